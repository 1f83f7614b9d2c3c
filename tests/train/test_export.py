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
