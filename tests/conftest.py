"""Shared test fixtures: paths to the repository and to ../shared."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE_SEEDS = SHARED / "data" / "self_instruct_seed_tasks.jsonl"
# names through which a test reads ../shared/data (the reference seeds and the user-oriented tasks)
_SHARED_NAMES = ("REFERENCE_SEEDS", "USER_ORIENTED", "SHARED", "load_seed_instructions", "reference_dedup")


def _reads_shared(item: pytest.Item) -> bool:
    """Whether a test's own source, or a fixture it uses, names the reference data."""
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else []):
        funcs.extend(d.func for d in defs)
    module = getattr(item, "module", None)
    for fn in list(funcs):  # and the module's own helpers they call, one level down
        for name in getattr(getattr(fn, "__code__", None), "co_names", ()):
            helper = getattr(module, name, None)
            if inspect.isfunction(helper) and helper.__module__ == getattr(module, "__name__", None):
                funcs.append(helper)
    for fn in funcs:
        try:
            src = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):
            continue
        if any(name in src for name in _SHARED_NAMES):
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside this project's layout (no ../shared/data next to the repository) the tests that read the
    reference data are skipped, saying why, instead of failing on a missing file."""
    if REFERENCE_SEEDS.is_file():
        return
    skip = pytest.mark.skip(reason=f"needs the reference data in {SHARED / 'data'} (next to the repository)")
    for item in items:
        if _reads_shared(item):
            item.add_marker(skip)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from an empty folder so runs/ lands in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIFT_RUNS_DIR", raising=False)
    return tmp_path
