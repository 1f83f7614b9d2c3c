"""`sift train --train.warmup_ratio` reaches transformers as a share of the steps, not as a step count.

    .venv/bin/python -m pytest -q tests/train/test_warmup.py

pipeline/stages/train.py passes the ratio as `warmup_steps`, which transformers reads as a ratio when below 1
from version 5 on (in 4.x it meant 0.03 steps, i.e. no warmup). So the project must require 5.x.
"""

from __future__ import annotations

from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO


def test_pyproject_requires_a_transformers_that_reads_warmup_steps_below_1_as_a_ratio() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "transformers"]
    assert not spec.contains(Version("4.57.6")), f"transformers{spec} still admits 4.x"
    assert spec.contains(Version("5.2.0")) and spec.contains(Version("5.25.0"))


def test_the_trainer_gets_the_ratio_as_warmup_steps(tmp_path: Path) -> None:
    from pipeline.settings import TrainSettings
    from pipeline.stages.train import Data, sft_args
    from train.format import TokenStats

    data = Data([], [], TokenStats(), TokenStats(), rows=[], per_device=8, accum=4)
    args = sft_args(tmp_path, TrainSettings(warmup_ratio=0.1), data, precision="fp32", cuda=False)
    assert args.warmup_steps == 0.1 and args.get_warmup_steps(1000) == 100


def test_the_installed_trainer_turns_the_ratio_into_a_share_of_steps(tmp_path: Path) -> None:
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), warmup_steps=0.03, use_cpu=True, report_to="none")
    assert args.get_warmup_steps(1000) == 30 and args.get_warmup_steps(10) == 1
    assert SFTConfig(output_dir=str(tmp_path), warmup_steps=5, use_cpu=True, report_to="none").get_warmup_steps(
        1000) == 5
