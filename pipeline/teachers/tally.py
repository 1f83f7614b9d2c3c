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
    tally = TeacherTally(stage)
    for r in accepted:
        tally.add(r, kept=True)
    for r in rejected:
        tally.add(r, kept=False)
    return tally.table(usage)


class TeacherTally:
    """`per_teacher` a record at a time, for a stage that streams its records."""

    def __init__(self, stage: str | None = None) -> None:
        self.stage = stage
        self.kept: Counter[str] = Counter()
        self.dropped: dict[str, Counter[str]] = {}

    def add(self, record: dict, *, kept: bool) -> None:
        """Count a kept record, or a rejected ledger row (its `reason`, its record under `record`)."""
        name = str(record_teacher(record, self.stage))
        if kept:
            self.kept[name] += 1
        else:
            self.dropped.setdefault(name, Counter())[str(record.get("reason", "?"))] += 1

    def table(self, usage: dict[str, dict] | None = None) -> dict[str, dict]:
        names = sorted(set(self.kept) | set(self.dropped) | set(usage or {}))
        out = {}
        for name in names:
            reasons = self.dropped.get(name, Counter())
            out[name] = {"kept": self.kept.get(name, 0), "rejected": sum(reasons.values()),
                         "rejected_by_reason": dict(sorted(reasons.items())), **(usage or {}).get(name, {})}
        return out


def add_usage(total: dict[str, dict], more: dict[str, dict] | None) -> dict[str, dict]:
    """Sum per-teacher usage tables (journal entries of several rounds)."""
    for name, row in (more or {}).items():
        mine = total.setdefault(name, {})
        for k, v in row.items():
            mine[k] = round(mine.get(k, 0) + v, 3)
    return total
