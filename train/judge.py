"""Pairwise judging for `sift eval --judge`: the teacher compares the base's and the student's answers.

    verdicts = judge_pairs(teacher, items, seed=0)      # items: instruction, reference, base, student
    summary = summarize(verdicts)                       # win rate, 95% CI, length-controlled win rate

Position bias is real in LLM judges (Zheng et al., 2023, "Judging LLM-as-a-judge"), so each row
shows the two answers in an order drawn from the row's id and the seed, and the order is kept with
the verdict. Ties count half. Only the first word of a reply is read (A, B or tie); a reply that
starts otherwise is unreadable and left out of the win rate. The interval is a percentile bootstrap over rows. The
length-controlled win rate follows AlpacaEval 2's idea (Dubois et al., 2024): fit
P(student wins) = sigmoid(b0 + b1 * tanh(length difference / its std)) and report sigmoid(b0),
the win rate the judge would give if both answers had the same length.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import Any

from pipeline.teachers.base import Sampling, Teacher
from pipeline.teachers.prompts import load

PROMPT = "judge_pairwise"
VERDICTS = {"a": "A", "b": "B", "tie": "tie"}
WRAPPING = "*_`\"'()[]{}<>.,:;!?"  # markdown and punctuation around the first word: "**A**", "(B)", "Tie."
BOOTSTRAP = 2000  # resamples for the confidence interval


def answer_order(row_id: str, seed: int) -> bool:
    """True when the student's answer is shown first (as A) for this row."""
    return hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[0] % 2 == 1


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from the first word of the judge's reply, as the prompt asks; None otherwise.

    Only the first word counts: a reply such as "Both are fine, but a slight edge to B" has the
    article "a" in it, and searching for any A/B/tie word would read it as a verdict for A. A reply
    whose first word is not a verdict ("Answer A ...", "Both ...") is unreadable: no score, counted
    as `unreadable` in the summary, never guessed. A lower-case "a" or "b" counts only as the whole
    reply ("b."): followed by more words ("a better answer is B") it is the article, unreadable."""
    words = text.split(maxsplit=1)
    if not words:
        return None
    first = words[0].strip(WRAPPING)
    if first in ("a", "b") and len(words) > 1:
        return None
    return VERDICTS.get(first.lower())


def judge_pairs(
    teacher: Teacher, items: Sequence[dict], *, seed: int = 0, max_tokens: int = 8, prompt: str = PROMPT
) -> list[dict]:
    """One verdict per item: {id, student_first, verdict (A/B/tie/None), score (1 student wins,
    0.5 tie, 0 base wins, None unreadable), raw, base_words, student_words}."""
    template = load(prompt)
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, seed=seed)
    requests, orders = [], []
    for it in items:
        student_first = answer_order(str(it["id"]), seed)
        a, b = (it["student"], it["base"]) if student_first else (it["base"], it["student"])
        requests.append(
            template.request(
                sampling, instruction=it["instruction"], reference=it["reference"], answer_a=a, answer_b=b
            )
        )
        orders.append(student_first)
    out = []
    for it, student_first, completion in zip(items, orders, teacher.generate(requests), strict=True):
        verdict = parse_verdict(completion.text) if completion.finish_reason != "error" else None
        score = None
        if verdict == "tie":
            score = 0.5
        elif verdict is not None:
            score = 1.0 if (verdict == "A") == student_first else 0.0
        out.append(
            {
                "id": it["id"],
                "student_first": student_first,
                "verdict": verdict,
                "score": score,
                "raw": completion.text[:200],
                "base_words": len(it["base"].split()),
                "student_words": len(it["student"].split()),
            }
        )
    return out


def bootstrap_ci(scores: Sequence[float], *, seed: int = 0, level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the mean (None without scores)."""
    if not scores:
        return None
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(BOOTSTRAP))
    lo = means[int((1 - level) / 2 * BOOTSTRAP)]
    hi = means[min(BOOTSTRAP - 1, int((1 + level) / 2 * BOOTSTRAP))]
    return [lo, hi]


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def length_controlled(
    scores: Sequence[float], length_diffs: Sequence[float], *, ridge: float = 0.01, steps: int = 50
) -> float | None:
    """sigmoid(b0) of a logistic fit of the score on tanh(length difference / std): the win rate
    with the length effect removed. Newton's method with a small ridge so a perfect split stays finite."""
    if not scores:
        return None
    sd = math.sqrt(sum(d * d for d in length_diffs) / len(length_diffs)) or 1.0
    xs = [math.tanh(d / sd) for d in length_diffs]
    b0 = b1 = 0.0
    for _ in range(steps):
        g0 = g1 = 0.0
        h00, h01, h11 = ridge, 0.0, ridge
        for x, y in zip(xs, scores, strict=True):
            p = _sigmoid(b0 + b1 * x)
            w = p * (1 - p)
            g0 += y - p
            g1 += (y - p) * x
            h00 += w
            h01 += w * x
            h11 += w * x * x
        g0 -= ridge * b0
        g1 -= ridge * b1
        det = h00 * h11 - h01 * h01
        d0, d1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        b0, b1 = b0 + d0, b1 + d1
        if abs(d0) + abs(d1) < 1e-10:
            break
    return _sigmoid(b0)


def summarize(verdicts: Sequence[dict], *, seed: int = 0) -> dict[str, Any]:
    """Win rate of the student over the base (ties half), its 95% bootstrap CI, the
    length-controlled variant, and how often each position won (a check on position bias)."""
    scored = [v for v in verdicts if v["score"] is not None]
    scores = [v["score"] for v in scored]
    diffs = [v["student_words"] - v["base_words"] for v in scored]
    first_wins = [1.0 if (v["verdict"] == "A") else 0.5 if v["verdict"] == "tie" else 0.0 for v in scored]
    return {
        "judged": len(verdicts),
        "valid": len(scored),
        "unreadable": len(verdicts) - len(scored),
        "student_wins": sum(s == 1.0 for s in scores),
        "base_wins": sum(s == 0.0 for s in scores),
        "ties": sum(s == 0.5 for s in scores),
        "win_rate": sum(scores) / len(scores) if scores else None,
        "ci95": bootstrap_ci(scores, seed=seed),
        "length_controlled_win_rate": length_controlled(scores, diffs),
        "position_a_rate": sum(first_wins) / len(first_wins) if first_wins else None,
    }
