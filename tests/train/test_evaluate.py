"""sift eval: held-out loading, metrics, batched passes against unbatched ones, the command end to end
on a tiny random Llama with a real PEFT adapter, and the embedded model (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.settings import EvalSettings, StudentSettings
from pipeline.stages.eval import evaluate, side_metrics
from tests.conftest import SHARED
from train.eval_sets import load_heldout, pick
from train.eval_stats import distinct_n, rouge_l

CPU32 = StudentSettings(device="cpu", dtype="float32")

USER_ORIENTED = SHARED / "data" / "user_oriented_instructions.jsonl"


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {
        "id": "a",
        "instruction": "give three tips for staying healthy",
        "input": "",
        "output": "eat vegetables sleep well and walk every day",
    },
    {
        "id": "b",
        "instruction": "what is the capital of france",
        "input": "",
        "output": "the capital of france is paris",
    },
    {"id": "c", "instruction": "translate hello to spanish", "input": "hello", "output": "hola"},
    {"id": "d", "instruction": "name a primary color", "input": "", "output": "red is a primary color"},
]


# ---------------------------------------------------------------- data and pure metrics


def test_load_heldout_reads_three_formats(tmp_path: Path) -> None:
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{k: v for k, v in r.items() if k != "id"} for r in ROWS]))
    assert [r["messages"][-1]["content"] for r in load_heldout(alpaca)] == [r["output"] for r in ROWS]
    chat = _write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "id": "x",
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            }
        ],
    )
    assert load_heldout(chat)[0]["messages"][0]["content"] == "hi"
    rows = load_heldout(USER_ORIENTED)
    tasks = [json.loads(line) for line in USER_ORIENTED.read_text().splitlines()]
    assert len(rows) == sum(len(t["instances"]) for t in tasks)
    first = tasks[0]
    assert rows[0]["messages"][0]["content"] == first["instruction"] + "\n\n" + first["instances"][0]["input"]


def test_load_heldout_names_the_bad_line(tmp_path: Path) -> None:
    bad = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"id": "z", "question": "?"}])
    with pytest.raises(SiftError, match=r"bad.jsonl:2: field 'instruction'"):
        load_heldout(bad)


def test_pick_is_seeded_and_independent_of_order() -> None:
    rows = [{"id": str(i)} for i in range(30)]
    a = pick(rows, 5, 0)
    assert [r["id"] for r in a] == [r["id"] for r in pick(rows[::-1], 5, 0)]
    assert [r["id"] for r in a] != [r["id"] for r in pick(rows, 5, 1)]
    assert len(pick(rows, 0, 0)) == 30


def test_distinct_2_and_rouge() -> None:
    assert distinct_n(["a b a b"]) == pytest.approx(2 / 3)
    assert distinct_n(["a b", "a b"]) == 0.5
    assert distinct_n(["one"]) == 0.0
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("the cat", "a dog") == 0.0
    # 2 * LCS / (|a| + |b|): LCS("the cat sat on", "the cat on mat") = 3
    assert rouge_l("the cat sat on", "the cat on mat") == pytest.approx(0.75)


def test_side_metrics_weights_nll_by_tokens() -> None:
    answers = [{"text": "x y", "tokens": 2, "stopped": True}, {"text": "x z", "tokens": 4, "stopped": False}]
    m = side_metrics([(3.0, 1), (1.0, 3)], answers, ["x y", "q"])
    assert m["nll"] == pytest.approx(1.0)
    assert m["perplexity"] == pytest.approx(math.e)
    assert m["stop_rate"] == 0.5 and m["mean_output_tokens"] == 3
    assert m["rouge_l"] == pytest.approx(0.5)


# ---------------------------------------------------------------- model passes on a tiny Llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.train.conftest import save_tiny
    from train.format import setup_tokenizer

    folder = save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")
    tok = AutoTokenizer.from_pretrained(folder)
    setup_tokenizer(tok, "chat")
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval(), tok


def test_batched_nll_equals_one_at_a_time(tiny) -> None:
    import torch

    from train.eval_passes import answer_nll
    from train.format import to_messages, tokenize_example

    _, model, tok = tiny
    rows = [{"id": r["id"], "messages": to_messages(r["instruction"], r["input"], r["output"])} for r in ROWS]
    batched = answer_nll(model, tok, rows, batch_size=4)
    for row, (total, n) in zip(rows, batched, strict=True):
        ex = tokenize_example(tok, row["messages"])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss.item()
        assert n == sum(label != -100 for label in ex.labels) - 0  # every answer token, EOS included
        assert total / n == pytest.approx(loss, rel=1e-4)


def test_batched_greedy_equals_single_and_counts_stops(tiny) -> None:
    import torch

    from train.eval_passes import greedy_answers
    from train.format import to_messages

    _, model, tok = tiny
    rows = [{"id": r["id"], "messages": to_messages(r["instruction"], r["input"], r["output"])} for r in ROWS]
    batched = greedy_answers(model, tok, rows, max_new_tokens=6, batch_size=4)
    single = [greedy_answers(model, tok, [r], max_new_tokens=6, batch_size=1)[0] for r in rows]
    assert batched == single
    assert all(a["tokens"] == 6 and not a["stopped"] for a in batched if not a["stopped"])
    # a head that always prefers EOS: every answer stops at once, empty
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 10.0
    old, model.lm_head = model.lm_head, head
    try:
        stopped = greedy_answers(model, tok, rows, max_new_tokens=6, batch_size=4)
    finally:
        model.lm_head = old
    assert stopped == [{"text": "", "tokens": 0, "stopped": True}] * len(rows)


# ---------------------------------------------------------------- the command


def _make_run(runs: Path, folder: Path, name: str = "t") -> Path:
    """A run with valid.jsonl and a real PEFT adapter (random LoRA weights, so it differs from its base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.format import setup_tokenizer, to_messages

    d = runs / name
    _write_jsonl(
        d / "valid.jsonl",
        [{"id": r["id"], "messages": to_messages(r["instruction"], r["input"], r["output"])} for r in ROWS],
    )
    tok = AutoTokenizer.from_pretrained(folder)
    info = setup_tokenizer(tok, "chat")
    model = AutoModelForCausalLM.from_pretrained(folder)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        ),
    )
    peft.save_pretrained(d / "student")
    tok.save_pretrained(d / "student")
    (d / "student" / "train_config.json").write_text(json.dumps({"student": str(folder), **info}))
    return d


def test_evaluate_writes_eval_json_side_by_side(tiny, runs: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tiny[0]
    d = _make_run(runs, folder)
    evaluate(run="t", student=CPU32, eval=EvalSettings(base=str(folder), limit=0, max_new_tokens=4, batch_size=2))
    result = json.loads((d / "eval.json").read_text())["valid"]
    assert result["examples"] == len(ROWS)
    for side in ("base", "student"):
        assert result[side]["answer_tokens_scored"] > 0
        assert result[side]["perplexity"] == pytest.approx(math.exp(result[side]["nll"]))
    assert result["base"]["nll"] != result["student"]["nll"]  # the adapter changes the model
    assert result["delta"]["nll"] == pytest.approx(result["student"]["nll"] - result["base"]["nll"])
    assert len(result["samples"]) == len(ROWS)
    out = capsys.readouterr().out
    assert "perplexity" in out and "delta" in out
    assert "eval" in json.loads((d / "manifest.json").read_text())["stages"]


def test_evaluate_without_student_says_train_first(runs: Path) -> None:
    (runs / "empty").mkdir(parents=True)
    with pytest.raises(SiftError, match="sift train"):
        evaluate(run="empty")


@pytest.mark.slow
def test_evaluate_embedded_model_on_user_oriented(runs: Path) -> None:
    """The real base (SmolLM2-135M) against a LoRA student on 5 user-oriented tasks."""
    pytest.importorskip("peft")
    from pipeline.io.models import embedded_dir, folder_problem

    if folder_problem(embedded_dir(), converted=True):
        pytest.skip("embedded model not fetched (sift model fetch)")
    d = _make_run(runs, embedded_dir(), "emb")
    evaluate(run="emb", eval=EvalSettings(eval_file=str(USER_ORIENTED), limit=4, max_new_tokens=12, batch_size=4))
    result = json.loads((d / "eval.json").read_text())["user_oriented_instructions"]
    assert result["examples"] == 4
    base = result["base"]
    assert 1 < base["perplexity"] < 1000  # a real instruct model on real answers
    assert 0 <= base["rouge_l"] <= 1 and base["mean_output_tokens"] <= 12


# ---------------------------------------------------------------- the pairwise judge


class ScriptedJudge:
    """A judge with a fixed habit, to test the judging arithmetic (not a model's quality)."""

    name = "scripted"

    def __init__(self, habit: str) -> None:
        self.habit = habit
        self.requests: list = []

    def generate(self, requests: list) -> list:
        from pipeline.teachers.base import Completion

        self.requests += requests
        out = []
        for r in requests:
            text = r.messages[-1]["content"]
            a = text.split("### Answer A\n", 1)[1].split("\n\n### Answer B", 1)[0]
            b = text.split("### Answer B\n", 1)[1].split("\n\nReply", 1)[0]
            longer = "A" if len(a) > len(b) else "B"
            row = int(text.split("### Instruction\ntask ", 1)[1].split("\n", 1)[0])
            noisy = {"A": "B", "B": "A"}[longer] if row % 5 == 0 else longer  # one row in 5 against length
            verdict = {
                "first": "A",
                "longer": longer,
                "noisy": noisy,
                "tie": "Tie.",
                "junk": "I cannot decide",
            }[self.habit]
            out.append(Completion(text=verdict, prompt_tokens=1, completion_tokens=1, finish_reason="stop"))
        return out


def _items(n: int = 60) -> list[dict]:
    return [
        {
            "id": f"r{i}",
            "instruction": f"task {i}",
            "reference": "ref",
            "base": "short",
            "student": "a much longer answer",
        }
        for i in range(n)
    ]


def test_judge_order_is_randomised_and_recorded() -> None:
    from train.judge import judge_pairs, summarize

    judge = ScriptedJudge("first")
    verdicts = judge_pairs(judge, _items(), seed=0)
    firsts = sum(v["student_first"] for v in verdicts)
    assert 15 < firsts < 45  # both orders used
    # a judge that always picks position A wins for the student exactly when the student came first
    assert all(v["score"] == (1.0 if v["student_first"] else 0.0) for v in verdicts)
    s = summarize(verdicts)
    assert s["win_rate"] == pytest.approx(firsts / 60) and s["position_a_rate"] == 1.0
    assert s["ci95"][0] <= s["win_rate"] <= s["ci95"][1]
    assert judge.requests[0].sampling.temperature == 0.0
    assert [v["student_first"] for v in judge_pairs(ScriptedJudge("first"), _items(), seed=0)] == [
        v["student_first"] for v in verdicts
    ]


def test_judge_length_bias_is_removed_by_length_control() -> None:
    from train.judge import judge_pairs, summarize

    items = _items(40)
    for i, it in enumerate(items):  # the student is longer in 3 rows of 4
        if i % 4 == 0:
            it["base"], it["student"] = it["student"], it["base"]
    # the judge prefers the longer answer in 4 rows of 5: P(win | longer) = 0.8, P(win | shorter) = 0.2
    s = summarize(judge_pairs(ScriptedJudge("noisy"), items, seed=1))
    assert s["win_rate"] == pytest.approx(26 / 40)
    assert s["length_controlled_win_rate"] == pytest.approx(0.5, abs=0.01)  # no win left once length is out
    always = summarize(judge_pairs(ScriptedJudge("longer"), _items(40), seed=1))
    assert always["win_rate"] == 1.0


def test_judge_ties_and_unreadable_verdicts() -> None:
    from train.judge import judge_pairs, parse_verdict, summarize

    assert [parse_verdict(t) for t in ("A", "b.", "Tie", "Answer A is better", "neither", "")] == [
        "A",
        "B",
        "tie",
        None,  # the first word only (tests/train/test_judge.py)
        None,
        None,
    ]
    ties = summarize(judge_pairs(ScriptedJudge("tie"), _items(10)))
    assert ties["win_rate"] == 0.5 and ties["ties"] == 10
    junk = summarize(judge_pairs(ScriptedJudge("junk"), _items(10)))
    assert junk["unreadable"] == 10 and junk["win_rate"] is None and junk["ci95"] is None
