"""`sift clean` and `make clean`: one run folder goes, and a run name that is a path is refused.

    .venv/bin/python -m pytest -q tests/pipeline/test_clean.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import REPO


def _runs(root: Path) -> Path:
    for name in ("a", "b"):
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "seeds.jsonl").write_text("{}\n")
        (root / "runs" / name / "manifest.json").write_text("{}\n")  # what makes a folder a run
    (root / "keep.txt").write_text("keep")
    return root / "runs"


@pytest.mark.parametrize("bad", ["..", "", ".", "a/..", "/", "../x"])
def test_sift_clean_refuses_a_run_name_that_is_a_path(in_tmp: Path, bad: str, capsys) -> None:
    runs = _runs(in_tmp)
    assert main(["clean", "--run", bad]) == 2
    assert "field 'run'" in capsys.readouterr().err
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b"] and (in_tmp / "keep.txt").exists()


def test_sift_clean_removes_one_run_only(in_tmp: Path, capsys) -> None:
    runs = _runs(in_tmp)
    assert main(["clean", "--run", "a"]) == 0
    assert [p.name for p in runs.iterdir()] == ["b"]
    assert main(["clean", "--run", "a"]) == 0 and "nothing to do" in capsys.readouterr().out


def test_sift_clean_leaves_a_run_another_process_holds(in_tmp: Path, capsys) -> None:
    import fcntl

    runs = _runs(in_tmp)
    fd = os.open(runs / "a" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "clean", "--run", "a"], cwd=in_tmp,
                           capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                                            if k != "SIFT_RUNS_DIR"})
    finally:
        os.close(fd)
    assert r.returncode == 2 and "another sift process" in r.stderr
    assert (runs / "a" / "seeds.jsonl").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(("run", "removed"), [("..", None), ("", None), ("a/b", None), ("a", "a")])
def test_make_clean_validates_the_run_name(tmp_path: Path, run: str, removed: str | None) -> None:
    """The repository's Makefile, run in a scratch folder (so a broken rule could only hurt tmp_path)."""
    runs = _runs(tmp_path)
    (runs / "a" / "b").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "SIFT_RUNS_DIR"}
    r = subprocess.run(["make", "--no-print-directory", "-f", str(REPO / "Makefile"), "clean", f"RUN={run}",
                        f"VENV={REPO / '.venv'}"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    left = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    assert (tmp_path / "keep.txt").read_text() == "keep"
    if removed is None:
        assert r.returncode != 0 and "must be a plain name" in r.stderr, r.stderr
        assert left == ["a", "b"] and (runs / "a" / "b").is_dir()
    else:
        assert r.returncode == 0, r.stderr
        assert left == ["b"]


def test_sift_clean_refuses_a_folder_sift_did_not_make_a_run(in_tmp: Path, monkeypatch, capsys) -> None:
    """#25.18: with SIFT_RUNS_DIR= the current folder was the runs folder, and `clean --run victimdir`
    removed any folder there. An empty SIFT_RUNS_DIR is refused; a folder with neither the run marker nor
    manifest.json is never deleted, even under the runs folder."""
    victim = in_tmp / "victimdir"
    victim.mkdir()
    (victim / "data.txt").write_text("precious\n")
    monkeypatch.setenv("SIFT_RUNS_DIR", "")
    assert main(["clean", "--run", "victimdir"]) == 2
    assert "SIFT_RUNS_DIR" in capsys.readouterr().err
    monkeypatch.setenv("SIFT_RUNS_DIR", str(in_tmp))
    assert main(["clean", "--run", "victimdir"]) == 2
    assert "not a sift run folder" in capsys.readouterr().err
    assert (victim / "data.txt").read_text() == "precious\n"


def test_a_run_folder_sift_creates_is_marked_and_sift_clean_removes_it(in_tmp: Path, monkeypatch) -> None:
    from pipeline.io.runs import RUN_MARKER, locked, run_dir

    monkeypatch.delenv("SIFT_RUNS_DIR", raising=False)
    d = run_dir("fresh")
    with locked(d):
        (d / "notes.txt").write_text("a stage's output\n")
    assert (d / RUN_MARKER).is_file()
    assert main(["clean", "--run", "fresh"]) == 0 and not d.exists()
