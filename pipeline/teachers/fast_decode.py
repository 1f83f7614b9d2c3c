"""A fast decode loop for Llama-family models on CPU: the default engine of the transformers teacher.

    .venv/bin/python bench/generate.py --quick      # side by side with plain batched `model.generate`

Same model weights and the same arithmetic as the Hugging Face Llama forward (RMSNorm, RoPE, SDPA,
SiLU MLP, op for op), without `generate`'s per-step overhead:
- continuous batching: up to `max_rows` sequences decode together; a finished row's slot goes to the
  next waiting prompt, so the batch stays full until the queue drains;
- a pre-allocated KV cache (slot x kv-head x position), grown by doubling, rows kept contiguous;
- prefill of admitted prompts in one right-padded causal pass, logits only for each last token;
- the sampler in `fast_sampler.py`: top-k candidates before top-p and one uniform draw per row.
Greedy float32 outputs are token-identical to plain `generate` (tested on the embedded model);
a row's random draws come only from its own seed (`random.Random(seed)`), never from its neighbours.
Only Llama-shaped models are supported (`supports(model)`); others use `generate`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.teachers.base import Sampling
from pipeline.teachers.fast_sampler import apply_penalties, sample_rows

MAX_ROWS = 128  # sequences decoding at once; measured best on 2 cores for the 135M model
CANDIDATES = 128  # top-k candidates the sampler looks at before falling back to a full sort
ADMIT_FRACTION = 8  # prefill newcomers once 1/8 of the rows are free (or nothing is decoding)
PREFILL_TOKENS = 2048  # prompt tokens (padded) per prefill pass: 128 x 160 at once was 2x slower
STOP_TAIL = 4  # tokens decoded per character of the longest stop string when checking a tail

Decode = Callable[[list[int]], str]
OnFinish = Callable[[int, list[int]], None]  # (job index, generated ids) when a job finishes


@dataclass
class Job:
    """One sequence to complete: prompt token ids, its sampling parameters and its seed."""

    prompt: list[int]
    sampling: Sampling
    seed: int


@dataclass
class _Row:
    index: int  # position of the job in the caller's list
    job: Job
    rng: random.Random
    ids: list[int] = field(default_factory=list)  # generated so far
    length: int = 0  # cache positions filled


def _split(rows: list[_Row]) -> tuple[list[_Row], list[_Row]]:
    """The longest head of `rows` whose padded prompt tokens fit PREFILL_TOKENS (at least one row)."""
    take, width = 1, rows[0].length
    while take < len(rows) and (take + 1) * max(width, rows[take].length) <= PREFILL_TOKENS:
        width = max(width, rows[take].length)
        take += 1
    return rows[:take], rows[take:]


def supports(model: Any) -> bool:
    """True for the architectures this loop reproduces exactly (plain Llama: no biases, default RoPE)."""
    c = model.config
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
    return (c.model_type == "llama" and rope == "default" and c.hidden_act == "silu"
            and not getattr(c, "attention_bias", False) and not getattr(c, "mlp_bias", False)
            and getattr(c, "pretraining_tp", 1) == 1)


class FastDecoder:
    """Continuous-batching decoder over a loaded Hugging Face Llama model (weights shared, not copied)."""

    def __init__(self, model: Any, *, eos_ids: Sequence[int], decode: Decode | None = None,
                 max_rows: int = MAX_ROWS, candidates: int = CANDIDATES) -> None:
        import torch

        if not supports(model):
            raise ValueError(f"fast decoding supports plain Llama models, not {model.config.model_type}")
        c, m = model.config, model.model
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps, self.scale = c.rms_norm_eps, self.head_dim ** -0.5
        cat = torch.cat  # fused projections: one matmul for q|k|v and one for gate|up (fewer, larger ops)
        self.layers = [(lay.input_layernorm.weight,
                        cat([lay.self_attn.q_proj.weight, lay.self_attn.k_proj.weight, lay.self_attn.v_proj.weight]),
                        lay.self_attn.o_proj.weight, lay.post_attention_layernorm.weight,
                        cat([lay.mlp.gate_proj.weight, lay.mlp.up_proj.weight]), lay.mlp.down_proj.weight)
                       for lay in m.layers]
        self.inner = c.intermediate_size
        self.embed, self.norm, self.lm_head = m.embed_tokens.weight, m.norm.weight, model.lm_head.weight
        self.inv_freq, self.dtype, self.device = m.rotary_emb.inv_freq, self.embed.dtype, self.embed.device
        self.eos_ids, self.decode = set(eos_ids), decode
        self.max_rows, self.candidates = max_rows, candidates
        self.cache: list[tuple[Any, Any]] = []
        self.capacity = 0
        self.counts: Any = None  # per-row token counts, only while a row has penalties
        self.torch = torch

    # ------------------------------------------------------------ model arithmetic (as in HF Llama)

    def _rms(self, x: Any, w: Any) -> Any:
        h = x.to(self.torch.float32)
        h = h * self.torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * h.to(x.dtype)

    def _rope(self, positions: Any) -> tuple[Any, Any]:
        """cos and sign-folded sin, so that rotating is x*cos + roll(x)*sin: bitwise the same as
        HF's x*cos + rotate_half(x)*sin, since (-a)*b == -(a*b) exactly."""
        freqs = positions[..., None].float() * self.inv_freq.to(dtype=self.torch.float)
        emb = self.torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin().to(self.dtype)
        half = sin.shape[-1] // 2
        return emb.cos().to(self.dtype), self.torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def _rotate(self, x: Any, cos: Any, sin: Any) -> Any:
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

    def _mlp(self, x: Any, layer: tuple) -> Any:
        F = self.torch.nn.functional
        gate, up = F.linear(self._rms(x, layer[3]), layer[4]).split(self.inner, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer[5])

    def _ensure_capacity(self, needed: int) -> None:
        """Grow every layer's cache to hold `needed` positions (doubling, multiple of 64)."""
        if needed <= self.capacity:
            return
        cap = max(needed, 2 * self.capacity, 64)
        cap = (cap + 63) // 64 * 64
        shape = (self.max_rows, self.kv_heads, cap, self.head_dim)
        grown = []
        for k, v in self.cache or [(None, None)] * len(self.layers):
            nk = self.torch.zeros(shape, dtype=self.dtype, device=self.device)  # zeros: masked slots must be finite
            nv = self.torch.zeros(shape, dtype=self.dtype, device=self.device)
            if k is not None:
                nk[:, :, :self.capacity] = k
                nv[:, :, :self.capacity] = v
            grown.append((nk, nv))
        self.cache, self.capacity = grown, cap

    def _prefill(self, base: int, prompts: list[list[int]]) -> Any:
        """Run prompts (right-padded, causal) into cache rows base.., return last-token logits."""
        torch, F = self.torch, self.torch.nn.functional
        n, width = len(prompts), max(len(p) for p in prompts)
        tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)
        cos, sin = self._rope(torch.arange(width, device=self.device)[None])
        cos, sin = cos[:, :, None], sin[:, :, None]  # (1, width, 1, d): rotate in the contiguous layout
        x = F.embedding(tokens, self.embed)
        for layer, (kc, vc) in zip(self.layers, self.cache, strict=True):
            qkv = F.linear(self._rms(x, layer[0]), layer[1]).view(n, width, -1, self.head_dim)
            qk = self._rotate(qkv[:, :, :self.heads + self.kv_heads].contiguous(), cos, sin).transpose(1, 2)
            q, k = qk[:, :self.heads], qk[:, self.heads:]
            v = qkv[:, :, self.heads + self.kv_heads:].transpose(1, 2)
            kc[base:base + n, :, :width], vc[base:base + n, :, :width] = k, v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            x = self._mlp(x + F.linear(a.transpose(1, 2).reshape(n, width, -1), layer[2]), layer)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return F.linear(self._rms(x[torch.arange(n), last], self.norm), self.lm_head)

    def _step(self, tokens: Any, positions: Any) -> Any:
        """One decode step for rows 0..n-1: token at `positions`, attending to the cache up to it."""
        torch, F = self.torch, self.torch.nn.functional
        n, span = tokens.shape[0], int(positions.max()) + 1
        rows, group = torch.arange(n, device=self.device), self.heads // self.kv_heads
        cos, sin = self._rope(positions)
        cos, sin = cos[:, None], sin[:, None]
        mask = (torch.arange(span, device=self.device)[None] <= positions[:, None]).view(n, 1, 1, span)
        x = F.embedding(tokens, self.embed)
        for layer, (kc, vc) in zip(self.layers, self.cache, strict=True):
            qkv = F.linear(self._rms(x, layer[0]), layer[1]).view(n, -1, self.head_dim)
            qk = self._rotate(qkv[:, :self.heads + self.kv_heads], cos, sin)
            kc[rows, :, positions], vc[rows, :, positions] = qk[:, self.heads:], qkv[:, self.heads + self.kv_heads:]
            q = qk[:, :self.heads].view(n, self.kv_heads, group, self.head_dim)
            a = F.scaled_dot_product_attention(q, kc[:n, :, :span], vc[:n, :, :span], attn_mask=mask,
                                               scale=self.scale)
            x = self._mlp(x + F.linear(a.reshape(n, -1), layer[2]), layer)
        return F.linear(self._rms(x, self.norm), self.lm_head)

    # ------------------------------------------------------------ the loop

    def run(self, jobs: Sequence[Job], on_finish: OnFinish | None = None) -> list[list[int]]:
        """Generate for every job; returns each job's new ids (ending with the EOS or the token
        that completed a stop string, when that is why it stopped)."""
        torch = self.torch
        if any(not j.prompt for j in jobs):
            raise ValueError("every job needs at least one prompt token")
        results: list[list[int]] = [[] for _ in jobs]
        waiting = list(range(len(jobs)))[::-1]  # pop() takes them in order
        active: list[_Row] = []
        with torch.inference_mode():
            while waiting or active:
                free = self.max_rows - len(active)
                if waiting and (not active or free >= max(1, self.max_rows // ADMIT_FRACTION)):
                    new = [waiting.pop() for _ in range(min(free, len(waiting)))]
                    rows = [_Row(i, jobs[i], random.Random(jobs[i].seed), length=len(jobs[i].prompt)) for i in new]
                    self._ensure_capacity(max(r.length + 1 for r in rows))
                    while rows:  # chunks of about PREFILL_TOKENS keep the big activations in cache
                        chunk, rows = _split(rows)
                        logits = self._prefill(len(active), [r.job.prompt for r in chunk])
                        active.extend(chunk)
                        self._advance(active, len(active) - len(chunk), logits, results, on_finish)
                    continue
                self._ensure_capacity(max(r.length + 1 for r in active))
                tokens = torch.tensor([r.ids[-1] for r in active], device=self.device)
                positions = torch.tensor([r.length for r in active], device=self.device)
                for r in active:
                    r.length += 1
                self._advance(active, 0, self._step(tokens, positions), results, on_finish)
        self.cache, self.capacity, self.counts = [], 0, None  # give the memory back between calls
        return results

    def _advance(self, active: list[_Row], start: int, logits: Any, results: list[list[int]],
                 on_finish: OnFinish | None) -> None:
        """Pick the next token of rows start.. from their logits; retire the finished rows."""
        rows = active[start:]
        picked = self._pick(rows, start, logits)
        done = []
        for offset, (r, t) in enumerate(zip(rows, picked, strict=True)):
            r.ids.append(t)
            if self.counts is not None:
                self.counts[start + offset, t] += 1
            if t in self.eos_ids or len(r.ids) >= r.job.sampling.max_tokens or self._stopped(r):
                done.append(start + offset)
        for slot in reversed(done):  # highest first, so moving the last row down stays valid
            r = active[slot]
            results[r.index] = r.ids
            if on_finish is not None:
                on_finish(r.index, r.ids)
            last = len(active) - 1
            if slot != last:
                for kc, vc in self.cache:
                    kc[slot, :, :active[last].length + 1] = kc[last, :, :active[last].length + 1]
                    vc[slot, :, :active[last].length + 1] = vc[last, :, :active[last].length + 1]
                if self.counts is not None:
                    self.counts[slot] = self.counts[last]
                active[slot] = active[last]
            if self.counts is not None:
                self.counts[last].zero_()
            active.pop()

    def _pick(self, rows: list[_Row], start: int, logits: Any) -> list[int]:
        torch = self.torch
        samplings = [r.job.sampling for r in rows]
        penalised = any(s.presence_penalty or s.frequency_penalty for s in samplings)
        if penalised:  # in float32, in the order of hf.PenaltyProcessor
            logits = logits.float()
            if self.counts is None:
                self.counts = torch.zeros(self.max_rows, logits.shape[1], device=self.device)
            width = max(len(r.ids) for r in rows)
            if width:
                history = torch.tensor([r.ids + [r.ids[0] if r.ids else 0] * (width - len(r.ids)) for r in rows],
                                       device=self.device)
                apply_penalties(logits, history, self.counts[start:start + len(rows)],
                                torch.tensor([s.presence_penalty for s in samplings], device=self.device),
                                torch.tensor([s.frequency_penalty for s in samplings], device=self.device))
        sampled = [i for i, s in enumerate(samplings) if s.temperature > 0]
        if len(sampled) < len(rows):
            picked = logits.argmax(-1)  # greedy: argmax of bf16 equals argmax of its exact float32 copy
        if not sampled:
            return picked.tolist()
        ss = [samplings[i] for i in sampled]
        chosen = sample_rows(
            logits if len(sampled) == len(rows) else logits[sampled], torch.tensor([s.temperature for s in ss]),
            torch.tensor([s.top_p for s in ss], dtype=torch.float64), torch.tensor([s.top_k for s in ss]),
            torch.tensor([rows[i].rng.random() for i in sampled], dtype=torch.float64), candidates=self.candidates)
        if len(sampled) == len(rows):
            return chosen.tolist()
        picked[sampled] = chosen
        return picked.tolist()

    def _stopped(self, r: _Row) -> bool:
        """Whether the text of the last few tokens contains one of the row's stop strings (cheap
        tail check; the caller cuts the text exactly)."""
        stops = [s for s in r.job.sampling.stop if s]
        if not stops or self.decode is None:
            return False
        tail = self.decode(r.ids[-STOP_TAIL * max(len(s) for s in stops) - STOP_TAIL:])
        return any(s in tail for s in stops)
