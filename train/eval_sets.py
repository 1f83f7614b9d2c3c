"""Which eval sets `sift eval` runs, and eval.json as one entry per set, merged in place.

    sift eval --run demo --sets valid,general                    # make eval
    sift eval --run demo --eval-file ../shared/data/user_oriented_instructions.jsonl

Sets by name: `valid` is the run's own split (runs/<run>/valid.jsonl), `general` the held-out set
sift ships (train/evalsets/general.jsonl), and a file given with --eval-file is named after its stem
(`user_oriented_instructions`). eval.json maps each name to its results; running one set reads the
file, replaces only that set's entry and writes it back atomically (the caller holds the run lock),
so earlier sets stay. An eval.json from before sets existed (one result at the top) is kept as the
entry of the set it came from.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import read_json, write_json
from train.general_set import GENERAL_PATH as GENERAL

BUILTIN = ("valid", "general")


def set_name(path: Path) -> str:
    """A file's set name: its stem, with anything outside letters, digits, - and _ made '_'."""
    stem = path.name.split(".", 1)[0] or "file"
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem)


def resolve_sets(directory: Path, sets: str | None, eval_file: str | None) -> list[tuple[str, Path]]:
    """(name, file) of every set to run, in order: the named built-in sets, then the --eval-file.
    With neither, the run's validation split."""
    names = [s.strip() for s in (sets or "").split(",") if s.strip()]
    unknown = [s for s in names if s not in BUILTIN]
    if unknown:
        raise SiftError(f"unknown eval set {unknown[0]!r}; built-in sets are {', '.join(BUILTIN)} "
                        "(a file of your own goes in --eval-file)", field="sets")
    if not names and not eval_file:
        names = ["valid"]
    out: list[tuple[str, Path]] = []
    for name in dict.fromkeys(names):
        path = directory / "valid.jsonl" if name == "valid" else GENERAL
        if not path.is_file():
            hint = "run `sift export` first" if name == "valid" else "the general set ships with sift"
            raise SiftError(f"eval set {name!r} is missing ({hint})", path=path, field="sets")
        out.append((name, path))
    if eval_file:
        path = Path(eval_file)
        if not path.is_file():
            raise SiftError("no such eval file", path=path, field="eval_file")
        name = set_name(path)
        if name in {n for n, _ in out}:
            raise SiftError(f"--eval-file would be named {name!r}, like a set already asked for; rename the file",
                            path=path, field="eval_file")
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
