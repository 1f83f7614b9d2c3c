"""Exact ROUGE-L F1 at rapidfuzz speed, and the growing pool Self-Instruct deduplicates against.

    .venv/bin/python bench/dedup.py --quick    # equivalence with rouge_score, pairs/s, 52K timing

Exactness. `rouge_score.rouge_scorer.RougeScorer(["rougeL"]).score(target, prediction)` tokenises
both texts (lower-case, split outside [a-z0-9], optional Porter stemming), takes the length L of the
longest common subsequence of the token lists, and returns F = 2*P*R/(P+R) with P = L/len(prediction)
and R = L/len(target), computed in floating point, or 0 when either list is empty. Here each text is
tokenised once with rouge_score's own tokenizer, each distinct token becomes one character (a shared
vocabulary, skipping the surrogate block), and L comes from rapidfuzz's bit-parallel Indel distance,
Indel(a, b) = |a| + |b| - 2L. F is rebuilt from the integer L with rouge_score's own float operations,
so every score is bit-identical to rouge_score's, including 0.7000000000000001 where 2L/(|a|+|b|) is
exactly 0.7 (9 and 11 tokens, L = 7), and 0 for empty token lists (rapidfuzz calls two empty strings
identical; rouge_score does not).

Decisions. Self-Instruct (`scorer.score(candidate, pool_item)`) and Alpaca
(`_score_lcs(candidate_tokens, pool_tokens)`) both reject a candidate when its F against any pool
instruction is > threshold, the candidate being the target. `RougeIndex.filter_stream` keeps those
sequential semantics: a candidate is compared with everything added before it, including earlier
accepted candidates of its own block. The dedup pass finds every pair with 2L/(|a|+|b|) at least
`threshold - MARGIN`; each such pair is then decided from its integer L with rouge_score's formula.

Pruning (top_k=0), exact. L <= the multiset intersection of the two token lists, counted as shared
(token, occurrence) features, and that is <= (|a| + |b| - popcount(mask_a XOR mask_b)) / 2 for any
hashing of features into mask bits (a bit set on one side only is set by a feature the other side
lacks). So a pair whose L could reach need(|a|, |b|) = ceil(cutoff (|a|+|b|) / 2) must have |b| in a
range fixed by |a| (L <= the shorter length), must share at least need features, and must have
popcount(mask_a XOR mask_b) <= |a| + |b| - 2 need. Candidate pairs come from prefix filtering
(`_PrefixIndex`): with all features in one order, rarest first, two texts sharing need features
share one among the first |a| - need + 1 features of a and the first |b| - need + 1 of b. Every pool
text is listed under its first few features (enough for its shortest possible partner), with its
64-bit mask; a block's candidates probe the lists of their own first few features, every listed
text is tested on the masks and cut to the exact length, position, 64-bit and 256-bit bounds in one
compiled loop (filters/rouge_kernel.py), and only the pairs still left get an LCS (rapidfuzz
`cpdist`). Candidates of one block are compared with each other by the former search, kept
behind SEARCH = "scan": the pool sorted by token count, each candidate tested against the slice of
feasible lengths on the 64-bit masks (numpy, 8 candidates x 8,192 texts per call), the survivors on
the 256-bit masks. Texts of more than LONG_TEXT tokens fill a 64-bit mask, so in that scan their
pairs go to rapidfuzz's `cdist` with a cutoff.

Cost model (N = final pool size, M = candidates, T = tokens per text):
- tokenising and encoding: O((N + M) * T) Python work, once per text (`findall` on the lower-cased
  text, the same tokens as rouge_score's tokenizer); the masks and the length-sorted view of the pool
  are built with numpy once per block.
- dedup only (top_k=0): one mask test (0.35 to 1.3 ns, compiled) per candidate and pool text that lists one of the
  candidate's first features: a fixed share of the pool, so still quadratic, but on
  bench/synthetic.py's small vocabulary about a tenth of the former search's M * N tests (minus the
  pairs whose lengths rule them out); plus B**2 / 2 tests within each block of B candidates and an
  LCS for the few pairs that pass the masks. The lists cost O(N * T) to build, again at each
  REFRESH_GROWTH-fold growth of the pool. bench/dedup.py and bench/scale.py measure it.
- top_k > 0: an LCS for every pair (rapidfuzz `cdist`, bit-parallel, SIMD across 8 to 32 queries,
  `workers` threads), without cutoff or length bound, plus numpy work on every cell (row sums for
  `mean_all`, a top-k selection that scores only the candidates exactly): about 15 times the dedup
  cost. `top_k=1` gives every candidate's exact nearest neighbour and score.
- memory: the pool (ids, texts, one short string per text, 40 bytes of masks per text, about 17 bytes
  per token for the lists and the feature ids that rebuild them) plus
  bounded scratch (SCAN_ROWS x SCAN_COLUMNS cells, or max_cells for top_k > 0), whatever N is: an
  N x N matrix is never built.
- prefilter="minhash" (inexact, off by default): compares a candidate only with the pool texts that a
  datasketch MinHash-LSH over token sets returns, so the cost is about linear in N, but a duplicate whose
  token-set Jaccard similarity falls below the LSH band threshold can be missed; `score`, `most_similar`
  and `mean_top_k` then cover only those neighbours and `mean_all` is None.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Indel

if TYPE_CHECKING:
    from datasketch import MinHash

MARGIN = 1e-6  # the dedup pass keeps pairs with 2L/(|a|+|b|) >= threshold - MARGIN, then decides exactly
SMALL_MATRIX = 1 << 16  # pairs below which one thread beats starting `workers` threads
MASK_WORDS = 4  # each text's (token, occurrence) features hashed into 256 bits, folded to 64
LONG_TEXT = 64  # token count above which a 64-bit mask filters too little: rapidfuzz takes those pairs
SCAN_ROWS, SCAN_COLUMNS = 8, 8192  # query-pool mask pairs compared per numpy call (fit in L2)
PREFILTERS = (None, "minhash")
SEARCH = "prefix"  # how the dedup pass finds its candidate pairs; "scan" (every length-feasible pair's masks) is
# the former way, kept for bench/scale.py's side-by-side timing


class _MemoStemmer:
    """nltk's Porter stemmer, as rouge_score builds it, memoised (stemming is a pure function)."""

    def __init__(self) -> None:
        from nltk.stem import porter  # imports all of nltk and scipy.stats: 1 to 3 s, only when stemming

        self.stem = functools.lru_cache(maxsize=1 << 17)(porter.PorterStemmer().stem)


@functools.cache
def _stemmer(use_stemmer: bool) -> _MemoStemmer | None:
    return _MemoStemmer() if use_stemmer else None


_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(text: str, *, use_stemmer: bool = False) -> list[str]:
    """rouge_score's tokens for `text`: its own `tokenize` function and Porter stemmer.

    Without stemming, rouge_score lower-cases, replaces every run outside [a-z0-9] by a space, splits
    on white space and drops empty tokens: that is exactly the runs of [a-z0-9] in the lower-cased
    text, which one `findall` returns three times faster (tests check it against rouge_score's). With
    stemming it then stems each token of more than 3 characters and drops what is no longer a run of
    [a-z0-9], as rouge_score does after its own split."""
    tokens = _TOKEN.findall(text.lower())
    if not use_stemmer:
        return tokens
    stem = _stemmer(use_stemmer).stem
    return [s for s in (stem(t) if len(t) > 3 else t for t in tokens) if _TOKEN.fullmatch(s)]


def score_from_lcs(lcs: int, target_len: int, prediction_len: int) -> float:
    """rouge_score's ROUGE-L F-measure from the LCS length, with its float operations in its order."""
    if target_len == 0 or prediction_len == 0:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _scores_from_lcs(lcs: np.ndarray, target_len: np.ndarray, prediction_len: np.ndarray) -> np.ndarray:
    """Vectorised `score_from_lcs`: the same IEEE operations in the same order, hence the same bits."""
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_len
        recall = lcs / target_len
        score = 2 * precision * recall / (precision + recall)
    return np.where(lcs > 0, score, 0.0)


def _lcs(a: str, b: str) -> int:
    return (len(a) + len(b) - Indel.distance(a, b)) // 2


def _need(cutoff: float, n: np.ndarray | int, m: np.ndarray | int) -> np.ndarray:
    """The fewest common tokens (LCS) with which texts of n and m tokens reach 2L/(n+m) >= cutoff,
    and at least one: rounded down by 1e-9 so that it never exceeds the exact bound."""
    return np.maximum(1, np.ceil(cutoff * (n + m) / 2 - 1e-9)).astype(np.int64)


@functools.lru_cache(maxsize=1 << 14)
def _partner_lengths(cutoff: float, n: int) -> tuple[int, int]:
    """The token counts m a partner of an n-token text can have and still reach the cutoff: the
    LCS is at most min(n, m), so `_need(cutoff, n, m) <= min(n, m)`; the need grows with m, so the
    feasible m form one range [lo, hi]."""
    lo = max(1, int(cutoff * n / (2.0 - cutoff)) - 1)
    while int(_need(cutoff, n, lo)) > min(n, lo):
        lo += 1
    while lo > 1 and int(_need(cutoff, n, lo - 1)) <= lo - 1:
        lo -= 1
    if cutoff * (1 << 40) < 2 * n + 2:
        return lo, 1 << 40
    hi = max(lo, int(2 * n / cutoff) - n + 1)
    while hi > lo and int(_need(cutoff, n, hi)) > n:
        hi -= 1
    while int(_need(cutoff, n, hi + 1)) <= n:
        hi += 1
    return lo, hi


def _masks(chars: Sequence[str]) -> np.ndarray:
    """(texts, MASK_WORDS) uint64: each encoded text's (token, occurrence) features hashed to 256 bits.

    The k-th copy (k = 0, 1, ...) of the token coded c sets bit (c + k * 40503) % 256; codes come in
    order of first appearance, so the 64 commonest tokens usually get 64 bits of their own in the
    64-bit fold (the OR of the four words, where the bit is the same hash % 64)."""
    out = np.zeros((len(chars), MASK_WORDS), dtype=np.uint64)
    lens = np.fromiter(map(len, chars), dtype=np.int64, count=len(chars))
    if not lens.sum():
        return out
    codes = np.frombuffer("".join(chars).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
    owner = np.repeat(np.arange(len(chars)), lens)
    order = np.argsort((owner << FEATURE_BITS) | codes, kind="stable")  # each text's copies of a token side by side
    owner, codes = owner[order], codes[order]
    first = np.r_[True, (owner[1:] != owner[:-1]) | (codes[1:] != codes[:-1])]
    at = np.arange(len(codes))
    copy = at - np.maximum.accumulate(np.where(first, at, 0))
    bit = (codes + copy * 40503) % (64 * MASK_WORDS)
    np.bitwise_or.at(out, (owner, bit // 64), np.left_shift(np.uint64(1), (bit % 64).astype(np.uint64)))
    return out


class _ByLength(NamedTuple):
    """Texts sorted by token count, then position, with their 64-bit masks: a query of n tokens
    scans the one slice of lengths a partner of it can have."""

    lens: np.ndarray
    masks: np.ndarray
    positions: np.ndarray

    @staticmethod
    def build(lens: np.ndarray, masks: np.ndarray, positions: np.ndarray) -> _ByLength:
        order = np.lexsort((positions, lens))
        return _ByLength(lens[order], masks[order], positions[order])

    def merged(self, new: _ByLength) -> _ByLength:
        """Insert texts whose positions all follow the present ones: O(N), not a new sort."""
        new = _ByLength.build(*new)
        at = np.searchsorted(self.lens, new.lens, side="right")
        return _ByLength(*(np.insert(old, at, add) for old, add in zip(self, new, strict=True)))


_SEPARATOR = "\x00"  # joins a block's texts: outside [a-z0-9], and unchanged by lower()
_TOKEN_OR_SEPARATOR = re.compile(r"[a-z0-9]+|\x00")
_SPLIT = "\ud800"  # what the separator encodes to: a surrogate, which no token's character is


class _Vocab:
    """Maps each distinct token to one character (codes skip the surrogate block)."""

    def __init__(self) -> None:
        self._chars: dict[str, str] = {_SEPARATOR: _SPLIT}  # no token is the separator
        self._size = 0

    def encode(self, tokens: Sequence[str]) -> str:
        chars = self._chars
        for token in tokens:
            if token not in chars:
                chars[token] = self._new_char()
        return "".join([chars[token] for token in tokens])

    def encode_texts(self, texts: Sequence[str]) -> list[str]:
        """`encode(tokenize(text))` for each text, the same codes, with the per-token work in C: the
        texts are joined by a separator, lower-cased and split into tokens in one go (lower() maps
        each character on its own; its one context rule, the final sigma, never yields [a-z0-9]),
        new tokens get codes in order of first appearance, as text by text."""
        joined = _SEPARATOR.join(texts)
        if joined.count(_SEPARATOR) != len(texts) - 1:  # a text holds the separator: text by text
            return [self.encode(tokenize(text)) for text in texts]
        tokens = _TOKEN_OR_SEPARATOR.findall(joined.lower())
        chars = self._chars
        for token in dict.fromkeys(tokens):
            if token not in chars:
                chars[token] = self._new_char()
        return "".join(map(chars.__getitem__, tokens)).split(_SPLIT) if texts else []

    def _new_char(self) -> str:
        code = self._size
        self._size += 1
        if code >= 0xD800:
            code += 0x800
        if code > 0x10FFFF:
            raise OverflowError("more than 1,112,064 distinct tokens: split the data or use prefilter")
        return chr(code)


# -- candidate pairs by prefix filtering (top_k=0, exact) ------------------------------------------

FEATURE_BITS = 21  # a feature is a (token code, occurrence) pair: code + (occurrence << 21); codes < 0x110000
KNOWN = 1 << 62  # order keys of the features ranked at the last refresh come after every feature key (< 2**62
# unless a text has 2**41 tokens)
REFRESH_GROWTH = 4  # the rarity order is recomputed, and the lists rebuilt, each time the pool grows 4 times
REFRESH_MIN = 256  # ... and not before it has REFRESH_GROWTH times this many texts
PARALLEL_ROWS = 64  # query rows from which the search is split across threads


def _grown(a: np.ndarray, size: int) -> np.ndarray:
    """`a` with room for at least `size` items (capacity doubles), contents kept."""
    if len(a) >= size:
        return a
    out = np.zeros(max(size, 2 * len(a)), dtype=a.dtype)
    out[: len(a)] = a
    return out


def _distinct(sorted_values: np.ndarray) -> np.ndarray:
    """Positions of the first of each run of equal values (np.unique is many times slower here)."""
    if not len(sorted_values):
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])


@functools.cache
def _kernel():  # noqa: ANN202 (a module)
    """filters.rouge_kernel, imported on first use: numba's import and the kernel's load take about a
    second, which only a dedup pass should pay."""
    from filters import rouge_kernel

    return rouge_kernel


def _fold(masks: np.ndarray) -> np.ndarray:
    """The 64-bit fold (OR of the words) of 256-bit masks."""
    return np.bitwise_or.reduce(masks, axis=1) if len(masks) else np.empty(0, dtype=np.uint64)


def _features(chars: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(owner, key) of every token of the encoded texts, grouped by owner: the k-th copy (k = 0, 1, ...)
    of the token coded c is the feature c + (k << FEATURE_BITS). A text's features are then a set,
    and two texts holding a token a and b times share min(a, b) features for it: the size of the
    multiset intersection, which bounds the LCS."""
    lens = np.fromiter(map(len, chars), dtype=np.int64, count=len(chars))
    total = int(lens.sum())
    if not total:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    codes = np.frombuffer("".join(chars).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)
    owner = np.repeat(np.arange(len(chars)), lens)
    order = np.argsort((owner << FEATURE_BITS) | codes, kind="stable")  # by text, then token (codes < 2**21)
    owner, codes = owner[order], codes[order]
    first = np.r_[True, (owner[1:] != owner[:-1]) | (codes[1:] != codes[:-1])]
    at = np.arange(total)
    copy = at - np.maximum.accumulate(np.where(first, at, 0))
    return owner, codes + (copy << FEATURE_BITS)


class _PrefixIndex:
    """Pool texts listed under their rarest features: the candidate pairs of the dedup pass.

    Prefix filtering (AllPairs, PPJoin), for the multiset bound L <= |A & B| of `_features`: order
    all features once (rarest first), and let need = need(n, m) <= L. Then the first common feature
    of a pair in that order lies among the first n - need + 1 features of the n-token text and among
    the first m - need + 1 of the other (each has at most n - need, resp. m - need, features outside
    the intersection). need(n, m) is at least need(n, lo(n)), lo(n) the shortest partner length, so
    listing every pool text under its first `plen(m) = m - need(m, lo(m)) + 1` features and probing
    the lists of a query's first plen(n) features finds every pair that may reach the cutoff; a hit
    whose query feature lies beyond n - need(n, m) is dropped, as is every pair that fails the mask
    bound of `RougeIndex._candidates` (the lists carry each text's 64-bit mask, so that test reads
    the list only; filters/rouge_kernel.py runs it).

    The order is fixed between refreshes: the rarity (pool document frequency) of every feature seen
    at the last refresh; features first seen since then count as rarer than all of those (they are),
    ordered by key, for queries and pool texts alike. Each REFRESH_GROWTH-fold growth of the pool
    re-ranks and rebuilds; between refreshes lists grow in place (a full list moves to the end of the
    slab with twice the room). Memory: a few prefix entries (13 bytes) and one feature id (4 bytes)
    per pool token, plus slack.
    """

    def __init__(self, cutoff: float) -> None:
        self.cutoff = cutoff
        self._keys = np.empty(0, dtype=np.int64)  # feature keys seen in the pool, sorted
        self._key_ids = np.empty(0, dtype=np.int64)  # the id of each
        self._n_ids = 0
        self._fkey = np.empty(0, dtype=np.int64)  # per id: its key
        self._order = np.empty(0, dtype=np.int64)  # per id: its order key (rarest first)
        self._start = np.empty(0, dtype=np.int64)  # per id: its list in the slab
        self._fill = np.empty(0, dtype=np.int64)
        self._cap = np.empty(0, dtype=np.int64)
        self._pool_ids = np.empty(0, dtype=np.int32)  # every pool token's feature id, by pool position
        self._offsets = np.zeros(1, dtype=np.int64)
        self._size = 0  # pool positions indexed
        self._refresh_at = 0
        self._mask = np.empty(0, dtype=np.uint64)  # the slab of lists: 64-bit mask, column term, position
        self._cterm = np.empty(0, dtype=np.uint8)
        self._pos = np.empty(0, dtype=np.int32)
        self._used = 0
        self._live = 0
        self._plen = np.zeros(0, dtype=np.int64)  # by token count: prefix length
        self._fl = np.zeros(0, dtype=np.int64)  # by token count: min(64, floor((1 - cutoff) n))
        self._need_s = np.zeros(0, dtype=np.int64)  # by n + m: need(n, m)
        self._pool: ThreadPoolExecutor | None = None

    # -- tables and the feature dictionary

    def _tables(self, nmax: int) -> None:
        if nmax < len(self._plen):
            return
        size = max(nmax + 1, 2 * len(self._plen), 64)
        plen = np.zeros(size, dtype=np.int64)
        for n in range(1, size):
            plen[n] = n - int(_need(self.cutoff, n, _partner_lengths(self.cutoff, n)[0])) + 1
        self._plen = plen
        self._fl = np.minimum(np.floor((1.0 - self.cutoff) * np.arange(size) + 1e-9), 64).astype(np.int64)
        self._need_s = _need(self.cutoff, np.arange(2 * size + 1), 0)  # by n + m: need(n, m)

    def _ids_of(self, keys: np.ndarray) -> np.ndarray:
        """Feature ids of `keys`, -1 for features no pool text has had."""
        if not len(self._keys):
            return np.full(len(keys), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        return np.where(self._keys[at] == keys, self._key_ids[at], -1)

    def _register(self, keys: np.ndarray) -> np.ndarray:
        ids = self._ids_of(keys)
        new = np.sort(keys[ids < 0])
        if not len(new):
            return ids
        new = new[_distinct(new)]
        first, n = self._n_ids, self._n_ids + len(new)
        for name in ("_fkey", "_order", "_start", "_fill", "_cap"):
            setattr(self, name, _grown(getattr(self, name), n))
        new_ids = np.arange(first, n)
        self._fkey[first:n] = new
        self._order[first:n] = new  # rarer than every ranked feature: see the class docstring
        self._start[first:n] = self._fill[first:n] = self._cap[first:n] = 0
        at = np.searchsorted(self._keys, new)
        self._keys = np.insert(self._keys, at, new)
        self._key_ids = np.insert(self._key_ids, at, new_ids)
        self._n_ids = n
        return self._ids_of(keys)

    def _prefix(
        self, owner: np.ndarray, keys: np.ndarray, ids: np.ndarray, lens: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(owner, id, position in the order) of each text's first plen(n) features."""
        order_keys = np.where(ids >= 0, self._order[ids], keys)
        o = np.lexsort((order_keys, owner))
        owner, ids = owner[o], ids[o]
        starts = np.cumsum(lens) - lens
        pos = np.arange(len(owner)) - starts[owner]
        keep = pos < self._plen[lens[owner]]
        return owner[keep], ids[keep], pos[keep]

    # -- the pool side

    def add(self, chars: Sequence[str], start: int, masks: np.ndarray, lens: np.ndarray) -> None:
        """List pool positions start, start + 1, ... (texts `chars`); masks and lens cover the whole pool."""
        assert start == self._size
        count = len(chars)
        new_lens = lens[start : start + count]
        self._tables(int(new_lens.max()) if count else 0)
        owner, keys = _features(chars)
        ids = self._register(keys)
        end = int(self._offsets[start]) + len(ids)
        self._pool_ids = _grown(self._pool_ids, end)
        self._pool_ids[self._offsets[start] : end] = ids
        self._offsets = _grown(self._offsets, start + count + 1)
        self._offsets[start + 1 : start + count + 1] = self._offsets[start] + np.cumsum(new_lens)
        self._size = start + count
        if self._size >= self._refresh_at or self._used > 4 * self._live + (1 << 20):
            self._refresh(masks, lens)
            return
        owner, ids, _ = self._prefix(owner, keys, ids, new_lens)
        at = start + owner
        self._append(ids, _fold(masks[at]), (64 - self._fl[lens[at]]).astype(np.uint8), at.astype(np.int32))

    def _refresh(self, masks: np.ndarray, lens: np.ndarray) -> None:
        """Rank every feature by its pool frequency and rebuild all lists in that order."""
        n, f = self._size, self._n_ids
        self._refresh_at = REFRESH_GROWTH * max(n, REFRESH_MIN)
        ids = self._pool_ids[: self._offsets[n]].astype(np.int64)
        df = np.bincount(ids, minlength=f)
        by_rarity = np.lexsort((self._fkey[:f], df))
        rank = np.empty(f, dtype=np.int64)
        rank[by_rarity] = np.arange(f)
        self._order[:f] = KNOWN + rank
        owner = np.repeat(np.arange(n), np.diff(self._offsets[: n + 1]))
        key = np.sort(owner * max(f, 1) + rank[ids])  # by text, then rarest first
        owner, ids = key // max(f, 1), by_rarity[key % max(f, 1)]
        keep = np.arange(len(key)) - self._offsets[owner] < self._plen[lens[owner]]
        owner, ids = owner[keep], ids[keep]
        o = np.argsort(ids, kind="stable")  # one list per feature, positions ascending
        owner, ids = owner[o], ids[o]
        counts = np.bincount(ids, minlength=f)
        cap = counts + counts // 2 + 4
        start = np.cumsum(cap) - cap
        self._start[:f], self._fill[:f], self._cap[:f] = start, counts, cap
        self._used, self._live = int(cap.sum()), len(ids)
        self._mask = np.zeros(self._used, dtype=np.uint64)
        self._cterm = np.zeros(self._used, dtype=np.uint8)
        self._pos = np.zeros(self._used, dtype=np.int32)
        at = start[ids] + np.arange(len(ids)) - (np.cumsum(counts) - counts)[ids]
        self._mask[at] = _fold(masks[owner])
        self._cterm[at] = 64 - self._fl[lens[owner]]
        self._pos[at] = owner

    def _append(self, ids: np.ndarray, mask: np.ndarray, cterm: np.ndarray, pos: np.ndarray) -> None:
        if not len(ids):
            return
        o = np.argsort(ids, kind="stable")
        ids, mask, cterm, pos = ids[o], mask[o], cterm[o], pos[o]
        first = _distinct(ids)
        counts = np.diff(np.r_[first, len(ids)])
        uids = ids[first]
        need = self._fill[uids] + counts
        full = need > self._cap[uids]
        if full.any():
            self._relocate(uids[full], need[full])
        at = self._start[ids] + self._fill[ids] + np.arange(len(ids)) - np.repeat(first, counts)
        self._mask[at], self._cterm[at], self._pos[at] = mask, cterm, pos
        self._fill[uids] = need
        self._live += len(ids)

    def _relocate(self, ids: np.ndarray, need: np.ndarray) -> None:
        """Move the lists of `ids` to the end of the slab, with room for twice `need` entries."""
        cap = 2 * need + 4
        start = self._used + np.cumsum(cap) - cap
        self._used += int(cap.sum())
        self._mask, self._cterm, self._pos = (_grown(a, self._used) for a in (self._mask, self._cterm, self._pos))
        fill = self._fill[ids]
        total = int(fill.sum())
        if total:
            base = np.arange(total) - np.repeat(np.cumsum(fill) - fill, fill)
            src, dst = np.repeat(self._start[ids], fill) + base, np.repeat(start, fill) + base
            for a in (self._mask, self._cterm, self._pos):
                a[dst] = a[src]
        self._start[ids], self._cap[ids] = start, cap

    # -- the query side

    def candidates(
        self,
        chars: Sequence[str],
        q_masks: np.ndarray,
        lens: np.ndarray,
        rows: np.ndarray,
        p_masks: np.ndarray,
        p_lens: np.ndarray,
        workers: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(query row, pool position) of every pair, a query of `rows` against the pool, that may reach
        the cutoff, once each: a superset of them, cut by the same bounds as `RougeIndex._candidates`.
        p_masks, p_lens: the pool's 256-bit masks and token counts. workers:
        threads, each taking every workers-th query row through the whole search (the compiled kernel
        releases the GIL for its whole call; the index is only read here)."""
        empty = np.empty(0, dtype=np.int64)
        if not len(rows) or not self._live:
            return empty, empty
        self._tables(int(lens.max()))
        parts = [rows[w::workers] for w in range(workers)] if len(rows) >= PARALLEL_ROWS else [rows]
        args = (chars, q_masks, lens, p_masks, p_lens)
        if len(parts) > 1:
            pool = self._threads(len(parts))
            found = list(pool.map(lambda part: self._search(part, *args), parts))
        else:
            found = [self._search(rows, *args)]
        q = np.concatenate([f[0] for f in found])
        p = np.concatenate([f[1] for f in found])
        return q, p

    def _search(
        self,
        rows: np.ndarray,
        chars: Sequence[str],
        q_masks: np.ndarray,
        lens: np.ndarray,
        p_masks: np.ndarray,
        p_lens: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`candidates` for some query rows, in one thread (the kernel releases the GIL)."""
        empty = np.empty(0, dtype=np.int64)
        owner, keys = _features([chars[r] for r in rows.tolist()])
        o, ids, at = self._prefix(owner, keys, self._ids_of(keys), lens[rows])
        listed = ids >= 0
        listed[listed] = self._fill[ids[listed]] > 0
        o, ids, at = o[listed], ids[listed], at[listed]
        if not len(ids):
            return empty, empty
        s = np.argsort(ids, kind="stable")  # incidences (query row, feature) grouped by feature
        q, ids, at = rows[o][s], ids[s], at[s]
        first = _distinct(ids)
        counts = np.diff(np.r_[first, len(ids)])
        groups = np.stack([first, counts, self._start[ids[first]], self._fill[ids[first]]], axis=1)
        slab = (self._mask, self._cterm, self._pos)
        kernel = _kernel()
        tables = (self._fl, self._need_s)
        q, p = kernel.probe(q, at, groups, slab, q_masks, lens, tables, p_masks, p_lens, kernel.TILE)
        pair = np.sort(q * len(p_lens) + p)  # a pair found through several features: once
        pair = pair[_distinct(pair)]
        return pair // len(p_lens), pair % len(p_lens)

    def _threads(self, count: int) -> ThreadPoolExecutor:
        if self._pool is None or self._pool._max_workers < count:
            self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="rouge-prefix")
        return self._pool


def rouge_l(a: str, b: str, *, use_stemmer: bool = False) -> float:
    """ROUGE-L F1 of `a` (target) and `b` (prediction), bit-identical to
    `RougeScorer(["rougeL"], use_stemmer=use_stemmer).score(a, b)["rougeL"].fmeasure`."""
    vocab = _Vocab()
    ca = vocab.encode(tokenize(a, use_stemmer=use_stemmer))
    cb = vocab.encode(tokenize(b, use_stemmer=use_stemmer))
    return score_from_lcs(_lcs(ca, cb), len(ca), len(cb))


class Neighbour(NamedTuple):
    """A pool instruction and its ROUGE-L F1 with the candidate."""

    id: str
    text: str
    score: float


@dataclass(frozen=True)
class Match:
    """How a candidate compares with the pool.

    `score` is the exact maximum ROUGE-L F1 over the pool (rouge_score's number), 0.0 for an empty
    pool; None when it was not computed: with top_k=0 only scores within MARGIN of the threshold or
    above are, so None means "below the threshold". `nearest_*` is the pool entry with that score (the
    earliest added on ties). `most_similar` holds the top_k entries by score (ties: earliest added
    first); `mean_top_k` is their mean and `mean_all` the mean over the whole pool (Self-Instruct's and
    Alpaca's `avg_similarity_score`; summed from 2L/(|a|+|b|), so equal to theirs to about 1e-15).
    """

    score: float | None
    nearest_id: str | None
    nearest_text: str | None
    is_duplicate: bool
    most_similar: tuple[Neighbour, ...] = ()
    mean_top_k: float | None = None
    mean_all: float | None = None


class _Raw(NamedTuple):
    """A match before pool indices are turned into ids and texts."""

    score: float | None
    top: list[tuple[int, float]]  # (pool index, score), best first; [0] is the nearest
    mean_all: float | None
    is_duplicate: bool


def _top_k_rows(sim: np.ndarray, q_lens: np.ndarray, p_lens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best cells by exact F1 (then lower column), and their F1, from rapidfuzz's
    similarity 2L/(|a|+|b|). That similarity and F1 differ by a few ulps only, so the top k by F1 lie
    among the cells at or above the k-th similarity (minus a tolerance far below the gap between two
    distinct ratios); only those get their exact F1, from the L recovered from the similarity."""
    rows, cols = sim.shape
    k = min(k, cols)
    kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1 : k]
    keep = sim >= kth - 1e-9
    zero_rows = (kth[:, 0] <= 0).nonzero()[0]
    if len(zero_rows):  # ties at 0: all their F1 are exactly 0, so the first k zero cells are enough
        zeros = keep[zero_rows] & (sim[zero_rows] == 0)
        keep[zero_rows] &= ~zeros | (np.cumsum(zeros, axis=1, dtype=np.int32) <= k)
    r, c = np.nonzero(keep)
    lensum = q_lens[r] + p_lens[c]
    lcs = (lensum - np.rint((1.0 - sim[r, c]) * lensum).astype(np.int64)) // 2
    score = _scores_from_lcs(lcs, q_lens[r], p_lens[c])
    order = np.lexsort((c, -score, r))  # rows kept in order, each by exact F1 then column
    r, c, score = r[order], c[order], score[order]
    starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
    rank = np.arange(len(r)) - np.repeat(starts, np.diff(np.r_[starts, len(r)]))
    first = rank < k
    return score[first].reshape(rows, k), c[first].reshape(rows, k)


def _best_k(scores: np.ndarray, index: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (index, score) pairs: highest score first, then lowest index."""
    order = np.lexsort((index, -scores))[:k]
    return [(int(index[o]), float(scores[o])) for o in order]


class RougeIndex:
    """A pool of instructions that answers ROUGE-L queries exactly and dedups streams sequentially.

    threshold: a candidate whose F1 with any pool entry is > threshold is a duplicate (Self-Instruct
        and Alpaca use 0.7). use_stemmer: rouge_score's Porter stemming (both references use False).
    top_k: how many most-similar pool entries to report, with the mean over the whole pool
        (Self-Instruct keeps 10): an LCS for every pair. 0 turns that off and leaves the pure dedup,
        pruned exactly by token counts and feature masks, about 15 times faster (see the module).
    workers: threads for rapidfuzz and the dedup pass's search (-1: all cores). block_size:
        candidates per batch. max_cells: the largest score matrix held at once. prefilter: None (exact)
        or "minhash" (inexact, see module).
    """

    def __init__(
        self,
        threshold: float = 0.7,
        use_stemmer: bool = False,
        top_k: int = 10,
        workers: int = -1,
        *,
        block_size: int = 2048,
        max_cells: int = 1 << 21,
        prefilter: str | None = None,
        minhash_threshold: float = 0.5,
        num_perm: int = 128,
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if top_k < 0 or block_size < 1 or max_cells < 1:
            raise ValueError("top_k must be >= 0, block_size and max_cells >= 1")
        if prefilter not in PREFILTERS:
            raise ValueError(f"prefilter must be one of {PREFILTERS}, got {prefilter!r}")
        self.threshold = threshold
        self.use_stemmer = use_stemmer
        self.top_k = top_k
        self.workers = workers
        self.block_size = block_size
        self.prefilter = prefilter
        self._chunk = max(1, max_cells // block_size)
        self._cutoff = max(0.0, threshold - MARGIN)
        self._vocab = _Vocab()
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._chars: list[str] = []
        self._lens = np.zeros(1024, dtype=np.int64)
        self._pruned = top_k == 0 and prefilter is None  # the dedup pass, pruned by lengths and masks
        self._masked_upto = 0  # pool positions below this are in the masks and the length view
        self._masks = np.zeros((1024, MASK_WORDS), dtype=np.uint64)  # per pool position
        self._scan_buffers = tuple(np.empty(SCAN_ROWS * SCAN_COLUMNS, dtype=t) for t in (np.uint64, np.uint8, bool))
        self._by_length = _ByLength.build(*(np.empty(0, dtype=t) for t in (np.int64, np.uint64, np.int64)))
        self._prefix = _PrefixIndex(self._cutoff) if SEARCH == "prefix" else None
        self._lsh = None
        if prefilter == "minhash":
            from datasketch import MinHashLSH

            self._num_perm = num_perm
            self._lsh = MinHashLSH(threshold=minhash_threshold, num_perm=num_perm)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, id: str, text: str) -> None:
        """Put `text` in the pool without checking it (seeds, or a resumed run's accepted records)."""
        tokens = tokenize(text, use_stemmer=self.use_stemmer)
        chars = self._vocab.encode(tokens)
        self._append(id, text, chars, tokens)

    def check(self, text: str) -> Match:
        """Compare `text` with the pool, without adding it."""
        return self._run_block([("", text)], commit=False)[0]

    def check_many(self, texts: Iterable[str]) -> Iterator[Match]:
        """`check` for many texts, a block at a time: each is compared with the pool only."""
        iterator = iter(texts)
        while block := [("", text) for text in itertools.islice(iterator, self.block_size)]:
            yield from self._run_block(block, commit=False)

    def filter_stream(self, items: Iterable[tuple[str, str]]) -> Iterator[tuple[str, Match, bool]]:
        """Dedup (id, text) candidates in order; yields (id, match, kept) and adds the kept ones.

        Sequential semantics, as the references: each candidate is compared with the pool as it
        stands when the candidate's turn comes, including candidates accepted just before it.
        """
        iterator = iter(items)
        while block := list(itertools.islice(iterator, self.block_size)):
            for (id_, _), match in zip(block, self._run_block(block, commit=True), strict=True):
                yield id_, match, not match.is_duplicate

    # -- internals ---------------------------------------------------------------------------

    def _append(self, id_: str, text: str, chars: str, tokens: Sequence[str]) -> None:
        n = len(self._ids)
        if n == len(self._lens):
            self._lens = np.concatenate([self._lens, np.zeros_like(self._lens)])
        self._lens[n] = len(chars)
        self._ids.append(id_)
        self._texts.append(text)
        self._chars.append(chars)
        if self._lsh is not None and tokens:
            self._lsh.insert(n, self._minhash(tokens))

    def _run_block(self, block: Sequence[tuple[str, str]], *, commit: bool) -> list[Match]:
        if self.use_stemmer or self._lsh is not None:
            tokens = [tokenize(text, use_stemmer=self.use_stemmer) for _, text in block]
            chars = [self._vocab.encode(t) for t in tokens]
        else:  # the tokens themselves are not kept
            chars = self._vocab.encode_texts([text for _, text in block])
            tokens = [()] * len(block)
        if self._lsh is not None:
            raws = self._minhash_block(block, chars, tokens, commit)
        else:
            lens = np.array([len(c) for c in chars], dtype=np.int64)
            decide = self._dedup_block if self._pruned else self._full_block
            raws = decide(chars, lens, commit)
            if commit:
                for (id_, text), c, t, raw in zip(block, chars, tokens, raws, strict=True):
                    if not raw.is_duplicate:
                        self._append(id_, text, c, t)
        return [self._match(raw) for raw in raws]

    def _match(self, raw: _Raw) -> Match:
        top = tuple(Neighbour(self._ids[i], self._texts[i], s) for i, s in raw.top)
        return Match(
            score=raw.score,
            nearest_id=top[0].id if top else None,
            nearest_text=top[0].text if top else None,
            is_duplicate=raw.is_duplicate,
            most_similar=top[: self.top_k],
            mean_top_k=sum(n.score for n in top) / len(top) if top and self.top_k else None,
            mean_all=raw.mean_all,
        )

    def _workers(self, pairs: int) -> int:
        """rapidfuzz starts its threads on every call: not worth it for a small matrix."""
        return self.workers if pairs >= SMALL_MATRIX else 1

    def _chunks(self) -> Iterator[tuple[int, list[str], np.ndarray]]:
        """The current pool in slices of at most `self._chunk` texts: (offset, chars, lengths)."""
        n = len(self._ids)
        for a in range(0, n, self._chunk):
            b = min(n, a + self._chunk)
            yield a, self._chars[a:b], self._lens[a:b]

    def _flush(self) -> None:
        """Mask and list (or sort in) the pool texts added since the last query (one by one or a block at
        a time): the lists or the view by length are updated once per block, not per text."""
        n, start = len(self._ids), self._masked_upto
        if n == start:
            return
        masks = _masks(self._chars[start:n])
        if len(self._masks) < n:
            grown = np.zeros((max(n, 2 * len(self._masks)), MASK_WORDS), dtype=np.uint64)
            grown[:start] = self._masks[:start]
            self._masks = grown
        self._masks[start:n] = masks
        self._masked_upto = n
        if self._prefix is not None:
            self._prefix.add(self._chars[start:n], start, self._masks, self._lens)
            return
        positions = np.arange(start, n)
        some = self._lens[start:n] > 0  # no tokens: F1 is 0 against everything
        new = _ByLength(self._lens[start:n][some], np.bitwise_or.reduce(masks[some], axis=1), positions[some])
        self._by_length = self._by_length.merged(new)

    def _candidates(
        self,
        chars: Sequence[str],
        q_masks: np.ndarray,
        lens: np.ndarray,
        rows: np.ndarray,
        view: _ByLength,
        p_chars: Sequence[str],
        p_masks: np.ndarray,
        p_lens: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(query row, position) of every pair, a query against a text of `view`, that may reach the
        cutoff: a superset of them. Positions index p_chars, p_masks and p_lens.

        The LCS of two token lists is at most the number of (token, occurrence) features they share,
        |A & B|. Hash the features into bits: each bit set in one mask only is set by a feature the
        other text lacks, so popcount(mask_a ^ mask_b) <= |A ^ B| = |A| + |B| - 2 |A & B|, and a
        pair whose LCS reaches need(n, m) has popcount(mask_a ^ mask_b) <= n + m - 2 need(n, m). A
        query is compared (XOR, popcount) with every text in its slice of partner lengths on the
        64-bit masks, then the few pairs left on the 256-bit masks. On instruction-like text about
        one pair in a thousand passes the first test and one in ten thousand the second. Queries of
        more than LONG_TEXT tokens fill a 64-bit mask: rapidfuzz's LCS (with a cutoff) filters those."""
        cutoff = self._cutoff
        if not len(rows) or not len(view.lens):
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        rows = rows[np.argsort(lens[rows], kind="stable")]
        q64 = np.bitwise_or.reduce(q_masks[rows], axis=1)
        ends = np.flatnonzero(np.r_[lens[rows][1:] != lens[rows][:-1], True]) + 1
        found_q, found_p = [], []
        for a, b in itertools.pairwise([0, *ends.tolist()]):
            n = int(lens[rows[a]])
            lo, hi = _partner_lengths(cutoff, n)
            start, stop = np.searchsorted(view.lens, [lo, hi + 1]).tolist()
            if start == stop:
                continue
            m = view.lens[start:stop]
            allowed = n + m - 2 * _need(cutoff, n, m)  # the largest XOR popcount (or Indel distance)
            if n > LONG_TEXT:
                queries = [chars[i] for i in rows[a:b].tolist()]
                step = max(1, self._chunk * self.block_size // (b - a))  # at most max_cells distances at once
                for c0 in range(start, stop, step):
                    c1 = min(stop, c0 + step)
                    dist = process.cdist(
                        queries,
                        [p_chars[i] for i in view.positions[c0:c1].tolist()],
                        scorer=Indel.distance,
                        score_cutoff=int(allowed[c0 - start : c1 - start].max()),
                        dtype=np.int32,
                        workers=self._workers((b - a) * (c1 - c0)),
                    )
                    r, col = np.nonzero(dist <= allowed[None, c0 - start : c1 - start])
                    found_q.append(rows[a + r])
                    found_p.append(view.positions[c0 + col])
                continue
            allowed = np.minimum(allowed, 64).astype(np.uint8)
            for r0 in range(a, b, SCAN_ROWS):  # a few rows against many columns: numpy's fastest shape
                r1 = min(b, r0 + SCAN_ROWS)
                for c0 in range(start, stop, SCAN_COLUMNS):
                    c1 = min(stop, c0 + SCAN_COLUMNS)
                    shape = (r1 - r0, c1 - c0)
                    xor, count, ok = (buf[: shape[0] * shape[1]].reshape(shape) for buf in self._scan_buffers)
                    np.bitwise_xor(q64[r0:r1, None], view.masks[None, c0:c1], out=xor)
                    np.bitwise_count(xor, out=count)
                    np.less_equal(count, allowed[None, c0 - start : c1 - start], out=ok)
                    r, col = np.divmod(np.flatnonzero(ok), shape[1])
                    found_q.append(rows[r0 + r])
                    found_p.append(view.positions[c0 + col])
        if not found_q:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        q, p = np.concatenate(found_q), np.concatenate(found_p)
        nq, np_ = lens[q], p_lens[p]
        xor = np.bitwise_count(q_masks[q] ^ p_masks[p]).sum(axis=1, dtype=np.int64)
        keep = xor <= nq + np_ - 2 * _need(cutoff, nq, np_)
        return q[keep], p[keep]

    def _verify(
        self,
        queries: Sequence[str],
        q_lens: np.ndarray,
        rows: np.ndarray,
        choices: Sequence[str],
        c_lens: np.ndarray,
        cols: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, exact F1) of the candidate pairs whose 2L/(|a|+|b|) reaches the cutoff,
        from the integer LCS (rapidfuzz's Indel distance, pair by pair in C++)."""
        if not len(rows):
            return rows, cols, np.empty(0)
        dist = process.cpdist(
            [queries[r] for r in rows.tolist()],
            [choices[c] for c in cols.tolist()],
            scorer=Indel.distance,
            dtype=np.int64,
            workers=self._workers(len(rows) * 16),
        )
        lensum = q_lens[rows] + c_lens[cols]
        lcs = (lensum - dist) // 2
        found = (lcs > 0) & (2 * lcs >= self._cutoff * lensum)
        rows, cols, lcs = rows[found], cols[found], lcs[found]
        return rows, cols, _scores_from_lcs(lcs, q_lens[rows], c_lens[cols])

    def _dedup_block(self, chars: list[str], lens: np.ndarray, commit: bool) -> list[_Raw]:
        """Decisions only: exact scores for the pairs that may reach the cutoff (see `_candidates`);
        every other pair is below it by the length and mask bounds and gets no LCS."""
        n0, size = len(self._ids), len(chars)
        best = np.full(size, -1.0)
        best_at = np.full(size, -1, dtype=np.int64)
        rows = np.flatnonzero(lens > 0)  # no tokens: F1 is 0 against everything
        self._flush()
        masks = _masks(chars)
        if self._prefix is not None:
            threads = self.workers if self.workers > 0 else os.cpu_count() or 1
            q, b = self._prefix.candidates(chars, masks, lens, rows, self._masks, self._lens, threads)
        else:
            q, b = self._candidates(chars, masks, lens, rows, self._by_length, self._chars, self._masks, self._lens)
        q, b, scores = self._verify(chars, lens, q, self._chars, self._lens, b)
        if len(q):
            order = np.lexsort((b, -scores, q))  # per row: best score, then earliest in the pool
            q, b, scores = q[order], b[order], scores[order]
            first = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
            best[q[first]], best_at[q[first]] = scores[first], b[first]
        inner: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if commit and len(rows) > 1:
            block = _ByLength.build(lens[rows], np.bitwise_or.reduce(masks[rows], axis=1), rows)
            q, b = self._candidates(chars, masks, lens, rows, block, chars, masks, lens)
            earlier = b < q
            q, b, scores = self._verify(chars, lens, q[earlier], chars, lens, b[earlier])
            order = np.lexsort((b, q))
            q, b, scores = q[order], b[order], scores[order]
            bounds = np.flatnonzero(np.r_[True, q[1:] != q[:-1], True]) if len(q) else []
            for a, z in itertools.pairwise(bounds):
                inner[int(q[a])] = (b[a:z], scores[a:z])
        position = np.full(size, -1, dtype=np.int64)  # pool position of accepted block members
        accepted = 0
        raws = []
        for i in range(size):
            score, at = float(best[i]), int(best_at[i])
            if i in inner:
                cols, scores = inner[i]
                pos = position[cols]
                ok = pos >= 0
                if ok.any():
                    j = int(np.argmax(scores[ok]))  # first maximum: the earliest accepted
                    if scores[ok][j] > score:
                        score, at = float(scores[ok][j]), n0 + int(pos[ok][j])
            duplicate = score > self.threshold
            if commit and not duplicate:
                position[i] = accepted
                accepted += 1
            found = at >= 0
            raws.append(_Raw(score if found else None, [(at, score)] if found else [], None, duplicate))
        return raws

    def _full_block(self, chars: list[str], lens: np.ndarray, commit: bool) -> list[_Raw]:
        """Exact scores against the whole pool: top_k, nearest and means for every candidate."""
        n0, size, k = len(self._ids), len(chars), self.top_k
        top_s = np.empty((size, 0))
        top_i = np.empty((size, 0), dtype=np.int64)
        sums = np.zeros(size)
        q_lens = lens[:, None]
        empty = lens == 0
        for offset, pool, pool_lens in self._chunks():
            workers = self._workers(size * len(pool))
            sim = process.cdist(chars, pool, scorer=Indel.normalized_similarity, dtype=np.float64, workers=workers)
            sim[empty] = 0.0  # rapidfuzz calls two empty strings identical; rouge_score scores them 0
            sums += sim.sum(axis=1)  # F1 sums, up to a few ulps per cell
            s, c = _top_k_rows(sim, lens, pool_lens, k)
            top_s = np.concatenate([top_s, s], axis=1)
            top_i = np.concatenate([top_i, c + offset], axis=1)
            if top_s.shape[1] > k:  # keep k per row: best score, then earliest
                order = np.lexsort((top_i, -top_s), axis=1)[:, :k]
                top_s = np.take_along_axis(top_s, order, axis=1)
                top_i = np.take_along_axis(top_i, order, axis=1)
        inner = np.zeros((size, size))
        if commit and size > 1:
            dist = process.cdist(
                chars, chars, scorer=Indel.distance, dtype=np.int32, workers=self._workers(size * size)
            )
            inner = _scores_from_lcs((q_lens + lens - dist) // 2, q_lens, lens[None, :])
        accepted = np.empty(size, dtype=np.int64)  # block rows accepted so far, in order
        n_acc = 0
        raws = []
        for i in range(size):
            scores, index, total = top_s[i], top_i[i], float(sums[i])
            if n_acc:
                mine = inner[i, accepted[:n_acc]]
                scores = np.concatenate([scores, mine])
                index = np.concatenate([index, np.arange(n0, n0 + n_acc)])
                total += float(mine.sum())
            top = _best_k(scores, index, k)
            score = top[0][1] if top else 0.0
            count = n0 + n_acc
            duplicate = score > self.threshold
            if commit and not duplicate:
                accepted[n_acc] = i
                n_acc += 1
            raws.append(_Raw(score, top, total / count if count else None, duplicate))
        return raws

    def _minhash(self, tokens: Sequence[str]) -> MinHash:
        from datasketch import MinHash

        m = MinHash(num_perm=self._num_perm)
        m.update_batch([t.encode() for t in set(tokens)])
        return m

    def _minhash_block(
        self, block: Sequence[tuple[str, str]], chars: list[str], tokens: list[list[str]], commit: bool
    ) -> list[_Raw]:
        """Inexact: each candidate is scored only against the LSH's candidates, one at a time."""
        assert self._lsh is not None
        raws = []
        for (id_, text), c, t in zip(block, chars, tokens, strict=True):
            found = sorted(self._lsh.query(self._minhash(t))) if t else []
            top: list[tuple[int, float]] = []
            if found:
                index = np.array(found, dtype=np.int64)
                pool_lens = self._lens[index]
                dist = process.cdist([c], [self._chars[j] for j in found], scorer=Indel.distance, dtype=np.int32)[0]
                scores = _scores_from_lcs((len(c) + pool_lens - dist) // 2, np.int64(len(c)), pool_lens)
                top = _best_k(scores, index, max(self.top_k, 1))
            score = top[0][1] if top else None
            duplicate = score is not None and score > self.threshold
            raws.append(_Raw(score, top, None, duplicate))
            if commit and not duplicate:
                self._append(id_, text, c, t)
        return raws
