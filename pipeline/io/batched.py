"""The resumable per-record loop shared by `sift classify` and `sift instances`.

    kept, rejected, stats = run_batches(records, work, journal_path=..., fingerprint=..., ...)

Records are processed in batches; each finished batch is one journal entry holding its results,
keyed by record id. A rerun skips the ids already done, so a kill at any moment loses at most
the batch in flight, and the final artifact, assembled in input order, is the same as an
uninterrupted run's. Records rejected with `teacher_error` are retried by the next run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.journal import open_journal
from pipeline.io.progress import StageProgress

RETRIED = frozenset({"teacher_error"})  # reasons a rerun tries again
Work = Callable[[list[dict]], tuple[list[dict], list[dict], dict]]  # batch -> kept, rejected, counters


def check_ids(records: list[dict], path: Path) -> None:
    seen: set[str] = set()
    for line, rec in enumerate(records, start=1):
        rid = rec.get("id")
        if not isinstance(rid, str) or not rid:
            raise SiftError("missing or empty", path=path, line=line, field="id")
        if rid in seen:
            raise SiftError(f"duplicate id {rid!r}", path=path, line=line, field="id")
        seen.add(rid)


def _add(total: object, more: object) -> object:
    """Counter values sum; nested tables (per-teacher figures) sum key by key."""
    if isinstance(more, dict):
        out = dict(total) if isinstance(total, dict) else {}
        for k, v in more.items():
            out[k] = _add(out.get(k), v)
        return out
    return round((total or 0) + more, 6) if isinstance(more, float) else (total or 0) + more  # type: ignore[operator]


def run_batches(records: list[dict], work: Work, *, stage: str, journal_path: Path, fingerprint: dict,
                batch_size: int) -> tuple[list[dict], list[dict], dict]:
    """Run `work` over the records not yet journaled; return everything in input order."""
    if batch_size < 1:
        raise SiftError(f"must be >= 1, got {batch_size}", field="batch_size")
    started = time.monotonic()
    journal, entries = open_journal(journal_path, fingerprint)
    final: dict[str, tuple[str, dict]] = {}  # id -> ("kept" | "rejected", record), the latest wins
    counters: dict[str, int] = {}

    def absorb(entry: dict) -> None:
        for rec in entry["kept"]:
            final[rec["id"]] = ("kept", rec)
        for rec in entry["rejected"]:
            final[rec["id"]] = ("rejected", rec)
        for k, v in entry["counters"].items():
            counters[k] = _add(counters.get(k), v)

    for entry in entries:
        absorb(entry)
    todo = [r for r in records if r["id"] not in final or
            (final[r["id"]][0] == "rejected" and final[r["id"]][1].get("reason") in RETRIED)]
    with StageProgress(stage, len(records), initial=len(records) - len(todo)) as bar:
        for lo in range(0, len(todo), batch_size):
            batch = todo[lo:lo + batch_size]
            kept, rejected, batch_counters = work(batch)
            entry = {"kind": "batch", "kept": kept, "rejected": rejected, "counters": batch_counters}
            journal.append([entry])
            absorb(entry)
            bar.update(done=len(batch), requests=batch_counters.get("requests", 0),
                       tokens_out=batch_counters.get("tokens_out", 0), rejected=len(rejected))
    kept_out, rejected_out = [], []
    for rec in records:
        status, out = final.get(rec["id"], ("missing", rec))
        (kept_out if status == "kept" else rejected_out).append(out)
    by_reason: dict[str, int] = {}
    for rec in rejected_out:
        by_reason[rec.get("reason", "?")] = by_reason.get(rec.get("reason", "?"), 0) + 1
    stats = {"records_in": len(records), "accepted": len(kept_out), "rejected": len(rejected_out),
             "rejected_by_reason": dict(sorted(by_reason.items())), **dict(sorted(counters.items())),
             "wall_time_s": round(time.monotonic() - started, 3)}
    return kept_out, rejected_out, stats
