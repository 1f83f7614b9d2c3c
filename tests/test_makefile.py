"""The Makefile's contract, checked with make itself and a stand-in for `sift`.

- A stage reruns when its effective settings change (`make generate N=200` after N=100), and only then.
- A command that fails (refused by the run lock, say) never costs another process its artifact: make
  must not delete a target that someone else wrote while the failing recipe ran.
- `make test` fails when pytest collects nothing.

The stand-in prints its arguments for `--print-config` (as the real one prints the settings they
give) and otherwise does what each test scripts, logging every real run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")

FAKE = """#!{python}
import os, sys
from pathlib import Path
args = sys.argv[1:]
if "--print-config" in args:
    print(" ".join(a for a in args if a != "--print-config"))
    sys.exit(0)
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args) + "\\n")
stage, run = args[0], args[args.index("--run") + 1].strip("'")
target = Path("runs") / run / "instructions.jsonl"
mode = os.environ.get("FAKE_MODE", "ok")
if mode == "refused":
    # another sift process, holding the run lock, finishes its artifact while this one is refused
    target.write_text("written by the lock holder\\n")
    print("sift: error: another sift process is using this run directory", file=sys.stderr)
    sys.exit(2)
target.write_text(" ".join(args) + "\\n")
"""


def _setup(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "fake-sift"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    old = time.time() - 100
    for name in ("pyproject.toml", "stamp-setup", "stamp-model"):  # set-up done, in make's order
        (tmp_path / name).touch()
        os.utime(tmp_path / name, (old, old))
        old += 1
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("{}\n")
    run = tmp_path / "runs" / "d"
    run.mkdir(parents=True)
    os.utime(seeds, (old, old))
    (run / "seeds.jsonl").write_text("{}\n")
    return {**os.environ, "FAKE_LOG": str(tmp_path / "log")}


def _make(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-f", str(REPO / "Makefile"), "--no-print-directory", "generate", "RUN=d",
         f"SIFT={tmp_path / 'fake-sift'}", f"SETUP={tmp_path / 'stamp-setup'}", f"MODEL={tmp_path / 'stamp-model'}",
         f"SEEDS={tmp_path / 'seeds.jsonl'}", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _runs(tmp_path: Path) -> list[str]:
    log = tmp_path / "log"
    return log.read_text().splitlines() if log.exists() else []


def test_a_stage_reruns_when_its_settings_change_and_only_then(tmp_path: Path) -> None:
    env = _setup(tmp_path)
    assert _make(tmp_path, env, "N=100").returncode == 0
    assert _make(tmp_path, env, "N=100").returncode == 0
    assert len(_runs(tmp_path)) == 1, _runs(tmp_path)
    assert _make(tmp_path, env, "N=200").returncode == 0
    runs = _runs(tmp_path)
    assert len(runs) == 2 and "--generate.n 200" in runs[-1], runs
    assert _make(tmp_path, env, "N=200").returncode == 0
    assert len(_runs(tmp_path)) == 2


def test_a_refused_command_leaves_the_lock_holders_artifact(tmp_path: Path) -> None:
    env = _setup(tmp_path)
    done = _make(tmp_path, {**env, "FAKE_MODE": "refused"})
    assert done.returncode != 0
    assert "Deleting file" not in done.stderr, done.stderr
    assert (tmp_path / "runs" / "d" / "instructions.jsonl").read_text() == "written by the lock holder\n"


def test_make_test_fails_when_no_test_is_collected(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "stamp-setup", "stamp-model"):
        (tmp_path / name).touch()
        time.sleep(0.01)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    done = subprocess.run(["make", "-f", str(REPO / "Makefile"), "--no-print-directory", "test",
                           f"SETUP={tmp_path / 'stamp-setup'}", f"MODEL={tmp_path / 'stamp-model'}",
                           f"PY={venv / 'python'}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, done.stdout + done.stderr
