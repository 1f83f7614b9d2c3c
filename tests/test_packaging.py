"""The wheel ships what an installed sift needs at run time: every prompt template, the general eval set."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO


def test_the_wheel_carries_every_prompt(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("sift_instruct-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    prompts = {f"prompts/{p.name}" for p in (REPO / "prompts").iterdir() if p.suffix in (".txt", ".jinja")}
    assert prompts and prompts <= names
    assert "pipeline/cli.py" in names and "filters/rouge.py" in names and "train/lora.py" in names
    assert "train/evalsets/general.jsonl" in names  # the general held-out set train/general_set.py loads
    viewer = REPO / "pipeline" / "views" / "viewer"
    pages = {p.relative_to(REPO).as_posix() for d in ("templates", "static") for p in (viewer / d).iterdir()}
    assert pages and pages <= names  # sift view's templates, script and style
