"""One shape for every stage's `*.stats.json` (and the stats in manifest.json), documented in
docs/artifacts.md:

    {"stage": "filter", "unit": "examples", "read": 91, "kept": 85, "rejected": 6,
     "rejected_by_reason": {"rouge_duplicate": 4, "too_short": 2}, ...the stage's own figures}

`unit` says what is counted (tasks, instructions or examples), so figures of two stages are only
compared when they count the same thing; `read == kept + rejected`, and `rejected` is the sum of
`rejected_by_reason`.
"""

from __future__ import annotations

from typing import Any

UNITS = ("tasks", "instructions", "examples")
COMMON = ("stage", "unit", "read", "kept", "rejected", "rejected_by_reason")
# the names stages used for the common counts before they shared one schema: never written beside it
_REPLACED = frozenset({*COMMON, "input", "records_in", "candidates", "accepted", "by_reason", "records"})


def stage_stats(stage: str, unit: str, *, read: int, kept: int, rejected_by_reason: dict[str, int],
                extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stats document of a stage: the common counts first, then the stage's own figures
    (`extras`, less any key that names a common count another way)."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    rejected = sum(rejected_by_reason.values())
    return {"stage": stage, "unit": unit, "read": read, "kept": kept, "rejected": rejected,
            "rejected_by_reason": dict(sorted(rejected_by_reason.items())),
            **{k: v for k, v in (extras or {}).items() if k not in _REPLACED}}
