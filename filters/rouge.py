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
accepted candidates of its own block. The fast pass finds every pair with 2L/(|a|+|b|) at least
`threshold - MARGIN`; each such pair is then decided from its integer L with rouge_score's formula.

Cost model (N = final pool size, M = candidates, B = block_size, C = max_cells // B, T = tokens/text):
- tokenising and encoding: O((N + M) * T) Python work, once per text.
- dedup only (top_k=0): up to M * N pair comparisons (N**2 / 2 for a stream deduplicated against
  itself), all inside rapidfuzz's C++ `cdist` (bit-parallel LCS, SIMD across 8 to 32 queries, `workers`
  threads) with the cutoff, minus the pairs whose token counts alone keep them below it (L <= the shorter
  length, so |b|/|a| must lie within [t/(2-t), (2-t)/t]: about 5% of pairs on bench/synthetic.py's
  narrow lengths, a third on the reference seeds' spread). One cdist call per (block, length band, pool
  chunk of at most C texts), so the Python overhead is per block, not per pair. Within a block, one
  B x B cdist plus a sequential pass over the few pairs above the cutoff. bench/dedup.py measures it.
- top_k > 0: every pair, without cutoff or length bound, plus numpy work on every cell (row sums for
  `mean_all`, a top-k selection that scores only the candidates exactly): a few times the dedup cost.
  `top_k=1` gives every candidate's exact nearest neighbour and score (the ROUGE-L-to-nearest histogram).
- memory: the pool (ids, texts, one short string per text) plus one score matrix of at most max_cells
  cells at a time, whatever N is: an N x N matrix is never built.
- prefilter="minhash" (inexact, off by default): compares a candidate only with the pool texts that a
  datasketch MinHash-LSH over token sets returns, so the cost is about linear in N, but a duplicate whose
  token-set Jaccard similarity falls below the LSH band threshold can be missed; `score`, `most_similar`
  and `mean_top_k` then cover only those neighbours and `mean_all` is None.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from nltk.stem import porter
from rapidfuzz import process
from rapidfuzz.distance import Indel
from rouge_score import tokenize as rouge_tokenize

if TYPE_CHECKING:
    from datasketch import MinHash

MARGIN = 1e-6  # the fast pass keeps pairs with 2L/(|a|+|b|) >= threshold - MARGIN, then decides exactly
EXACT_LENSUM = 1 << 21  # below this |a|+|b|, L is recovered exactly from a float32 similarity
SMALL_MATRIX = 1 << 16  # pairs below which one thread beats starting `workers` threads
PREFILTERS = (None, "minhash")


class _MemoStemmer:
    """nltk's Porter stemmer, as rouge_score builds it, memoised (stemming is a pure function)."""

    def __init__(self) -> None:
        self.stem = functools.lru_cache(maxsize=1 << 17)(porter.PorterStemmer().stem)


@functools.cache
def _stemmer(use_stemmer: bool) -> _MemoStemmer | None:
    return _MemoStemmer() if use_stemmer else None


def tokenize(text: str, *, use_stemmer: bool = False) -> list[str]:
    """rouge_score's tokens for `text`: its own `tokenize` function and Porter stemmer."""
    return rouge_tokenize.tokenize(text, _stemmer(use_stemmer))


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


class _Vocab:
    """Maps each distinct token to one character (codes skip the surrogate block)."""

    def __init__(self) -> None:
        self._chars: dict[str, str] = {}

    def encode(self, tokens: Sequence[str]) -> str:
        chars = self._chars
        for token in tokens:
            if token not in chars:
                chars[token] = self._new_char()
        return "".join([chars[token] for token in tokens])

    def _new_char(self) -> str:
        code = len(self._chars)
        if code >= 0xD800:
            code += 0x800
        if code > 0x10FFFF:
            raise OverflowError("more than 1,112,064 distinct tokens: split the data or use prefilter")
        return chr(code)


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
    top_k: how many most-similar pool entries to report (Self-Instruct keeps 10); 0 turns off the full
        scoring and leaves the pure dedup, several times faster (see the module docstring).
    workers: rapidfuzz threads (-1: all cores). block_size: candidates per batch. max_cells: the
        largest score matrix held at once. prefilter: None (exact) or "minhash" (inexact, see module).
    """

    def __init__(
        self,
        threshold: float = 0.7,
        use_stemmer: bool = False,
        top_k: int = 10,
        workers: int = -1,
        *,
        block_size: int = 1024,
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
        self._append(id, text, self._vocab.encode(tokens), tokens)

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
        tokens = [tokenize(text, use_stemmer=self.use_stemmer) for _, text in block]
        chars = [self._vocab.encode(t) for t in tokens]
        if self._lsh is not None:
            raws = self._minhash_block(block, chars, tokens, commit)
        else:
            lens = np.array([len(c) for c in chars], dtype=np.int64)
            decide = self._full_block if self.top_k else self._dedup_block
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

    def _pairs_above(
        self, queries: list[str], q_lens: np.ndarray, choices: list[str], c_lens: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, column, exact F1) of the pairs whose 2L/(|a|+|b|) reaches the cutoff."""
        sim = process.cdist(
            queries,
            choices,
            scorer=Indel.normalized_similarity,
            score_cutoff=self._cutoff,
            dtype=np.float32,
            workers=self._workers(len(queries) * len(choices)),
        )
        hit = np.flatnonzero(sim.view(np.int32).max(axis=1) > 0)  # rows with a pair: far cheaper than
        sub_rows, cols = np.nonzero(sim[hit])  # np.nonzero over the whole matrix
        rows = hit[sub_rows]
        lensum = q_lens[rows] + c_lens[cols]
        dist = np.rint((1.0 - sim[rows, cols].astype(np.float64)) * lensum).astype(np.int64)
        lcs = (lensum - dist) // 2
        for k in np.flatnonzero((lensum >= EXACT_LENSUM) | ((lensum - dist) % 2 != 0)):
            lcs[k] = _lcs(queries[rows[k]], choices[cols[k]])
        found = lcs > 0  # drops pairs of empty strings, which rapidfuzz calls identical
        rows, cols, lcs = rows[found], cols[found], lcs[found]
        return rows, cols, _scores_from_lcs(lcs, q_lens[rows], c_lens[cols])

    def _length_bands(self, lens: np.ndarray) -> Iterator[tuple[np.ndarray, int, int]]:
        """Block rows grouped by similar token counts, each with the pool lengths that can reach the
        cutoff: L <= min(|a|, |b|), so 2L/(|a|+|b|) >= t needs t/(2-t) <= |b|/|a| <= (2-t)/t."""
        ratio = self._cutoff / (2.0 - self._cutoff)
        rows = np.argsort(lens, kind="stable")
        rows = rows[lens[rows] > 0]  # no tokens: F1 is 0 against everything
        start = 0
        while start < len(rows):
            low = int(lens[rows[start]])
            end = int(np.searchsorted(lens[rows], low * 1.25 + 1, side="right"))
            high = int(lens[rows[end - 1]])
            max_len = int(math.floor(high / ratio)) + 1 if ratio > 0 else 1 << 62
            yield rows[start:end], int(math.floor(low * ratio)), max_len
            start = end

    def _dedup_block(self, chars: list[str], lens: np.ndarray, commit: bool) -> list[_Raw]:
        """Decisions only: every pair below the cutoff is skipped without an exact score, and pairs
        whose lengths alone keep them below it are not compared at all."""
        n0, size = len(self._ids), len(chars)
        best = np.full(size, -1.0)
        best_at = np.full(size, -1, dtype=np.int64)
        by_len = np.argsort(self._lens[:n0], kind="stable")  # the pool sorted by length, then by age
        sorted_lens = self._lens[:n0][by_len]
        sorted_chars = [self._chars[i] for i in by_len]
        for band, min_len, max_len in self._length_bands(lens):
            queries = [chars[i] for i in band]
            lo = int(np.searchsorted(sorted_lens, min_len, side="left"))
            hi = int(np.searchsorted(sorted_lens, max_len, side="right"))
            step = max(1, self._chunk * self.block_size // len(band))
            for a in range(lo, hi, step):
                b = min(hi, a + step)
                rows, cols, scores = self._pairs_above(queries, lens[band], sorted_chars[a:b], sorted_lens[a:b])
                r, at = band[rows], by_len[a + cols]
                order = np.lexsort((at, -scores, r))  # per row: best score, then earliest in the pool
                r, at, scores = r[order], at[order], scores[order]
                first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]]) if len(r) else r
                r, at, s = r[first], at[first], scores[first]
                better = (s > best[r]) | ((s == best[r]) & (at < best_at[r]))
                best[r[better]], best_at[r[better]] = s[better], at[better]
        inner: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if commit and size > 1:
            rows, cols, scores = self._pairs_above(chars, lens, chars, lens)
            earlier = cols < rows
            rows, cols, scores = rows[earlier], cols[earlier], scores[earlier]
            order = np.lexsort((cols, rows))
            rows, cols, scores = rows[order], cols[order], scores[order]
            bounds = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1], True]) if len(rows) else []
            for a, b in itertools.pairwise(bounds):
                inner[int(rows[a])] = (cols[a:b], scores[a:b])
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
