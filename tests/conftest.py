"""Shared test fixtures: paths to the repository and to ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE_SEEDS = SHARED / "data" / "self_instruct_seed_tasks.jsonl"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the test from an empty folder so runs/ lands in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SIFT_RUNS_DIR", raising=False)
    return tmp_path
