"""The dedup pass's prefix-filtering search (filters.rouge._PrefixIndex): exact against rouge_score.

The search must never miss a pair that reaches the cutoff; these tests run it on texts made to be
hard for it (exact ties at 0.7, empty token lists, a token repeated many times, non-ASCII text, texts
of hundreds of tokens), with a feature's list tested in one tile or in tiles of 3 entries (the
compiled kernel's loop order), the rarity order recomputed every few texts and lists outgrowing
their room.
"""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer

import filters.rouge as rouge
import filters.rouge_kernel as rouge_kernel
from filters.rouge import RougeIndex, rouge_l
from tests.filters.reference import near_duplicate
from tests.filters.test_rouge import TIE_A, TIE_B, assert_same_as_reference

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
WORDS = ["write", "a", "poem", "about", "the", "sea", "list", "ideas", "for", "x1", "2024", "café", "naïve", "日本"]


def _texts(rng: random.Random, count: int, sizes: tuple[int, int] = (0, 30)) -> list[str]:
    """Texts over a small vocabulary (so most share tokens): near-duplicates of earlier ones, empty or
    punctuation-only ones, ones repeating a token many times."""
    out: list[str] = []
    for _ in range(count):
        r = rng.random()
        if out and r < 0.25:
            out.append(near_duplicate(rng.choice(out), rng))
        elif r < 0.3:
            out.append(rng.choice(["", "?!", "日本語", "...", "—"]))
        elif r < 0.37:
            out.append(" ".join([rng.choice(WORDS)] * rng.randint(2, 15) + rng.sample(WORDS, 3)))
        else:
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*sizes))))
    return out


def _exact_ties(rng: random.Random) -> list[str]:
    """Pairs whose 2L/(n+m) is exactly 0.7 (n + m = 20, 40 or 60): rouge_score's float F lands just
    above or just below 0.7, and only its own formula says which."""
    out = [TIE_A, TIE_B]
    for n, m, lcs in [(10, 10, 7), (9, 11, 7), (20, 20, 14), (15, 25, 14), (30, 30, 21), (24, 36, 21), (6, 14, 7)]:
        core = [f"c{i}" for i in range(lcs)]
        a = core + [f"a{i}" for i in range(n - lcs)]
        b = core + [f"b{i}" for i in range(m - lcs)]
        rng.shuffle(a[lcs:]) if rng.random() < 0.5 else None
        out += [" ".join(a), " ".join(b)]
    return out


@pytest.fixture(params=["one tile", "tiles of 3"])
def lists_tested_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(rouge_kernel, "TILE", 1 << 20 if request.param == "one tile" else 3)
    monkeypatch.setattr(rouge, "REFRESH_MIN", 4)  # re-rank and rebuild after 16, 64, 256 ... texts
    return request.param


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("workers", [1, 2])
def test_every_pair_near_the_threshold_is_found(lists_tested_by: str, threshold: float, workers: int) -> None:
    rng = random.Random(int(threshold * 10) + workers)
    pool = _texts(rng, 300) + _exact_ties(rng)
    queries = _texts(rng, 60) + _exact_ties(rng) + [near_duplicate(p, rng) for p in rng.sample(pool, 20)]
    index = RougeIndex(threshold=threshold, top_k=0, workers=workers, block_size=32)
    for i, text in enumerate(pool):
        index.add(str(i), text)
    for query, match in zip(queries, index.check_many(queries), strict=True):
        scores = [rouge_l(query, p) for p in pool]  # bit-identical to rouge_score (test_rouge.py)
        best = max(scores)
        if best >= threshold - 1e-7:
            assert (match.score, match.nearest_id) == (best, str(scores.index(best))), query
        elif best < threshold - 2e-6:  # below the cutoff: no score
            assert match.score is None, query
        assert match.is_duplicate == (best > threshold), query


@pytest.mark.parametrize("block_size", [1, 16])
def test_stream_matches_the_reference_on_adversarial_texts(lists_tested_by: str, block_size: int) -> None:
    rng = random.Random(block_size)
    long_words = [f"w{i}" for i in range(40)] + ["the", "a"] * 20
    long = [" ".join(rng.choice(long_words) for _ in range(rng.randint(150, 300))) for _ in range(4)]
    candidates = _texts(rng, 70) + _exact_ties(rng) + long + [near_duplicate(t, rng) for t in long]
    candidates += [near_duplicate(t, rng) for t in _exact_ties(rng)]
    rng.shuffle(candidates)
    assert_same_as_reference(_exact_ties(rng)[:3] + ["", "Ünïcödé wörds"], candidates, top_k=0, block_size=block_size)


def _stream(texts: list[str], **kwargs: object) -> list[tuple[str, bool, float | None, str | None]]:
    index = RougeIndex(top_k=0, **kwargs)  # type: ignore[arg-type]
    return [(i, kept, m.score, m.nearest_id) for i, m, kept in index.filter_stream(enumerate(map(str, texts)))]


def test_prefix_and_scan_searches_agree_on_a_long_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    texts = [str(t) for t in _texts(rng, 2500, sizes=(3, 25))]
    monkeypatch.setattr(rouge, "REFRESH_MIN", 8)
    monkeypatch.setattr(rouge, "SEARCH", "scan")
    scan = _stream(texts, block_size=256)
    monkeypatch.setattr(rouge, "SEARCH", "prefix")
    prefix = _stream(texts, block_size=256, workers=2)
    assert prefix == scan
    # and a sample of the decisions against rouge_score itself
    kept = [i for i, k, _, _ in prefix if k]
    rejected = [(i, s, n) for i, k, s, n in prefix if not k]
    assert len(kept) > 500 and len(rejected) > 500
    for i, score, nearest in rng.sample(rejected, 100):
        assert nearest is not None and nearest in kept and int(nearest) < int(i)
        assert SCORER.score(texts[int(i)], texts[int(nearest)])["rougeL"].fmeasure == score > 0.7
    for _ in range(300):  # the later of two kept texts was compared with the earlier one
        a, b = sorted(rng.sample(kept, 2), key=int)
        assert SCORER.score(texts[int(b)], texts[int(a)])["rougeL"].fmeasure <= 0.7
