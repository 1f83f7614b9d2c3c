"""The review ledger (latest line per id wins, undo, atomic rewrite), apply_review, `sift export`
applying it, and the dataset card that makes the run folder load as train and validation splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import SiftError
from pipeline.io.review import REVIEW_FILE, append_decisions, apply_review, decision_line, latest, read_review
from tests.conftest import REPO


def _line(rid: str, decision: str, **kw) -> dict:
    return decision_line(rid, decision, artifact=kw.pop("artifact", "filtered.jsonl"), sha256=kw.pop("sha", "s"),
                         **kw)


def test_latest_line_per_id_wins_and_undo_clears() -> None:
    lines = [_line("a", "reject", note="bad"), _line("b", "accept"), _line("a", "accept"),
             _line("b", "undo"), _line("c", "edit", output="better"), _line("c", "reject")]
    state = latest(lines)
    assert {i: d["decision"] for i, d in state.items()} == {"a": "accept", "c": "reject"}
    assert latest([*lines, _line("a", "undo"), _line("b", "reject")]).keys() == {"b", "c"}


@pytest.mark.parametrize(("args", "field"), [
    (("", "accept"), "id"),
    (("a", "approve"), "decision"),
    (("a", "edit"), "output"),  # an edit without its text
    (("a", "reject", {"output": "x"}), "output"),  # only an edit carries an output
])
def test_bad_decisions_are_refused(args: tuple, field: str) -> None:
    extra = args[2] if len(args) > 2 else {}
    with pytest.raises(SiftError) as e:
        _line(args[0], args[1], **extra)
    assert e.value.field == field


def test_ledger_appends_atomically_and_keeps_history(tmp_path: Path) -> None:
    append_decisions(tmp_path, [_line("a", "reject", note="first")])
    append_decisions(tmp_path, [_line("a", "undo"), _line("b", "edit", output="new <b>text</b>")])
    lines = read_review(tmp_path / REVIEW_FILE)
    assert [(x["id"], x["decision"]) for x in lines] == [("a", "reject"), ("a", "undo"), ("b", "edit")]
    assert set(lines[0]) == {"id", "decision", "note", "time", "artifact", "sha256"}
    assert lines[2]["output"] == "new <b>text</b>"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".review.lock", REVIEW_FILE]  # no temporary left


def test_a_ledger_line_with_a_bad_field_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / REVIEW_FILE
    path.write_text(json.dumps(_line("a", "accept")) + "\n" + json.dumps({"id": "b", "decision": "maybe"}) + "\n")
    with pytest.raises(SiftError, match=r"review.jsonl:2: field 'decision'"):
        read_review(path)


def _records() -> list[dict]:
    return [{"id": f"r{k}", "instruction": f"task {k}", "input": "", "output": f"answer {k}",
             "metadata": {"provenance": {"teacher": {"name": "t"}}}} for k in range(4)]


def test_apply_review_rejects_edits_and_keeps_the_original() -> None:
    decisions = latest([_line("r0", "reject", note="wrong"), _line("r1", "edit", output="fixed", note="typo"),
                        _line("r2", "accept", sha="old"), _line("gone", "reject")])
    records = _records()
    out = apply_review(records, decisions, source=("filtered.jsonl", "s"))
    assert [r["id"] for r in out.kept] == ["r1", "r2", "r3"]
    assert out.rejected == [{"id": "r0", "reason": "human_review", "note": "wrong", "score": None,
                             "reviewed_at": decisions["r0"]["time"],
                             "record": {"id": "r0", "instruction": "task 0", "input": "", "output": "answer 0",
                                        "provenance": {"teacher": {"name": "t"}}}}]
    edited = out.kept[0]
    assert edited["output"] == "fixed"
    assert edited["metadata"]["provenance"] == {"teacher": {"name": "t"}, "review": {
        "original_output": "answer 1", "note": "typo", "edited_at": decisions["r1"]["time"]}}
    assert records[1]["output"] == "answer 1" and "review" not in records[1]["metadata"]["provenance"]  # pure
    assert out.counts == {"accepted": 1, "rejected": 1, "edited": 1, "stale": 1, "unmatched": 1}


def _run(runs: Path) -> Path:
    d = runs / "r"
    d.mkdir(parents=True)
    rows = [{k: v for k, v in r.items() if k != "metadata"} | r["metadata"] for r in _records()]
    rows += [{"id": f"x{k}", "instruction": f"another task number {k}", "input": "", "output": f"reply {k}"}
             for k in range(8)]
    (d / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_export_applies_the_review_and_writes_a_card_that_loads(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("SIFT_RUNS_DIR", str(runs))
    d = _run(runs)
    append_decisions(d, [_line("r0", "reject", note="made up"), _line("r1", "edit", output="a reviewed answer"),
                         _line("r2", "reject"), _line("r2", "undo")])
    assert main(["export", "--run", "r"]) == 0
    ledger = [json.loads(x) for x in (d / "export.rejected.jsonl").read_text().splitlines()]
    assert [(x["id"], x["reason"], x["note"]) for x in ledger] == [("r0", "human_review", "made up")]
    exported = {r["id"]: r for name in ("train.jsonl", "valid.jsonl")
                for r in map(json.loads, (d / name).read_text().splitlines())}
    assert "r0" not in exported and "r2" in exported  # undone: exported as before
    assert exported["r1"]["messages"][-1]["content"] == "a reviewed answer"
    assert exported["r1"]["metadata"]["provenance"]["review"]["original_output"] == "answer 1"
    stats = json.loads((d / "manifest.json").read_text())["stages"]["export"]["stats"]
    assert stats["rejected_by_reason"] == {"human_review": 1} and stats["read"] == 12 and stats["kept"] == 11
    # two standing decisions (r2 undone), both made on a file whose hash ("s") is not this one: stale
    assert stats["review"] == {"decisions": 2, "accepted": 0, "rejected": 1, "edited": 1, "stale": 2, "unmatched": 0}
    card = (d / "README.md").read_text()
    assert card.startswith("---\nlicense: other") and "- n<1K" in card and "path: valid.jsonl" in card
    assert "1 rejected, 1 edited" in card and "| export | examples | 12 | 11 | human_review 1 |" in card
    # the folder is a dataset: its card's configs give the two splits, offline
    code = ("import sys, json; from datasets import load_dataset; "
            "ds = load_dataset(sys.argv[1], cache_dir=sys.argv[2]); "
            "print(json.dumps({k: v.num_rows for k, v in ds.items()}))")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(d), str(tmp_path / "hf")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"train": stats["train"], "validation": stats["valid"]}


def test_export_with_every_record_rejected_in_review_says_so(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("SIFT_RUNS_DIR", str(runs))
    d = _run(runs)
    ids = [json.loads(x)["id"] for x in (d / "filtered.jsonl").read_text().splitlines()]
    append_decisions(d, [_line(i, "reject") for i in ids])
    with pytest.raises(SiftError, match="rejected in review"):
        from pipeline.settings import ExportSettings
        from pipeline.stages.export import export

        export(run="r", export=ExportSettings())
    assert not (d / "train.jsonl").exists() and not (d / "README.md").exists()


def test_a_broken_review_ledger_stops_export_before_any_output(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    monkeypatch.setenv("SIFT_RUNS_DIR", str(runs))
    d = _run(runs)
    (d / REVIEW_FILE).write_text('{"id": "r0", "decision": "edit"}\n')
    assert main(["export", "--run", "r"]) == 2
    assert not (d / "train.jsonl").exists()
