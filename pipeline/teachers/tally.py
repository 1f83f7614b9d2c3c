"""Per-teacher figures of a stage: accepted and rejected by reason from each record's provenance,
plus the requests, tokens, seconds and errors a TeacherPool counted.

    table = per_teacher(accepted, rejected, stage="classify", usage=stats.get("by_teacher"))

Stages write the table into their stats as `by_teacher`; `sift filter` writes one into funnel.json
and `sift inspect --by teacher` prints one for any artifact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

STAGE_KEYS = ("instances", "classify")  # where a later stage keeps its own provenance in a record


def record_teacher(record: dict, stage: str | None = None) -> str | None:
    """The name of the teacher that wrote a record: the one of `stage` (classify, instances) when given,
    else the one that wrote the instruction (generate); ledger rows keep the record under `record`."""
    rec = record.get("record") if isinstance(record.get("record"), dict) else record
    prov = rec.get("provenance") if isinstance(rec.get("provenance"), dict) else {}
    if stage is not None:
        prov = prov.get(stage) if isinstance(prov.get(stage), dict) else {}
    teacher = prov.get("teacher")
    if isinstance(teacher, dict):
        return str(teacher.get("name")) if teacher.get("name") is not None else None
    if isinstance(teacher, str):
        return teacher
    loop = rec.get("loop") or (rec.get("metadata") or {}).get("loop") or {}
    return loop.get("teacher") if isinstance(loop, dict) else None


def per_teacher(accepted: Iterable[dict], rejected: Iterable[dict], *, stage: str | None = None,
                usage: dict[str, dict] | None = None) -> dict[str, dict]:
    """{teacher: {kept, rejected, rejected_by_reason, and the usage figures}}, teachers in name order (the
    counts named as in every stage's stats, docs/artifacts.md)."""
    kept: Counter[str] = Counter(str(record_teacher(r, stage)) for r in accepted)
    dropped: dict[str, Counter[str]] = {}
    for r in rejected:
        dropped.setdefault(str(record_teacher(r, stage)), Counter())[str(r.get("reason", "?"))] += 1
    names = sorted(set(kept) | set(dropped) | set(usage or {}))
    out = {}
    for name in names:
        reasons = dropped.get(name, Counter())
        out[name] = {"kept": kept.get(name, 0), "rejected": sum(reasons.values()),
                     "rejected_by_reason": dict(sorted(reasons.items())), **(usage or {}).get(name, {})}
    return out


def add_usage(total: dict[str, dict], more: dict[str, dict] | None) -> dict[str, dict]:
    """Sum per-teacher usage tables (journal entries of several rounds)."""
    for name, row in (more or {}).items():
        mine = total.setdefault(name, {})
        for k, v in row.items():
            mine[k] = round(mine.get(k, 0) + v, 3)
    return total
