"""Aggregating the LoRA adapters of several clients into one global adapter (the server's step).

    sift federate --run demo --federate.aggregation fedavg     # or exact; see docs/federated.md

Two rules, both weighted by each client's example count:
- `fedavg`: average every tensor, so A and B separately, as Flower's LLM examples (FlowerTune) and
  OpenFedLLM do. Cheap, but the product of the mean factors is not the mean of the products:
  mean(B_k) @ mean(A_k) != mean(B_k @ A_k), and the cross terms B_i @ A_j are noise.
- `exact`: average the low-rank updates B_k @ A_k themselves and re-factorise the mean to rank r by
  a truncated SVD, so the global adapter's product is the best rank-r approximation (Eckart-Young)
  of the mean update; exactly the mean when its rank is at most r (e.g. all clients agree). The
  mean update is never formed as a dense matrix: it is [w_1 B_1 .. w_K B_K] @ [A_1; ..; A_K], whose
  SVD comes from two thin QRs and the SVD of a small (K r x K r) core.
Pure functions over {name: tensor} dicts (PEFT's adapter state dict keys); no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

METHODS = ("fedavg", "exact")
LORA_A, LORA_B = ".lora_A.", ".lora_B."


def lora_pairs(state: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """{layer prefix: (A key, B key)} for every LoRA layer of an adapter state dict."""
    pairs = {}
    for key in state:
        if LORA_A in key:
            b_key = key.replace(LORA_A, LORA_B, 1)
            if b_key not in state:
                raise ValueError(f"adapter tensor {key!r} has no matching {b_key!r}")
            pairs[key.split(LORA_A, 1)[0]] = (key, b_key)
    return pairs


def _weights(states: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> list[float]:
    """Weights normalised to sum to one; every client must send the same tensor names."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per adapter, got {len(states)} adapters and {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    names = set(states[0])
    for s in states[1:]:
        if set(s) != names:
            raise ValueError(f"adapters differ in their tensors: {sorted(names ^ set(s))[:4]}")
    total = float(sum(weights))
    return [w / total for w in weights]


def fedavg(states: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """Weighted mean of every tensor (A and B averaged separately); dtypes kept."""
    w = _weights(states, weights)
    out = {}
    for name, first in states[0].items():
        acc = sum(wk * s[name].double() for wk, s in zip(w, states, strict=True))
        out[name] = acc.to(first.dtype)
    return out


def mean_update(states: Sequence[Mapping[str, Any]], weights: Sequence[float], prefix: str) -> Any:
    """The dense weighted mean of B_k @ A_k for one layer (float64); for tests and small layers."""
    w = _weights(states, weights)
    a_key, b_key = lora_pairs(states[0])[prefix]
    return sum(wk * (s[b_key].double() @ s[a_key].double()) for wk, s in zip(w, states, strict=True))


def refactorise(bs: Sequence[Any], as_: Sequence[Any], weights: Sequence[float], rank: int) -> tuple[Any, Any, float]:
    """(B, A, residual): the rank-`rank` truncated SVD of sum_k w_k B_k @ A_k, split evenly between
    the factors (B = U sqrt(S), A = sqrt(S) V^T), and the share of the mean's squared Frobenius
    norm that the truncation dropped (0 when the mean has rank <= `rank`). Float64 inside."""
    import torch

    b_cat = torch.cat([w * b.double() for w, b in zip(weights, bs, strict=True)], dim=1)  # d_out x K r
    a_cat = torch.cat([a.double() for a in as_], dim=0)  # K r x d_in
    q_b, r_b = torch.linalg.qr(b_cat, mode="reduced")
    q_a, r_a = torch.linalg.qr(a_cat.T, mode="reduced")
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    new_b = torch.zeros(b_cat.shape[0], rank, dtype=torch.float64)
    new_a = torch.zeros(rank, a_cat.shape[1], dtype=torch.float64)
    new_b[:, :k] = (q_b @ u[:, :k]) * root
    new_a[:k] = root[:, None] * (vh[:k] @ q_a.T)
    total = float((s**2).sum())
    residual = float((s[k:] ** 2).sum()) / total if total > 0 else 0.0
    return new_b, new_a, residual


def exact(states: Sequence[Mapping[str, Any]], weights: Sequence[float]) -> tuple[dict[str, Any], dict[str, float]]:
    """(adapter, residuals): each LoRA layer's A and B re-factorised from the weighted mean of the
    clients' B @ A at the clients' rank; other tensors (if any) are averaged. `residuals` maps each
    layer to the share of its mean update that rank r could not hold."""
    w = _weights(states, weights)
    pairs = lora_pairs(states[0])
    out = fedavg(states, weights)  # non-LoRA tensors; LoRA ones are replaced below
    residuals = {}
    for prefix, (a_key, b_key) in pairs.items():
        rank = states[0][a_key].shape[0]
        b, a, residuals[prefix] = refactorise([s[b_key] for s in states], [s[a_key] for s in states], w, rank)
        out[b_key], out[a_key] = b.to(states[0][b_key].dtype), a.to(states[0][a_key].dtype)
    return out, residuals


def aggregate(states: Sequence[Mapping[str, Any]], weights: Sequence[float],
              method: str = "fedavg") -> tuple[dict[str, Any], dict[str, float]]:
    """The global adapter by `method` (fedavg or exact) and, for exact, the truncation residual of
    every layer (fedavg: empty)."""
    if method == "fedavg":
        return fedavg(states, weights), {}
    if method == "exact":
        return exact(states, weights)
    raise ValueError(f"aggregation must be one of {', '.join(METHODS)}, got {method!r}")
