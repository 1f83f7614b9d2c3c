"""`sift loop` answers through the fast engine of `sift eval` (the student merged), and falls back to
`model.generate` for a model the engine does not run: in float32 greedy both give the plain path's
answers (the PEFT model, batched `generate`), but for true ties."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.io.artifacts import write_jsonl
from pipeline.llm2llm import augment as llm2llm
from pipeline.settings import StudentSettings
from pipeline.stages.loop import score_examples
from pipeline.teachers.prompts import load
from tests.pipeline.test_fast_decode import first_divergence_is_a_tie
from tests.train.conftest import fine_tune, make_tokenizer
from train.format import prompt_ids, to_messages

QUESTIONS = ["what is the capital of france", "name a primary color", "translate hello to spanish",
             "give three tips for staying healthy", "summarize the text below", "a short story about a cat",
             "what is the capital", "name a color", "eat vegetables", "walk every day"]


def _student(runs: Path, base: Path) -> Path:
    d = runs / "r"
    write_jsonl(d / "train.jsonl", [{"id": f"t{i}", "messages": to_messages(q, "", "red is a primary color")}
                                    for i, q in enumerate(QUESTIONS[:4])])
    fine_tune("r", base, max_steps=3, batch_size=4, grad_accum=1, precision="fp32", lr=1e-2)
    return d


def _unsupported_base(folder: Path) -> Path:
    """A tiny Llama with attention biases: the fast engine does not run it (`supports` is False)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, attention_bias=True, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("engine", ["fast", "fallback"])
def test_loop_answers_equal_the_plain_path_in_float32(runs: Path, tiny_model_dir: Path, tmp_path: Path,
                                                      engine: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoTokenizer

    from train.eval_passes import fast_supported, greedy_answers, load_side

    base = tiny_model_dir if engine == "fast" else _unsupported_base(tmp_path / "biased")
    d = _student(runs, base)
    student = StudentSettings(model=str(base), device="cpu", dtype="float32")
    rows = [{"id": f"q{i}", "instruction": q, "input": "", "output": "red", "messages": to_messages(q, "", "red")}
            for i, q in enumerate(QUESTIONS)]
    capsys.readouterr()
    monkeypatch.setenv("SIFT_PROGRESS", "1")  # the fast engine's pass shows its own bar, `generate` none
    scored = score_examples(d, rows, student=student, metric="rouge", max_new_tokens=10, batch_size=4,
                            teacher=lambda: None, grade_template=load(llm2llm.GRADE_PROMPT))  # type: ignore[arg-type]
    assert ("loop answers" in capsys.readouterr().err) is (engine == "fast")
    tok = AutoTokenizer.from_pretrained(str(d / "student"))
    assert fast_supported(load_side(str(base), tok, d / "student", student=student)) is (engine == "fast")
    plain_model = load_side(str(base), tok, d / "student", student=student, merge=False)
    plain = greedy_answers(plain_model, tok, rows, max_new_tokens=10, batch_size=4)
    assert [s["id"] for s in scored] == [r["id"] for r in rows]
    differing = [i for i, (s, p) in enumerate(zip(scored, plain, strict=True)) if s["answer"] != p["text"]]
    assert len(differing) <= 1, differing  # float32 sums round alike but for the odd true tie
    for i in differing:
        ids = [tok(x["answer" if x is scored[i] else "text"], add_special_tokens=False)["input_ids"]
               for x in (scored[i], plain[i])]
        assert first_divergence_is_a_tie(plain_model, prompt_ids(tok, rows[i]["messages"][:-1]), *ids, tol=1e-3)
    for s, p in zip(scored, plain, strict=True):
        if s["answer"] == p["text"]:
            assert (s["stopped"], s["tokens"]) == (p["stopped"], p["tokens"])
