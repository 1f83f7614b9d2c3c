"""sift inspect and the pure summaries under it: record shapes, lengths, verbs, near-duplicate
buckets, rejection reasons, contamination, and row selection with --where / --grep / --sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from pipeline.errors import SiftError
from pipeline.views.inspect import inspect_artifact, matches, parse_where, summarize
from pipeline.views.stats import (
    contamination,
    length_table,
    near_duplicate_buckets,
    nearest_similarity,
    percentile,
    record_examples,
)
from pipeline.views.verbs import heuristic_verb_object, parse_verbs, top_verb_objects
from tests.conftest import REFERENCE_SEEDS, SHARED

USER_ORIENTED = SHARED / "data" / "user_oriented_instructions.jsonl"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- verbs


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Write a poem about the sea.", ("write", "poem")),
        ("Please give me three tips for staying healthy.", ("give", "tip")),
        ("Can you suggest some games that can be played?", ("suggest", "game")),
        ("Given a list of numbers, find the largest prime number.", ("find", "number")),
        ("Make a grocery list for a healthy meal.", ("make", "list")),
        ('Replace the "TODO" comment in the code.', ("replace", "comment")),
        ("Write a conversation based on the given facts.", ("write", "conversation")),
        ("Explain how a rainbow forms.", ("explain", None)),
        ("What is the capital of France?", (None, None)),
        ("The sentence below is too long.", (None, None)),
        ("", (None, None)),
    ],
)
def test_heuristic_verb_object(text: str, expected: tuple) -> None:
    assert heuristic_verb_object(text) == expected


def test_verbs_on_reference_seeds_rank_write_first() -> None:
    tasks = [json.loads(x) for x in REFERENCE_SEEDS.read_text().splitlines()]
    pairs, parser = parse_verbs([t["instruction"] for t in tasks], parser="heuristic")
    assert parser == "heuristic" and len(pairs) == 175
    top = top_verb_objects(pairs, verbs=5, objects=3)
    assert top[0][0] == "write"
    assert all(n >= sum(c for _, c in objs) for _, n, objs in top)
    assert [n for _, n, _ in top] == sorted((n for _, n, _ in top), reverse=True)


def test_spacy_parser_is_refused_clearly_when_absent() -> None:
    from pipeline.views.verbs import load_spacy

    if load_spacy() is not None:
        pytest.skip("spaCy with an English pipeline is installed here")
    with pytest.raises(ValueError, match="spacy download"):
        parse_verbs(["Write a poem."], parser="spacy")
    assert parse_verbs(["Write a poem."])[1] == "heuristic"


# ---------------------------------------------------------------- pure summaries


def test_record_examples_of_every_shape() -> None:
    assert record_examples({"instruction": "i", "input": "x", "output": "o"}) == [
        {"instruction": "i", "input": "x", "output": "o"}
    ]
    task = {"instruction": "i", "instances": [{"input": "a", "output": "b"}, {"input": "", "output": "c"}]}
    assert [e["output"] for e in record_examples(task)] == ["b", "c"]
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert record_examples(chat) == [{"instruction": "q", "input": None, "output": "a"}]
    assert record_examples({"instruction": "only"})[0]["output"] is None


def test_percentiles_and_length_table() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    t = length_table(
        [
            {"instruction": "a b c", "input": "", "output": "x"},
            {"instruction": "a", "input": "y z", "output": None},
        ]
    )
    assert t["instruction"]["p50"] == 2 and t["input"]["empty"] == 1 and t["output"]["n"] == 1


def test_bulk_rouge_matches_rouge_score() -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tasks = [json.loads(x)["instruction"] for x in REFERENCE_SEEDS.read_text().splitlines()]
    queries, pool = tasks[:40], tasks[40:]
    got = nearest_similarity(queries, pool)
    for q, g in zip(queries, got, strict=True):
        want = max(scorer.score(p, q)["rougeL"].fmeasure for p in pool)
        assert g == pytest.approx(want, abs=1e-6)
    assert nearest_similarity(["", "!!"], ["", "a"]) == [0.0, 0.0]  # no tokens: never similar


def test_near_duplicate_buckets_chain_and_skip_empties() -> None:
    texts = [
        "Write a poem about the sea.",
        "Write a poem about the blue sea.",
        "Write a poem about a blue sea!",
        "Sort these numbers.",
        "",
        "...",
    ]
    assert near_duplicate_buckets(texts, 0.7) == [[0, 1, 2]]


def test_contamination_finds_a_leaked_task() -> None:
    tasks = [json.loads(x) for x in USER_ORIENTED.read_text().splitlines()]
    texts = [
        t["instruction"] + "\n" + t["instances"][0]["input"] + "\n" + t["instances"][0]["output"]
        for t in tasks
    ]
    clean = {"id": "c", "instruction": "Write a poem about the sea.", "input": "", "output": "Waves."}
    source = tasks[6]["instances"][0]["input"]  # 54 words
    leaked = {
        "id": "l",
        "instruction": "Rewrite this.",
        "input": "Some words first. " + source,
        "output": "ok",
    }
    c = contamination([clean, leaked], texts, n=13)
    assert c["contaminated"] == 1 and c["hits"][0]["id"] == "l" and c["rate"] == 0.5
    assert contamination([clean, leaked], texts, n=500)["contaminated"] == 0


# ---------------------------------------------------------------- selection and the command


def test_where_and_grep() -> None:
    rec = {"id": "1", "reason": "too_short", "provenance": {"teacher": "smol"}, "ok": True}
    assert matches(rec, grep=None, where=parse_where("reason=too_short"))
    assert not matches(rec, grep=None, where=parse_where("reason!=too_short"))
    assert matches(rec, grep=None, where=parse_where("provenance.teacher=smol"))
    assert matches(rec, grep=None, where=parse_where("ok=true"))
    assert not matches(rec, grep=None, where=parse_where("missing=x"))
    with pytest.raises(SiftError, match="FIELD=VALUE"):
        parse_where("reason")


def test_summarize_counts_reasons(tmp_path: Path) -> None:
    rows = [
        {"id": str(i), "instruction": f"Write a story number {i} about cats and dogs.", "reason": r}
        for i, r in enumerate(["rouge_similar"] * 3 + ["too_short"])
    ]
    s = summarize(rows)
    assert s["reasons"] == {"rouge_similar": 3, "too_short": 1}
    assert s["near_duplicates"]["buckets"] == 1 and s["near_duplicates"]["texts_in_buckets"] == 4
    assert s["verbs"][0][:2] == ("write", 4)


def test_inspect_command_prints_tables_and_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _jsonl(
        tmp_path / "x.rejected.jsonl",
        [
            {
                "id": "a",
                "instruction": "Write a poem about the sea.",
                "reason": "rouge_similar",
                "score": 0.8,
            },
            {"id": "b", "instruction": "Hi", "reason": "too_short"},
        ],
    )
    inspect_artifact(str(path), where="reason=too_short")
    out = capsys.readouterr().out
    assert "1 records match" in out and "too_short" in out and '"id": "b"' in out and '"id": "a"' not in out
    inspect_artifact(str(REFERENCE_SEEDS), against=str(USER_ORIENTED), sample=2)
    out = capsys.readouterr().out
    assert "175 records" in out and "root verbs" in out and "contamination: 0 of 175" in out
    assert out.count('"instances"') == 2
    inspect_artifact(str(tmp_path))
    assert "x.rejected.jsonl" in capsys.readouterr().out


def test_inspect_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(SiftError, match=r"bad.jsonl:2"):
        inspect_artifact(str(bad))
    with pytest.raises(SiftError, match="no such file"):
        inspect_artifact(str(tmp_path / "nope.jsonl"))
    with pytest.raises(SiftError, match="regular expression"):
        inspect_artifact(str(REFERENCE_SEEDS), grep="(")


def test_near_duplicates_above_the_cap_come_from_a_seeded_sample_and_say_so() -> None:
    """Up to `cap` distinct instructions every pair is compared (what inspect always did); above it a
    seeded sample of `cap` is, the summary says so, and the per-record figures still count every record."""
    import io

    from rich.console import Console

    from pipeline.views.inspect import _print_summary

    rows = [{"id": str(i), "instruction": f"Write a story number {i % 12} about cats {i}.", "output": "x y"}
            for i in range(40)]
    instructions = list(dict.fromkeys(r["instruction"] for r in rows))

    def printed(s: dict) -> str:
        buf = io.StringIO()
        _print_summary(Path("x.jsonl"), s, Console(file=buf, width=200))
        return buf.getvalue()

    full = summarize(rows)
    assert full == summarize(rows, cap=40)
    assert full["near_duplicates"]["compared"] == 40
    assert full["near_duplicates"]["buckets"] == len(near_duplicate_buckets(instructions, 0.7)) >= 1
    assert "seeded sample" not in printed(full)

    small = summarize(rows, cap=10)
    assert small["near_duplicates"]["compared"] == 10 and small == summarize(rows, cap=10)  # seeded: the same
    assert small["near_duplicates"]["texts_in_buckets"] <= 10
    assert small["records"] == 40 and small["instructions"] == 40 and small["lengths"]["output"]["n"] == 40
    assert {k: v for k, v in small.items() if k != "near_duplicates"} == \
        {k: v for k, v in full.items() if k != "near_duplicates"}
    assert "near-duplicate figures on a seeded sample of 10 of 40 instructions" in printed(small)


def _former_field_stats(records: list[dict]) -> list[dict]:
    """field_stats as it was when it held every value in lists (the reference for the tallies)."""
    from collections import Counter

    from pipeline.views.stats import _json_type

    out = []
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    for key in keys:
        values = [r[key] for r in records if key in r]
        strings = [v for v in values if isinstance(v, str)]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        bools = [v for v in values if isinstance(v, bool)]
        note = ""
        if bools:
            note = f"true {sum(bools)}, false {len(bools) - sum(bools)}"
        elif strings:
            note = (f"{len(set(strings))} distinct, {sum(not s.strip() for s in strings)} empty, "
                    f"median {percentile([len(s) for s in strings], 50):.0f} chars")
        elif numbers:
            note = f"min {min(numbers):.4g}, median {percentile(numbers, 50):.4g}, max {max(numbers):.4g}"
        elif values and all(isinstance(v, list) for v in values):
            note = f"median length {percentile([len(v) for v in values], 50):.0f}"
        out.append({"field": key, "present": len(values), "types": dict(Counter(_json_type(v) for v in values)),
                    "note": note})
    return out


def test_streamed_inspect_keeps_no_records_and_prints_what_the_lists_gave(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """inspect tallies fields, lengths and scores a record at a time and reads the file again for
    --sample; the figures are the former lists', and the sampled records are those
    random.Random(seed).sample(records, k) picked."""
    import random
    import re

    from pipeline.views.stats import field_stats

    rng = random.Random(3)
    rows = [{"id": f"r{i}", "instruction": f"Explain topic {i % 9} to a child.", "input": rng.choice(["", " ", "x"]),
             "ok": rng.random() < 0.5, "n": rng.choice([1, 2.5, 7]), "tags": ["a"] * rng.randint(0, 3),
             **({"mixed": rng.choice([1, "s", None, True])} if i % 4 == 0 else {}),
             **({"scores": {"length": i, "ifd": rng.choice([0.5, float("nan")])}} if i % 3 == 0 else {})}
            for i in range(80)]
    assert field_stats(rows) == _former_field_stats(rows)
    path = _jsonl(tmp_path / "x.jsonl", rows)
    monkeypatch.setenv("COLUMNS", "300")
    inspect_artifact(str(path), sample=3, seed=5)
    out = capsys.readouterr().out
    assert re.findall(r'"id": "(r\d+)"', out) == [r["id"] for r in random.Random(5).sample(rows, 3)]
    assert "80 records, 80 examples, 9 distinct instructions" in out
