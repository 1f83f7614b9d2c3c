"""Row-wise sampling for the fast decoder: temperature -> top-k -> top-p, one uniform draw per row.

    .venv/bin/python -m pytest tests/pipeline/test_fast_decode.py -k sampler

The reference semantics are those of `hf.choose_tokens`: divide by the temperature, keep the top_k
logits (renormalised), then the nucleus: sorted by probability, a token stays while the mass
strictly above it is < top_p (as transformers' TopPLogitsWarper); draw from what stays, renormalised.
Sorting and drawing over the whole 49,152-token vocabulary per row is what made sampling 40% of
plain `generate`'s time here, so:

- `torch.topk` takes `candidates` tokens per row (all `top_k` when that is larger);
- probabilities use the full-vocabulary normaliser (logsumexp), so a candidate's probability is its
  exact share. When the candidates' total mass reaches top_p, every token outside them has at least
  that much mass above it, so the nucleus lies inside the candidates: top-p over the candidates equals
  top-p over the full vocabulary. With top_k set the candidates are the whole support;
- one uniform per row picks by inverse CDF. Rows whose nucleus may reach past the candidates (mass
  < top_p; or top_p = 1 with the uniform landing past the candidates' mass) take the full sort,
  which is exact by construction. The tail draw reuses the same uniform, so the pick is still exact.
"""

from __future__ import annotations

from typing import Any


def apply_penalties(logits: Any, history: Any, counts: Any, presence: Any, frequency: Any) -> None:
    """OpenAI presence/frequency penalties in place, touching only generated tokens: logits[r, t] -=
    presence[r] * (count > 0) + frequency[r] * count, in the same float32 order as `hf.PenaltyProcessor`.
    `history` (rows x n) lists generated ids per row, padded with repeats or zero-count ids (writing the
    same value twice is harmless)."""
    vals = logits.gather(1, history)
    c = counts.gather(1, history)
    logits.scatter_(1, history, vals - presence[:, None] * (c > 0) - frequency[:, None] * c)


def sample_rows(logits: Any, temperature: Any, top_p: Any, top_k: Any, uniform: Any, *,
                candidates: int = 128) -> Any:
    """One token per row from `logits` (rows x vocab, any float dtype), given per-row temperature
    (> 0), top_p, top_k (0: off) and a uniform in [0, 1) per row. Returns token ids (rows,)."""
    import torch

    n, vocab = logits.shape
    top_p, uniform = top_p.double(), uniform.double()
    # float32 temperature promotes bf16 logits in the division itself: no separate copy
    probs = (logits / temperature.float()[:, None]).softmax(-1)  # what hf.choose_tokens computes
    has_k = (top_k > 0) & (top_k < vocab)
    k = min(vocab, max(candidates, int(top_k[has_k].max()) if bool(has_k.any()) else 0))
    p, ids = probs.topk(k, dim=-1)  # sorted, largest first; exact full-vocabulary shares
    p = p.double()
    p = torch.where(has_k[:, None], p.masked_fill(torch.arange(k)[None] >= top_k[:, None], 0.0), p)
    p = torch.where(has_k[:, None], p / p.sum(-1, keepdim=True), p)  # top_k renormalises
    keep = (p > 0) & (p.cumsum(-1) - p < top_p[:, None])
    keep[:, 0] = True
    w = p * keep
    c = w.cumsum(-1)
    mass = p.sum(-1)
    closed = has_k | ((top_p < 1) & (mass >= top_p))
    full = ~closed & ((top_p < 1) | (uniform >= mass))  # the nucleus may leave the candidates
    target = torch.where(closed, uniform * c[:, -1], uniform)  # open rows (top_p = 1): no renormalising
    last = keep.sum(-1) - 1
    pick = torch.minimum(torch.searchsorted(c, target[:, None], right=True)[:, 0], last)
    out = ids.gather(1, pick[:, None])[:, 0]
    for row in full.nonzero()[:, 0].tolist():
        out[row] = _full_row(probs[row], float(top_p[row]), float(uniform[row]))
    return out


def _full_row(probs: Any, top_p: float, u: float) -> int:
    """The reference nucleus over the whole (sorted) vocabulary, drawn by inverse CDF with `u`."""
    import torch

    p, order = probs.sort(descending=True)
    p = p.double()
    w = p * (p.cumsum(-1) - p < top_p)
    c = w.cumsum(-1)
    i = int(torch.searchsorted(c, torch.tensor([u * float(c[-1])], dtype=c.dtype), right=True)[0])
    return int(order[min(i, int((w > 0).sum()) - 1)])
