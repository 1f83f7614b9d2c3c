"""Export the kept records for training: chat messages and Alpaca's JSON list.

    sift export --run demo        # or: make export

Reads runs/<run>/filtered.jsonl and writes, atomically:
- train.jsonl / valid.jsonl: {"id", "messages": [user, assistant], "metadata"} a line;
- alpaca.json: the train split as Alpaca's list of {instruction, input, output}.
The split hashes each id with the seed, so it is deterministic and a record stays on its side
when others are added or removed. All three load with `datasets.load_dataset("json", ...)`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import all_or_none, iter_jsonl, require, write_json, write_jsonl
from pipeline.io.runs import locked, record_stage, run_dir
from train.format import to_messages

METADATA_FIELDS = ("provenance", "source", "task_id", "seed_id", "is_classification", "loop")  # carried if present


def split_score(record_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from the id and seed: below the valid fraction means validation."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_ids(ids: list[str], valid_fraction: float, seed: int) -> set[str]:
    """The ids of the validation split: at least one when there are two or more records."""
    scores = {i: split_score(i, seed) for i in ids}
    valid = {i for i, s in scores.items() if s < valid_fraction}
    if not valid and len(ids) >= 2 and valid_fraction > 0:
        valid = {min(ids, key=scores.__getitem__)}
    if len(valid) == len(ids) and ids:  # keep something to train on
        valid.discard(max(valid, key=scores.__getitem__))
    return valid


def read_filtered(path) -> list[dict]:
    records, seen = [], {}
    for line, obj in iter_jsonl(path):
        rec = {k: require(obj, k, str, path=path, line=line) for k in ("id", "instruction", "input", "output")}
        for k in ("instruction", "output"):
            if not rec[k].strip():
                raise SiftError("is empty", path=path, line=line, field=k)
        if rec["id"] in seen:
            raise SiftError(f"duplicate id {rec['id']!r} (first on line {seen[rec['id']]})", path=path,
                            line=line, field="id")
        seen[rec["id"]] = line
        rec["metadata"] = {k: obj[k] for k in METADATA_FIELDS if k in obj}
        records.append(rec)
    return records


def chat_record(r: dict) -> dict:
    """An exported line: the id, the chat messages, and the metadata carried along."""
    return {"id": r["id"], "messages": to_messages(r["instruction"], r["input"], r["output"]),
            "metadata": r.get("metadata", {})}


def write_splits(directory: Path, train: list[dict], valid: list[dict]) -> None:
    """train.jsonl, valid.jsonl and alpaca.json in `directory`, all three or none."""
    with all_or_none(*(directory / n for n in ("train.jsonl", "valid.jsonl", "alpaca.json"))):
        write_jsonl(directory / "train.jsonl", (chat_record(r) for r in train))
        write_jsonl(directory / "valid.jsonl", (chat_record(r) for r in valid))
        write_json(directory / "alpaca.json", [{"instruction": r["instruction"], "input": r["input"],
                                                "output": r["output"]} for r in train])


def export(*, run: str = "demo", valid_fraction: float = 0.1, seed: int = 0) -> None:
    """Write train.jsonl, valid.jsonl (chat messages) and alpaca.json from filtered.jsonl.

    Args:
        run: Run name; artifacts live in runs/<run>/.
        valid_fraction: Share of records held out for validation (at least one when there are two).
        seed: Changes which records fall in the validation split.
    """
    if not 0 <= valid_fraction < 1:
        raise SiftError(f"must be in [0, 1), got {valid_fraction}", field="valid_fraction")
    directory = run_dir(run)
    source = directory / "filtered.jsonl"
    with locked(directory):
        records = read_filtered(source)
        valid_ids = split_ids([r["id"] for r in records], valid_fraction, seed)
        train = [r for r in records if r["id"] not in valid_ids]
        valid = [r for r in records if r["id"] in valid_ids]
        write_splits(directory, train, valid)
        stats = {"records": len(records), "train": len(train), "valid": len(valid),
                 "with_input": sum(bool(r["input"]) for r in records)}
        record_stage(directory, "export", {"run": run, "valid_fraction": valid_fraction, "seed": seed},
                     stats=stats)
    print(f"exported {len(train)} train and {len(valid)} validation records to {directory}/"
          " (train.jsonl, valid.jsonl, alpaca.json)")
