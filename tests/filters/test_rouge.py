"""filters.rouge against rouge_score itself: scores bit for bit, sequential dedup decisions, top-k."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Indel
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize

from filters.rouge import LONG_TEXT, RougeIndex, _masks, _Vocab, rouge_l, score_from_lcs, tokenize
from tests.filters.reference import SEEDS, load_seed_instructions, near_duplicate, reference_dedup

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
STEMMER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
TIE_A = "one two three four five six seven eight nine"  # 9 tokens
TIE_B = "one two three four five six seven x y z w"  # 11 tokens, LCS 7: 2*7/20 is exactly 0.7

WORDS = ["write", "a", "poem", "about", "the", "sea", "list", "three", "ideas", "for", "dinner", "explain", "Ünïcode"]
word_texts = st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join)
odd_texts = st.text(alphabet=st.sampled_from(list("ab c!?.,:-\n\tÉé日本ß0123")), max_size=30)
STEM_WORDS = ["ies", "sses", "running", "studies", "generously", "happiness", "agreed", "x1", "feed", "Caresses",
              "relational", "ponies", "café", "ÉTUDES", "flying", "2024s", "sing", "hopeful", "electriciti"]
unicode_texts = st.text(max_size=40)  # any code point: case mappings, digits of other scripts, surrogates
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


@settings(max_examples=300, deadline=None)
@given(text=texts | st.lists(st.sampled_from(STEM_WORDS), max_size=12).map(" ".join) | unicode_texts)
def test_tokens_equal_rouge_scores_own_hypothesis(text: str) -> None:
    """Stemming runs on sift's own split (each token of more than 3 characters, then only runs of
    [a-z0-9] kept): the same tokens as rouge_score's tokenizer, with and without the stemmer."""
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


# -- the dedup pass's pruning (top_k=0): exact, never cuts a pair that could reach the cutoff -----------------




@settings(max_examples=300, deadline=None)
@given(text=st.one_of(unicode_texts, texts))
def test_tokenize_is_rouge_scores_tokenizer(text: str) -> None:
    assert tokenize(text) == rouge_tokenize.tokenize(text, None)


# characters whose lower case is, or contains, ASCII (Kelvin sign, dotted capital I), the final sigma,
# and the separator that joins a block's texts
tricky_texts = st.text(alphabet=st.sampled_from(list("aB1 \u212a\u0130\u03a3\u03c3\x00.")), max_size=12)


@settings(max_examples=300, deadline=None)
@given(blocks=st.lists(st.lists(st.one_of(unicode_texts, texts, tricky_texts), max_size=6), max_size=4))
def test_a_block_is_encoded_as_text_by_text(blocks: list[list[str]]) -> None:
    """The block encoder gives each text the characters, and each new token the code, that encoding
    the texts one by one gives."""
    whole, one_by_one = _Vocab(), _Vocab()
    for block in blocks:
        assert whole.encode_texts(block) == [one_by_one.encode(tokenize(text)) for text in block]


token_lists = st.lists(st.sampled_from("abcdefghij"), max_size=24)


@settings(max_examples=300, deadline=None)
@given(a=token_lists, b=token_lists, offset=st.sampled_from([0, 200, 0xE000 - 5]))
def test_mask_bound_is_at_least_the_lcs(a: list[str], b: list[str], offset: int) -> None:
    # Codes near and beyond the surrogate block go through the UTF-32 path of `_masks` too.
    ca = "".join(chr(offset + ord(t) - 97) for t in a)
    cb = "".join(chr(offset + ord(t) - 97) for t in b)
    wide = _masks([ca, cb])
    lcs = (len(ca) + len(cb) - Indel.distance(ca, cb)) // 2
    narrow = np.bitwise_or.reduce(wide, axis=1)
    for xor in (int(np.bitwise_count(wide[0] ^ wide[1]).sum()), int(np.bitwise_count(narrow[0] ^ narrow[1]))):
        assert (len(ca) + len(cb) - xor) // 2 >= lcs


def _at_the_bound(rng: random.Random, threshold: float, n: int, sizes: tuple[int, int] = (1, 30)) -> list[str]:
    """Pairs of texts whose LCS is one below, at, or one above the fewest tokens that reach the
    threshold, with shared tokens also out of order (overlap above the LCS) and repeated tokens."""
    out = []
    for _ in range(n):
        size_a, size_b = rng.randint(*sizes), rng.randint(*sizes)
        need = math.ceil(threshold * (size_a + size_b) / 2)
        lcs = max(0, min(size_a, size_b, need + rng.choice([-1, 0, 1])))
        core = [rng.choice(["x", "y", "z", "the", "a"]) for _ in range(lcs)]
        a = core + [f"a{i}" for i in range(size_a - lcs)]
        b = core + [f"b{i}" for i in range(size_b - lcs)]
        rng.shuffle(a) if rng.random() < 0.2 else None  # overlap stays, the LCS drops
        rng.shuffle(b) if rng.random() < 0.2 else None
        out += [" ".join(a), " ".join(b)]
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("block_size", [1, 64])
def test_pruned_dedup_at_the_bound_matches_reference(threshold: float, block_size: int) -> None:
    rng = random.Random(int(threshold * 100) + block_size)
    candidates = _at_the_bound(rng, threshold, 60) + ["", "!!", TIE_A, TIE_B]
    seeds = _at_the_bound(rng, threshold, 5)
    ref = reference_dedup(seeds, candidates, threshold=threshold)
    assert 0 < sum(kept for _, _, kept, _ in ref) < len(candidates)
    got = _run(RougeIndex(threshold=threshold, top_k=0, block_size=block_size), seeds, candidates)
    ids = _pool_ids(seeds, candidates, ref)
    for i, ((best, nearest, kept, _), (_, match, got_kept)) in enumerate(zip(ref, got, strict=True)):
        assert got_kept == kept, (i, candidates[i])
        if best >= threshold - 1e-7:  # every pair near the threshold or above is found and scored exactly
            assert match.score == best and match.nearest_id == ids[nearest], (i, candidates[i])
        else:
            assert match.score is None, (i, candidates[i])


def test_long_texts_take_rapidfuzz_and_match_reference() -> None:
    rng = random.Random(11)
    words = [f"w{i}" for i in range(60)] + ["the", "a", "of"] * 10
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(LONG_TEXT - 5, LONG_TEXT + 40))) for _ in range(8)]
    candidates = [near_duplicate(rng.choice(base), rng) for _ in range(10)] + base
    candidates += _at_the_bound(rng, 0.7, 10, sizes=(LONG_TEXT - 20, LONG_TEXT + 20)) + ["short one", "a b c"]
    rng.shuffle(candidates)
    assert sum(len(tokenize(c)) > LONG_TEXT for c in candidates) > 10
    assert_same_as_reference(base[:2], candidates, top_k=0, block_size=16)


def test_vocabulary_past_the_surrogate_block() -> None:
    index = RougeIndex(top_k=0)
    for i in range(0xD800 + 300):  # every token new: codes run through the surrogate gap
        index.add(str(i), f"w{i}")
    late = 0xD800 + 250
    out = list(index.filter_stream([("dup", f"W{late}"), ("near", f"w{late} new"), ("new", "w9999999 x y")]))
    assert [(i, kept) for i, _, kept in out] == [("dup", False), ("near", True), ("new", True)]
    assert out[0][1].nearest_id == str(late) and out[0][1].score == 1.0
    assert out[1][1].score is None  # 2 * 1 / 3 < 0.7
