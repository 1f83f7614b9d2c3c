"""`sift filter`: stand-alone on any dataset and as the stage; exact against the reference loop."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from pipeline.cli import main
from pipeline.io.artifacts import read_json, read_jsonl
from tests.conftest import REFERENCE_SEEDS

WORDS = ("write a short story poem about the cat dog city list five ways to improve explain why how what "
         "summarize this article give me an example of classify sentence into positive negative").split()


def _instructions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    base = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(n // 2)]
    out = []
    for _ in range(n):
        text = rng.choice(base).split()
        for _ in range(rng.randint(0, 3)):  # mutate: near duplicates at every distance
            text[rng.randrange(len(text))] = rng.choice(WORDS)
        out.append(" ".join(text).capitalize() + rng.choice([".", "?", "", "!"]))
    return out


def _reference_keep(texts: list[str], threshold: float, pool: list[str] = ()) -> list[bool]:
    """The Self-Instruct / Alpaca loop: rouge_score against seeds plus everything kept so far."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept_texts, keep = list(pool), []
    for t in texts:
        dup = any(scorer.score(t, k)["rougeL"].fmeasure > threshold for k in kept_texts)
        keep.append(not dup)
        if not dup:
            kept_texts.append(t)
    return keep


@pytest.mark.parametrize(("seed", "threshold"), [(1, 0.7), (2, 0.5), (3, 0.9)])
def test_rouge_alone_keeps_exactly_the_reference(in_tmp: Path, seed: int, threshold: float) -> None:
    texts = _instructions(300, seed)
    src = in_tmp / "data.json"
    src.write_text(json.dumps([{"instruction": t, "input": "", "output": f"o{i}"} for i, t in enumerate(texts)]))
    assert main(["filter", str(src), "-o", "kept.jsonl", "--filter.rules", "rouge",
                 "--filter.threshold", str(threshold)]) == 0
    kept = read_jsonl(in_tmp / "kept.jsonl", allow_empty=True)
    rejected = read_jsonl(in_tmp / "kept.rejected.jsonl", allow_empty=True)
    expected = [t for t, k in zip(texts, _reference_keep(texts, threshold), strict=True) if k]
    assert [r["instruction"] for r in kept] == expected
    assert len(kept) + len(rejected) == len(texts)
    assert 0 < len(rejected) < len(texts)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for r in rejected:
        assert r["reason"] == "rouge_duplicate"
        assert r["score"] > threshold
        ref = scorer.score(r["record"]["instruction"], r["nearest_text"])["rougeL"].fmeasure
        assert abs(ref - r["score"]) < 1e-9
    funnel = read_json(in_tmp / "kept.funnel.json")
    assert funnel["rules"] == [{"rule": "rouge", "in": 300, "out": len(kept), "dropped": len(rejected)}]


@pytest.mark.skipif(not REFERENCE_SEEDS.exists(), reason="needs ../shared/data")
def test_seeds_preload_the_pool(in_tmp: Path) -> None:
    seeds = [json.loads(line)["instruction"] for line in REFERENCE_SEEDS.read_text().splitlines()]
    rng = random.Random(0)
    texts = [s if rng.random() < 0.5 else s + " " + rng.choice(WORDS) for s in rng.sample(seeds, 40)]
    texts += _instructions(40, 9)
    src = in_tmp / "d.jsonl"
    src.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in texts))
    assert main(["filter", str(src), "-o", "k.jsonl", "--filter.rules", "rouge", "--seeds", str(REFERENCE_SEEDS)]) == 0
    kept = [r["instruction"] for r in read_jsonl(in_tmp / "k.jsonl", allow_empty=True)]
    assert kept == [t for t, k in zip(texts, _reference_keep(texts, 0.7, seeds), strict=True) if k]


def test_every_rule_reason_reaches_the_ledger(in_tmp: Path) -> None:
    rows = [
        {"instruction": "Hi there.", "output": "x"},  # too_short
        {"instruction": "Describe the picture of the house in detail.", "output": "x"},  # blacklist
        {"instruction": "Write a program that sorts numbers quickly.", "output": "x"},  # write_a_program
        {"instruction": "Give me a synonym for happy please.", "input": "same", "output": "same"},
        {"instruction": "List three fruits that are red.", "output": "Apples, cherries:"},  # trailing_colon
        {"instruction": "List three fruits that are red!", "output": "Apples, cherries."},  # rouge
        {"instruction": "Name a mammal that lives in the ocean.", "input": "any", "output": ""},  # empty_output
        {"instruction": "Name a capital city in Europe please.", "output": "Paris."},
    ]
    src = in_tmp / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["filter", str(src), "-o", "k.jsonl"]) == 0
    reasons = [r["reason"] for r in read_jsonl(in_tmp / "k.rejected.jsonl")]
    assert reasons == ["too_short", "blacklist", "write_a_program", "input_equals_output", "trailing_colon",
                       "rouge_duplicate", "empty_output"]
    kept = read_jsonl(in_tmp / "k.jsonl")
    assert [r["instruction"] for r in kept] == ["Name a capital city in Europe please."]


def test_malformed_line_names_file_and_line_and_writes_nothing(in_tmp: Path, capsys) -> None:
    src = in_tmp / "d.jsonl"
    src.write_text('{"instruction": "Name three rivers in Africa."}\n{"instruction": 5}\n')
    assert main(["filter", str(src), "-o", "k.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:2: field 'instruction': expected a string, got integer" in err
    assert not list(in_tmp.glob("k*"))


def test_unknown_rule_is_a_clear_error(in_tmp: Path, capsys) -> None:
    src = in_tmp / "d.jsonl"
    src.write_text('{"instruction": "Name three rivers in Africa."}\n')
    assert main(["filter", str(src), "-o", "k.jsonl", "--filter.rules", "rouge,nope"]) == 2
    assert "unknown rule 'nope'" in capsys.readouterr().err


def test_stage_reads_instances_and_writes_the_run_artifacts(in_tmp: Path) -> None:
    run = in_tmp / "runs" / "r"
    run.mkdir(parents=True)
    tasks = [
        {"id": "t1", "instruction": "Translate the sentence into French.", "is_classification": False,
         "instances": [{"input": "Good morning.", "output": "Bonjour."}, {"input": "Thanks.", "output": "Merci."},
                       {"input": "Good morning.", "output": "Bonjour."}]},
        {"id": "t2", "instruction": "Translate the sentence into French!", "is_classification": False,
         "instances": [{"input": "Yes.", "output": "Oui."}]},
        {"id": "t3", "instruction": "Decide if the review is positive or negative.", "is_classification": True,
         "instances": [{"input": "Great!", "output": "Positive"}, {"input": "Great!", "output": "Negative"}]},
    ]
    (run / "instances.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    assert main(["filter", "--run", "r"]) == 0
    kept = read_jsonl(run / "filtered.jsonl")
    assert [(r["task_id"], r["input"]) for r in kept] == [("t1", "Good morning."), ("t1", "Thanks.")]
    reasons = sorted(r["reason"] for r in read_jsonl(run / "filtered.rejected.jsonl"))
    assert reasons == ["conflicting_outputs", "conflicting_outputs", "duplicate_instance", "rouge_duplicate"]
    assert read_json(run / "funnel.json")["kept"] == 2
    assert "filter" in read_json(run / "manifest.json")["stages"]


@pytest.mark.parametrize("mode", ["stage", "stand-alone"])
def test_a_missing_seeds_file_is_an_error_in_both_modes(in_tmp: Path, capsys, mode: str) -> None:
    """`--seeds typo.jsonl` used to dedup the stage without the seed pool and record the typo in the
    manifest as if it had been used; now it is one error naming the file, before anything is written."""
    run = in_tmp / "runs" / "r"
    run.mkdir(parents=True)
    (run / "instances.jsonl").write_text(json.dumps({"id": "t1", "instruction": "Name three rivers in Africa.",
                                                     "instances": [{"input": "", "output": "Nile"}]}) + "\n")
    args = ["filter", "--run", "r"] if mode == "stage" else ["filter", str(run / "instances.jsonl"), "-o", "k.jsonl"]
    assert main([*args, "--seeds", "typo.jsonl"]) == 2
    assert "typo.jsonl: field 'seeds': no such file" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["instances.jsonl"] and not list(in_tmp.glob("k*"))
    assert main([*args, "--seeds", str(in_tmp)]) == 2  # a folder is no seed file either
    assert "field 'seeds': is not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_streamed_outputs_equal_the_list_path(in_tmp: Path, suffix: str) -> None:
    """The stage streams kept and rejected records into their files; the bytes are those of the former
    path, which held both lists and wrote them with write_jsonl / write_json (by_teacher included)."""
    from filters.rules import parse_rules
    from pipeline.io.artifacts import write_json, write_jsonl
    from pipeline.settings import FilterSettings
    from pipeline.stages.filter import flatten_tasks, run_filter
    from pipeline.teachers.tally import per_teacher

    rng = random.Random(8)
    tasks = []
    for i, text in enumerate(_instructions(120, 8)):
        insts = [{"input": rng.choice(["", "x", "y"]), "output": rng.choice([f"o{i}", f"o{i}{j}", "", "x"])}
                 for j in range(rng.randint(1, 3))]
        tasks.append({"id": f"task{i}", "instruction": text, "instances": insts,
                      "provenance": {"teacher": {"name": f"t{i % 2}"}}})
    src = in_tmp / "tasks.jsonl"
    src.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    assert main(["filter", str(src), "-o", f"kept{suffix}"]) == 0

    records = flatten_tasks(list(enumerate(tasks, start=1)), src)
    kept, rejected, rows, _ = run_filter(records, parse_rules("self-instruct"), settings=FilterSettings(),
                                         seeds=None, decontaminate=None)
    write_jsonl(in_tmp / "ref.rejected.jsonl", rejected)
    write_json(in_tmp / "ref.funnel.json", {"input": len(records), "kept": len(kept), "rules": rows,
                                            "by_teacher": per_teacher(kept, rejected)})
    if suffix == ".json":
        write_json(in_tmp / "ref.json", [{k: v for k, v in r.items() if k != "filter"} for r in kept], indent=None)
    else:
        write_jsonl(in_tmp / "ref.jsonl", kept)
    assert {r["reason"] for r in rejected} >= {"conflicting_outputs", "rouge_duplicate", "empty_output"}
    for got, ref in ((f"kept{suffix}", f"ref{suffix}"), ("kept.rejected.jsonl", "ref.rejected.jsonl"),
                     ("kept.funnel.json", "ref.funnel.json")):
        assert (in_tmp / got).read_bytes() == (in_tmp / ref).read_bytes(), got
