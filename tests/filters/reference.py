"""The references' ROUGE-L dedup, written as plainly as they do it, for equivalence tests and the bench.

Self-Instruct: `scorer.score(candidate, pool_item)` for every pool item, reject when the maximum F-measure
is > threshold, else append the candidate to the pool. Ties for the nearest go to the earliest pool item.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from rouge_score import rouge_scorer

SEEDS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"


def reference_dedup(
    seeds: Sequence[str], candidates: Sequence[str], *, threshold: float = 0.7, use_stemmer: bool = False
) -> list[tuple[float, int | None, bool, list[float]]]:
    """Per candidate: (max score, index of the nearest pool item, kept, all scores against the pool)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    pool = list(seeds)
    out = []
    for cand in candidates:
        scores = [scorer.score(cand, item)["rougeL"].fmeasure for item in pool]
        best = max(scores, default=0.0)
        nearest = scores.index(best) if scores else None
        kept = not best > threshold
        out.append((best, nearest, kept, scores))
        if kept:
            pool.append(cand)
    return out


def load_seed_instructions() -> list[str]:
    """The 175 reference seed instructions (callers skip when the shared file is absent)."""
    with SEEDS.open() as f:
        return [json.loads(line)["instruction"] for line in f if line.strip()]


def near_duplicate(text: str, rng: random.Random) -> str:
    """A planted near-duplicate: one or two word-level edits."""
    words = text.split()
    if not words:
        return text
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(len(words))
        op = rng.randrange(3)
        if op == 0 and len(words) > 2:
            del words[i]
        elif op == 1:
            words.insert(i, rng.choice(["please", "also", "quickly", "new"]))
        else:
            words[i] = words[i].upper()
    return " ".join(words)
