"""Every file sift reads is a regular file of bounded size and line length (#25.16, #25.12).

`sift inspect /dev/zero` grew to 17 GB, `sift inspect FIFO` hung, and every other reader had the
same reader under it. Each case runs in a child process with its address space capped at 2 GiB
(so the old unbounded read ends in MemoryError there, not in the test machine's OOM killer) and an
alarm that turns a blocked open into an error, so a regression fails instead of hanging the suite.

    .venv/bin/python -m pytest -q tests/pipeline/test_file_limits.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from tests.conftest import REPO

CHILD = r"""
import json, resource, signal, sys
from pathlib import Path

resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


def blocked(*_):
    raise TimeoutError("blocked")


signal.signal(signal.SIGALRM, blocked)
from pipeline.errors import SiftError
from pipeline.io import artifacts
from pipeline.teachers import prompts, specs
from train import eval_sets

READERS = {
    "iter_jsonl": lambda p: list(artifacts.iter_jsonl(p)),
    "read_records": artifacts.read_records,
    "read_json": artifacts.read_json,
    "teachers file": specs.read_teachers_file,
    "prompt file": prompts.load,
    "eval file": eval_sets.load_heldout,
}
out = {}
for name in sys.argv[2:]:
    signal.alarm(120)  # only ever reached by a read that blocks; a refusal is immediate
    try:
        READERS[name](Path(sys.argv[1]))
        out[name] = "read"
    except SiftError as e:
        out[name] = "SiftError: " + str(e)
    except BaseException as e:
        out[name] = type(e).__name__
    finally:
        signal.alarm(0)
print(json.dumps(out))
"""
READERS = ["iter_jsonl", "read_records", "read_json", "teachers file", "prompt file", "eval file"]


def _outcomes(path: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), *READERS], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    return path


def test_every_reader_refuses_a_device(tmp_path: Path) -> None:
    out = _outcomes(Path("/dev/zero"))
    assert out == {name: "SiftError: /dev/zero: is not a regular file (a pipe, device or socket); give a file"
                   for name in READERS}


def test_every_reader_refuses_a_fifo_without_waiting(fifo: Path) -> None:
    out = _outcomes(fifo)
    assert out == {name: f"SiftError: {fifo}: is not a regular file (a pipe, device or socket); give a file"
                   for name in READERS}


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SIFT_RUNS_DIR", None)
    code = ("import resource, signal, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "signal.alarm(300); from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=1200)


@pytest.mark.parametrize("args", [
    ["inspect", "/dev/zero"],
    ["inspect", "{fifo}"],
    ["inspect", "{ok}", "--against", "/dev/zero"],
    ["inspect", "{ok}", "--against", "{fifo}"],
    ["seeds", "/dev/zero", "--run", "r"],
    ["filter", "{ok}", "-o", "{tmp}/out.jsonl", "--decontaminate", "/dev/zero"],
    ["filter", "{ok}", "-o", "{tmp}/out.jsonl", "--seeds", "{fifo}"],
])
def test_commands_refuse_a_device_or_a_fifo(tmp_path: Path, fifo: Path, args: list[str]) -> None:
    """The hostile cases of #25.16 on the real command line: one line, exit 2, nothing written."""
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"id": "a", "instruction": "Name a colour.", "input": "", "output": "Blue."}\n')
    argv = [a.format(fifo=fifo, ok=ok, tmp=tmp_path) for a in args]
    r = _cli(argv, tmp_path)
    assert r.returncode == 2, r.stderr
    assert "is not a regular file" in r.stderr and "internal error" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.jsonl", "pipe.jsonl"]


def test_lines_and_documents_are_read_within_their_limits(tmp_path: Path) -> None:
    from pipeline.io.files import iter_lines, read_bounded

    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"a": 1}\n' + b"x" * 100 + b"\n" + b"never reached\n")
    lines = iter_lines(path, 64)
    assert next(lines) == (1, b'{"a": 1}')
    with pytest.raises(SiftError, match=r"long.jsonl:2: line longer than 64 bytes"):
        next(lines)
    assert read_bounded(path, 200) == path.read_bytes()
    with pytest.raises(SiftError, match=r"long.jsonl: is larger than 64 bytes"):
        read_bounded(path, 64)


def test_inspect_refuses_a_negative_sample_in_its_own_function(tmp_path: Path) -> None:
    """--sample -3 ended in an internal ValueError from random.sample."""
    from pipeline.views.inspect import inspect_artifact

    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "Name a colour."}\n')
    with pytest.raises(SiftError, match=r"field 'sample': must be >= 0, got -3"):
        inspect_artifact(str(path), sample=-3)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_inspect_refuses_a_100000_deep_line(tmp_path: Path, suffix: str) -> None:
    from pipeline.views.inspect import inspect_artifact

    path = tmp_path / f"deep{suffix}"
    deep = '{"instruction": "x", "input": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path.write_text(f"[{deep}]" if suffix == ".json" else deep + "\n")
    with pytest.raises(SiftError, match="nested deeper than 64 levels") as e:
        inspect_artifact(str(path))
    assert e.value.field == ("[0]" if suffix == ".json" else "input")
