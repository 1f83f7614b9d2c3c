"""The human review ledger, runs/<run>/review.jsonl, and what `sift export` does with it.

    sift view --run demo     # accept, reject or edit records in the browser: lines land here
    sift export --run demo   # rejected records -> export.rejected.jsonl (reason human_review), edits applied

One line per decision: {id, decision, note, output (the edited text; only for `edit`), time,
artifact (the file the record was reviewed in), sha256 (that file's SHA-256 then)}. Decisions are
`accept`, `reject`, `edit` and `undo`; the latest line of an id wins, and `undo` leaves the id as if
never reviewed. Nothing is ever rewritten in place: the history stays readable.

Writing: each batch of decisions rewrites the whole ledger into a temporary file that is fsynced and
renamed over the old one (pipeline/io/artifacts.py's atomic_write), holding `.review.lock` for the
read-modify-write. A reader (`sift export`, make, a second viewer) therefore only ever sees a
complete ledger, so it needs no repair of a torn last line; the lock keeps two viewers from losing
each other's lines. The cost is a copy of the ledger per click, which is human-sized (10,000
decisions are about 3 MB). The run's own lock is not taken: reviewing must not wait for an hour of
`sift train`, and export reads the ledger once, as one consistent file.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import atomic_write, iter_jsonl, require

REVIEW_FILE = "review.jsonl"
LOCK_FILE = ".review.lock"
DECISIONS = ("accept", "reject", "edit", "undo")
REASON = "human_review"  # the export's rejection reason for a reviewer's `reject`
MAX_NOTE = 10_000  # characters; a note is a remark, not a document


def decision_line(record_id: str, decision: str, *, note: str = "", output: str | None = None,
                  artifact: str, sha256: str, at: str | None = None) -> dict[str, Any]:
    """One ledger line, checked: a known decision, an edit with a non-empty output, no output otherwise."""
    if not isinstance(record_id, str) or not record_id:
        raise SiftError("a review decision needs the record's id", field="id")
    if decision not in DECISIONS:
        raise SiftError(f"use one of {', '.join(DECISIONS)}, got {decision!r}", field="decision")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise SiftError(f"must be text of at most {MAX_NOTE} characters", field="note")
    if decision == "edit":
        if not isinstance(output, str) or not output.strip():
            raise SiftError("an edit needs the new output text", field="output")
    elif output is not None:
        raise SiftError(f"only an edit carries an output, not {decision!r}", field="output")
    line: dict[str, Any] = {"id": record_id, "decision": decision, "note": note}
    if decision == "edit":
        line["output"] = output
    line["time"] = at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line["artifact"] = artifact
    line["sha256"] = sha256
    return line


def read_review(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a review ledger in order ([] when there is none), each checked like decision_line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = []
    for lineno, obj in iter_jsonl(path, allow_empty=True):
        rid = require(obj, "id", str, path=path, line=lineno)
        decision = require(obj, "decision", str, path=path, line=lineno)
        if decision not in DECISIONS:
            raise SiftError(f"use one of {', '.join(DECISIONS)}, got {decision!r}", path=path, line=lineno,
                            field="decision")
        require(obj, "note", str, path=path, line=lineno, optional=True)
        output = require(obj, "output", str, path=path, line=lineno, optional=True)
        if decision == "edit" and not (output or "").strip():
            raise SiftError("an edit needs the new output text", path=path, line=lineno, field="output")
        if not rid:
            raise SiftError("is empty", path=path, line=lineno, field="id")
        lines.append(obj)
    return lines


def latest(lines: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """id -> its standing decision: the latest line per id wins, and `undo` removes the id."""
    state: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line["decision"] == "undo":
            state.pop(line["id"], None)
        else:
            state[line["id"]] = line
    return state


@contextlib.contextmanager
def _ledger_lock(directory: Path) -> Iterator[None]:
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SiftError(f"cannot lock the review ledger: {e.strerror or e}", path=directory) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for a copy of the ledger: milliseconds
        yield
    finally:
        os.close(fd)


def append_decisions(directory: str | Path, lines: list[dict[str, Any]]) -> Path:
    """Add decision lines to directory/review.jsonl: the old ledger plus the new lines, written
    atomically under the ledger's lock (see the module docstring for why a rewrite)."""
    directory = Path(directory)
    path = directory / REVIEW_FILE
    payload = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
    with _ledger_lock(directory):
        old = path.read_bytes().decode("utf-8") if path.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        atomic_write(path, lambda f: f.write(old + payload))
    return path


# ---------------------------------------------------------------- applying a review (pure)


@dataclass
class Applied:
    """What a review did to a list of records: the kept (edits applied), the rejected ledger rows,
    and the counts for the stage's stats."""

    kept: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    counts: dict[str, int] = field(default_factory=dict)


def apply_review(records: list[dict[str, Any]], decisions: dict[str, dict[str, Any]], *,
                 source: tuple[str, str] | None = None) -> Applied:
    """Apply standing decisions (from `latest`) to export records {id, instruction, input, output,
    metadata}. `reject`: the record leaves, as a ledger row {id, reason: human_review, note, score: None,
    reviewed_at, record}. `edit`: its output becomes the reviewer's text, and metadata.provenance.review
    keeps the teacher's original with the note and time. `accept`: unchanged. With `source` (the
    records' file name and SHA-256), counts say how many decisions were made on another version of
    that file (`stale`; they still apply by id, and ids are content hashes); `unmatched` counts
    decisions that name no record here."""
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    counts = {"accepted": 0, "rejected": 0, "edited": 0, "stale": 0, "unmatched": 0}
    ids = {r["id"] for r in records}
    counts["unmatched"] = sum(1 for i in decisions if i not in ids)
    for rec in records:
        d = decisions.get(rec["id"])
        kind, row = review_record(rec, d)
        if d is not None:
            counts[kind] += 1
            counts["stale"] += is_stale(d, source)
        (rejected if kind == "rejected" else kept).append(row)
    return Applied(kept, rejected, counts)


def is_stale(decision: dict[str, Any], source: tuple[str, str] | None) -> bool:
    """Made on another version of the records' file (`source`: its name and SHA-256)."""
    return source is not None and decision.get("artifact") == source[0] and decision.get("sha256") != source[1]


def review_record(rec: dict[str, Any], d: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """One record under its standing decision `d` (None: never reviewed), as `apply_review` says:
    ("kept", rec), ("accepted", rec), ("edited", a copy with the new output) or ("rejected", ledger row)."""
    if d is None:
        return "kept", rec
    if d["decision"] == "reject":
        flat = {k: v for k, v in rec.items() if k != "metadata"} | rec.get("metadata", {})
        return "rejected", {"id": rec["id"], "reason": REASON, "note": d.get("note", ""), "score": None,
                            "reviewed_at": d.get("time"), "record": flat}
    if d["decision"] == "edit":
        new = copy.deepcopy(rec)
        metadata = new.setdefault("metadata", {})
        provenance = metadata.get("provenance") if isinstance(metadata.get("provenance"), dict) else {}
        metadata["provenance"] = {**provenance, "review": {"original_output": rec["output"],
                                                           "note": d.get("note", ""),
                                                           "edited_at": d.get("time")}}
        new["output"] = d["output"]
        return "edited", new
    return "accepted", rec
