"""The first token's probabilities of a reply, for backends that can give them.

    dists = first_token_probs(teacher, requests, top=20)   # [{token text: probability}] or None

Used by the `judge` scorer (train/rating.py) to read a 1-5 rating as the probability-weighted mean
over the rating tokens (G-Eval; Liu et al., 2023) instead of parsing one sampled digit. The
transformers backend computes the exact next-token distribution after the prompt (one forward pass
over the chat-templated prompt, the same ids `generate` would start from). A backend with its own
`first_token_probs(requests, top=, include=)` method answers for itself: the openai backend asks the
server for one token with `top_logprobs` (openai_compat.py), vllm asks its engine for `logprobs=20`
(vllm_engine.py), and a TeacherPool forwards each request to the member that serves it (pool.py);
those may give None for single requests (a server that refuses log-probabilities). Other backends
give None for the whole call. Either way the caller falls back to a sampled reply. Token texts are
decoded and stripped, and tokens with the same stripped text ("4" and " 4") are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.teachers.base import Request

TOP = 20  # tokens kept per request (OpenAI's top_logprobs allows at most 20)


def _own_method(teacher: Any) -> Any:
    """The backend's own `first_token_probs` method (openai, vllm, a pool), else None."""
    method = getattr(teacher, "first_token_probs", None)
    return method if callable(method) else None


def _in_process(teacher: Any) -> bool:
    return all(hasattr(teacher, a) for a in ("model", "tokenizer", "prompt_ids"))


def supports_logprobs(teacher: Any) -> bool:
    """True when `first_token_probs` can ask this teacher for a distribution (unwrapping a cache); a
    server may still refuse for single requests, a pool only where its members can."""
    inner = getattr(teacher, "teacher", teacher)
    supports = getattr(inner, "supports_logprobs", None)
    if callable(supports):
        return bool(supports())
    return _own_method(inner) is not None or _in_process(inner)


def _single_token_ids(tok: Any, texts: Sequence[str]) -> list[int]:
    """Ids of the one-token spellings of `texts` ("4" and " 4" are often two different tokens)."""
    ids = set()
    for text in texts:
        for spelling in (text, " " + text):
            enc = tok(spelling, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.add(enc[0])
    return sorted(ids)


def _last_logits(model: Any, ids: Any, mask: Any, last: Any) -> Any:
    """Float logits at one position per row. The output layer runs only there: over all positions it
    was most of the pass's memory traffic (rows x width x vocabulary)."""
    import torch

    decoder, head = getattr(model, "get_decoder", lambda: None)(), model.get_output_embeddings()
    if decoder is None or head is None:  # an unusual architecture: the whole forward, then pick
        logits = model(input_ids=ids, attention_mask=mask).logits
        return logits[torch.arange(len(ids)), last.to(logits.device)].float()
    hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = head(hidden[torch.arange(len(ids)), last.to(hidden.device)]).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits  # as the model's own forward does (Gemma 2)


def first_token_probs(teacher: Any, requests: Sequence[Request], *, top: int = TOP, include: Sequence[str] = (),
                      batch_size: int = 8, names: Sequence[str | None] | None = None
                      ) -> list[dict[str, float] | None] | None:
    """The `top` most likely first tokens of each reply, plus the tokens spelling `include` where the
    backend can name them, as {stripped text: probability}; None for the whole call when the backend
    cannot tell, None for one request when it could not for that one. `names` (a TeacherPool only):
    the member that serves each request, as from `pool.assign`."""
    inner = getattr(teacher, "teacher", teacher)
    method = _own_method(inner)
    if method is not None:
        if not requests:
            return []
        extra = {"names": names} if names is not None else {}
        return method(list(requests), top=top, include=tuple(include), **extra)
    if not _in_process(inner):
        return None
    return _transformers_probs(inner, requests, top=top, include=include, batch_size=batch_size)


def _transformers_probs(inner: Any, requests: Sequence[Request], *, top: int, include: Sequence[str],
                        batch_size: int) -> list[dict[str, float] | None]:
    """The exact next-token distribution after each prompt, by one forward pass per batch."""
    import torch

    encoded = [inner.prompt_ids(r) for r in requests]
    model, tok = inner.model, inner.tokenizer
    device = next(model.parameters()).device
    out: list[dict[str, float] | None] = [{} for _ in requests]
    wanted = _single_token_ids(tok, include)
    order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
    for lo in range(0, len(order), batch_size):
        batch = order[lo:lo + batch_size]
        width = max(len(encoded[i]) for i in batch)
        pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        # right padding: every prompt keeps the positions it has alone; read each row at its last token
        ids = torch.tensor([encoded[i] + [pad] * (width - len(encoded[i])) for i in batch])
        mask = torch.tensor([[1] * len(encoded[i]) + [0] * (width - len(encoded[i])) for i in batch])
        last = torch.tensor([len(encoded[i]) - 1 for i in batch])
        with torch.inference_mode():
            logits = _last_logits(model, ids.to(device), mask.to(device), last.to(device))
        probs = logits.softmax(-1)
        values, indices = probs.topk(min(top, probs.shape[-1]), dim=-1)
        for row, i in enumerate(batch):
            dist: dict[str, float] = {}
            chosen = dict(zip(indices[row].tolist(), values[row].tolist(), strict=True))
            chosen.update((t, float(probs[row, t])) for t in wanted)
            for t, p in chosen.items():
                text = tok.decode([t]).strip()
                dist[text] = dist.get(text, 0.0) + p
            out[i] = dist
    return out
