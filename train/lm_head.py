"""The LM head of `sift train` on a CPU: one bfloat16 product over the answer tokens only.

Used by `sift train` (train/lora.py) on devices without Triton; bench/train.py measures it.
TRL's SFTTrainer (1.16) scores tokens through a "fused LM head" (`trl.trainer.utils.add_fused_lm_head`)
that never builds the full logits. On a GPU it runs Triton kernels over the answer tokens only. On a
CPU it falls back to torch ops over every position, prompt and padding included, in 32K-column tiles:
about ten float32 passes over each tile forward and again backward, plus a float32 matrix product
for the gradient (TRL's `_addmm_fp32`), where autocast would have used bfloat16. Profiled on a
`sift train` of SmolLM2-135M (docs/training.md) that head took 37% of each training step.

`plain_lm_head(model)` wraps the forward TRL installed: called with `fused_lm_head=True`, it returns
the same `FusedCausalLMOutput` fields SFTTrainer reads (loss, log_probs, entropy, is_top1,
label_mask), computed as transformers' own loss does (logits in the autocast dtype, log-softmax in
float32, autograd for the gradient), but only at the positions that carry a label. Any other call,
and models this does not cover (logit soft-capping or scaling, MoE router losses), go to TRL's head.
The per-position memory is that of ordinary logits over the answer tokens.
"""

from __future__ import annotations

import functools
import types
from typing import Any

IGNORE = -100


def covered(model: Any) -> bool:
    """True when the model's logits are a plain linear map of the last hidden state, as assumed here."""
    config = model.config.get_text_config()
    return (getattr(config, "final_logit_softcapping", None) is None
            and all(getattr(config, k, None) in (None, 1.0) for k in ("logit_scale", "output_multiplier",
                                                                        "lm_head_multiplier", "logits_scaling"))
            and not getattr(config, "output_router_logits", False)
            and model.get_output_embeddings() is not None)


def answer_scores(hidden: Any, lm_head: Any, labels: Any, num_items_in_batch: Any = None) -> dict:
    """Per-position log-probabilities of the labels (0 where the label is ignored), the loss, and
    detached entropy and top-1 flags, from hidden states [B, T, H] and already-shifted labels [B, T]."""
    import torch

    mask = labels != IGNORE
    targets = labels[mask]
    logits = lm_head(hidden[mask])  # [M, V] over the scored positions only
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
        is_top1 = logp.argmax(-1) == targets  # the first maximum, as TRL counts a tie

    def spread(x: Any) -> Any:  # back to [B, T], zero (or False) where ignored, still connected to the graph
        return x.new_zeros(mask.shape).masked_scatter(mask, x)

    log_probs = spread(picked)
    denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return {"loss": -log_probs.sum() / denominator, "log_probs": log_probs, "entropy": spread(entropy),
            "is_top1": spread(is_top1), "label_mask": mask}


def plain_lm_head(model: Any) -> bool:
    """Route `model(..., fused_lm_head=True)` (TRL's SFTTrainer) through `answer_scores`; returns
    whether it did (False: the model is not `covered`, TRL's head stays). Call it after SFTTrainer
    has patched the base model (`trainer.model.get_base_model()` under PEFT)."""
    if not covered(model) or "forward" not in vars(model):  # no TRL patch to wrap
        return False
    from trl.trainer.utils import FusedCausalLMOutput

    trl_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or (labels is None and shift_labels is None):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        lm_head = self.get_output_embeddings()
        scores = answer_scores(hidden.to(lm_head.weight.device), lm_head, shift_labels.to(lm_head.weight.device),
                               num_items_in_batch)
        return FusedCausalLMOutput(**scores)

    model.forward = types.MethodType(forward, model)
    return True
