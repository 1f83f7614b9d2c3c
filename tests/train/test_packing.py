"""train/packing.py: packed examples cannot attend to each other (per-example losses agree)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.train.conftest import make_model
from train.packing import IGNORE, Collator, best_fit_decreasing, pack_rows, padding_waste, position_ids


def test_best_fit_decreasing_places_every_example_once_within_capacity() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.25 * sum(lengths) / 128 + 1  # close to the lower bound
    with pytest.raises(ValueError):
        best_fit_decreasing([129], 128)


def test_position_ids_restart_per_example_and_for_padding() -> None:
    assert position_ids([3, 2], 7) == [0, 1, 2, 0, 1, 0, 1]


def test_padding_waste_counts_slots() -> None:
    assert padding_waste([[3, 1], [2]]) == (6, 8)


def _examples(vocab: int, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, answer = rng.randint(2, 9), rng.randint(1, 8)
        ids = [rng.randrange(3, vocab) for _ in range(prompt + answer)]
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def _per_example_losses(logits: torch.Tensor, ids: list[int], labels: list[int]) -> float:
    """Summed next-token loss of one example, given its logits (positions aligned with ids)."""
    target = torch.tensor(labels[1:])
    return torch.nn.functional.cross_entropy(logits[: len(ids) - 1], target, ignore_index=IGNORE,
                                             reduction="sum").item()


def _packed_losses(model: torch.nn.Module, rows: list[dict], batch: dict) -> list[float]:
    with torch.no_grad():
        # use_cache=False as in training (TRL sets it): with a cache, transformers skips packed masks
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    losses = []
    for r, row in enumerate(rows):
        start = 0
        for n in row["seq_lengths"]:
            seg = slice(start, start + n)
            losses.append(_per_example_losses(logits[r, seg], row["input_ids"][seg], row["labels"][seg]))
            start += n
    return losses


def test_packed_and_unpacked_per_example_losses_agree() -> None:
    model = make_model(vocab_size=60)
    examples = _examples(60, 12)
    rows = pack_rows(examples, max_length=40)
    assert len(rows) < len(examples) and any(len(r["seq_lengths"]) > 1 for r in rows)
    batch = Collator(pad_token_id=0)(rows)
    assert "attention_mask" not in batch
    packed = _packed_losses(model, rows, batch)
    order = [e for row in rows for e in _row_members(row, examples)]
    alone = []
    for ex in order:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]
        alone.append(_per_example_losses(logits, ex["input_ids"], ex["labels"]))
    assert packed == pytest.approx(alone, rel=1e-4, abs=1e-4)

    # Control: the same rows with a plain causal mask let later examples see earlier ones.
    leaky = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"])}
    assert _packed_losses(model, rows, leaky) != pytest.approx(alone, rel=1e-3, abs=1e-3)


def test_collator_masks_the_cross_example_target_and_pads_plain_rows() -> None:
    rows = pack_rows([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}], 8)
    batch = Collator(pad_token_id=0)(rows)
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9]]
    plain = Collator(pad_token_id=0)([{"input_ids": [5, 6], "labels": [IGNORE, 6]}, {"input_ids": [7], "labels": [7]}])
    assert plain["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert plain["labels"].tolist() == [[IGNORE, 6], [7, IGNORE]]


def _row_members(row: dict, examples: list[dict]) -> list[dict]:
    """The examples of a packed row, in order (recovered by matching their token runs)."""
    out, start = [], 0
    for n in row["seq_lengths"]:
        ids = row["input_ids"][start:start + n]
        out.append(next(e for e in examples if e["input_ids"] == ids))
        start += n
    return out
