"""Selection on scores: the `--keep` rules of `sift score`, pure and in order, with a ledger.

    .venv/bin/python -m pytest tests/filters/test_selection.py -q

A rule is `SCORE OP NUMBER` (OP one of < <= > >= ==), e.g. `ifd<1` or `judge>=4`, or `top=F:SCORE`,
the fraction F of the records still alive with the highest SCORE (ties at the cut kept in input order).
For `ifd` the highest are the hardest examples, which Cherry LLM and Superfiltering select; put `ifd<1`
first, as they do, so that answers the instruction does not help predict are dropped before the cut.
Rules apply in the given order, each to what the
previous ones kept, like the filter rules. A dropped record's reason is `low_<score>`, except
`ifd<1`, whose reason is `ifd_at_least_1` (Superfiltering drops answers that do not depend on their
instruction); a record without the score (None: e.g. an empty answer's IFD) is dropped as `no_<score>`.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "==": operator.eq,
                                                  "<": operator.lt, ">": operator.gt}
_NAME = r"[a-z][a-z0-9_]*"
# what float() reads, the non-finite spellings included, so that they get their own message below
_NUMBER = r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?|[nN][aA][nN])"
_THRESHOLD = re.compile(rf"^({_NAME})\s*(<=|>=|==|<|>)\s*({_NUMBER})$")
_TOP = re.compile(rf"^top\s*=\s*({_NUMBER})\s*:\s*({_NAME})$")


def _finite(part: str, text: str) -> float:
    """The rule's number; inf, nan and numbers too large for a float (1e999) are refused, however written."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{part!r}: {text} is not a finite number; a keep rule needs one, e.g. ifd<1")
    return value


@dataclass(frozen=True)
class KeepRule:
    """One rule: a threshold (`op`, `value`) or a top fraction (`op` == "top", `value` the fraction)."""

    text: str  # as the user wrote it, for the funnel
    score: str
    op: str
    value: float

    @property
    def reason(self) -> str:
        if self.score == "ifd" and self.op == "<" and self.value == 1:
            return "ifd_at_least_1"
        return f"low_{self.score}"


def parse_keep(spec: str | None, known: Sequence[str] | None = None) -> list[KeepRule]:
    """'ifd<1,judge>=4,top=0.25:judge' -> rules, in order; None: no rules (keep all). ValueError naming
    the bad part: an empty rule ("", "," or "ifd<1,"), a number that is not finite, and, when `known`
    is given, a rule on a score that no scorer computes."""
    rules: list[KeepRule] = []
    if spec is None:
        return rules
    for n, part in enumerate((p.strip() for p in spec.split(",")), start=1):
        if not part:
            raise ValueError(f"keep rule {n} of {spec!r} is empty; leave --keep out to keep every record")
        m = _THRESHOLD.match(part)
        if m:
            rule = KeepRule(part, m.group(1), m.group(2), _finite(part, m.group(3)))
        elif (m := _TOP.match(part)) is not None:
            fraction = _finite(part, m.group(1))
            if not 0 < fraction <= 1:
                raise ValueError(f"{part!r}: the fraction of top= must be in (0, 1], got {fraction}")
            rule = KeepRule(part, m.group(2), "top", fraction)
        else:
            raise ValueError(f"cannot read keep rule {part!r}; write SCORE<NUMBER (also <=, >, >=, ==), "
                             "e.g. ifd<1 or judge>=4, or top=FRACTION:SCORE, e.g. top=0.25:judge")
        if known is not None and rule.score not in known:
            raise ValueError(f"{part!r}: no scorer computes {rule.score!r} (scorers: {', '.join(known)})")
        rules.append(rule)
    return rules


def score_of(record: Mapping[str, Any], score: str) -> float | None:
    value = (record.get("scores") or {}).get(score)
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _top_ids(alive: Sequence[tuple[int, float]], rule: KeepRule) -> set[int]:
    """Positions of the best ceil(fraction * n) records among (position, score) pairs."""
    n = math.ceil(rule.value * len(alive) - 1e-9)
    ranked = sorted(alive, key=lambda x: (-x[1], x[0]))  # highest first, ties in input order
    return {pos for pos, _ in ranked[:n]}


def select(records: Sequence[Mapping[str, Any]], rules: Sequence[KeepRule]
           ) -> tuple[list[str | None], list[dict[str, Any]]]:
    """Each record's drop reason (None: kept), and the funnel rows [{rule, in, out, dropped}]."""
    reasons: list[str | None] = [None] * len(records)
    rows = []
    for rule in rules:
        alive = [i for i, r in enumerate(reasons) if r is None]
        scored = [(i, s) for i in alive if (s := score_of(records[i], rule.score)) is not None]
        for i in set(alive) - {i for i, _ in scored}:
            reasons[i] = f"no_{rule.score}"
        if rule.op == "top":
            best = _top_ids(scored, rule)
            drop = [i for i, _ in scored if i not in best]
        else:
            drop = [i for i, s in scored if not OPS[rule.op](s, rule.value)]
        for i in drop:
            reasons[i] = rule.reason
        out = sum(r is None for r in reasons)
        rows.append({"rule": f"keep {rule.text}", "in": len(alive), "out": out, "dropped": len(alive) - out})
    return reasons, rows
