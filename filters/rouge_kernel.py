"""The dedup pass's inner loop, compiled: every (query, listed pool text) mask test in one pass.

`filters.rouge._PrefixIndex` finds the candidate pairs of the exact ROUGE-L dedup: each query probes
the lists of its rarest features, and each listed pool text must pass a 64-bit mask bound, then the
length, position and 256-bit bounds (the proofs are in filters/rouge.py). On bench/scale.py's million
records that is 24.7 billion mask tests. Written as numpy array operations they took five passes
over memory, each in its own call, and two threads spent much of their time waiting for the GIL
between those calls. Here the 64-bit bound runs over a tile of a list in a branch-free loop that
the compiler vectorises (`_flags`), and only the few entries that pass it go through the rest.
numba (https://numba.pydata.org) compiles this loop once per machine (`cache=True`, in
`filters/__pycache__`), fuses the tests, uses the CPU's popcount instruction, and releases the GIL
for the whole call, so the index's threads run side by side.

Integer arithmetic only: the pairs found are the same on every CPU, and the same as the former
numpy search (tests/filters/test_rouge_prefix.py checks the search against rouge_score itself).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

TILE = 2048  # list entries tested against every query of a feature before the next ones (stay in L1)


@intrinsic
def _popcount(typingctx, x):  # noqa: ANN001, ANN202 (numba's intrinsic protocol)
    """LLVM's ctpop on a uint64: one POPCNT instruction where the CPU has it."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@njit(cache=True, nogil=True)
def _flags(q64: np.uint64, masks: np.ndarray, cterms: np.ndarray, qterm: int, out: np.ndarray) -> None:
    """out[j] = 1 where mask j passes the 64-bit bound: branch-free, so the compiler vectorises it."""
    for j in range(masks.shape[0]):
        out[j] = np.int64(_popcount(q64 ^ masks[j])) + np.int64(cterms[j]) <= qterm


@njit(cache=True, nogil=True)
def probe(
    inc_q: np.ndarray,
    inc_at: np.ndarray,
    groups: np.ndarray,
    slab: tuple,
    q_masks: np.ndarray,
    lens: np.ndarray,
    tables: tuple,
    p_masks: np.ndarray,
    p_lens: np.ndarray,
    tile: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(query row, pool position) of every incidence's listed text that passes all the bounds.

    inc_q, inc_at: each incidence's query row and the position of its feature in the query's order,
        grouped by feature; groups: (first incidence, incidence count, list start, list fill) per
        feature. slab: the lists' (64-bit mask, 64 - fl(m), pool position) arrays. q_masks: the
        block's 256-bit masks (rows x 4), lens its token counts. tables: (fl by token count, need by
        n + m). p_masks, p_lens: the pool's 256-bit masks and token counts (masks of any word count,
        the same for both). tile: list entries tested against every query of the feature before the
        next ones (TILE; tests use small ones). A pair is listed once per feature it is found
        through; the caller removes repeats."""
    s_mask, s_cterm, s_pos = slab
    fl, need_s = tables
    out_q = np.empty(1024, dtype=np.int64)
    out_p = np.empty(1024, dtype=np.int64)
    found = 0
    words = np.zeros((tile + 7) // 8, dtype=np.uint64)
    flags = words.view(np.uint8)  # bytes past a short tile's end may hold old flags: only read below width
    for g in range(groups.shape[0]):
        a, count, start, fill = groups[g, 0], groups[g, 1], groups[g, 2], groups[g, 3]
        for c0 in range(start, start + fill, tile):
            width = min(start + fill - c0, tile)
            for i in range(a, a + count):
                r = inc_q[i]
                n = lens[r]
                q64 = np.uint64(0)
                for k in range(q_masks.shape[1]):  # the 64-bit fold, as the lists hold it
                    q64 |= q_masks[r, k]
                qterm = fl[n] + 65  # popcount + (64 - fl(m)) <= fl(n) + 1 + 64: the bound of rouge.py
                _flags(q64, s_mask[c0 : c0 + width], s_cterm[c0 : c0 + width], qterm, flags)
                for w in range((width + 7) // 8):  # few pass: skip eight flags at a time
                    if words[w] == 0:
                        continue
                    for j in range(8 * w, min(8 * w + 8, width)):
                        if flags[j] == 0:
                            continue
                        c = c0 + j
                        p = s_pos[c]
                        m = p_lens[p]
                        need = need_s[n + m]
                        if need > min(n, m) or inc_at[i] > n - need:
                            continue
                        allowed = n + m - 2 * need
                        if np.int64(_popcount(q64 ^ s_mask[c])) > allowed:
                            continue
                        xor = np.int64(0)
                        for k in range(q_masks.shape[1]):
                            xor += np.int64(_popcount(q_masks[r, k] ^ p_masks[p, k]))
                        if xor > allowed:
                            continue
                        if found == out_q.shape[0]:
                            out_q = np.concatenate((out_q, np.empty_like(out_q)))
                            out_p = np.concatenate((out_p, np.empty_like(out_p)))
                        out_q[found] = r
                        out_p[found] = p
                        found += 1
    return out_q[:found], out_p[:found]
