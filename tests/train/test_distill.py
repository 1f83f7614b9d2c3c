"""sift train --distill.enabled: the loss against hand computation, the top-k cache, the tokenizer check,
and tiny-model runs (loss falls, zero KL against itself, the cache reused on resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.errors import SiftError
from pipeline.io.artifacts import write_jsonl
from tests.train.conftest import fine_tune, make_model, make_tokenizer
from train.distill import (
    IGNORE,
    build_topk,
    distill_loss,
    keep_mask,
    kept_logits,
    kl_full,
    kl_topk,
    next_tokens,
    tokenizer_differences,
)
from train.format import to_messages, tokenize_records
from train.packing import Collator, pack_rows

QA = [("what is the capital of france", "the capital of france is paris"),
      ("name a primary color", "red is a primary color"),
      ("translate hello to spanish", "hola"),
      ("give three tips for staying healthy", "eat vegetables sleep well and walk every day")]
FAST = {"precision": "fp32", "lr": 1e-2, "logging_steps": 1, "batch_size": 2, "grad_accum": 1, "save_steps": 2,
        "eval_steps": 100}


def _softmax(xs: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in xs)
    return [math.exp(x) / z for x in xs]


# ---------------------------------------------------------------- the loss, by hand


def test_loss_matches_a_hand_computed_kl_and_ce_on_a_toy_case() -> None:
    t, alpha = 2.0, 0.3
    s_logits, t_logits, target = [1.0, 2.0, 3.0], [3.0, 1.0, 0.0], 0
    q = _softmax([x / t for x in s_logits])
    p = _softmax([x / t for x in t_logits])
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    ce = -math.log(_softmax(s_logits)[target])
    # position 0 predicts a prompt token (ignored), position 1 predicts `target`, position 2 predicts nothing
    student = torch.tensor([[[9.0, -9.0, 0.0], s_logits, [5.0, 5.0, 5.0]]])
    teacher = torch.tensor([[[-9.0, 9.0, 0.0], t_logits, [0.0, 0.0, 9.0]]])
    labels = torch.tensor([[IGNORE, IGNORE, target]])
    mask = keep_mask(labels)
    assert mask.tolist() == [[False, True, False]] and next_tokens(labels, mask).tolist() == [target]
    student, teacher = student[mask], teacher[mask]
    terms = distill_loss(student, next_tokens(labels, mask), teacher_logits=teacher, temperature=t, alpha=alpha)
    assert terms.tokens == 1
    assert terms.kl_sum.item() == pytest.approx(kl, rel=1e-5)
    assert terms.ce_sum.item() == pytest.approx(ce, rel=1e-5)
    assert terms.loss.item() == pytest.approx(alpha * t * t * kl + (1 - alpha) * ce, rel=1e-5)
    assert kl > 0.1  # the case is not degenerate
    # num_items (tokens over accumulated micro-batches) is the normaliser when given
    half = distill_loss(student, next_tokens(labels, mask), teacher_logits=teacher, temperature=t, alpha=alpha,
                        num_items=2)
    assert half.loss.item() == pytest.approx(terms.loss.item() / 2, rel=1e-5)


def test_topk_keeps_the_teachers_top_tokens_and_one_tail_bucket() -> None:
    t = 1.5
    s_logits, t_logits = [0.5, 2.0, -1.0, 1.0], [2.0, 0.0, 1.0, -3.0]
    p, q = _softmax([x / t for x in t_logits]), _softmax([x / t for x in s_logits])
    keep = [0, 2]  # the teacher's top 2
    p_tail, q_tail = p[1] + p[3], q[1] + q[3]  # everything else, as one outcome
    expected = sum(p[i] * math.log(p[i] / q[i]) for i in keep) + p_tail * math.log(p_tail / q_tail)
    got = kl_topk(torch.tensor([s_logits]), torch.tensor([[math.log(p[0]), math.log(p[2])]]), torch.tensor([keep]),
                  torch.tensor([math.log(p_tail)]), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    full = kl_full(torch.tensor([s_logits]), torch.tensor([t_logits]), t).item()
    assert 0 < got.item() < full  # grouping the tail never raises the KL
    # with every token kept it is exactly the full KL
    every = kl_topk(torch.tensor([s_logits]), torch.tensor([[math.log(x) for x in p]]), torch.tensor([[0, 1, 2, 3]]),
                    torch.tensor([float("-inf")]), t)
    assert every.item() == pytest.approx(full, rel=1e-5)
    # and a student equal to the teacher costs nothing, whatever k
    same = kl_topk(torch.tensor([t_logits]), torch.tensor([[math.log(p[0]), math.log(p[2])]]), torch.tensor([keep]),
                   torch.tensor([math.log(p_tail)]), t)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_kl_compares_the_ids_both_models_have() -> None:
    """A student with one extra logit (a pad token added for training) against the teacher."""
    s, t = torch.tensor([[1.0, 0.0, 2.0, 7.0]]), torch.tensor([[1.0, 0.0, 2.0]])
    assert kl_full(s, t, 1.0).item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- on a tiny model


def _packed_batch(tokenizer) -> tuple[list[dict], dict]:
    from train.format import setup_tokenizer

    setup_tokenizer(tokenizer, "chat")
    records = [(f"t{i}", to_messages(q, "", a)) for i, (q, a) in enumerate(QA)]
    examples, _ = tokenize_records(tokenizer, records, max_length=64, overlong="drop")
    rows = pack_rows([{"input_ids": e.input_ids, "labels": e.labels} for e in examples], 40)
    assert len(rows) >= 2 and any(len(r["seq_lengths"]) > 1 for r in rows)  # really packed
    return rows, Collator(tokenizer.pad_token_id)(rows)


def _inputs(batch: dict) -> dict:
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


def _kept(model, batch: dict, *, compact: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return kept_logits(model, _inputs(batch), keep_mask(batch["labels"]), compact=compact)[0]


def test_kl_is_zero_against_itself_and_alpha_zero_is_the_models_own_loss(tokenizer) -> None:
    _, batch = _packed_batch(tokenizer)
    mask = keep_mask(batch["labels"])
    targets = next_tokens(batch["labels"], mask)
    student = make_model(len(tokenizer), seed=0)
    logits = _kept(student, batch)
    with torch.no_grad():
        full = student(**_inputs(batch)).logits
    assert torch.allclose(logits, full[mask], atol=1e-5)  # the LM head run at the kept positions only
    assert torch.allclose(_kept(student, batch, compact=False), logits, atol=1e-5)
    same = distill_loss(logits, targets, teacher_logits=logits.clone(), temperature=2.0, alpha=0.5)
    assert same.tokens > 10 and same.kl_sum.item() == pytest.approx(0.0, abs=1e-5)
    other_teacher = _kept(make_model(len(tokenizer), seed=1), batch)
    other = distill_loss(logits, targets, teacher_logits=other_teacher, temperature=2.0, alpha=0.5)
    assert other.kl_sum.item() > 1e-3  # a different teacher is not free
    plain = distill_loss(logits, targets, teacher_logits=other_teacher, temperature=2.0, alpha=0.0)
    with torch.no_grad():
        own = student(**_inputs(batch), labels=batch["labels"]).loss
    assert plain.loss.item() == pytest.approx(own.item(), rel=1e-5)


def test_topk_cache_with_k_equal_to_the_vocabulary_matches_the_teacher_on_the_fly(tokenizer) -> None:
    rows, _ = _packed_batch(tokenizer)
    collate = Collator(tokenizer.pad_token_id)
    teacher, student = make_model(len(tokenizer), seed=1), make_model(len(tokenizer), seed=0)
    topk = build_topk(teacher, rows, collate, k=len(tokenizer), temperature=2.0, batch_rows=1)
    assert int(topk.offsets[-1]) == sum(int(keep_mask(collate([r])["labels"]).sum()) for r in rows)
    order = [len(rows) - 1, 0]  # a batch in another order and width than the cache was built with
    batch = collate([rows[i] for i in order])
    targets = next_tokens(batch["labels"], keep_mask(batch["labels"]))
    s = _kept(student, batch)
    live = distill_loss(s, targets, teacher_logits=_kept(teacher, batch), temperature=2.0, alpha=0.7)
    cached = distill_loss(s, targets, teacher_topk=topk.for_rows(order), temperature=2.0, alpha=0.7)
    assert cached.tokens == live.tokens
    assert cached.kl_sum.item() == pytest.approx(live.kl_sum.item(), rel=1e-4)
    assert cached.loss.item() == pytest.approx(live.loss.item(), rel=1e-4)
    small = build_topk(teacher, rows, collate, k=3, temperature=2.0, batch_rows=2)
    assert small.logprobs.shape == (int(topk.offsets[-1]), 3)
    assert torch.equal(small.ids, topk.ids[:, :3])  # the k most likely, in order
    total = torch.logsumexp(torch.cat([small.logprobs, small.log_tail[:, None]], dim=1), dim=1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)  # top 3 and the tail hold all the mass
    kept = distill_loss(s, targets, teacher_topk=small.for_rows(order), temperature=2.0, alpha=0.7)
    assert 0 < kept.kl_sum.item() <= live.kl_sum.item() + 1e-5
    itself = build_topk(student, rows, collate, k=3, temperature=2.0, batch_rows=2)
    zero = distill_loss(s, targets, teacher_topk=itself.for_rows(order), temperature=2.0, alpha=0.7)
    assert zero.kl_sum.item() == pytest.approx(0.0, abs=1e-4)  # a student equal to its teacher, at k = 3


# ---------------------------------------------------------------- the tokenizer check


def test_tokenizer_differences_name_what_differs(tokenizer) -> None:
    assert tokenizer_differences(tokenizer, make_tokenizer()) == []
    shuffled = make_tokenizer(specials=["<|im_end|>", "<|im_start|>", "<|endoftext|>", "[UNK]"])
    diffs = tokenizer_differences(tokenizer, shuffled)
    assert any("tokens have other ids" in d and "'<|endoftext|>' is 0 vs 2" in d for d in diffs)
    assert any(d.startswith("EOS differs: '<|im_end|>' (id 2) vs '<|im_end|>' (id 0)") for d in diffs)


def _save_folder(folder: Path, tok, model=None) -> Path:
    """A model folder; without `model` only config.json and the tokenizer (no weights at all)."""
    from transformers import LlamaConfig

    (model.config if model is not None else LlamaConfig(vocab_size=len(tok))).save_pretrained(folder)
    if model is not None:
        model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
        model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _write_split(runs: Path, run: str) -> Path:
    d = runs / run
    write_jsonl(d / "train.jsonl", [{"id": f"t{i}", "messages": to_messages(q, "", a)} for i, (q, a) in
                                    enumerate(QA)])
    write_jsonl(d / "valid.jsonl", [{"id": "v0", "messages": to_messages(QA[0][0], "", QA[0][1])}])
    return d


def test_a_teacher_with_another_tokenizer_is_refused_before_any_weights_load(runs: Path, tmp_path: Path,
                                                                             tiny_model_dir: Path) -> None:
    _write_split(runs, "mismatch")
    other = make_tokenizer(specials=["<|im_end|>", "<|im_start|>", "<|endoftext|>", "[UNK]"])
    teacher = _save_folder(tmp_path / "weightless-teacher", other)  # loading its weights would fail differently
    with pytest.raises(SiftError) as e:
        fine_tune("mismatch", tiny_model_dir, distill={"enabled": True, "teacher": str(teacher)}, **FAST)
    msg = str(e.value)
    assert e.value.field == "distill.teacher"
    assert str(teacher) in msg and str(tiny_model_dir) in msg and "do not share a tokenizer" in msg
    assert "EOS differs" in msg
    assert not (runs / "mismatch" / "student" / "metrics.jsonl").exists()


def test_distillation_without_a_teacher_is_one_clear_error(runs: Path, tiny_model_dir: Path) -> None:
    _write_split(runs, "bad")
    with pytest.raises(SiftError) as e:
        fine_tune("bad", tiny_model_dir, distill={"enabled": True}, **FAST)
    assert e.value.field == "distill.teacher"
    assert not (runs / "bad" / "student").exists()


@pytest.mark.parametrize(("flag", "value"), [("alpha", "1.5"), ("temperature", "0"), ("top_k", "-1")])
def test_bad_distill_settings_are_one_clear_error(runs: Path, capsys: pytest.CaptureFixture, flag: str,
                                                  value: str) -> None:
    from pipeline.cli import main

    _write_split(runs, "bad")
    assert main(["train", "--run", "bad", "--distill.enabled", "--distill.teacher", "x",
                 f"--distill.{flag}", value]) == 2
    assert f"field 'distill.{flag}'" in capsys.readouterr().err
    assert not (runs / "bad" / "student").exists()


# ---------------------------------------------------------------- runs


def _metrics(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "student" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def taught_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer with other weights, fully fine-tuned on QA for a few steps: a teacher
    that knows the answers and is sure of them, as a real teacher is."""
    tok = make_tokenizer()
    _, batch = _packed_batch(make_tokenizer())
    model = make_model(len(tok), seed=1).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(25):
        loss = model(**_inputs(batch), labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0
    return _save_folder(tmp_path_factory.mktemp("teacher") / "tiny-teacher", tok, model.eval())


def test_distillation_run_lowers_its_loss_and_records_its_settings(runs: Path, tiny_model_dir: Path,
                                                                   taught_teacher: Path) -> None:
    d = _write_split(runs, "distil")
    # rows of 32 tokens, two micro-batches a step: kl and ce are weighted by tokens as the loss is
    fine_tune("distil", tiny_model_dir, distill={"enabled": True, "teacher": str(taught_teacher),
                                                 "temperature": 2.0, "alpha": 0.8},
              epochs=10, **{**FAST, "max_length": 32, "batch_size": 1, "grad_accum": 2})
    config = json.loads((d / "student" / "train_config.json").read_text())
    assert config["resolved"]["accumulation_steps"] == 2 and config["data"]["packed_rows"] >= 3
    entries = [e for e in _metrics(d) if e["kind"] == "train"]
    assert len(entries) >= 10 and all({"kl", "ce", "mean_token_accuracy"} <= set(e) for e in entries)
    for e in entries:
        assert e["loss"] == pytest.approx(0.8 * 2.0 ** 2 * e["kl"] + 0.2 * e["ce"], rel=1e-4)
    assert entries[0]["kl"] > 1.0  # the teacher is far from the untrained student
    # measured 7.68 -> 6.67 and 2.14 -> 1.87: a tiny student with a frozen lm_head moves slowly
    assert entries[-1]["loss"] < 0.9 * entries[0]["loss"]
    assert entries[-1]["kl"] < 0.93 * entries[0]["kl"]  # the student moves towards the teacher
    assert config["distill"] == {"enabled": True, "teacher": str(taught_teacher), "teacher_resolved": "tiny-teacher",
                                 "temperature": 2.0, "alpha": 0.8, "top_k": 0, "cache": None, "cache_reused": None}
    assert (d / "student" / "adapter_model.safetensors").is_file()


def test_a_teacher_equal_to_the_student_starts_at_zero_kl(runs: Path, tiny_model_dir: Path) -> None:
    """LoRA starts as the identity, so before the first update student and teacher agree exactly:
    the teacher got the same packed ids and positions as the student."""
    d = _write_split(runs, "self")
    fine_tune("self", tiny_model_dir, distill={"enabled": True, "teacher": str(tiny_model_dir)}, max_steps=2, **FAST)
    first = next(e for e in _metrics(d) if e["kind"] == "train")
    assert first["step"] == 1 and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["ce"] > 1.0


def test_the_topk_cache_is_built_once_and_reused_on_resume(runs: Path, tiny_model_dir: Path, taught_teacher: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    d = _write_split(runs, "cached")
    teacher = {"enabled": True, "teacher": str(taught_teacher)}
    common = {"student": tiny_model_dir, **FAST}
    fine_tune("cached", distill={**teacher, "top_k": 5}, max_steps=2, **common)
    assert "cached in" in capsys.readouterr().out
    caches = list((d / "student" / "teacher_topk").glob("topk-*.safetensors"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    fine_tune("cached", distill={**teacher, "top_k": 5}, max_steps=4, resume=True, **common)
    assert "reusing the teacher top-5 cache" in capsys.readouterr().out
    assert caches[0].stat().st_mtime_ns == stamp and list(caches[0].parent.iterdir()) == caches
    steps = [e for e in _metrics(d) if e["kind"] == "train"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(e["loss"]) and e["kl"] > 0 for e in steps)
    config = json.loads((d / "student" / "train_config.json").read_text())
    assert config["distill"]["cache_reused"] is True and config["distill"]["top_k"] == 5
    # another temperature is another cache
    fine_tune("cached", distill={**teacher, "top_k": 5, "temperature": 1.0}, max_steps=1, **common)
    assert "cached in" in capsys.readouterr().out
    # with k = the vocabulary, the cached run's first step is the on-the-fly run's first step
    for run, k in (("full", len(make_tokenizer())), ("live", 0)):
        _write_split(runs, run)
        fine_tune(run, distill={**teacher, "top_k": k}, max_steps=1, **common)
    a, b = (next(e for e in _metrics(runs / r) if e["kind"] == "train") for r in ("full", "live"))
    assert a["kl"] == pytest.approx(b["kl"], rel=1e-4) and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
