"""A fast decode loop for Llama-family models on CPU: the default engine of the transformers teacher.

    .venv/bin/python bench/generate.py --quick      # side by side with plain batched `model.generate`

Same model weights and the same arithmetic as the Hugging Face Llama forward (RMSNorm, RoPE, SiLU
MLP, op for op), without `generate`'s per-step overhead:
- lanes: one decoding thread per torch thread (at most MAX_LANES), each with one intra-op thread,
  its own rows and cache; job i goes to lane i % lanes. OpenMP's two-thread ops meet at a barrier
  after every one of the ~1,000 ops of a step, and on a busy machine a descheduled partner stalls
  the other (measured here under load: 26 decode tokens/s at 2 OpenMP threads against 96 at one
  thread and 112 for two lanes); lanes never wait for each other, and torch releases the GIL in ops;
- continuous batching: up to `max_rows` sequences decode together; a finished row's slot goes to
  the next waiting prompt, so the batch stays full until the queue drains;
- a pre-allocated KV cache (slot x kv-head x position), grown by doubling, rows kept contiguous;
- prefill of admitted prompts in one right-padded causal pass, logits only for each last token;
- decode attention in bfloat16 by the C kernel of `fast_kernel.py` (scaled_dot_product_attention
  spent half of a step on per-block set-up); float32 keeps SDPA, which is what `generate` runs;
- the sampler in `fast_sampler.py`: top-k candidates (found in C) before top-p, one uniform per row.
Greedy float32 outputs are token-identical to plain `generate` (tested on the embedded model);
a row's random draws come only from its own seed (`random.Random(seed)`), never from its neighbours.
Only Llama-shaped models are supported (`supports(model)`); others use `generate`.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.teachers import fast_kernel
from pipeline.teachers.base import Sampling
from pipeline.teachers.fast_sampler import apply_penalties, sample_rows

MAX_ROWS = 128  # sequences decoding at once, all lanes together; measured best on 2 cores for the 135M model
MAX_LANES = 4  # decoding threads by default: one per torch thread, at most this many (they share the GIL)
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


@dataclass
class _Lane:
    """One decoding thread's state: its slots, their KV cache and penalty counts."""

    rows: int  # slots (sequences decoding at once in this lane)
    active: list[_Row] = field(default_factory=list)
    cache: list[tuple[Any, Any]] = field(default_factory=list)  # per layer (k, v): slot x kv-head x position
    capacity: int = 0  # positions the cache holds
    counts: Any = None  # per-slot token counts, only while a row has penalties


def _split(rows: list[_Row]) -> tuple[list[_Row], list[_Row]]:
    """The longest head of `rows` whose padded prompt tokens fit PREFILL_TOKENS (at least one row)."""
    take, width = 1, rows[0].length
    while take < len(rows) and (take + 1) * max(width, rows[take].length) <= PREFILL_TOKENS:
        width = max(width, rows[take].length)
        take += 1
    return rows[:take], rows[take:]


def _wait_all(ended: list[threading.Event]) -> None:
    """Wait until every started lane has left its decode loop, even through further Ctrl-C: a lane
    still inside a torch op when the interpreter exits takes the process down with SIGABRT
    ("terminate called without an active exception") instead of the clean exit 130. A lane stops at
    its next step once `stop` is set. Events, not Thread.join: on Python 3.11 a join interrupted by
    Ctrl-C marks a running thread as stopped, and a second join returns at once."""
    for e in ended:
        while not e.is_set():
            try:
                e.wait()
            except KeyboardInterrupt:
                continue


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
                 max_rows: int = MAX_ROWS, candidates: int = CANDIDATES, lanes: int | None = None,
                 kernel: bool = True) -> None:
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
        self.max_rows, self.candidates, self.lanes = max_rows, candidates, lanes
        self.torch = torch
        self.kernels = fast_kernel.load() if kernel and self.device.type == "cpu" else None  # C, or torch only
        # the C decode attention for bfloat16 caches (keys stored dim-major), else scaled_dot_product_attention
        self.kernel = self.kernels if self.kernels is not None and self.dtype == torch.bfloat16 \
            and fast_kernel.usable(self.heads // self.kv_heads, self.head_dim) else None

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

    def _ensure_capacity(self, lane: _Lane, needed: int) -> None:
        """Grow every layer's cache of `lane` to hold `needed` positions (doubling, multiple of 64)."""
        if needed <= lane.capacity:
            return
        cap = max(needed, 2 * lane.capacity, 64)
        cap = (cap + 63) // 64 * 64
        shape = (lane.rows, self.kv_heads, cap, self.head_dim)
        kshape = (lane.rows, self.kv_heads, self.head_dim, cap) if self.kernel else shape  # kernel: keys dim-major
        grown = []
        for k, v in lane.cache or [(None, None)] * len(self.layers):
            nk = self.torch.zeros(kshape, dtype=self.dtype, device=self.device)  # zeros: masked slots must be finite
            nv = self.torch.zeros(shape, dtype=self.dtype, device=self.device)
            if k is not None:
                if self.kernel:
                    nk[..., :lane.capacity] = k
                else:
                    nk[:, :, :lane.capacity] = k
                nv[:, :, :lane.capacity] = v
            grown.append((nk, nv))
        lane.cache, lane.capacity = grown, cap

    def _prefill(self, lane: _Lane, base: int, prompts: list[list[int]]) -> Any:
        """Run prompts (right-padded, causal) into cache rows base.., return last-token logits."""
        torch, F = self.torch, self.torch.nn.functional
        n, width = len(prompts), max(len(p) for p in prompts)
        tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)
        cos, sin = self._rope(torch.arange(width, device=self.device)[None])
        cos, sin = cos[:, :, None], sin[:, :, None]  # (1, width, 1, d): rotate in the contiguous layout
        x = F.embedding(tokens, self.embed)
        for layer, (kc, vc) in zip(self.layers, lane.cache, strict=True):
            qkv = F.linear(self._rms(x, layer[0]), layer[1]).view(n, width, -1, self.head_dim)
            qk = self._rotate(qkv[:, :, :self.heads + self.kv_heads].contiguous(), cos, sin).transpose(1, 2)
            q, k = qk[:, :self.heads], qk[:, self.heads:]
            v = qkv[:, :, self.heads + self.kv_heads:].transpose(1, 2)
            if self.kernel:
                kc[base:base + n, ..., :width] = k.transpose(-1, -2)
            else:
                kc[base:base + n, :, :width] = k
            vc[base:base + n, :, :width] = v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            x = self._mlp(x + F.linear(a.transpose(1, 2).reshape(n, width, -1), layer[2]), layer)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return F.linear(self._rms(x[torch.arange(n), last], self.norm), self.lm_head)

    def _step(self, lane: _Lane, tokens: Any, positions: Any) -> Any:
        """One decode step for rows 0..n-1: token at `positions`, attending to the cache up to it."""
        torch, F = self.torch, self.torch.nn.functional
        n, span = tokens.shape[0], int(positions.max()) + 1
        rows, group = torch.arange(n, device=self.device), self.heads // self.kv_heads
        cos, sin = self._rope(positions)
        cos, sin = cos[:, None], sin[:, None]
        if self.kernel:
            lengths = positions + 1
        else:
            mask = (torch.arange(span, device=self.device)[None] <= positions[:, None]).view(n, 1, 1, span)
        x = F.embedding(tokens, self.embed)
        for layer, (kc, vc) in zip(self.layers, lane.cache, strict=True):
            qkv = F.linear(self._rms(x, layer[0]), layer[1]).view(n, -1, self.head_dim)
            qk = self._rotate(qkv[:, :self.heads + self.kv_heads], cos, sin)
            if self.kernel:  # rotated q|k in place of the raw ones: one row layout for the kernel
                qkv[:, :self.heads + self.kv_heads] = qk
                a = fast_kernel.decode_attention(self.kernel, qkv.view(n, -1), kc, vc, lengths, heads=self.heads,
                                                 kv_heads=self.kv_heads, scale=self.scale)
            else:
                kc[rows, :, positions] = qk[:, self.heads:]
                vc[rows, :, positions] = qkv[:, self.heads + self.kv_heads:]
                q = qk[:, :self.heads].view(n, self.kv_heads, group, self.head_dim)
                a = F.scaled_dot_product_attention(q, kc[:n, :, :span], vc[:n, :, :span], attn_mask=mask,
                                                   scale=self.scale).reshape(n, -1)
            x = self._mlp(x + F.linear(a, layer[2]), layer)
        return F.linear(self._rms(x, self.norm), self.lm_head)

    # ------------------------------------------------------------ the loop

    def run(self, jobs: Sequence[Job], on_finish: OnFinish | None = None) -> list[list[int]]:
        """Generate for every job; returns each job's new ids (ending with the EOS or the token
        that completed a stop string, when that is why it stopped). With several lanes, job i
        goes to lane i % lanes (a fixed split, so the same job list gives the same batches) and
        `on_finish` is called from the lanes' threads, one call at a time."""
        torch = self.torch
        if any(not j.prompt for j in jobs):
            raise ValueError("every job needs at least one prompt token")
        results: list[list[int]] = [[] for _ in jobs]
        threads = torch.get_num_threads()
        lanes = max(1, min(self.lanes or min(threads, MAX_LANES), len(jobs)))
        if lanes == 1:
            self._decode(_Lane(self.max_rows), list(range(len(jobs))), jobs, results, on_finish, None)
            return results
        per_lane = max(1, threads // lanes)
        lock, stop, errors = threading.Lock(), threading.Event(), []

        def finish(index: int, ids: list[int]) -> None:
            with lock:
                on_finish(index, ids)  # type: ignore[misc]

        ended = [threading.Event() for _ in range(lanes)]

        def work(k: int) -> None:
            try:
                torch.set_num_threads(per_lane)  # this thread's own setting (OpenMP and MKL keep it per thread)
                self._decode(_Lane(max(1, self.max_rows // lanes)), list(range(k, len(jobs), lanes)), jobs,
                             results, finish if on_finish is not None else None, stop)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                errors.append(e)
                stop.set()
            finally:
                ended[k].set()

        workers = [threading.Thread(target=work, args=(k,), name=f"sift-decode-{k}", daemon=True)
                   for k in range(lanes)]
        try:
            for w in workers:
                w.start()
            for e in ended:
                e.wait()
        finally:
            stop.set()  # an interrupt in this thread stops the lanes at their next step
            _wait_all([e for w, e in zip(workers, ended, strict=True) if w.ident is not None])
        if errors:
            raise errors[0]
        return results

    def _decode(self, lane: _Lane, order: list[int], jobs: Sequence[Job], results: list[list[int]],
                on_finish: OnFinish | None, stop: threading.Event | None) -> None:
        """The continuous-batching loop of one lane over the jobs `order` names, in that order."""
        torch = self.torch
        waiting = order[::-1]  # pop() takes them in order
        active = lane.active
        with torch.inference_mode():
            while waiting or active:
                if stop is not None and stop.is_set():
                    return
                free = lane.rows - len(active)
                if waiting and (not active or free >= max(1, lane.rows // ADMIT_FRACTION)):
                    new = [waiting.pop() for _ in range(min(free, len(waiting)))]
                    rows = [_Row(i, jobs[i], random.Random(jobs[i].seed), length=len(jobs[i].prompt)) for i in new]
                    self._ensure_capacity(lane, max(r.length + 1 for r in rows))
                    while rows:  # chunks of about PREFILL_TOKENS keep the big activations in cache
                        chunk, rows = _split(rows)
                        logits = self._prefill(lane, len(active), [r.job.prompt for r in chunk])
                        active.extend(chunk)
                        self._advance(lane, len(active) - len(chunk), logits, results, on_finish)
                    continue
                self._ensure_capacity(lane, max(r.length + 1 for r in active))
                tokens = torch.tensor([r.ids[-1] for r in active], device=self.device)
                positions = torch.tensor([r.length for r in active], device=self.device)
                for r in active:
                    r.length += 1
                self._advance(lane, 0, self._step(lane, tokens, positions), results, on_finish)

    def _advance(self, lane: _Lane, start: int, logits: Any, results: list[list[int]],
                 on_finish: OnFinish | None) -> None:
        """Pick the next token of rows start.. from their logits; retire the finished rows."""
        active = lane.active
        rows = active[start:]
        picked = self._pick(lane, rows, start, logits)
        done = []
        for offset, (r, t) in enumerate(zip(rows, picked, strict=True)):
            r.ids.append(t)
            if lane.counts is not None:
                lane.counts[start + offset, t] += 1
            if t in self.eos_ids or len(r.ids) >= r.job.sampling.max_tokens or self._stopped(r):
                done.append(start + offset)
        for slot in reversed(done):  # highest first, so moving the last row down stays valid
            r = active[slot]
            results[r.index] = r.ids
            if on_finish is not None:
                on_finish(r.index, r.ids)
            last = len(active) - 1
            if slot != last:
                filled = active[last].length + 1
                for kc, vc in lane.cache:
                    if self.kernel:
                        kc[slot, ..., :filled] = kc[last, ..., :filled]
                    else:
                        kc[slot, :, :filled] = kc[last, :, :filled]
                    vc[slot, :, :filled] = vc[last, :, :filled]
                if lane.counts is not None:
                    lane.counts[slot] = lane.counts[last]
                active[slot] = active[last]
            if lane.counts is not None:
                lane.counts[last].zero_()
            active.pop()

    def _pick(self, lane: _Lane, rows: list[_Row], start: int, logits: Any) -> list[int]:
        torch = self.torch
        samplings = [r.job.sampling for r in rows]
        penalised = any(s.presence_penalty or s.frequency_penalty for s in samplings)
        if penalised:  # in float32, in the order of hf.PenaltyProcessor
            logits = logits.float()
            if lane.counts is None:
                lane.counts = torch.zeros(lane.rows, logits.shape[1], device=self.device)
            width = max(len(r.ids) for r in rows)
            if width:
                history = torch.tensor([r.ids + [r.ids[0] if r.ids else 0] * (width - len(r.ids)) for r in rows],
                                       device=self.device)
                apply_penalties(logits, history, lane.counts[start:start + len(rows)],
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
            torch.tensor([rows[i].rng.random() for i in sampled], dtype=torch.float64), candidates=self.candidates,
            kernels=self.kernels)
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
