"""The `judge` scorer: the teacher rates each answer 1-5 (AlpaGasus; Chen et al., 2024).

    results = judge_scores(teacher, records)      # the stage: sift score --scorers judge
    .venv/bin/python -m pytest tests/train/test_rating.py -q

The prompt is prompts/score_judge.txt (or the user's own file with {instruction}, {input},
{output}). Small models write digits badly, so where the backend gives the first token's
probabilities (transformers in process, an OpenAI-compatible server's `top_logprobs`, vLLM's
`logprobs`; see pipeline/teachers/logprobs.py) the rating is the probability-weighted mean over
the five rating tokens, renormalised to their total mass (G-Eval; Liu et al., 2023): method
"logprobs". Otherwise (a backend or server that gives none, for that record) the teacher replies
greedily and the first digit 1-5 of its reply is the rating: method "sampled" (None when the reply
has none). When the rating tokens hold less than MIN_MASS of the probability the model was not
answering with a digit, and the sampled reply is used instead. With a TeacherPool (several judges)
each record is rated by one member, by share, named in the result's "teacher"; a single judge's
name is recorded the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pipeline.teachers.base import Sampling, Teacher
from pipeline.teachers.logprobs import first_token_probs
from pipeline.teachers.pool import TeacherPool
from pipeline.teachers.prompts import PromptTemplate, load

PROMPT = "score_judge"
RATINGS = ("1", "2", "3", "4", "5")
MIN_MASS = 0.05  # probability on the rating tokens below which the distribution says nothing
_DIGIT = re.compile(r"(?<![\d.])([1-5])(?!\d|\.\d)")


def load_prompt(prompt: str | None = None) -> PromptTemplate:
    template = load(prompt or PROMPT)
    template.check({"instruction", "input", "output"}, required={"instruction", "output"})
    return template


def parse_rating(text: str) -> int | None:
    """The first stand-alone digit 1-5 of a reply ("4", "Rating: 4/5", "**3**"), else None."""
    m = _DIGIT.search(text or "")
    return int(m.group(1)) if m else None


def expected_rating(dist: dict[str, float]) -> tuple[float | None, float]:
    """(probability-weighted mean rating over the tokens 1..5, their total probability)."""
    mass = sum(dist.get(r, 0.0) for r in RATINGS)
    if mass <= 0:
        return None, 0.0
    return sum(int(r) * dist.get(r, 0.0) for r in RATINGS) / mass, mass


def judge_scores(teacher: Teacher, records: Sequence[dict], *, template: PromptTemplate | None = None,
                 max_tokens: int = 8, use_logprobs: bool = True) -> list[dict]:
    """One result per record: {"value": rating or None, "method": "logprobs" | "sampled", "teacher":
    the judge's name, plus "mass" and "probs" (logprobs) or "raw" (sampled)}."""
    template = template or load_prompt()
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, seed=0)
    requests = [template.request(sampling, instruction=r["instruction"], input=r.get("input") or "",
                                 output=r.get("output") or "") for r in records]
    pool = teacher if isinstance(teacher, TeacherPool) else None
    names: list[str | None] = list(pool.assign(len(requests))) if pool is not None else [teacher.name] * len(requests)
    if pool is not None and len(names) != len(requests):  # every judge is down: the sampled path says so
        names = [None] * len(requests)
    dists = None
    if use_logprobs and requests:
        dists = first_token_probs(teacher, requests, include=RATINGS,
                                  **({"names": names} if pool is not None else {}))
    results: list[dict[str, Any] | None] = [None] * len(records)
    if dists is not None:
        for i, dist in enumerate(dists):
            if dist is None:
                continue
            value, mass = expected_rating(dist)
            if value is not None and mass >= MIN_MASS:
                results[i] = {"value": value, "method": "logprobs", "mass": round(mass, 6),
                              "probs": {r: round(dist.get(r, 0.0) / mass, 6) for r in RATINGS},
                              "teacher": names[i]}
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        batch = [requests[i] for i in todo]
        completions = pool.generate_for(batch, [names[i] for i in todo]) if pool is not None \
            else teacher.generate(batch)
        for i, c in zip(todo, completions, strict=True):
            rating = parse_rating(c.text) if c.finish_reason != "error" else None
            who = (c.teacher or {}).get("name") if pool is not None else teacher.name
            results[i] = {"value": rating, "method": "sampled", "raw": c.text[:200], "teacher": who,
                          **({"error": c.error} if c.error else {})}
    return [r for r in results if r is not None]
