"""Pairwise judging as the leaderboards do it, for `sift eval --judge`: each pair in both orders.

    verdicts = judge_both_orders(teacher, items)     # items: id, instruction, reference, base, student
    summary = summarize_both(verdicts, seed=0)       # win rate, 95% CI, length-controlled win rate

MT-Bench (Zheng et al., 2023) shows every pair twice, the two answers swapped, and declares a win
only when both verdicts agree; a disagreement is a tie, so position bias turns into ties instead of
into wins. The win rate counts ties half; its interval is a percentile bootstrap over pairs. The
length-controlled win rate is AlpacaEval 2's idea (Dubois et al., 2024) in its simplest form:
a logistic regression of the outcome on tanh(word-length difference / its sd) (train/judge.py's
`length_controlled`), reporting sigmoid(intercept), the win rate at equal lengths. A pair the
judge could not read in either order is left out and counted as unreadable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.io.progress import StageProgress
from pipeline.teachers.base import Request, Sampling, Teacher
from pipeline.teachers.prompts import load
from train.eval_stats import mean_interval
from train.judge import PROMPT, length_controlled, parse_verdict

CHUNK = 32  # requests per call for a teacher without a progress callback


def _student_score(verdict: str | None, student_first: bool) -> float | None:
    """1 when the verdict prefers the student, 0 the base, 0.5 a tie, None unreadable."""
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    return 1.0 if (verdict == "A") == student_first else 0.0


def _generate(teacher: Teacher, requests: list[Request], label: str) -> list[Any]:
    """All completions, with a progress bar: through the teacher's own callback when it has one
    (the transformers teacher), else in chunks."""
    with StageProgress(label, len(requests), unit="req") as bar:
        if hasattr(teacher, "on_batch"):
            old = teacher.on_batch
            teacher.on_batch = lambda done, tokens: bar.update(done=done, requests=done, tokens_out=tokens)
            try:
                return teacher.generate(requests)
            finally:
                teacher.on_batch = old
        out: list[Any] = []
        for start in range(0, len(requests), CHUNK):
            part = teacher.generate(requests[start:start + CHUNK])
            out += part
            bar.update(done=len(part), requests=len(part), tokens_out=sum(c.completion_tokens for c in part))
        return out


def judge_both_orders(
    teacher: Teacher, items: Sequence[dict], *, seed: int = 0, max_tokens: int = 8, prompt: str = PROMPT,
    label: str = "judge",
) -> list[dict]:
    """One record per pair: {id, verdicts [student-first, base-first], scores, score (None when
    either order is unreadable; 0.5 when the two disagree), agree, base_words, student_words}."""
    template = load(prompt)
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, seed=seed)
    requests = []
    for it in items:
        for student_first in (True, False):
            a, b = (it["student"], it["base"]) if student_first else (it["base"], it["student"])
            requests.append(template.request(sampling, instruction=it["instruction"], reference=it["reference"],
                                             answer_a=a, answer_b=b))
    completions = _generate(teacher, requests, label)
    out = []
    for k, it in enumerate(items):
        pair = completions[2 * k:2 * k + 2]
        verdicts = [parse_verdict(c.text) if c.finish_reason != "error" else None for c in pair]
        scores = [_student_score(v, first) for v, first in zip(verdicts, (True, False), strict=True)]
        score = None if None in scores else scores[0] if scores[0] == scores[1] else 0.5
        out.append({"id": it["id"], "verdicts": verdicts, "scores": scores, "score": score,
                    "agree": None if score is None else scores[0] == scores[1],
                    "raw": [c.text[:120] for c in pair],
                    "base_words": len(it["base"].split()), "student_words": len(it["student"].split())})
    return out


def summarize_both(verdicts: Sequence[dict], *, seed: int = 0) -> dict[str, Any]:
    """Win rate of the student (ties half) with its 95% bootstrap CI, the length-controlled win rate,
    how often the two orders agreed, and how often answer A was chosen (position bias)."""
    scored = [v for v in verdicts if v["score"] is not None]
    scores = [v["score"] for v in scored]
    diffs = [v["student_words"] - v["base_words"] for v in scored]
    firsts = [1.0 if x == "A" else 0.5 if x == "tie" else 0.0 for v in verdicts for x in v["verdicts"] if x]
    return {
        "method": "both orders, tie when they disagree (MT-Bench); LC: logistic fit on tanh(length diff / sd)",
        "judged": len(verdicts),
        "valid": len(scored),
        "unreadable": len(verdicts) - len(scored),
        "student_wins": sum(s == 1.0 for s in scores),
        "base_wins": sum(s == 0.0 for s in scores),
        "ties": sum(s == 0.5 for s in scores),
        "orders_agree": sum(bool(v["agree"]) for v in scored) / len(scored) if scored else None,
        "win_rate": sum(scores) / len(scores) if scores else None,
        "ci95": mean_interval(scores, seed=seed),
        "length_controlled_win_rate": length_controlled(scores, diffs),
        "position_a_rate": sum(firsts) / len(firsts) if firsts else None,
    }
