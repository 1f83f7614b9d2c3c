"""`sift eval` without --eval.base compares the student with its own base, not with SmolLM2.

    .venv/bin/python -m pytest -q tests/train/test_eval_base.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.artifacts import write_jsonl
from pipeline.settings import EvalSettings, StudentSettings
from pipeline.stages.eval import evaluate, student_base_of
from tests.train.conftest import fine_tune
from train.format import to_messages

QA = [("what is the capital of france", "the capital of france is paris"), ("name a primary color", "red")]


def test_eval_defaults_to_the_students_own_base(runs: Path, tiny_model_dir: Path) -> None:
    rows = [{"id": f"t{i}", "messages": to_messages(q, "", a)} for i, (q, a) in enumerate(QA)]
    write_jsonl(runs / "e" / "train.jsonl", rows)
    write_jsonl(runs / "e" / "valid.jsonl", rows)
    fine_tune("e", tiny_model_dir, max_steps=1, batch_size=2, grad_accum=1, precision="fp32")
    evaluate(run="e", student=StudentSettings(device="cpu", dtype="float32"),
             eval=EvalSettings(limit=2, max_new_tokens=4))
    result = json.loads((runs / "e" / "eval.json").read_text())
    text = json.dumps(result)
    assert "smollm2" not in text.lower()  # the embedded model was never the comparison
    entry = result["valid"]  # eval.json: one entry per eval set
    assert entry["base"]["model"] == tiny_model_dir.name
    assert entry["settings"]["base"] == entry["settings"]["student_base"] == str(tiny_model_dir)


def test_without_train_config_the_adapter_config_names_the_base(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/qwen-0.5b"}))
    assert student_base_of(tmp_path) == "/models/qwen-0.5b"
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None}))
    assert student_base_of(tmp_path, "given") == "given"
    with pytest.raises(SiftError, match="pass --eval.base"):
        student_base_of(tmp_path)
