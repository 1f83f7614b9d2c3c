"""Packing several examples into one row without letting them attend to each other.

Used by `sift train` (`--train.packing`, the default) and `python bench/train.py`. Examples are placed
into rows of at most `max_length` tokens by best-fit decreasing; each row keeps `seq_lengths`,
and the collator turns those into `position_ids` that restart at 0 for every example and sends
no `attention_mask`. transformers then builds a block-diagonal causal mask from the position
restarts (masking_utils.find_packed_sequence_indices; only when `use_cache=False`, which TRL's
SFTTrainer always passes), so each token sees only its own example:
tests/train/test_packing.py checks that packed and unpacked per-example losses agree.
Without packing the collator pads each batch and sends an ordinary attention mask.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

IGNORE = -100


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, each summing to at most `capacity`; longest examples placed first."""
    if any(n > capacity or n <= 0 for n in lengths):
        raise ValueError(f"every length must be in 1..{capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining space, bin index)
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))  # the tightest bin that still fits
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def pack_rows(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples ({input_ids, labels}) into rows with their `seq_lengths`."""
    bins = best_fit_decreasing([len(e["input_ids"]) for e in examples], max_length)
    rows = []
    for members in bins:
        ids, labels, lengths = [], [], []
        for i in members:
            ids += examples[i]["input_ids"]
            labels += examples[i]["labels"]
            lengths.append(len(examples[i]["input_ids"]))
        rows.append({"input_ids": ids, "labels": labels, "seq_lengths": lengths})
    return rows


def position_ids(seq_lengths: list[int], total: int) -> list[int]:
    """Positions restarting at each example; the padding tail counts as one more segment."""
    out = [p for n in seq_lengths for p in range(n)]
    return out + list(range(total - len(out)))


@dataclass
class Collator:
    """Right-pads a batch. Rows with `seq_lengths` get restarting `position_ids` and no attention
    mask (so examples stay apart); plain rows get an attention mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = [r["input_ids"] + [self.pad_token_id] * (width - len(r["input_ids"])) for r in rows]
        labels = [r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows]
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if "seq_lengths" in rows[0]:
            batch["position_ids"] = torch.tensor([position_ids(r["seq_lengths"], width) for r in rows])
            batch["labels"][batch["position_ids"] == 0] = IGNORE  # no token predicts the next example's first
        else:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        return batch


def padding_waste(batches: list[list[int]]) -> tuple[int, int]:
    """(real tokens, padded slots) over batches given as lists of row lengths."""
    real = sum(sum(b) for b in batches)
    slots = sum(max(b) * len(b) for b in batches if b)
    return real, slots
