"""sift eval's sets, intervals and fast passes: the paired bootstrap on cases with a known answer,
eval.json keeping every set across runs, the forgetting flag, judging in both orders, and the fast
path (merged LoRA, fast engine, length-sorted NLL) against the plain one on a tiny Llama in float32."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.settings import EvalSettings
from tests.train.test_evaluate import CPU32, ROWS, ScriptedJudge, _items, _make_run, _write_jsonl
from train.eval_sets import merge_sets, read_sets, resolve_sets, set_name
from train.eval_stats import MIN_EXAMPLES, findings, mean_interval, paired_bootstrap

# ---------------------------------------------------------------- the bootstrap


def test_paired_bootstrap_constant_shift_has_a_point_interval() -> None:
    """Every example moves by exactly 0.25: every resample's difference is 0.25."""
    rng = random.Random(0)
    base = [rng.gauss(0, 3) for _ in range(50)]
    low, high = paired_bootstrap(base, [b + 0.25 for b in base])
    assert low == pytest.approx(0.25, abs=1e-12) and high == pytest.approx(0.25, abs=1e-12)


def test_paired_bootstrap_matches_the_normal_interval_of_a_large_sample() -> None:
    """n = 2000 paired differences ~ N(0.1, 1): the interval is mean +- 1.96 sd / sqrt(n) (the
    percentile bootstrap converges to it; 2000 resamples put the ends within about 5% of the width)."""
    rng = random.Random(1)
    base = [rng.gauss(5, 2) for _ in range(2000)]
    diffs = [rng.gauss(0.1, 1) for _ in range(2000)]
    student = [b + d for b, d in zip(base, diffs, strict=True)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = 1.96 * sd / math.sqrt(len(diffs))
    low, high = paired_bootstrap(base, student, seed=3)
    assert low == pytest.approx(mean - half, abs=0.1 * half)
    assert high == pytest.approx(mean + half, abs=0.1 * half)


def test_weighted_bootstrap_is_a_ratio_of_sums() -> None:
    """Token-weighted NLL: one example of 1 token and one of 99; the difference of the pooled means
    is dominated by the long example, and resampling only ever mixes the two."""
    base, student, tokens = [10.0, 99.0], [10.0, 198.0], [1, 99]  # per-token NLL 10 -> 10 and 1 -> 2
    low, high = paired_bootstrap(base, student, base_weights=tokens, student_weights=tokens)
    assert 0 <= low <= high <= 1.0  # between "only the short one" (0) and "only the long one" (+1)
    assert high == pytest.approx(1.0)  # a resample of the long example twice


def test_win_rate_interval_of_a_fair_coin() -> None:
    scores = [1.0, 0.0] * 200  # 400 games, half won: sd of the mean 0.025
    low, high = mean_interval(scores)
    assert low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.01) and high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.01)
    assert mean_interval([]) is None


# ---------------------------------------------------------------- findings in words


def _entry(n: int, nll: tuple[float, float] | None, win: tuple[float, float] | None = None) -> dict:
    ci, delta = {}, {}
    if nll:
        ci["nll"], delta["nll"] = list(nll), sum(nll) / 2
    if win:
        ci["judge_win_rate"], delta["judge_win_rate"] = list(win), sum(win) / 2
    return {"examples": n, "ci95": ci, "delta": delta}


def test_forgetting_is_flagged_on_general_only_when_significant() -> None:
    worse = findings("general", _entry(150, (0.05, 0.20)))
    assert any(line.startswith("the student forgot: NLL of the references rose by +0.125") for line in worse)
    assert not any("forgot" in line for line in findings("general", _entry(150, (-0.05, 0.20))))  # holds zero
    judged = findings("general", _entry(150, (-0.3, -0.1), win=(-0.30, -0.10)))
    assert any("forgot" in line and "prefers the base" in line for line in judged)
    assert any("significantly better on" in line for line in findings("valid", _entry(40, (-0.3, -0.1))))
    # the same rise on the run's own split is said, but not as forgetting
    assert not any("forgot" in line for line in findings("valid", _entry(150, (0.05, 0.20))))


def test_a_small_set_is_said_to_be_too_small() -> None:
    lines = findings("valid", _entry(6, (-0.5, 0.4)))
    assert any("too small to tell" in line for line in lines)
    assert not any("too small" in line for line in findings("valid", _entry(MIN_EXAMPLES, (-0.5, 0.4))))
    # an interval clear of zero on a handful of examples is not called better or worse in the same breath
    small = findings("valid", _entry(6, (-0.3, -0.1)))
    assert len(small) == 1 and "too small" in small[0]
    assert findings("general", _entry(6, (0.05, 0.20))) == small[:0] + [small[0].replace("valid", "general")]


# ---------------------------------------------------------------- sets and eval.json


def test_resolve_sets_names_and_refusals(tmp_path: Path) -> None:
    (tmp_path / "valid.jsonl").write_text("{}\n")
    mine = _write_jsonl(tmp_path / "data" / "user_oriented_instructions.jsonl", ROWS)
    assert resolve_sets(tmp_path, None, None) == [("valid", tmp_path / "valid.jsonl")]
    assert resolve_sets(tmp_path, None, str(mine)) == [("user_oriented_instructions", mine)]
    assert [n for n, _ in resolve_sets(tmp_path, "valid", str(mine))] == ["valid", "user_oriented_instructions"]
    assert set_name(Path("my tasks.v2.json")) == "my_tasks"
    with pytest.raises(SiftError, match="unknown eval set 'train'") as e:
        resolve_sets(tmp_path, "valid,train", None)
    assert e.value.field == "eval.sets"
    with pytest.raises(SiftError, match="no such eval file"):
        resolve_sets(tmp_path, None, str(tmp_path / "nope.jsonl"))


def test_merge_keeps_other_sets_and_converts_the_old_format(tmp_path: Path) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"eval_file": "runs/x/valid.jsonl", "examples": 6, "base": {}, "student": {}}))
    assert list(read_sets(path)) == ["valid"]
    merged = merge_sets(path, {"general": {"examples": 150}})
    assert list(merged) == ["valid", "general"] and merged["valid"]["examples"] == 6
    merge_sets(path, {"general": {"examples": 151}})
    assert json.loads(path.read_text())["general"]["examples"] == 151
    assert json.loads(path.read_text())["valid"]["examples"] == 6


# ---------------------------------------------------------------- the command on a tiny Llama


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.train.conftest import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_two_runs_on_different_sets_keep_both(tiny_folder: Path, runs: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from pipeline.stages.eval import evaluate

    d = _make_run(runs, tiny_folder)
    other = _write_jsonl(tmp_path / "mine.jsonl", list(reversed(ROWS)))
    evaluate(run="t", student=CPU32, eval=EvalSettings(base=str(tiny_folder), max_new_tokens=4))
    first = json.loads((d / "eval.json").read_text())
    evaluate(run="t", student=CPU32, eval=EvalSettings(base=str(tiny_folder), eval_file=str(other), max_new_tokens=4))
    both = json.loads((d / "eval.json").read_text())
    assert list(both) == ["valid", "mine"]
    assert both["valid"] == first["valid"]  # untouched by the second run
    for entry in both.values():
        assert entry["examples"] == len(ROWS)
        assert set(entry["delta"]) >= {"nll", "rouge_l", "stop_rate", "mean_output_tokens"}
        for key in ("nll", "rouge_l", "stop_rate", "mean_output_tokens"):
            low, high = entry["ci95"][key]
            assert low <= entry["delta"][key] + 1e-9 and entry["delta"][key] - 1e-9 <= high
    assert both["mine"]["eval_file"] == str(other)
    out = capsys.readouterr().out
    assert "valid (4)" in out and "mine (4)" in out and "too small to tell" in out


def test_fast_greedy_answers_equal_generate_with_a_lora_adapter(tiny_folder: Path, runs: Path) -> None:
    """float32, tiny Llama + random LoRA: merged in memory, the fast engine's greedy answers are
    generate's on the same merged weights, and the merged model's logits are the PEFT model's
    (to 1e-4: merging changes only the order of float32 additions)."""
    import torch
    from transformers import AutoTokenizer

    from train.eval_passes import fast_answers, fast_supported, greedy_answers, load_side
    from train.format import prompt_ids, to_messages

    d = _make_run(runs, tiny_folder)
    tok = AutoTokenizer.from_pretrained(str(d / "student"))
    rows = [{"id": r["id"], "messages": to_messages(r["instruction"], r["input"], r["output"])} for r in ROWS * 3]
    merged = load_side(str(tiny_folder), tok, d / "student", student=CPU32)
    peft = load_side(str(tiny_folder), tok, d / "student", student=CPU32, merge=False)
    assert fast_supported(merged) and type(merged).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([prompt_ids(tok, rows[0]["messages"][:-1])])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-4)
        assert not torch.allclose(merged(ids).logits, load_side(str(tiny_folder), tok, None, student=CPU32)(ids).logits,
                                  atol=1e-3)  # the adapter is in
    fast = fast_answers(merged, tok, rows, max_new_tokens=12, max_rows=5)  # fewer slots than rows: refills
    plain = greedy_answers(merged, tok, rows, max_new_tokens=12, batch_size=1)
    assert fast == plain
    assert all(a["tokens"] == 12 or a["stopped"] for a in fast)


def test_length_sorted_nll_equals_the_plain_pass(tiny_folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.eval_passes import answer_nll, reference_nll
    from train.format import setup_tokenizer, to_messages

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    setup_tokenizer(tok, "chat")
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    rows = [{"id": r["id"], "messages": to_messages(r["instruction"], r["input"], r["output"])} for r in ROWS]
    plain = answer_nll(model, tok, rows, batch_size=1)
    for budget, lanes in ((1, 2), (40, 1), (40, 3), (10_000, 2)):  # one row per batch, a few, all at once
        fast = reference_nll(model, tok, rows, token_budget=budget, lanes=lanes)
        assert [n for _, n in fast] == [n for _, n in plain]
        for (a, _), (b, _) in zip(fast, plain, strict=True):
            assert a == pytest.approx(b, rel=1e-4)


def test_nll_of_a_model_the_engine_does_not_run_takes_the_decoder_path(tiny_folder: Path) -> None:
    """A Llama with attention biases is not the fast engine's: its length-sorted NLL comes from the
    model's own decoder, and still equals the plain pass."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from train.eval_passes import answer_nll, fast_supported, reference_nll
    from train.format import setup_tokenizer, to_messages

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    setup_tokenizer(tok, "chat")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         attention_bias=True)).eval()
    assert not fast_supported(model)
    rows = [{"id": r["id"], "messages": to_messages(r["instruction"], r["input"], r["output"])} for r in ROWS]
    plain = answer_nll(model, tok, rows, batch_size=1)
    fast = reference_nll(model, tok, rows, token_budget=40)
    assert [n for _, n in fast] == [n for _, n in plain]
    for (a, _), (b, _) in zip(fast, plain, strict=True):
        assert a == pytest.approx(b, rel=1e-4)


# ---------------------------------------------------------------- judging in both orders


def test_both_orders_turn_position_bias_into_ties() -> None:
    from train.judge_both import judge_both_orders, summarize_both

    first = ScriptedJudge("first")  # always says A: the two orders always disagree
    verdicts = judge_both_orders(first, _items(20))
    assert len(first.requests) == 40
    s = summarize_both(verdicts)
    assert s["ties"] == 20 and s["win_rate"] == 0.5 and s["orders_agree"] == 0.0 and s["position_a_rate"] == 1.0
    longer = summarize_both(judge_both_orders(ScriptedJudge("longer"), _items(20)))  # agrees: a real win
    assert longer["win_rate"] == 1.0 and longer["orders_agree"] == 1.0 and longer["student_wins"] == 20
    junk = summarize_both(judge_both_orders(ScriptedJudge("junk"), _items(5)))
    assert junk["unreadable"] == 5 and junk["win_rate"] is None and junk["ci95"] is None


def test_length_controlled_win_rate_of_a_length_biased_judge() -> None:
    """The judge picks the longer answer in 4 rows of 5 in both orders; with the student longer in 3
    rows of 4 the raw win rate is high, the length-controlled one near 0.5."""
    from train.judge_both import judge_both_orders, summarize_both

    items = _items(40)
    for i, it in enumerate(items):
        if i % 4 == 0:
            it["base"], it["student"] = it["student"], it["base"]
    s = summarize_both(judge_both_orders(ScriptedJudge("noisy"), items))
    assert s["win_rate"] == pytest.approx(26 / 40)
    assert s["length_controlled_win_rate"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.slow
def test_embedded_model_bfloat16_nll_through_the_engine_matches_the_decoder() -> None:
    """The embedded model in bfloat16 on 32 general-set tasks: per-example NLL through the fast engine's
    lanes and through the model's own decoder (one batch shape for both) agree within 2% of each
    example's NLL, and their means within 0.5%: room for bfloat16 rounding on other CPUs (identical here, AMD EPYC)."""
    from pipeline.io.models import EMBEDDED_ALIAS, load_model, load_tokenizer, resolve_model
    from train.eval_passes import fast_supported, reference_nll
    from train.eval_sets import load_heldout
    from train.format import setup_tokenizer
    from train.general_set import GENERAL_PATH

    ref = resolve_model(EMBEDDED_ALIAS)
    model, tok = load_model(ref, dtype="bfloat16", device="cpu"), load_tokenizer(ref)
    setup_tokenizer(tok, "auto")
    rows = load_heldout(GENERAL_PATH)[:32]
    assert fast_supported(model)
    engine = reference_nll(model, tok, rows, lanes=2)
    model.config.attention_bias = True  # the engine refuses it, so the same weights take the decoder path
    assert not fast_supported(model)
    decoder = reference_nll(model, tok, rows)
    assert [n for _, n in engine] == [n for _, n in decoder]
    for (a, n), (b, _) in zip(engine, decoder, strict=True):
        assert a / n == pytest.approx(b / n, rel=0.02)
    assert sum(a for a, _ in engine) == pytest.approx(sum(b for b, _ in decoder), rel=0.005)
