"""Seed validation: the reference file loads unchanged; each kind of bad line is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import SiftError
from pipeline.io.artifacts import read_jsonl
from pipeline.stages.seeds import load_seeds, validate_seed
from tests.conftest import REFERENCE_SEEDS

GOOD = {"id": "t1", "name": "t", "instruction": "Add the numbers.",
        "instances": [{"input": "1, 2", "output": "3"}], "is_classification": False}


def _seed_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.skipif(not REFERENCE_SEEDS.exists(), reason="needs ../shared/data")
def test_reference_seed_file_loads_unchanged() -> None:
    seeds = load_seeds(REFERENCE_SEEDS)
    assert len(seeds) == 175
    assert seeds == read_jsonl(REFERENCE_SEEDS)
    assert sum(s["is_classification"] for s in seeds) == 26


def test_defaults_and_normalisation() -> None:
    seed = validate_seed({"id": 7, "instruction": "  Say hi. ", "instances": [{"output": " hi "}]},
                         path="f", line=1)
    assert seed == {"id": "7", "name": "7", "instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}],
                    "is_classification": False}


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"instruction": None}, "instruction", "expected a string, got null"),
        ({"instruction": "  "}, "instruction", "must not be empty"),
        ({"instances": "x"}, "instances", "expected a list, got string"),
        ({"instances": []}, "instances", "at least one"),
        ({"instances": [3]}, "instances[0]", "expected an object"),
        ({"instances": [{"input": "a"}]}, "instances[0].output", "missing"),
        ({"instances": [{"input": 1, "output": "a"}]}, "instances[0].input", "expected a string"),
        ({"instances": [{"output": ""}]}, "instances[0].output", "must not be empty"),
        ({"instances": [{"output": "a", "extra": 1}]}, "instances[0].extra", "unknown field"),
        ({"is_classification": "yes"}, "is_classification", "expected true or false"),
        ({"instance": []}, "instance", "unknown field"),
        ({"id": ""}, "id", "must not be empty"),
        ({"id": [1]}, "id", "expected a string or an integer"),
    ],
)
def test_each_bad_field_is_named(change: dict, field: str, message: str) -> None:
    obj = {**GOOD, **change}
    with pytest.raises(SiftError) as err:
        validate_seed(obj, path="seeds.jsonl", line=4)
    assert f"seeds.jsonl:4: field '{field}'" in str(err.value)
    assert message in str(err.value)


def test_missing_instruction(tmp_path: Path) -> None:
    obj = dict(GOOD)
    del obj["instruction"]
    with pytest.raises(SiftError, match="field 'instruction': missing"):
        validate_seed(obj, path="s", line=1)


def test_duplicate_ids(tmp_path: Path) -> None:
    p = _seed_file(tmp_path / "s.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "id": "t2"}), json.dumps(GOOD)])
    with pytest.raises(SiftError, match=r"s.jsonl:3: field 'id': duplicate id 't1' \(first at .*s.jsonl:1\)"):
        load_seeds(p)


def test_folder_of_seed_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    _seed_file(tmp_path / "d" / "b.jsonl", [json.dumps({**GOOD, "id": "b"})])
    _seed_file(tmp_path / "d" / "a.jsonl", [json.dumps({**GOOD, "id": "a"})])
    assert [s["id"] for s in load_seeds(tmp_path / "d")] == ["a", "b"]


def test_cli_broken_third_line_exits_nonzero_and_writes_nothing(in_tmp: Path, capsys) -> None:
    p = _seed_file(in_tmp / "seeds.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "id": "t2"}),
                                            json.dumps({**GOOD, "id": "t3", "instances": {"input": ""}})])
    assert main(["seeds", str(p), "--run", "r"]) == 2
    err = capsys.readouterr().err
    assert "seeds.jsonl:3" in err and "field 'instances'" in err
    assert "Traceback" not in err
    assert not (in_tmp / "runs" / "r" / "seeds.jsonl").exists()


def test_cli_writes_normalised_seeds_and_manifest(in_tmp: Path) -> None:
    p = _seed_file(in_tmp / "seeds.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "id": "t2"})])
    assert main(["seeds", str(p), "--run", "r"]) == 0
    out = in_tmp / "runs" / "r"
    assert [s["id"] for s in read_jsonl(out / "seeds.jsonl")] == ["t1", "t2"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["seeds"]["stats"]["tasks"] == 2
    assert json.loads((out / "seeds.stats.json").read_text()) == manifest["stages"]["seeds"]["stats"]
    assert {k: manifest["stages"]["seeds"]["stats"][k] for k in ("stage", "unit", "read", "kept", "rejected")} == {
        "stage": "seeds", "unit": "tasks", "read": 2, "kept": 2, "rejected": 0}
    assert "seeds.jsonl" in manifest["artifacts"]
    assert manifest["versions"]["transformers"]
