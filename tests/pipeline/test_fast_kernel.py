"""The decode kernels' library: only the file sift built is loaded, and a fallback is said once.

    .venv/bin/python -m pytest -q tests/pipeline/test_fast_kernel.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.io import progress
from pipeline.teachers import fast_kernel

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fast_kernel, "_loaded", {})
    monkeypatch.setattr(progress, "_noted", set())
    return tmp_path / "cache" / "kernels"


def _reload(monkeypatch: pytest.MonkeyPatch) -> fast_kernel.Kernels | None:
    monkeypatch.setattr(fast_kernel, "_loaded", {})
    return fast_kernel.load()


@needs_cc
def test_a_library_that_is_not_the_one_built_is_rebuilt_not_loaded(fresh: Path, monkeypatch, capsys) -> None:
    fast_kernel.load()
    (lib,) = fresh.glob("sift_kernels-*.so")
    record = lib.with_name(lib.name + ".sha256")
    assert record.read_text().strip() == fast_kernel._sha256(lib)
    built = lib.read_bytes()
    assert "note" not in capsys.readouterr().err
    other = lib.with_name("other.so")  # the same code with one byte more: a loadable library, not ours,
    other.write_bytes(built + b"\0")  # put in place by a rename (this process has the old file mapped)
    other.replace(lib)
    _reload(monkeypatch)
    err = capsys.readouterr().err
    assert err.count("sift: note:") == 1 and "does not match the sha256" in err and "rebuilding" in err
    assert lib.read_bytes() != built + b"\0" and fast_kernel._verified(lib)
    _reload(monkeypatch)  # the library sift built: loaded silently
    assert capsys.readouterr().err == ""
    record.unlink()  # a library with no record of sift building it (dropped there by someone else)
    assert not fast_kernel._verified(lib)


def test_a_failed_build_is_said_once(fresh: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    broken = tmp_path / "bin" / "cc"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert _reload(monkeypatch) is None and _reload(monkeypatch) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not build the decode kernels" in err[0]
    assert "cc: fatal error: cannot compile" in err[0] and "slower" in err[0]
