"""Nanoseconds per mask test in the dedup pass's compiled search (filters/rouge_kernel.py).

    .venv/bin/python bench/rouge_kernel.py

One feature list of 4M random 64-bit masks, probed by 1, 8 and 64 queries at once (a list is read
once per tile for all the queries that probe it, so more queries share each read). No mask passes
the first bound here, which is the common case: on bench/scale.py's 1M records 3.35M of 24.7 billion
tests leave a pair for the LCS. The first call compiles (or loads numba's cache) and is not timed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filters.rouge_kernel import TILE, probe  # noqa: E402

LIST = 1 << 22


def main() -> None:
    rng = np.random.default_rng(0)
    slab = (rng.integers(0, 2**63, LIST, dtype=np.int64).astype(np.uint64), np.full(LIST, 50, np.uint8),
            rng.integers(0, 1000, LIST).astype(np.int32))
    fl = np.minimum(np.floor(0.3 * np.arange(300)), 64).astype(np.int64)
    tables = (fl, np.arange(600, dtype=np.int64))
    for queries in (1, 8, 64):
        q_masks = rng.integers(0, 2**63, (queries, 4), dtype=np.int64).astype(np.uint64)
        args = (np.arange(queries, dtype=np.int64), np.zeros(queries, dtype=np.int64),
                np.array([[0, queries, 0, LIST]], dtype=np.int64), slab, q_masks, np.full(queries, 20, np.int64),
                tables, q_masks[:1].repeat(1000, 0), np.full(1000, 20, np.int64), TILE)
        probe(*args)
        start = time.perf_counter()
        probe(*args)
        took = time.perf_counter() - start
        print(f"queries per list {queries:3}: {took / (LIST * queries) * 1e9:.2f} ns per mask test")


if __name__ == "__main__":
    main()
