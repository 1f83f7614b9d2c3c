"""A distillation top-k cache that cannot be used is recomputed, and sift says so once.

    .venv/bin/python -m pytest -q tests/train/test_distill_cache.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.io import progress
from train.distill import TopK, cache_path, load_topk, save_topk


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(progress, "_noted", set())
    topk = TopK(torch.log_softmax(torch.randn(5, 3), -1), torch.arange(15, dtype=torch.int32).view(5, 3),
                torch.full((5,), -2.0), torch.tensor([0, 2, 5]), 32)
    save_topk(topk, tmp_path, "k" * 64, {"teacher": "t"})
    return tmp_path


def test_a_good_cache_loads_silently(cache: Path, capsys) -> None:
    got = load_topk(cache, "k" * 64)
    assert got is not None and got.vocab == 32 and got.ids.shape == (5, 3)
    assert capsys.readouterr().err == ""


def test_a_torn_cache_is_recomputed_with_one_line_saying_so(cache: Path, capsys) -> None:
    path = cache_path(cache, "k" * 64)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a crash mid-copy, a full disk
    assert load_topk(cache, "k" * 64) is None and load_topk(cache, "k" * 64) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sift: note: distillation cache") and str(path) in err[0]
    assert "unreadable" in err[0] and "recomputing" in err[0]


def test_a_cache_for_other_settings_is_recomputed_with_a_note(cache: Path, capsys) -> None:
    other = "k" * 16 + "x" * 48  # the same file name (first 16 digits), another key inside
    assert load_topk(cache, other) is None
    assert "written for other settings or data; recomputing it" in capsys.readouterr().err
