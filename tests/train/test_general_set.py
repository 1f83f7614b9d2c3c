"""The general held-out set: its shape, its distance from the reference sets, and export's 13-gram guard."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from filters.contamination import build_ngram_index, ngram_overlap
from filters.rouge import RougeIndex
from pipeline.errors import SiftError
from pipeline.io.artifacts import read_jsonl
from pipeline.settings import ExportSettings
from pipeline.stages.export import export
from tests.conftest import REFERENCE_SEEDS, REPO, SHARED
from train.general_set import CATEGORIES, GENERAL_PATH, build_eval_index, load_general, overlapping_tasks

USER_ORIENTED = SHARED / "data" / "user_oriented_instructions.jsonl"
PROJECT_SEEDS = REPO / "seeds" / "default.jsonl"
MIN_PER_CATEGORY = {c: 10 for c in CATEGORIES}


@pytest.fixture(scope="module")
def tasks() -> list[dict]:
    return load_general()


def _reference(path: Path) -> list[dict]:
    if not path.is_file():
        pytest.skip(f"reference set {path} is missing (it lives in ../shared/data next to the repo)")
    return read_jsonl(path)


def _texts(task: dict) -> list[str]:
    """Instruction, then each instance's input and output (Self-Instruct shape) or the task's own."""
    out = [task["instruction"]]
    for inst in task.get("instances") or [task]:
        out += [inst.get("input") or "", inst.get("output") or ""]
    return [t for t in out if t]


def test_the_set_is_large_varied_and_well_formed(tasks: list[dict]) -> None:
    assert GENERAL_PATH == REPO / "train" / "evalsets" / "general.jsonl"
    assert 150 <= len(tasks) <= 250
    counts = Counter(t["category"] for t in tasks)
    assert {c: n for c, n in counts.items() if n < MIN_PER_CATEGORY[c]} == {}
    assert set(counts) == set(CATEGORIES)
    assert len({t["id"] for t in tasks}) == len(tasks) and all(t["id"].startswith("general-") for t in tasks)
    assert len({t["instruction"].lower() for t in tasks}) == len(tasks)
    assert all(t["output"].strip() and t["instruction"].strip() for t in tasks)
    assert 0.35 <= sum(bool(t["input"]) for t in tasks) / len(tasks) <= 0.65  # about half carry an input
    words = sorted(len(t["output"].split()) for t in tasks)
    assert words[len(words) // 2] <= 60 and words[-1] <= 150  # references a 135M student can be scored on


def test_tables_are_markdown_and_code_compiles(tasks: list[dict]) -> None:
    for t in tasks:
        if t["category"] == "tables":
            lines = t["output"].splitlines()
            assert lines[0].startswith("|") and set(lines[1].replace("|", "").split()) == {"---"}, t["id"]
            assert len({line.count("|") for line in lines}) == 1, t["id"]
        if t["category"] == "code" and t["output"].startswith(("def ", "from ")):
            compile(t["output"], t["id"], "exec")


@pytest.mark.parametrize("path", [REFERENCE_SEEDS, USER_ORIENTED, PROJECT_SEEDS], ids=lambda p: p.name)
def test_no_task_is_close_to_a_reference_task(tasks: list[dict], path: Path) -> None:
    """ROUGE-L F1 (rouge_score's, exactly) below 0.7 to every reference instruction, for each task's
    instruction alone and with its input; compared with the reference instructions alone and with
    each of their inputs."""
    pool = RougeIndex(threshold=0.7, top_k=1)
    for ref in _reference(path):
        pool.add(ref["id"], ref["instruction"])
        for k, inst in enumerate(ref["instances"]):
            if inst.get("input"):
                pool.add(f"{ref['id']}/{k}", f"{ref['instruction']}\n{inst['input']}")
    queries = [(t["id"], t["instruction"]) for t in tasks]
    queries += [(t["id"], f"{t['instruction']}\n{t['input']}") for t in tasks if t["input"]]
    close = [(i, m.nearest_id, round(m.score, 3)) for (i, _), m in zip(queries, pool.check_many(q for _, q in queries),
                                                                       strict=True) if m.score >= 0.7]
    assert close == []


@pytest.mark.parametrize("path", [REFERENCE_SEEDS, USER_ORIENTED, PROJECT_SEEDS], ids=lambda p: p.name)
def test_no_13_gram_is_shared_with_a_reference_set(tasks: list[dict], path: Path) -> None:
    """Both ways: no text of ours holds a reference 13-gram (or a whole 8-12-word reference text), and
    no reference text holds one of ours."""
    refs = _reference(path)
    theirs = build_ngram_index(t for r in refs for t in _texts(r))
    ours = build_ngram_index(t for task in tasks for t in _texts(task))
    assert [task["id"] for task in tasks if any(ngram_overlap(t, theirs) for t in _texts(task))] == []
    assert [r["id"] for r in refs if any(ngram_overlap(t, ours) for t in _texts(r))] == []


@pytest.mark.parametrize(("line", "message"), [
    ({"id": "g1", "category": "lists", "instruction": "x", "input": ""}, ":2: field 'output': missing"),
    ({"id": "g1", "category": "lists", "instruction": "x", "input": 3, "output": "y"}, "field 'input': expected a"),
    ({"id": "g1", "category": "poetry", "instruction": "x", "input": "", "output": "y"}, "unknown category 'poetry'"),
    ({"id": "g0", "category": "lists", "instruction": "y", "input": "", "output": "y"}, ":2: field 'id': duplicate"),
    ({"id": "g1", "category": "lists", "instruction": "A", "input": "", "output": "y"}, "field 'instruction': dupl"),
    ({"id": "g1", "category": "lists", "instruction": "y", "input": "", "output": " "}, "field 'output': is empty"),
])
def test_a_bad_line_names_file_line_and_field(tmp_path: Path, line: dict, message: str) -> None:
    path = tmp_path / "general.jsonl"
    first = {"id": "g0", "category": "qa", "instruction": "a", "input": "", "output": "b"}
    path.write_text(json.dumps(first) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(SiftError, match=message) as e:
        load_general(path)
    assert "general.jsonl" in str(e.value)
    with pytest.raises(SiftError, match="missing"):
        load_general(tmp_path / "absent.jsonl")


def test_overlapping_tasks_names_the_task(tasks: list[dict]) -> None:
    index = build_eval_index(tasks)
    target = next(t for t in tasks if len(t["output"].split()) >= 20)
    leaked = "Here is my answer. " + target["output"]
    assert overlapping_tasks(["an unrelated text about nothing in particular", leaked], index)[0] == [target["id"]]
    assert overlapping_tasks(["Give me three tips for a calm morning."], index) == ([], 0)
    assert overlapping_tasks([], index) == ([], 0)


def _write_filtered(runs: Path, rows: list[dict]) -> None:
    (runs / "r").mkdir(parents=True, exist_ok=True)
    (runs / "r" / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_export_drops_records_that_overlap_the_general_set(runs: Path, tasks: list[dict]) -> None:
    target = next(t for t in tasks if t["input"] and len(t["input"].split()) >= 13)
    clean = [{"id": f"c{k}", "instruction": f"Describe a colour you like, number {k}.", "input": "",
              "output": "Green, because it reminds me of walks in the woods.", "provenance": {"k": k}}
             for k in range(20)]
    planted = {"id": "leak", "instruction": "Answer this.", "input": target["input"], "output": "ok",
               "provenance": {"teacher": "t"}}
    _write_filtered(runs, [*clean[:10], planted, *clean[10:]])
    export(run="r", export=ExportSettings(valid_fraction=0.2))
    d = runs / "r"
    exported = read_jsonl(d / "train.jsonl") + read_jsonl(d / "valid.jsonl", allow_empty=True)
    assert sorted(r["id"] for r in exported) == sorted(r["id"] for r in clean)
    (entry,) = read_jsonl(d / "export.rejected.jsonl")
    assert entry["id"] == "leak" and entry["reason"] == "contaminated" and entry["eval_set"] == "general"
    assert target["id"] in entry["eval_ids"] and entry["score"] >= 1
    assert entry["record"]["input"] == target["input"] and entry["record"]["provenance"] == {"teacher": "t"}
    stats = json.loads((d / "manifest.json").read_text())["stages"]["export"]["stats"]
    assert stats["rejected"] == 1 and stats["rejected_by_reason"] == {"contaminated": 1} and stats["read"] == 21
    assert stats["train"] + stats["valid"] == 20

    _write_filtered(runs, clean)  # a clean rerun leaves an empty ledger, not the old one
    export(run="r")
    assert read_jsonl(d / "export.rejected.jsonl", allow_empty=True) == []
    _write_filtered(runs, [*clean, planted])  # the check can be turned off
    export(run="r", export=ExportSettings(decontaminate_general=False))
    assert "leak" in {r["id"] for r in read_jsonl(d / "train.jsonl") + read_jsonl(d / "valid.jsonl")}


def test_export_refuses_when_every_record_overlaps(runs: Path, tasks: list[dict]) -> None:
    target = next(t for t in tasks if len(t["output"].split()) >= 13)
    _write_filtered(runs, [{"id": "leak", "instruction": target["instruction"], "input": "",
                            "output": target["output"]}])
    with pytest.raises(SiftError, match=f"share a 13-gram with the general eval set .*{target['id']}"):
        export(run="r")
    assert not (runs / "r" / "train.jsonl").exists()
