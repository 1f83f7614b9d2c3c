"""A base model (no chat template) as the student: Alpaca's template is chosen, said, saved and reused.

    .venv/bin/python -m pytest tests/train/test_base_student.py

The student is a tiny random Gemma 3 written as a GGUF without a chat template
(tests/pipeline/tiny_gguf.py) and converted as `sift` converts any GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.io.artifacts import write_jsonl
from pipeline.io.models import resolve_model
from pipeline.settings import StudentSettings
from pipeline.stages.sample import load_student, sample
from tests.pipeline.tiny_gguf import make_tiny_gemma_gguf
from tests.train.conftest import fine_tune
from train.format import alpaca_chat_template, prompt_ids, to_messages

QA = [("Name a color.", "Red is a color."), ("Give three tips for staying healthy.", "Eat, sleep, walk."),
      ("Translate hello to Spanish.", "Hola.")]


@pytest.fixture(scope="module")
def base_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path, _ = make_tiny_gemma_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3-base.gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return Path(resolve_model(str(path)).path_or_id)


def test_a_base_student_trains_on_the_alpaca_template_and_sample_uses_it(
        base_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    d = tmp_path / "runs" / "base"
    records = [{"id": f"t{i}", "messages": to_messages(q, "", a)} for i, (q, a) in enumerate(QA)]
    write_jsonl(d / "train.jsonl", records)
    write_jsonl(d / "valid.jsonl", records[:1])
    fine_tune("base", base_student, max_steps=2, batch_size=2, grad_accum=1, eval_steps=1, save_steps=2,
              precision="fp32", logging_steps=1)
    out = capsys.readouterr().out
    assert f"train: {base_student} has no chat template (a base model): using --train.template alpaca" in out
    config = json.loads((d / "student" / "train_config.json").read_text())
    assert config["template"] == "alpaca" and config["pad_token"] == "<pad>" and config["eos_token"] == "<eos>"

    model, tokenizer, _ = load_student("base", student=StudentSettings(device="cpu"))  # what `sift sample` loads
    assert tokenizer.chat_template == alpaca_chat_template()
    text = tokenizer.decode(prompt_ids(tokenizer, [{"role": "user", "content": "Name a color."}]))
    assert text == ("<bos>Below is an instruction that describes a task. Write a response that appropriately "
                    "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n")
    sample("Name a color.", run="base", max_new_tokens=4)
    assert capsys.readouterr().out.strip()  # an answer, or the no-EOS note: the base student generated


def test_asking_for_chat_on_a_base_student_is_a_clear_error(base_student: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.errors import SiftError

    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    write_jsonl(tmp_path / "runs" / "chat" / "train.jsonl",
                [{"id": "t0", "messages": to_messages(QA[0][0], "", QA[0][1])}])
    with pytest.raises(SiftError, match="template.*no chat template; use alpaca"):
        fine_tune("chat", base_student, template="chat", max_steps=1)
