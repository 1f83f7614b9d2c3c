"""Aggregation arithmetic of train/fedlora.py against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from train.fedlora import aggregate, exact, fedavg, lora_pairs, mean_update

P = "base_model.model.layers.0.q_proj"


def adapter(b: list[list[float]], a: list[list[float]]) -> dict[str, torch.Tensor]:
    return {f"{P}.lora_A.weight": torch.tensor(a), f"{P}.lora_B.weight": torch.tensor(b)}


def product(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return state[f"{P}.lora_B.weight"].double() @ state[f"{P}.lora_A.weight"].double()


# two clients, rank 1: client 1 updates W[0,0] by 1, client 2 updates W[1,1] by 1; 3 and 1 examples
C1 = adapter([[1.0], [0.0]], [[1.0, 0.0]])
C2 = adapter([[0.0], [1.0]], [[0.0, 1.0]])


def test_fedavg_weights_a_and_b_by_example_count() -> None:
    out = fedavg([C1, C2], [3, 1])
    assert out[f"{P}.lora_B.weight"].tolist() == [[0.75], [0.25]]
    assert out[f"{P}.lora_A.weight"].tolist() == [[0.75, 0.25]]
    # the product of the means: [[.5625, .1875], [.1875, .0625]], not the mean of the products
    assert torch.allclose(product(out), torch.tensor([[0.5625, 0.1875], [0.1875, 0.0625]], dtype=torch.float64))


def test_exact_is_the_best_rank_r_approximation_of_the_mean_update() -> None:
    out, residuals = exact([C1, C2], [3, 1])
    # the mean of the products is diag(.75, .25); its best rank-1 approximation keeps the .75
    assert torch.allclose(product(out), torch.tensor([[0.75, 0.0], [0.0, 0.0]], dtype=torch.float64), atol=1e-7)
    assert residuals[P] == pytest.approx(0.25**2 / (0.75**2 + 0.25**2))
    assert out[f"{P}.lora_A.weight"].dtype == torch.float32


def test_exact_reproduces_the_mean_when_the_rank_allows() -> None:
    c1 = adapter([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]])  # rank 2 adapters, rank-1 updates
    c2 = adapter([[0.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]])
    out, residuals = exact([c1, c2], [1, 1])
    assert torch.allclose(product(out), torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64), atol=1e-7)
    assert residuals[P] == pytest.approx(0.0, abs=1e-12)


def test_exact_and_fedavg_agree_when_every_client_sends_the_same_update() -> None:
    g = torch.Generator().manual_seed(0)
    same = {f"{P}.lora_A.weight": torch.randn(4, 24, generator=g),
            f"{P}.lora_B.weight": torch.randn(16, 4, generator=g)}
    states = [dict(same), dict(same), dict(same)]
    avg, _ = aggregate(states, [5, 1, 2], "fedavg")
    ex, residuals = aggregate(states, [5, 1, 2], "exact")
    assert torch.allclose(product(avg), product(same), atol=1e-5)
    assert torch.allclose(product(ex), product(avg), atol=1e-5)
    assert residuals[P] < 1e-10


def test_factored_svd_matches_a_dense_svd_of_the_mean_update() -> None:
    g = torch.Generator().manual_seed(1)
    states = [{f"{P}.lora_A.weight": torch.randn(3, 20, generator=g),
               f"{P}.lora_B.weight": torch.randn(12, 3, generator=g)} for _ in range(4)]
    weights = [1, 2, 3, 4]
    out, _ = exact(states, weights)
    dense = mean_update(states, weights, P)
    u, s, vh = torch.linalg.svd(dense)
    best = (u[:, :3] * s[:3]) @ vh[:3]  # float64 reference; the adapter is float32, hence the tolerance
    assert torch.allclose(product(out), best, atol=1e-5 * float(s[0]))


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="one weight per adapter"):
        fedavg([C1, C2], [1])
    with pytest.raises(ValueError, match="positive sum"):
        fedavg([C1, C2], [0, 0])
    with pytest.raises(ValueError, match="differ"):
        fedavg([C1, {f"{P}.lora_A.weight": torch.zeros(1, 2)}], [1, 1])
    with pytest.raises(ValueError, match="no matching"):
        lora_pairs({f"{P}.lora_A.weight": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="aggregation must be"):
        aggregate([C1], [1], "median")
