"""The report's refine section: what `sift refine` kept and why, and a few records before and after.

    sift report --run demo          # the "refine" section, when the run has refine.stats.json

Reads refine.stats.json and refined.jsonl (each record's `refinement`); only reads.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from pipeline.io.artifacts import iter_jsonl, read_json

SHOWN = 4  # refined records shown, before and after


def _e(x: Any) -> str:
    return html.escape(str(x))


def _reasons(table: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(table.items(), key=lambda kv: -kv[1])) or "none"


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) else "" if x is None else str(x)


def refine_section(d: Path) -> str:
    """Per-round counts, the reasons rewrites were kept or not, and a few records that changed."""
    path = d / "refine.stats.json"
    if not path.is_file():
        return "<p class=missing>No refine.stats.json (run `sift refine` / `make refine` to let the teacher " \
               "rewrite and the student choose).</p>"
    stats = read_json(path)
    rewrites = stats.get("rewrites", {})
    out = [f"<p>{_e(stats.get('read', 0))} records from {_e(stats.get('source', '?'))}, select rule "
           f"<code>{_e(stats.get('select'))}</code>, target <code>{_e(stats.get('target'))}</code>: "
           f"{_e(stats.get('refined', 0))} refined; {_e(rewrites.get('kept', 0))} of "
           f"{_e(rewrites.get('proposed', 0))} rewrites kept.</p>"]
    rows = "".join(f"<tr><td class=num>{_e(r['round'])}</td><td class=num>{_e(r['records'])}</td>"
                   f"<td class=num>{_e(r['refined'])}</td><td>{_e(_reasons(r.get('kept_by_reason', {})))}</td>"
                   f"<td>{_e(_reasons(r.get('rejected_by_reason', {})))}</td></tr>" for r in stats.get("rounds", []))
    out.append("<table><tr><th>round</th><th>records</th><th>refined</th><th>rewrites kept (why)</th>"
               f"<th>rewrites not kept (why)</th></tr>{rows}</table>")
    refined = d / "refined.jsonl"
    shown = []
    if refined.is_file():
        for _, rec in iter_jsonl(refined, allow_empty=True):
            if rec.get("refinement", {}).get("changed"):
                shown.append(rec)
            if len(shown) == SHOWN:
                break
    for rec in shown:
        ref = rec["refinement"]
        kept = [s for s in ref["steps"] if s["decision"] == "rewrite"]
        scores = "; ".join(f"{_e(s['target'])} ({_e(s['reason'])}): " + ", ".join(
            f"{k} {_fmt(s['scores']['original'].get(k))} &rarr; {_fmt(s['scores']['rewrite'].get(k))}"
            for k in ("ifd", "rifd", "judge") if k in s["scores"]["original"]) for s in kept if "scores" in s)
        out.append(f"<h3>{_e(rec['id'])}</h3><table><tr><th></th><th>original</th><th>refined</th></tr>"
                   f"<tr><td>instruction</td><td>{_e(ref['original']['instruction'])}</td>"
                   f"<td>{_e(rec['instruction'])}</td></tr>"
                   f"<tr><td>output</td><td><pre>{_e(ref['original']['output'])}</pre></td>"
                   f"<td><pre>{_e(rec['output'])}</pre></td></tr></table>"
                   f"<p>critique: {_e(kept[-1]['critique'] if kept else '')}<br>scores: {scores}</p>")
    return "\n".join(out)
