"""filters.rouge against rouge_score itself: scores bit for bit, sequential dedup decisions, top-k."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer

from filters.rouge import RougeIndex, rouge_l, score_from_lcs, tokenize
from tests.filters.reference import SEEDS, load_seed_instructions, near_duplicate, reference_dedup

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
STEMMER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
TIE_A = "one two three four five six seven eight nine"  # 9 tokens
TIE_B = "one two three four five six seven x y z w"  # 11 tokens, LCS 7: 2*7/20 is exactly 0.7

WORDS = ["write", "a", "poem", "about", "the", "sea", "list", "three", "ideas", "for", "dinner", "explain", "Ünïcode"]
word_texts = st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join)
odd_texts = st.text(alphabet=st.sampled_from(list("ab c!?.,:-\n\tÉé日本ß0123")), max_size=30)
texts = st.one_of(word_texts, odd_texts, st.sampled_from(["", "   ", "!!!", "日本語のテキスト", TIE_A, TIE_B]))

SPECIAL = [
    "",
    "   ",
    "?!...",
    "日本語のテキスト",
    "Ünïcödé wörds and ASCII words",
    TIE_A,
    TIE_B,
    "a a a a a a a",
    "A a a",
    "write write write a poem",
    " ".join(["long"] * 40 + ["text", "with", "many", "tokens"] * 20),
    " ".join(f"w{i}" for i in range(90)),
]


def test_the_tie_case_is_what_rouge_score_says() -> None:
    assert SCORER.score(TIE_A, TIE_B)["rougeL"].fmeasure == 0.7000000000000001
    assert rouge_l(TIE_A, TIE_B) == 0.7000000000000001
    assert score_from_lcs(7, 9, 11) == 0.7000000000000001
    for top_k in (0, 10):
        index = RougeIndex(threshold=0.7, top_k=top_k)
        index.add("b", TIE_B)
        match = index.check(TIE_A)
        assert match.is_duplicate and match.score == 0.7000000000000001 and match.nearest_id == "b"


def test_empty_token_lists_score_zero_even_against_each_other() -> None:
    assert rouge_l("", "") == 0.0 == SCORER.score("", "")["rougeL"].fmeasure
    assert rouge_l("!!!", "日本") == 0.0
    for top_k in (0, 3):
        index = RougeIndex(top_k=top_k)
        decisions = [kept for _, _, kept in index.filter_stream([("1", ""), ("2", "?!"), ("3", "日本語")])]
        assert decisions == [True, True, True]


def test_rouge_l_equals_rouge_score_on_mixed_pairs() -> None:
    rng = random.Random(0)
    pool = SPECIAL + [near_duplicate(t, rng) for t in SPECIAL if t.split()]
    if SEEDS.exists():
        seeds = load_seed_instructions()
        pool += seeds[:60] + [near_duplicate(s, rng) for s in seeds[:60]]
    for _ in range(1500):
        a, b = rng.choice(pool), rng.choice(pool)
        assert rouge_l(a, b) == SCORER.score(a, b)["rougeL"].fmeasure, (a, b)
    for a, b in [(TIE_A, TIE_B), ("Running runners ran", "the runner runs"), ("", "x")]:
        assert rouge_l(a, b, use_stemmer=True) == STEMMER.score(a, b)["rougeL"].fmeasure


def test_stemmed_tokens_are_rouge_scores_own() -> None:
    text = "Generating better instructions, studies and running jokes"
    assert tokenize(text, use_stemmer=True) == STEMMER._tokenizer.tokenize(text)
    assert tokenize(text) == SCORER._tokenizer.tokenize(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=texts, b=texts)
def test_rouge_l_equals_rouge_score_hypothesis(a: str, b: str) -> None:
    assert rouge_l(a, b) == SCORER.score(a, b)["rougeL"].fmeasure
    assert rouge_l(a, b, use_stemmer=True) == STEMMER.score(a, b)["rougeL"].fmeasure


def _run(index: RougeIndex, seeds: list[str], candidates: list[str]) -> list:
    for i, s in enumerate(seeds):
        index.add(f"s{i}", s)
    return list(index.filter_stream((f"c{i}", c) for i, c in enumerate(candidates)))


def _pool_ids(seeds: list[str], candidates: list[str], ref: list) -> list[str]:
    return [f"s{i}" for i in range(len(seeds))] + [f"c{i}" for i, r in enumerate(ref) if r[2]]


def assert_same_as_reference(seeds: list[str], candidates: list[str], **index_kwargs: object) -> None:
    ref = reference_dedup(seeds, candidates)
    ids = _pool_ids(seeds, candidates, ref)
    got = _run(RougeIndex(**index_kwargs), seeds, candidates)  # type: ignore[arg-type]
    for i, ((best, nearest, kept, _), (_, match, got_kept)) in enumerate(zip(ref, got, strict=True)):
        assert got_kept == kept and match.is_duplicate == (not kept), (i, candidates[i])
        if match.score is None:  # dedup-only mode leaves scores below the cutoff out
            assert index_kwargs.get("top_k") == 0 and best < 0.7 - 1e-7
        else:
            assert match.score == best, (i, candidates[i])
            if best > 0:
                assert match.nearest_id == ids[nearest]


@pytest.mark.parametrize("top_k", [0, 1, 10])
@pytest.mark.parametrize("block_size,max_cells", [(1, 10_000), (7, 30), (256, 1 << 21)])
def test_sequential_decisions_match_reference(top_k: int, block_size: int, max_cells: int) -> None:
    rng = random.Random(top_k * 100 + block_size)
    base = SPECIAL + [f"write a poem about the {w} and the {v}" for w in WORDS for v in WORDS[:4]]
    candidates = [rng.choice(base) if rng.random() < 0.5 else near_duplicate(rng.choice(base), rng) for _ in range(90)]
    candidates += [TIE_A, TIE_B, TIE_A, "", ""]
    rng.shuffle(candidates)
    assert_same_as_reference(SPECIAL[:4], candidates, top_k=top_k, block_size=block_size, max_cells=max_cells)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seeds=st.lists(texts, max_size=5),
    candidates=st.lists(texts, max_size=25),
    top_k=st.sampled_from([0, 2]),
    block_size=st.sampled_from([1, 3, 64]),
)
def test_sequential_decisions_hypothesis(seeds: list[str], candidates: list[str], top_k: int, block_size: int) -> None:
    assert_same_as_reference(seeds, candidates, top_k=top_k, block_size=block_size, max_cells=50)


@pytest.mark.skipif(not SEEDS.exists(), reason="reference seed file not present")
@pytest.mark.parametrize("top_k", [0, 10])
def test_reference_seeds_with_planted_near_duplicates(top_k: int) -> None:
    seeds = load_seed_instructions()
    rng = random.Random(7)
    planted = [near_duplicate(rng.choice(seeds[:100]), rng) for _ in range(40)]
    fresh = [f"Describe how to {w} a {v} for a school project" for w in ("plan", "cook") for v in ("trip", "meal")]
    candidates = planted + fresh + seeds[100:140]
    rng.shuffle(candidates)
    ref = reference_dedup(seeds[:100], candidates)
    assert sum(not kept for _, _, kept, _ in ref) >= 35  # (nearly) all planted ones go
    assert_same_as_reference(seeds[:100], candidates, top_k=top_k, block_size=32)


def test_top_k_and_means_match_brute_force() -> None:
    rng = random.Random(3)
    pool = [" ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(0, 9))) for _ in range(300)]
    index = RougeIndex(threshold=1.0, top_k=10, block_size=16, max_cells=200)  # threshold 1: keep everything
    for i, text in enumerate(pool):
        index.add(str(i), text)
    for query in pool[:25] + ["write a poem about the sea", ""]:
        scores = [SCORER.score(query, p)["rougeL"].fmeasure for p in pool]
        order = sorted(range(len(pool)), key=lambda j: (-scores[j], j))[:10]
        match = index.check(query)
        assert [(n.id, n.score) for n in match.most_similar] == [(str(j), scores[j]) for j in order]
        assert match.score == max(scores)
        assert match.mean_top_k == pytest.approx(np.mean([scores[j] for j in order]), abs=1e-12)
        assert match.mean_all == pytest.approx(np.mean(scores), abs=1e-12)


def test_top_k_in_a_stream_sees_earlier_candidates_of_the_block() -> None:
    index = RougeIndex(threshold=0.9, top_k=3, block_size=100)
    out = list(index.filter_stream([("a", "write a poem about the sea"), ("b", "write a poem about the moon")]))
    second = out[1][1]
    assert second.nearest_id == "a"
    assert second.score == rouge_l("write a poem about the moon", "write a poem about the sea")
    assert second.mean_all == second.score  # one pool entry so far


def test_check_does_not_add_and_add_does_not_check() -> None:
    index = RougeIndex(top_k=2)
    index.add("x", "write a poem about the sea")
    index.add("y", "write a poem about the sea")  # seeds are not checked
    assert len(index) == 2
    match = index.check("write a poem about the sea")
    assert match.is_duplicate and match.nearest_id == "x" and len(index) == 2
    assert [n.id for n in match.most_similar] == ["x", "y"]


def test_empty_pool() -> None:
    assert RougeIndex(top_k=5).check("anything at all").score == 0.0
    assert RougeIndex(top_k=0).check("anything at all").score is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RougeIndex(threshold=1.5)
    with pytest.raises(ValueError):
        RougeIndex(prefilter="bloom")
    with pytest.raises(ValueError):
        RougeIndex(top_k=-1)


def test_minhash_prefilter_is_inexact_but_never_wrong_about_what_it_rejects() -> None:
    pytest.importorskip("datasketch")
    rng = random.Random(5)
    base = [f"write a {a} poem about the {b} for my {c}" for a in WORDS[:5] for b in WORDS[5:10] for c in WORDS[8:]]
    stream = [rng.choice(base) if rng.random() < 0.7 else near_duplicate(rng.choice(base), rng) for _ in range(200)]
    index = RougeIndex(top_k=3, prefilter="minhash")
    out = list(index.filter_stream((str(i), t) for i, t in enumerate(stream)))
    rejected = [(i, m) for i, m, kept in out if not kept]
    assert rejected, "exact repeats must be caught"
    for i, match in rejected:
        assert match.score is not None and match.score > 0.7
        assert match.score == rouge_l(stream[int(i)], match.nearest_text or "")
        assert match.mean_all is None


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.7, 0.9])
def test_length_bounds_are_tight_but_safe(threshold: float) -> None:
    # Prefixes of one sentence: LCS = the shorter length, so F1 = 2 min/(|a|+|b|) sits exactly on the
    # length bound the dedup pass uses to skip pairs.
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(words[:n]) for n in range(1, 40)]
    rng = random.Random(int(threshold * 10))
    seeds = rng.sample(texts, 10)
    candidates = rng.sample(texts, 30) + ["", "w0"]
    ref = reference_dedup(seeds, candidates, threshold=threshold)
    for top_k in (0, 3):
        index = RougeIndex(threshold=threshold, top_k=top_k, block_size=8, max_cells=40)
        got = _run(index, seeds, candidates)
        assert [kept for _, _, kept in got] == [r[2] for r in ref]
        assert [m.score for _, m, _ in got if m.score is not None] == [
            r[0] for r, (_, m, _) in zip(ref, got, strict=True) if m.score is not None
        ]
