"""Paired bootstrap intervals for `sift eval`, and the findings said in words (forgetting, a set too small).

    stats = set_stats(base_values, student_values, seed=0)     # delta and ci95 per metric
    findings("general", entry)                                  # ["the student forgot: ...", ...]

Base and student answer the same examples, so the interval is a paired percentile bootstrap
(Efron & Tibshirani, 1993, ch. 13): resample the examples with replacement, recompute each side's
metric on the same resample, take the 2.5th and 97.5th percentiles of the difference. Pairing
removes the examples' own difficulty from the spread, which is most of it. A token-weighted metric
(NLL per answer token) is recomputed as a ratio of sums on each resample, not averaged per example.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000  # bootstrap resamples; the percentile ends move by about 0.01 sd between seeds
LEVEL = 0.95
MIN_EXAMPLES = 30  # below this a set is said to be too small to tell a change from noise
# per-example metrics with an interval: name -> True when higher is better (None: neither)
PAIRED = {"nll": False, "rouge_l": True, "stop_rate": True, "mean_output_tokens": None}
METRICS = (  # eval.json's metrics of each side: name, label, True when higher is better
    ("nll", "NLL / answer token", False),
    ("perplexity", "perplexity", False),
    ("rouge_l", "ROUGE-L F1", True),
    ("stop_rate", "stop rate", True),
    ("mean_output_tokens", "mean answer tokens", None),
    ("distinct_2", "distinct-2", True),
)


def paired_bootstrap(
    base: Sequence[float],
    student: Sequence[float],
    *,
    base_weights: Sequence[float] | None = None,
    student_weights: Sequence[float] | None = None,
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
) -> list[float] | None:
    """[low, high] percentile interval of weighted-mean(student) - weighted-mean(base) over resamples
    of the example indices (the same indices for both sides). Per-example values are sums when weights
    are given (e.g. summed NLL with token counts as weights). None without examples."""
    b, s = np.asarray(base, dtype=np.float64), np.asarray(student, dtype=np.float64)
    if b.shape != s.shape:
        raise ValueError(f"paired samples differ in length: {b.shape} and {s.shape}")
    n = len(b)
    if n == 0:
        return None
    wb = np.ones(n) if base_weights is None else np.asarray(base_weights, dtype=np.float64)
    ws = np.ones(n) if student_weights is None else np.asarray(student_weights, dtype=np.float64)
    if base_weights is None:
        b = b * wb  # unweighted: each value is its own sum over one unit
    if student_weights is None:
        s = s * ws
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        diffs = counts @ s / (counts @ ws) - counts @ b / (counts @ wb)
    diffs = diffs[np.isfinite(diffs)]
    if not len(diffs):
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return [float(low), float(high)]


def mean_interval(values: Sequence[float], *, seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """Percentile bootstrap interval of a plain mean (e.g. a win rate); None without values."""
    return paired_bootstrap([0.0] * len(values), values, seed=seed, level=level)


def per_example(nll: Sequence[tuple[float, int]], answers: Sequence[dict], rouge: Sequence[float]) -> dict:
    """The per-example columns the intervals are computed from."""
    return {
        "nll": [float(t) for t, _ in nll],
        "nll_tokens": [int(n) for _, n in nll],
        "rouge_l": [float(r) for r in rouge],
        "stop_rate": [1.0 if a["stopped"] else 0.0 for a in answers],
        "mean_output_tokens": [float(a["tokens"]) for a in answers],
    }


def set_intervals(base: dict, student: dict, *, seed: int = 0) -> dict[str, list[float] | None]:
    """ci95 of student - base for every PAIRED metric, from two per_example() columns sets."""
    out: dict[str, list[float] | None] = {}
    for key in PAIRED:
        weights = {"base_weights": base["nll_tokens"], "student_weights": student["nll_tokens"]} if key == "nll" else {}
        out[key] = paired_bootstrap(base[key], student[key], seed=seed, **weights)
    return out


def significant(ci: Sequence[float] | None) -> int:
    """+1 when the whole interval is above zero, -1 when below, 0 when it holds zero (or is missing)."""
    if not ci:
        return 0
    return 1 if ci[0] > 0 else -1 if ci[1] < 0 else 0


def findings(name: str, entry: dict) -> list[str]:
    """What a reader should take from one set, in words: too small to tell (and then nothing else); on
    `general`, that the
    student forgot (NLL of the references or the judge's win rate significantly worse); otherwise
    which metrics changed beyond their interval."""
    n = int(entry.get("examples", 0))
    ci, delta = entry.get("ci95") or {}, entry.get("delta") or {}
    if n < MIN_EXAMPLES:  # an interval from a handful of examples is not evidence either way: say only that
        return [f"{name}: {n} examples is too small to tell a change from noise (want at least {MIN_EXAMPLES})"]
    out = []
    forgot = []
    if significant(ci.get("nll")) > 0:
        lo, hi = ci["nll"]
        forgot.append(f"NLL of the references rose by {delta['nll']:+.3f} per token (95% CI {lo:+.3f} to {hi:+.3f})")
    if significant(ci.get("judge_win_rate")) < 0:
        lo, hi = ci["judge_win_rate"]
        forgot.append(f"the judge prefers the base (win rate {0.5 + delta['judge_win_rate']:.2f}, "
                      f"95% CI {lo + 0.5:.2f} to {hi + 0.5:.2f})")
    if forgot and name == "general":
        out.append("the student forgot: " + "; ".join(forgot))
    elif forgot:
        out.append(f"{name}: worse than the base: " + "; ".join(forgot))
    better = [k for k, up in PAIRED.items() if up is not None and significant(ci.get(k)) == (1 if up else -1)]
    if significant(ci.get("judge_win_rate")) > 0:
        better.append("judge_win_rate")
    if better:
        out.append(f"{name}: significantly better on " + ", ".join(better))
    return out


# ---------------------------------------------------------------- metrics of answers (pure)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 as rouge_score computes it (filters.rouge when present, else rouge_score itself)."""
    try:
        from filters.rouge import rouge_l as fast
    except ImportError:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        return scorer.score(reference, prediction)["rougeL"].fmeasure
    return fast(prediction, reference)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams over all n-grams of all texts (Li et al., 2016); 0 when there are none."""
    grams = [tuple(w[i : i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
