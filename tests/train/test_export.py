"""sift export: messages and Alpaca files, a deterministic split, clear errors on bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.settings import ExportSettings, SettingsError
from pipeline.stages.export import export, split_ids


def _filtered(runs: Path, rows: list[dict], run: str = "r") -> Path:
    path = runs / run / "filtered.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int) -> list[dict]:
    return [{"id": f"i{k}", "instruction": f"task {k}", "input": "some input" if k % 3 == 0 else "",
             "output": f"answer {k}", "provenance": {"seed": k}} for k in range(n)]


def test_export_writes_loadable_splits(runs: Path) -> None:
    from datasets import load_dataset

    _filtered(runs, _rows(50))
    export(run="r", export=ExportSettings(valid_fraction=0.2))
    d = runs / "r"
    train = [json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (d / "valid.jsonl").read_text().splitlines()]
    assert len(train) + len(valid) == 50 and 3 <= len(valid) <= 18
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in valid)
    first = next(r for r in train + valid if r["id"] == "i0")
    assert first["messages"] == [{"role": "user", "content": "task 0\n\nsome input"},
                                 {"role": "assistant", "content": "answer 0"}]
    assert first["metadata"] == {"provenance": {"seed": 0}}
    alpaca = json.loads((d / "alpaca.json").read_text())
    assert len(alpaca) == len(train) and set(alpaca[0]) == {"instruction", "input", "output"}
    assert len(load_dataset("json", data_files=str(d / "train.jsonl"), split="train")) == len(train)
    assert len(load_dataset("json", data_files=str(d / "alpaca.json"), split="train")) == len(train)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["stages"]["export"]["stats"]["valid"] == len(valid)


def test_split_is_deterministic_stable_and_seeded() -> None:
    ids = [f"i{k}" for k in range(200)]
    valid = split_ids(ids, 0.1, 0)
    assert valid == split_ids(list(reversed(ids)), 0.1, 0)
    assert valid & set(ids[:100]) == split_ids(ids[:100], 0.1, 0)  # a record keeps its side
    assert valid != split_ids(ids, 0.1, 1)
    assert 8 <= len(valid) <= 35


@pytest.mark.parametrize("n", [2, 3])
def test_at_least_one_valid_and_one_train(n: int) -> None:
    ids = [f"x{k}" for k in range(n)]
    assert len(split_ids(ids, 0.0001, 0)) == 1
    assert 1 <= len(split_ids(ids, 0.99, 0)) < n
    assert split_ids(["only"], 0.99, 0) == set()  # a single record is kept for training


@pytest.mark.parametrize(("rows", "message"), [
    ([{"id": "a", "instruction": "x", "output": "y"}], "filtered.jsonl:1: field 'input': missing"),
    ([{"id": "a", "instruction": "x", "input": "", "output": 3}], "field 'output': expected a string"),
    ([{"id": "a", "instruction": "x", "input": "", "output": " "}], "field 'output': is empty"),
    ([{"id": "a", "instruction": "x", "input": "", "output": "y"}] * 2, ":2: field 'id': duplicate id 'a'"),
    ([], "is empty: no records"),
])
def test_bad_records_give_one_clear_error(runs: Path, rows: list[dict], message: str) -> None:
    _filtered(runs, rows)
    with pytest.raises(SiftError, match=message):
        export(run="r")
    assert not (runs / "r" / "train.jsonl").exists()


def test_valid_fraction_is_checked(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    with pytest.raises(SettingsError) as e:
        ExportSettings(valid_fraction=1.0)
    assert e.value.field == "valid_fraction"
    _filtered(runs, _rows(3))
    assert main(["export", "--run", "r", "--export.valid-fraction", "1.0"]) == 2
    assert "field 'export.valid_fraction': must be in [0, 1), got 1.0" in capsys.readouterr().err
    assert not (runs / "r" / "train.jsonl").exists()


def test_the_manifest_records_the_export_section(runs: Path) -> None:
    _filtered(runs, _rows(10))
    export(run="r", export=ExportSettings(seed=3))
    settings = json.loads((runs / "r" / "manifest.json").read_text())["stages"]["export"]["settings"]
    assert settings == {"run": "r", "export": {"valid_fraction": 0.1, "seed": 3, "decontaminate_general": True}}


def _former_export(directory: Path, run: str, settings: ExportSettings, out: Path) -> None:
    """What `sift export` wrote before it streamed: every record in lists (read_filtered, apply_review,
    decontaminate), then write_splits and the card, into `out`."""
    from pipeline.io.artifacts import file_sha256, write_text
    from pipeline.io.review import REVIEW_FILE, apply_review, latest, read_review
    from pipeline.io.stage_stats import stage_stats
    from pipeline.stages.export import decontaminate, read_filtered, write_splits
    from pipeline.views.card import card_text, read_inputs
    from train.general_set import GENERAL_PATH, load_general

    source = directory / "filtered.jsonl"
    read = read_filtered(source)
    decisions = latest(read_review(directory / REVIEW_FILE))
    reviewed = apply_review(read, decisions, source=(source.name, file_sha256(source)))
    records, contaminated = decontaminate(reviewed.kept, load_general(GENERAL_PATH))
    valid_ids = split_ids([r["id"] for r in records], settings.valid_fraction, settings.seed)
    train = [r for r in records if r["id"] not in valid_ids]
    valid = [r for r in records if r["id"] in valid_ids]
    by_reason = {k: v for k, v in (("human_review", len(reviewed.rejected)), ("contaminated", len(contaminated)))
                 if v}
    stats = stage_stats("export", "examples", read=len(read), kept=len(records), rejected_by_reason=by_reason,
                        extras={"train": len(train), "valid": len(valid),
                                "with_input": sum(bool(r["input"]) for r in records),
                                "review": {"decisions": len(decisions), **reviewed.counts}})
    write_splits(out, train, valid, reviewed.rejected + contaminated)
    write_text(out / "README.md", card_text(run, read_inputs(directory), stats))


def test_streamed_export_writes_what_the_list_path_wrote(runs: Path) -> None:
    """export reads its source twice (ids, review counts and the split first; then a record at a time
    into the files) and holds no list of records; its files are the former path's bytes, with human
    review rejections, edits (one that brings in a general-set text), stale and unmatched decisions,
    undo, and contaminated records interleaved with rejected ones."""
    from pipeline.io.review import append_decisions, decision_line
    from train.general_set import load_general

    leak = next(t for t in load_general() if len(t["output"].split()) >= 13)
    rows = _rows(60)
    for k in (5, 17, 40):
        rows[k]["output"] = f"{leak['output']} ({k})"  # contaminated
    rows[23]["metadata_ignored"] = "x"
    path = _filtered(runs, rows)

    def line(rid: str, decision: str, **kw: object) -> dict:
        return decision_line(rid, decision, artifact="filtered.jsonl", sha256=str(kw.pop("sha", "s")), **kw)

    append_decisions(path.parent, [line("i3", "reject", note="wrong"), line("i8", "edit", output="better answer"),
                                   line("i9", "edit", output=leak["output"]), line("i17", "reject"),
                                   line("i30", "accept"), line("i31", "reject"), line("i31", "undo"),
                                   line("i44", "reject", sha="x"), line("gone", "reject")])
    settings = ExportSettings(valid_fraction=0.2, seed=4)
    export(run="r", export=settings)
    (runs / "ref").mkdir()
    _former_export(path.parent, "r", settings, runs / "ref")
    rejected = [json.loads(x) for x in (runs / "ref" / "export.rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejected] == [
        ("i3", "human_review"), ("i17", "human_review"), ("i44", "human_review"),
        ("i5", "contaminated"), ("i9", "contaminated"), ("i40", "contaminated")]
    for name in ("train.jsonl", "valid.jsonl", "alpaca.json", "export.rejected.jsonl", "README.md"):
        assert (path.parent / name).read_bytes() == (runs / "ref" / name).read_bytes(), name


@pytest.mark.parametrize("change", ["drop", "add"])
def test_a_source_changed_between_the_two_passes_is_refused(runs: Path, monkeypatch: pytest.MonkeyPatch,
                                                             change: str) -> None:
    """export reads its source twice; a file that gives other records the second time (written by
    hand under the lock) is an error, and nothing is written."""
    import pipeline.stages.export as stage

    path = _filtered(runs, _rows(10))
    first = stage.plan_training

    def then_change(*args: object, **kwargs: object) -> stage.TrainingPlan:
        plan = first(*args, **kwargs)
        _filtered(runs, _rows(9) if change == "drop" else _rows(11))
        return plan

    monkeypatch.setattr(stage, "plan_training", then_change)
    with pytest.raises(SiftError, match="changed while it was being exported"):
        export(run="r")
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == ["filtered.jsonl"]
