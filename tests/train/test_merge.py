"""sift merge --output: it replaces only a previous merge output (or an empty folder) unless --force.

    .venv/bin/python -m pytest -q tests/train/test_merge.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import SiftError
from pipeline.io.artifacts import write_jsonl
from pipeline.stages.merge import MARKER, merge
from tests.train.conftest import fine_tune
from train.format import to_messages

QA = [("what is the capital of france", "the capital of france is paris"), ("name a primary color", "red")]


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIFT_RUNS_DIR", str(runs))
        write_jsonl(runs / "m" / "train.jsonl",
                    [{"id": f"t{i}", "messages": to_messages(q, "", a)} for i, (q, a) in enumerate(QA)])
        fine_tune("m", tiny_model_dir, max_steps=1, batch_size=2, grad_accum=1, precision="fp32")
        yield runs


def test_an_existing_folder_with_a_file_is_refused_and_left_alone(student: Path, tmp_path: Path, capsys) -> None:
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["merge", "--run", "m", "--output", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "not a previous `sift merge` output" in err and "--force" in err and str(mine) in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SiftError, match="a file, not a folder"):
        merge(run="m", output=str(tmp_path / "a-file"))
    assert (tmp_path / "a-file").read_text() == "x"


def test_a_previous_merge_is_replaced_and_force_replaces_anything(student: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    merge(run="m", output=str(out))
    assert (out / MARKER).is_file() and (out / "config.json").is_file()
    (out / "stale.bin").write_text("old")
    merge(run="m", output=str(out))  # a previous merge output: replaced whole
    assert not (out / "stale.bin").exists() and (out / MARKER).is_file()
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("x")
    merge(run="m", output=str(other), force=True)
    assert not (other / "x").exists() and (other / MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    merge(run="m", output=str(empty))
    assert (empty / MARKER).is_file()


def test_the_run_itself_is_never_a_target_even_with_force(student: Path) -> None:
    for target in (student / "m", student, student / "m" / "student"):
        with pytest.raises(SiftError, match="holds the adapter"):
            merge(run="m", output=str(target), force=True)
    assert (student / "m" / "student" / "adapter_model.safetensors").is_file()


def test_merge_takes_the_run_lock(student: Path) -> None:
    import fcntl
    import os

    fd = os.open(student / "m" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process holds the run
        import subprocess
        import sys

        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "merge", "--run", "m"], capture_output=True,
                           text=True, env={**os.environ, "SIFT_RUNS_DIR": str(student)}, timeout=120)
    finally:
        os.close(fd)
    assert r.returncode == 2 and "another sift process" in r.stderr
    assert not (student / "m" / "merged").exists()
