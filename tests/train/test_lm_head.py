"""The CPU LM head (train/lm_head.py) against TRL's fused head: same outputs, same gradients.

    .venv/bin/python -m pytest -q tests/train/test_lm_head.py
"""

from __future__ import annotations

import pytest

from tests.train.conftest import make_model
from train.packing import IGNORE

VOCAB = 300


def _peft_pair(seed: int = 0):
    """The same tiny LoRA model twice: one with TRL's fused head, one with ours on top of it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    from train.lm_head import plain_lm_head

    models = []
    for ours in (False, True):
        base = make_model(VOCAB, seed)
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
        if ours:
            assert plain_lm_head(base)
        torch.manual_seed(seed + 1)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                init_lora_weights=False)).train()
        models.append(model)
    return models


def _batch():
    import torch

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :9] = IGNORE  # a prompt
    labels[1, 20:] = IGNORE  # padding
    return {"input_ids": ids, "labels": labels}


def test_outputs_and_gradients_match_trls_fused_head_in_float32() -> None:
    """Tolerance 1e-4: both are float32 on the same weights; they differ only in summation order."""
    import torch

    trl_model, our_model = _peft_pair()
    outs = []
    for model in (trl_model, our_model):
        out = model(**_batch(), use_cache=False, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        outs.append((out, grads))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(b.loss, a.loss, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.log_probs, a.log_probs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.entropy, a.entropy.detach(), atol=1e-4, rtol=1e-4)
    assert torch.equal(b.label_mask, a.label_mask)
    assert torch.equal(b.is_top1, a.is_top1)
    assert (b.log_probs[~b.label_mask] == 0).all() and (b.log_probs[b.label_mask] < 0).all()
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-4, rtol=1e-3, msg=name)


def test_loss_is_the_models_own_cross_entropy_over_the_answer_tokens() -> None:
    """The same number transformers' ordinary forward gives (labels shifted, ignored positions skipped)."""
    import torch

    _, model = _peft_pair()
    batch = _batch()
    with torch.no_grad():
        ours = model(**batch, use_cache=False, fused_lm_head=True).loss
        plain = model(**batch, use_cache=False).loss
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)


def test_bfloat16_autocast_stays_near_the_float32_reference() -> None:
    """bf16 products (native or emulated, any CPU): the loss within 2% of float32's."""
    import torch

    _, model = _peft_pair()
    batch = _batch()
    with torch.no_grad():
        ref = model(**batch, use_cache=False, fused_lm_head=True).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**batch, use_cache=False, fused_lm_head=True).loss
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) <= 0.02 * ref.item()


@pytest.mark.parametrize("key", ["final_logit_softcapping", "logit_scale"])
def test_models_with_transformed_logits_keep_trls_head(key: str) -> None:
    from trl.trainer.utils import add_fused_lm_head

    from train.lm_head import plain_lm_head

    base = make_model(VOCAB)
    setattr(base.config, key, 30.0 if key == "final_logit_softcapping" else 0.5)
    add_fused_lm_head(base)
    assert not plain_lm_head(base)
    assert not plain_lm_head(make_model(VOCAB))  # nothing installed by TRL: nothing to wrap
