"""The dedup pass on bench/synthetic.py's instructions: the same bytes as before any speed-up.

`sift filter FILE -o OUT --filter.rules rouge` on 5,000 synthetic records (seed 7, the data bench/scale.py
times at 1M) must write exactly the files it wrote when the dedup pass was first measured at scale
(their SHA-256 below, taken from that code), and exactly what the former candidate search (SEARCH =
"scan") writes; the decisions must not depend on how the stream is cut into blocks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import filters.rouge as rouge
from bench.synthetic import make_synthetic_records
from filters.rouge import RougeIndex
from pipeline.cli import main

N = 5000
OUTPUTS = ("kept.jsonl", "kept.rejected.jsonl")
# sha256 of kept.jsonl and kept.rejected.jsonl, written by the code before this file existed
KEPT_SHA256 = "ad360513848211c140ab584c588b69d0d606f9b78f5496c64a57ba3702ef1048"
REJECTED_SHA256 = "d7b6794def3c0cdebe181e4f6559de569d3afe898bb75a83ef7767f0546ca21b"
# and of the (id, kept, score, nearest_id) lines of `_decisions`
DECISIONS_SHA256 = "33fefb9b52d7fa676410ee1f53e28aaf919a6da0d1ff7e90a2ca1d842f573613"


@pytest.fixture(scope="module")
def records() -> list[dict[str, str]]:
    return make_synthetic_records(N, 7)


def _filter(records: list[dict[str, str]], directory: Path) -> tuple[str, str]:
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["filter", str(data), "-o", str(directory / "kept.jsonl"), "--filter.rules", "rouge"]) == 0
    kept, rejected = (hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in OUTPUTS)
    return kept, rejected


def _decisions(records: list[dict[str, str]], **options: object) -> str:
    index = RougeIndex(threshold=0.7, top_k=0, **options)  # type: ignore[arg-type]
    lines = [
        json.dumps([id_, kept, match.score, match.nearest_id])
        for id_, match, kept in index.filter_stream((r["id"], r["instruction"]) for r in records)
    ]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_filter_writes_the_same_bytes_as_before(records: list[dict[str, str]], tmp_path: Path) -> None:
    assert _filter(records, tmp_path) == (KEPT_SHA256, REJECTED_SHA256)


def test_former_search_writes_the_same_bytes(
    records: list[dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rouge, "SEARCH", "scan")
    assert _filter(records, tmp_path) == (KEPT_SHA256, REJECTED_SHA256)


@pytest.mark.parametrize("block_size", [16, 37, 1024, 4096])
@pytest.mark.parametrize("workers", [1, 2])
def test_decisions_do_not_depend_on_blocks_or_threads(
    records: list[dict[str, str]], block_size: int, workers: int
) -> None:
    assert _decisions(records, block_size=block_size, workers=workers) == DECISIONS_SHA256
