"""Row-wise sampling for the fast decoder: temperature -> top-k -> top-p, one uniform draw per row.

    .venv/bin/python -m pytest tests/pipeline/test_fast_decode.py -k sampler

The reference semantics are those of `hf.choose_tokens`: divide by the temperature, keep the top_k
logits (renormalised), then the nucleus: sorted by probability, a token stays while the mass
strictly above it is < top_p (as transformers' TopPLogitsWarper); draw from what stays, renormalised.
Sorting and drawing over the whole 49,152-token vocabulary per row is what made sampling 40% of
plain `generate`'s time here, so:

- the candidates are the `candidates` largest logits per row (all `top_k` when that is larger): found
  in one C pass per row (`fast_kernel.top_candidates`, a stable order: lower id first among equal
  logits) where the kernels are built, else by `torch.topk`;
- probabilities use the full-vocabulary normaliser (logsumexp), so a candidate's probability is its
  exact share. When the candidates' total mass reaches top_p, every token outside them has at least
  that much mass above it, so the nucleus lies inside the candidates: top-p over the candidates equals
  top-p over the full vocabulary. With top_k set the candidates are the whole support;
- one uniform per row picks by inverse CDF. A row whose nucleus may reach past the candidates (mass
  < top_p) takes the full sort, exact by construction. An untruncated row (top_p = 1, no top_k) orders
  its own first `candidates` tokens by probability and then the rest of the vocabulary by id: a
  uniform past the candidates' mass picks from that tail with the same uniform. Any fixed order gives
  every token exactly its probability, and this one needs no sort and does not depend on the batch.
"""

from __future__ import annotations

from typing import Any

from pipeline.teachers import fast_kernel


def apply_penalties(logits: Any, history: Any, counts: Any, presence: Any, frequency: Any) -> None:
    """OpenAI presence/frequency penalties in place, touching only generated tokens: logits[r, t] -=
    presence[r] * (count > 0) + frequency[r] * count, in the same float32 order as `hf.PenaltyProcessor`.
    `history` (rows x n) lists generated ids per row, padded with repeats or zero-count ids (writing the
    same value twice is harmless)."""
    vals = logits.gather(1, history)
    c = counts.gather(1, history)
    logits.scatter_(1, history, vals - presence[:, None] * (c > 0) - frequency[:, None] * c)


def sample_rows(logits: Any, temperature: Any, top_p: Any, top_k: Any, uniform: Any, *,
                candidates: int = 128, kernels: Any = None) -> Any:
    """One token per row from `logits` (rows x vocab, any float dtype), given per-row temperature
    (> 0), top_p, top_k (0: off) and a uniform in [0, 1) per row. Returns token ids (rows,).
    `kernels` (from `fast_kernel.load()`) finds the candidates in C; without it, torch does."""
    import torch

    n, vocab = logits.shape
    top_p, uniform = top_p.double(), uniform.double()
    has_k = (top_k > 0) & (top_k < vocab)
    k = min(vocab, max(candidates, int(top_k[has_k].max()) if bool(has_k.any()) else 0))
    probs = None
    if kernels is not None and logits.dtype in (torch.bfloat16, torch.float32) and logits.stride(1) == 1:
        ids, scaled, lse = fast_kernel.top_candidates(kernels, logits, 1.0 / temperature.double(), k)
        p = (scaled.double() - lse[:, None]).exp()  # exact full-vocabulary shares, largest first
    else:
        # float32 temperature promotes bf16 logits in the division itself: no separate copy
        probs = (logits / temperature.float()[:, None]).softmax(-1)  # what hf.choose_tokens computes
        p, ids = probs.topk(k, dim=-1)  # sorted, largest first; exact full-vocabulary shares
        p = p.double()
    p = torch.where(has_k[:, None], p.masked_fill(torch.arange(k)[None] >= top_k[:, None], 0.0), p)
    p = torch.where(has_k[:, None], p / p.sum(-1, keepdim=True), p)  # top_k renormalises
    keep = (p > 0) & (p.cumsum(-1) - p < top_p[:, None])
    keep[:, 0] = True
    c = (p * keep).cumsum(-1)
    mass = p.sum(-1)
    closed = has_k | ((top_p < 1) & (mass >= top_p))
    wide = ~closed & (top_p < 1)  # the nucleus may leave the candidates: the full sort decides
    # no truncation: the row's own first `candidates` tokens (so not its neighbours' top_k) in order, then
    # the rest of the vocabulary in index order; a draw past the candidates' mass takes that tail
    m = min(candidates, k)
    c_open = p[:, :m].cumsum(-1)
    tail = ~closed & (top_p >= 1) & (uniform >= c_open[:, -1])
    pick = torch.where(closed, torch.searchsorted(c, (uniform * c[:, -1])[:, None], right=True)[:, 0],
                       torch.searchsorted(c_open, uniform[:, None], right=True)[:, 0])
    pick = torch.minimum(pick, torch.where(closed, keep.sum(-1) - 1, torch.full_like(pick, m - 1)))
    out = ids.gather(1, pick[:, None])[:, 0]
    for row in (wide | tail).nonzero()[:, 0].tolist():
        full = probs[row] if probs is not None else (logits[row].double() / float(temperature[row])).softmax(-1)
        if bool(wide[row]):
            out[row] = _full_row(full, float(top_p[row]), float(uniform[row]))
        else:
            out[row] = _tail_row(full, ids[row, :m], float(c_open[row, -1]), float(uniform[row]))
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


def _tail_row(probs: Any, candidates: Any, mass: float, u: float) -> int:
    """A draw from the whole distribution that landed past the candidates (u >= their mass): the
    rest of the inverse CDF, over the other tokens in vocabulary order (no sort needed: without
    truncation, any fixed order gives each token exactly its probability)."""
    import torch

    rest = probs.double().clone()
    rest[candidates] = 0.0
    c = rest.cumsum(-1)
    share = (u - mass) / max(1.0 - mass, 1e-300)  # where u falls inside the tail, in [0, 1)
    i = int(torch.searchsorted(c, torch.tensor([share * float(c[-1])], dtype=c.dtype), right=True)[0])
    nonzero = rest.nonzero()
    return int(min(i, int(nonzero[-1, 0]))) if len(nonzero) else int(candidates[0])
