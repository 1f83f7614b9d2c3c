"""Which eval sets `sift eval` runs, their held-out rows, and eval.json as one entry per set, merged in place.

    sift eval --run demo --eval.sets valid,general                    # make eval
    sift eval --run demo --eval.eval_file ../shared/data/user_oriented_instructions.jsonl

Sets by name: `valid` is the run's own split (runs/<run>/valid.jsonl), `general` the held-out set
sift ships (train/evalsets/general.jsonl), and a file given with eval.eval_file is named after its stem
(`user_oriented_instructions`). eval.json maps each name to its results; running one set reads the
file, replaces only that set's entry and writes it back atomically (the caller holds the run lock),
so earlier sets stay. An eval.json from before sets existed (one result at the top) is kept as the
entry of the set it came from. A set's file becomes rows {id, messages} (`load_heldout`: chat,
Alpaca or Self-Instruct records), of which `pick` takes a seeded subset (also loop's and federate's).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import read_json, read_records, write_json
from train.format import DataError, check_messages, to_messages
from train.general_set import GENERAL_PATH as GENERAL

BUILTIN = ("valid", "general")


def set_name(path: Path) -> str:
    """A file's set name: its stem, with anything outside letters, digits, - and _ made '_'."""
    stem = path.name.split(".", 1)[0] or "file"
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem)


def resolve_sets(directory: Path, sets: str | None, eval_file: str | None) -> list[tuple[str, Path]]:
    """(name, file) of every set to run, in order: the named built-in sets, then eval.eval_file.
    With neither, the run's validation split."""
    names = [s.strip() for s in (sets or "").split(",") if s.strip()]
    unknown = [s for s in names if s not in BUILTIN]
    if unknown:
        raise SiftError(f"unknown eval set {unknown[0]!r}; built-in sets are {', '.join(BUILTIN)} "
                        "(a file of your own goes in --eval.eval_file)", field="eval.sets")
    if not names and not eval_file:
        names = ["valid"]
    out: list[tuple[str, Path]] = []
    for name in dict.fromkeys(names):
        path = directory / "valid.jsonl" if name == "valid" else GENERAL
        if not path.is_file():
            hint = "run `sift export` first" if name == "valid" else "the general set ships with sift"
            raise SiftError(f"eval set {name!r} is missing ({hint})", path=path, field="eval.sets")
        out.append((name, path))
    if eval_file:
        path = Path(eval_file)
        if not path.is_file():
            raise SiftError("no such eval file", path=path, field="eval.eval_file")
        name = set_name(path)
        if name in {n for n, _ in out}:
            raise SiftError(f"eval.eval_file would be named {name!r}, like a set already asked for; rename the file",
                            path=path, field="eval.eval_file")
        out.append((name, path))
    return out


def read_sets(path: Path) -> dict[str, dict]:
    """eval.json as {set name: entry}; an old single-result file becomes the entry of its own set."""
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise SiftError("eval.json must hold an object of eval sets", path=path)
    if "base" in data and "student" in data:  # written before eval sets existed
        source = Path(str(data.get("eval_file") or "valid.jsonl"))
        return {"valid" if source.name == "valid.jsonl" else set_name(source): data}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def merge_sets(path: Path, entries: dict[str, dict]) -> dict[str, dict]:
    """Replace these sets' entries in eval.json, keep every other set; atomic. Returns the whole file."""
    merged = read_sets(path) | entries
    write_json(path, merged)
    return merged


# ---------------------------------------------------------------- held-out data


def load_heldout(path: Path) -> list[dict]:
    """Rows {id, messages} from chat, Alpaca or Self-Instruct records; one row per instance."""
    rows: list[dict] = []
    for pos, rec in read_records(path):
        rec_id = str(rec.get("id", f"row{pos}"))
        try:
            if "messages" in rec:
                rows.append({"id": rec_id, "messages": check_messages(rec["messages"])})
            elif isinstance(rec.get("instances"), list):
                for k, inst in enumerate(rec["instances"]):
                    out = inst.get("output", "") if isinstance(inst, dict) else ""
                    if isinstance(out, str) and out.strip():
                        rows.append(
                            {
                                "id": f"{rec_id}#{k}",
                                "messages": to_messages(
                                    str(rec.get("instruction", "")), str(inst.get("input", "") or ""), out
                                ),
                            }
                        )
            elif isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str):
                messages = to_messages(rec["instruction"], str(rec.get("input") or ""), rec["output"])
                rows.append({"id": rec_id, "messages": messages})
            else:
                raise DataError(
                    "expected messages, instances, or instruction and output", field="instruction"
                )
        except DataError as e:
            raise SiftError(str(e), path=path, line=pos, field=e.field) from None
    rows = [r for r in rows if r["messages"][-1]["content"].strip()]
    if not rows:
        raise SiftError("no record with a reference answer", path=path)
    return rows


def pick(rows: list[dict], limit: int, seed: int) -> list[dict]:
    """A seeded subset that does not depend on file order (the file may be grouped by source)."""
    key = {r["id"]: hashlib.sha256(f"{seed}:{r['id']}".encode()).digest() for r in rows}
    return sorted(rows, key=lambda r: key[r["id"]])[:limit] if limit > 0 else rows
