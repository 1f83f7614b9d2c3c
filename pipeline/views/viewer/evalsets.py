"""The eval sets page: per set, base and student metrics, and each sample's reference, the two
answers side by side with their ROUGE-L, and the judge's verdict (when `sift eval` ran a judge).

A sample is `worse` when the judge preferred the base in both orders (score 0), or, without a
verdict, when the student's answer is further from the reference (lower ROUGE-L) than the base's.
"""

from __future__ import annotations

from typing import Any

METRICS = ("nll", "perplexity", "rouge_l", "stop_rate", "mean_output_tokens", "distinct_2")
VERDICT = {1.0: "student better", 0.0: "base better", 0.5: "tie (the two orders disagree)"}


def _rouge(prediction: str, reference: str) -> float:
    from filters.rouge import rouge_l

    return rouge_l(prediction, reference)


def samples(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """A set's samples with their ROUGE-L per side, the judge's verdict and whether the student got worse."""
    verdicts = {v.get("id"): v for v in ((entry.get("judge") or {}).get("verdicts") or []) if isinstance(v, dict)}
    out = []
    for s in entry.get("samples") or []:
        if not isinstance(s, dict):
            continue
        ref, base, stud = (str(s.get(k) or "") for k in ("reference", "base", "student"))
        rb, rs = _rouge(base, ref), _rouge(stud, ref)
        v = verdicts.get(s.get("id"))
        score = v.get("score") if v else None
        worse = score == 0.0 if score is not None else rs < rb
        out.append({**s, "rouge_base": rb, "rouge_student": rs, "verdict": VERDICT.get(score) if v else None,
                    "judge_raw": (v or {}).get("raw"), "worse": worse})
    return out


def sets(eval_sets: dict[str, dict[str, Any]], *, only_worse: bool) -> list[dict[str, Any]]:
    """Every set's metrics (base, student, change) and its samples, only the worse ones if asked."""
    out = []
    for name, entry in eval_sets.items():
        base, stud = entry.get("base") or {}, entry.get("student") or {}
        metrics = [{"name": m, "base": base.get(m), "student": stud.get(m), "delta": (entry.get("delta") or {}).get(m),
                    "ci95": (entry.get("ci95") or {}).get(m)} for m in METRICS if m in base or m in stud]
        rows = samples(entry)
        judge = entry.get("judge") or {}
        out.append({"name": name, "examples": entry.get("examples"), "metrics": metrics,
                    "judge": {k: judge.get(k) for k in ("teacher", "win_rate", "ci95", "student_wins", "base_wins",
                                                        "ties", "unreadable") if k in judge},
                    "worse": sum(r["worse"] for r in rows), "shown": len(rows),
                    "samples": [r for r in rows if r["worse"] or not only_worse]})
    return out
