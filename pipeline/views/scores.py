"""The report's score section and `sift inspect`'s score percentiles, from records that carry `scores`.

    sift report --run demo          # the "scores" section, when the run has scored.jsonl
    sift inspect runs/demo/scored.jsonl

Reads scored.jsonl (kept) and scored.rejected.jsonl (each entry's `record`), so the histograms and
the highest and lowest examples cover every scored record, selected or not. Only reads: `sift score`
writes the scores.
"""

from __future__ import annotations

import heapq
import html
import math
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.io.artifacts import iter_jsonl
from pipeline.views import plots
from pipeline.views.stats import percentile

SHOWN = 5  # highest and lowest examples per score
PERCENTILES = (0, 10, 25, 50, 75, 90, 100)


def _e(x: Any) -> str:
    return html.escape(str(x))


def score_names(records: Sequence[dict]) -> list[str]:
    """Every numeric score any record carries, in first-seen order."""
    names: dict[str, None] = {}
    for r in records:
        for k, v in (r.get("scores") or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                names.setdefault(k, None)
    return list(names)


def values(records: Sequence[dict], name: str) -> list[tuple[float, dict]]:
    out = []
    for r in records:
        v = (r.get("scores") or {}).get(name)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out.append((float(v), r))
    return out


def percentile_table(records: Iterable[dict]) -> list[dict]:
    """Per score: n, missing, mean and the PERCENTILES (for `sift inspect`)."""
    tally = ScoreTally()
    for r in records:
        tally.add(r)
    return tally.table()


class ScoreTally:
    """`percentile_table` a record at a time: each score's finite values, and the count of records."""

    def __init__(self) -> None:
        self.records = 0
        self.values: dict[str, list[float]] = {}  # every numeric score, in first-seen order

    def add(self, r: dict) -> None:
        self.records += 1
        for k, v in (r.get("scores") or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                vals = self.values.setdefault(k, [])
                if math.isfinite(v):
                    vals.append(float(v))

    def table(self) -> list[dict]:
        rows = []
        for name, unsorted in self.values.items():
            vals = sorted(unsorted)
            if not vals:
                continue
            row: dict[str, Any] = {"score": name, "n": len(vals), "missing": self.records - len(vals),
                                   "mean": sum(vals) / len(vals)}
            row.update({f"p{q}": percentile(vals, q) for q in PERCENTILES})
            rows.append(row)
        return rows


def score_histograms(series: dict[str, Sequence[float]], pairs: dict[str, Sequence[tuple[float, int]]]) -> str:
    """Top row: each score's histogram with its median; bottom row: each score against answer words."""
    plt = plots._pyplot()
    names = list(series)
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 6), squeeze=False)
    for i, name in enumerate(names):
        vals = sorted(series[name])
        ax = axes[0][i]
        ax.hist(vals, bins=min(30, max(5, len(vals) // 4)), color=plots.COLORS[i % len(plots.COLORS)])
        ax.axvline(percentile(vals, 50), color="#222", linestyle="--", linewidth=1)
        ax.set_title(f"{name} (n={len(vals)}, median {percentile(vals, 50):.3g})", fontsize=9)
        ax = axes[1][i]
        ax.scatter([w for _, w in pairs[name]], [s for s, _ in pairs[name]], s=8, alpha=0.6,
                   color=plots.COLORS[i % len(plots.COLORS)])
        ax.set_xlabel("answer words", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return plots.to_data_uri(fig)


def _example_rows(ranked: Sequence[tuple[float, dict]]) -> str:
    rows = "".join(
        f"<tr><td class=num>{v:.4g}</td><td>{_e(r.get('instruction', ''))[:300]}</td>"
        f"<td>{_e(r.get('input', ''))[:200]}</td><td>{_e(r.get('output', ''))[:300]}</td></tr>" for v, r in ranked)
    return f"<table><tr><th>score</th><th>instruction</th><th>input</th><th>output</th></tr>{rows}</table>"


def scored_records(d: Path) -> list[dict] | None:
    """Kept and rejected scored records of a run; None when `sift score` has not run."""
    return list(iter_scored(d)) if (d / "scored.jsonl").is_file() else None


def iter_scored(d: Path) -> Iterator[dict]:
    """`scored_records` a record at a time: scored.jsonl, then each scored.rejected.jsonl entry's record."""
    yield from (r for _, r in iter_jsonl(d / "scored.jsonl", allow_empty=True))
    rejected = d / "scored.rejected.jsonl"
    if rejected.is_file():
        yield from (r["record"] for _, r in iter_jsonl(rejected, allow_empty=True) if isinstance(r.get("record"), dict))


def scores_section(d: Path) -> str:
    """Histograms, score against answer length, and the highest and lowest examples by each score.
    Two passes over the scored records: the scores and answer lengths first (numbers, not records),
    then the few records shown."""
    if not (d / "scored.jsonl").is_file():
        return "<p class=missing>No scored.jsonl yet: run `sift score` (make score).</p>"
    tally = ScoreTally()
    found: dict[str, tuple[array, array, array]] = {}  # score -> its values, answer words, record positions
    for i, r in enumerate(iter_scored(d)):
        tally.add(r)
        for k, v in (r.get("scores") or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                vals, words, where = found.setdefault(k, (array("d"), array("q"), array("q")))
                vals.append(float(v))
                words.append(len((r.get("output") or "").split()))
                where.append(i)
    names = [n for n in tally.values if n in found]  # score_names' order: first seen, finite or not
    if not names:
        return "<p class=missing>scored.jsonl has no numeric scores.</p>"
    series = {n: list(found[n][0]) for n in names}
    pairs = {n: list(zip(found[n][0], found[n][1], strict=True)) for n in names}
    out = [f"<p>{tally.records} scored records (kept and dropped by --keep), ranked highest first; for ifd the "
           "highest are the hardest (Cherry LLM's pick), and 1 or more means the instruction does not help "
           "(`ifd<1` drops them).</p>",
           f'<img src="{score_histograms(series, pairs)}" alt="score histograms and score against answer length">']
    del series, pairs
    table = tally.table()
    cols = ["score", "n", "missing", "mean", *(f"p{q}" for q in PERCENTILES)]
    out.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td class=num>{_e(f'{r[c]:.4g}' if isinstance(r[c], float) else r[c])}</td>"
                         for c in cols) + "</tr>" for r in table) + "</table>")
    # the SHOWN first and last of a stable sort, highest first, as sorted(..., reverse=True) ranks them
    shown = {}
    for n in names:
        vals = found[n][0]
        top = heapq.nlargest(SHOWN, range(len(vals)), key=vals.__getitem__)
        bottom = heapq.nsmallest(SHOWN, range(len(vals)), key=lambda j, vals=vals: (vals[j], -j))
        shown[n] = (top, bottom)
    wanted = {found[n][2][j] for n in names for picks in shown[n] for j in picks}
    records = {i: r for i, r in enumerate(iter_scored(d)) if i in wanted}
    for n in names:
        vals, _, where = found[n]
        top, bottom = ([(vals[j], records[where[j]]) for j in picks] for picks in shown[n])
        out.append(f"<h3>{_e(n)}: the {SHOWN} highest</h3>{_example_rows(top)}")
        out.append(f"<h3>{_e(n)}: the {SHOWN} lowest</h3>{_example_rows(bottom)}")
    return "\n".join(out)


def ledger_record(r: dict) -> dict:
    """A ledger row's `record` (which carries the scores), or the record itself."""
    return r["record"] if "scores" not in r and isinstance(r.get("record"), dict) else r


def inspect_rows(records: Iterable[dict]) -> list[dict]:
    """`percentile_table` of records or of ledger rows (whose `record` carries the scores)."""
    return percentile_table(ledger_record(r) for r in records)


def print_percentiles(rows: Sequence[dict], console: Any) -> None:
    """The `sift inspect` table of score percentiles (nothing when no record has scores)."""
    if not rows:
        return
    from rich.table import Table

    t = Table(title="scores (sift score): percentiles")
    cols = ["n", "missing", "mean", *(f"p{q}" for q in PERCENTILES)]
    t.add_column("score")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["score"], *(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    console.print(t)
