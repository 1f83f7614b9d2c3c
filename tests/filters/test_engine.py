"""The rule engine: order, first failing rule, task grouping, ROUGE-L details, and the funnel."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from filters.contamination import build_ngram_index
from filters.engine import apply_rules, count_reasons, funnel
from filters.rouge import RougeIndex
from filters.rules import REASONS, parse_rules

GOOD = "Explain how tides work to a curious child"


def rec(id: str, instruction: str, input: str | None = None, output: str | None = None, **extra: str) -> dict:
    r = {"id": id, "instruction": instruction, **extra}
    if input is not None:
        r["input"] = input
    if output is not None:
        r["output"] = output
    return r


def reasons(records: list[dict], rules: str, **kwargs: object) -> dict[str, str | None]:
    return {r["id"]: reason for r, reason, _ in apply_rules(records, parse_rules(rules), **kwargs)}  # type: ignore[arg-type]


def test_each_rule_by_reason_string() -> None:
    records = [
        rec("short", "Draw it", "", "ok"),
        rec("long", " ".join(["word"] * 151), "", "ok"),
        rec("black", "Describe the picture in detail please", "", "ok"),
        rec("prog", "Write a program that adds two numbers", "", "ok"),
        rec("punct", "- List three famous painters of Spain", "", "ok"),
        rec("ascii", "¿Puedes explicar la gravedad en palabras simples?", "", "ok"),
        rec("keep", GOOD, "", "Because the moon pulls the sea."),
        rec("dup", GOOD + ".", "", "Another answer"),
        rec("same", "Repeat the input word back exactly as given", "echo", "echo"),
        rec("empty", "Give the capital city of the following country", "France", " "),
        rec("colon", "List the primary colors of light for me", "", "They are:"),
    ]
    got = reasons(records, "self-instruct")
    assert got == {
        "short": "too_short",
        "long": "too_long",
        "black": "blacklist",
        "prog": "write_a_program",
        "punct": "starts_with_punctuation",
        "ascii": "starts_non_ascii",
        "keep": None,
        "dup": "rouge_duplicate",
        "same": "input_equals_output",
        "empty": "empty_output",
        "colon": "trailing_colon",
    }


def test_task_rules_group_by_task_id() -> None:
    records = [
        rec("a1", "Add the two numbers given in the input", "2 2", "4", task_id="add"),
        rec("a2", "Add the two numbers given in the input", "3 3", "6", task_id="add"),
        rec("a3", "Add the two numbers given in the input", "2 2", "4", task_id="add"),
        *[
            rec(f"a{i}", "Add the two numbers given in the input", f"{i} 1", str(i + 1), task_id="add")
            for i in range(4, 9)
        ],
        rec("c1", "Name the capital city of the given country", "Peru", "Lima", task_id="cap"),
        rec("c2", "Name the capital city of the given country", "Peru", "Cusco", task_id="cap"),
        rec("c3", "Name the capital city of the given country", "Chile", "Santiago", task_id="cap"),
        rec("m1", "Tell me a joke about computers and cats", "", "A joke", task_id="joke"),
    ]
    got = reasons(records, "self-instruct")
    assert got["a1"] is None and got["a2"] is None and got["a3"] == "duplicate_instance"
    assert [got[f"a{i}"] for i in range(4, 9)] == [None, None, None, "too_many_instances", "too_many_instances"]
    assert got["c1"] == got["c2"] == got["c3"] == "conflicting_outputs"
    assert got["m1"] is None  # same instruction within a task is not a ROUGE duplicate of itself


def test_rouge_details_and_seeded_pool() -> None:
    pool = RougeIndex(top_k=3)
    pool.add("seed-1", "Explain how tides work to a child")
    records = [rec("x", GOOD), rec("y", "Write a haiku about autumn leaves falling"), rec("z", "")]
    out = list(apply_rules(records, ["rouge"], rouge_index=pool))
    (_, r1, d1), (_, r2, d2), (_, r3, _) = out
    assert r1 == "rouge_duplicate" and d1["nearest_id"] == "seed-1" and d1["score"] > 0.7
    assert d1["nearest_text"] == "Explain how tides work to a child"
    assert r2 is None and d2["score"] < 0.7 and len(d2["most_similar"]) == 1
    assert {"id", "text", "score"} == set(d2["most_similar"][0])
    assert r3 is None  # no tokens: never a duplicate
    assert len(pool) == 3


def test_instruction_only_records_skip_instance_rules() -> None:
    got = reasons([rec("i", GOOD), rec("j", "Summarize the story of Hamlet in two sentences")], "self-instruct")
    assert got == {"i": None, "j": None}


def test_options_and_contamination() -> None:
    records = [rec("a", "Name two primes"), rec("b", "Give me three tips for staying healthy today", "", "Eat well")]
    assert reasons(records, "too_short", options={"too_short": {"min_words": 3}}) == {"a": None, "b": None}
    index = build_ngram_index(["Give me three tips for staying healthy today"])
    assert reasons(records, "contaminated", contamination_index=index) == {"a": None, "b": "contaminated"}
    with pytest.raises(ValueError, match="contamination_index"):
        apply_rules(records, ["contaminated"])
    with pytest.raises(ValueError, match="unknown"):
        apply_rules(records, ["too_short"], options={"rogue": {}})


def test_funnel_adds_up_and_order_is_kept() -> None:
    rng = random.Random(1)
    words = ["write", "a", "poem", "about", "the", "sea", "draw", "program", "list", "three", "ideas", "x"]
    records = []
    for i in range(400):
        n = rng.randint(0, 9)
        text = " ".join(rng.choice(words) for _ in range(n))
        records.append(
            rec(str(i), rng.choice(["", "- ", "Write a program "]) + text, "in", rng.choice(["", "in", "out:"]))
        )
    rules = parse_rules("self-instruct")
    results = list(apply_rules(records, rules, options={"rouge": {"top_k": 0, "block_size": 16}}))
    assert [r["id"] for r, _, _ in results] == [r["id"] for r in records]
    counts = count_reasons(results)
    rows = funnel(rules, counts)
    assert [row["rule"] for row in rows] == rules
    assert rows[0]["in"] == len(records)
    assert all(row["in"] - row["dropped"] == row["out"] for row in rows)
    assert all(a["out"] == b["in"] for a, b in zip(rows, rows[1:], strict=False))
    kept = counts[None]
    assert rows[-1]["out"] == kept and kept + sum(row["dropped"] for row in rows) == len(records)
    assert sum(counts[REASONS[r]] for r in rules) == len(records) - kept
    with pytest.raises(ValueError):
        funnel(["too_short"], Counter({"blacklist": 1}))


def test_rouge_stage_across_blocks_and_repeated_ids() -> None:
    records = [rec(str(i), f"Tell me about alpha{i} beta{i} gamma{i} delta{i}") for i in range(40)]
    records += [rec("0", records[0]["instruction"]), rec("x", records[1]["instruction"].upper())]
    records.insert(3, rec("2", records[2]["instruction"]))  # a repeat inside one block is checked too
    out = list(apply_rules(records, ["rouge"], options={"rouge": {"top_k": 0, "block_size": 8}}))
    assert [r["id"] for r, _, _ in out] == [r["id"] for r in records]
    assert out[2][1] is None and out[3][1] == "rouge_duplicate"
    assert out[-2][1] == "rouge_duplicate" and out[-2][2]["nearest_id"] == "0"  # no task_id: checked again
    assert out[-1][1] == "rouge_duplicate" and out[-1][2]["nearest_id"] == "1"


# ---------------------------------------------------------------- task_sizes: the same results, one task held


def _tasks(n: int, seed: int) -> list[dict]:
    """Tasks of 1 to 4 examples with repeated inputs, some with conflicting outputs, some duplicates."""
    rng = random.Random(seed)
    words = "tides moon sea river cloud rain snow wind storm sun star planet rock sand tree leaf".split()
    out = []
    for t in range(n):
        instruction = "Explain " + " ".join(rng.choice(words) for _ in range(8))
        for j in range(rng.randint(1, 4)):
            inp = rng.choice(["", "a", "b"])
            out.append(rec(f"t{t}e{j}", instruction, inp, rng.choice([f"answer {t}", f"answer {t} {j}", inp]),
                           task_id=f"t{t}"))
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_task_sizes_change_no_result(shuffle: bool) -> None:
    """With task_sizes (one task held at a time) every rule decides as without it (the whole input
    held), with each task's records together or scattered through the input."""
    records = _tasks(150, 4)
    if shuffle:
        random.Random(5).shuffle(records)
    rules = parse_rules("self-instruct")
    sizes = Counter(r["task_id"] for r in records)
    plain = [(r["id"], reason, d) for r, reason, d in apply_rules(records, rules, options={"rouge": {"top_k": 0}})]
    sized = [(r["id"], reason, d) for r, reason, d in
             apply_rules(records, rules, options={"rouge": {"top_k": 0}}, task_sizes=sizes)]
    assert sized == plain
    assert Counter(reason for _, reason, _ in plain)["conflicting_outputs"] > 0


def test_conflicting_outputs_holds_one_task_with_task_sizes() -> None:
    """conflicting_outputs yields a task's records once its last record has been read, not at the end
    of the input: the records are pulled lazily, and never more than one task ahead."""
    records = _tasks(40, 6)
    sizes = Counter(r["task_id"] for r in records)
    pulled = 0

    def source():
        nonlocal pulled
        for r in records:
            pulled += 1
            yield r

    for n, (record, _, _) in enumerate(apply_rules(source(), ["conflicting_outputs"], task_sizes=sizes), start=1):
        assert pulled - n < sizes[record["task_id"]] + 4  # at most the rest of this task and the next one
    assert pulled == len(records)
    pulled = 0
    first = next(apply_rules(source(), ["conflicting_outputs"]))  # without sizes: the whole input first
    assert first[0] is records[0] and pulled == len(records)
