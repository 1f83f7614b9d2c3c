"""A fast decode loop for Llama-family and Gemma 3 models on CPU: the default engine of the transformers teacher.

    .venv/bin/python bench/generate.py --quick                          # beside plain batched `model.generate`
    .venv/bin/python bench/generate.py --quick --teacher gemma-3-270m   # the same for Gemma 3 270M

Same model weights and the same arithmetic as the Hugging Face forward, op for op: for Llama
RMSNorm, RoPE, SiLU MLP; for Gemma 3's text model (`Gemma3ForCausalLM`) also its differences:
- sliding-window and global layers, in the per-layer pattern of `config.layer_types`: a sliding
  layer attends to its last `sliding_window` positions (itself included), in prefill and decode;
- one rotary table per layer type (local and global theta, static scaling such as "linear");
- qk-norm (q_norm/k_norm on each head before RoPE) and the query scale `query_pre_attn_scalar`;
- Gemma's RMSNorm, x * (1 + w) in float32 then rounded, before and after attention and the MLP;
- embeddings scaled by sqrt(hidden) rounded to the weights' dtype; GELU-tanh MLP;
- the tied 262K-row output layer, with `final_logit_softcapping` where the config sets it.
  (`attn_logit_softcapping` is refused by `supports`: transformers' Gemma 3 never applies it.)
Without `generate`'s per-step overhead:
- lanes: one decoding thread per torch thread (at most MAX_LANES), each with one intra-op thread,
  its own rows and cache; job i goes to lane i % lanes. OpenMP's two-thread ops meet at a barrier
  after every one of the ~1,000 ops of a step, and on a busy machine a descheduled partner stalls
  the other (measured here under load: 26 decode tokens/s at 2 OpenMP threads against 96 at one
  thread and 112 for two lanes); lanes never wait for each other, and torch releases the GIL in ops;
- continuous batching: up to `max_rows` sequences decode together; a finished row's slot goes to
  the next waiting prompt, so the batch stays full until the queue drains;
- a pre-allocated KV cache (slot x kv-head x position), grown by doubling, rows kept contiguous
  (sliding layers keep every position too; they read only their window);
- prefill of admitted prompts in one right-padded causal pass, logits only for each last token;
- a shared prompt prefix prefilled once: admitted prompts that begin with the same SHARED_MIN or more
  tokens (a few-shot prompt: classify's 700 tokens before each instruction) are grouped, the prefix
  runs through the model once, its keys and values are copied into each row's cache, and only the
  rest of each prompt is prefilled, attending to the prefix (the same attention, in fewer FLOPs);
- decode attention in bfloat16 by the C kernel of `fast_kernel.py` (head_dim 64, 128 or 256, with
  the window of a sliding layer; scaled_dot_product_attention spent half of a step on per-block
  set-up); float32 keeps SDPA, which is what `generate` runs;
- the sampler in `fast_sampler.py`: top-k candidates (found in C) before top-p, one uniform per row.
  On Gemma's 262K vocabulary the output layer is about half of a decode step (docs/measurements.md).
Greedy float32 outputs are token-identical to plain `generate` (tested on the embedded model, and
on Gemma 3 but for float32 ties); a row's random draws come only from its own seed
(`random.Random(seed)`), never from its neighbours. Other architectures (`supports(model)` False)
use `generate`.
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
SHARED_MIN = 32  # prompt tokens shared for a prefix prefilled once; eval's 24-token system prompt stays whole
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


def _split(rows: list[_Row], skip: int = 0) -> tuple[list[_Row], list[_Row]]:
    """The longest head of `rows` whose padded prompt tokens (past the first `skip`, a shared prefix)
    fit PREFILL_TOKENS (at least one row)."""
    take, width = 1, rows[0].length - skip
    while take < len(rows) and (take + 1) * max(width, rows[take].length - skip) <= PREFILL_TOKENS:
        width = max(width, rows[take].length - skip)
        take += 1
    return rows[:take], rows[take:]


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def shared_groups(rows: list[_Row], minimum: int = SHARED_MIN) -> list[tuple[int, list[_Row]]]:
    """Admitted rows as (shared prefix length, rows) groups: greedy prompts that begin with the same
    `minimum` or more tokens go together, their common prefix (never a whole prompt: the last token's
    logits are needed) to be prefilled once; every other row goes, in its given order, into one group
    with prefix 0, first. Rows within a shared group are ordered by length, for the prefill's padding.
    Sampled rows are never shared: attending to a copied prefix moves logits in their last bits, which
    leaves a greedy pick alone unless it is a near-tie, but would change a seeded draw's text."""
    ranked = sorted((r for r in rows if r.job.sampling.temperature == 0),
                    key=lambda r: r.job.prompt)  # prompts with a common prefix sit side by side
    if not ranked:
        return [(0, rows)]
    groups: list[tuple[int, list[_Row]]] = []
    head, shared = ranked[0], ranked[0].length - 1
    members = [head]
    for r in [*ranked[1:], None]:
        common = -1 if r is None else min(shared, _common(head.job.prompt, r.job.prompt), r.length - 1)
        if common >= minimum:
            members.append(r)
            shared = common
            continue
        if len(members) > 1 and shared >= minimum:
            groups.append((shared, sorted(members, key=lambda m: m.length)))
        else:
            groups.append((0, members))
        if r is not None:
            head, shared, members = r, r.length - 1, [r]
    in_shared = {id(m) for p, ms in groups if p > 0 for m in ms}
    plain = [r for r in rows if id(r) not in in_shared]  # the caller's order (shortest first) for unshared prompts
    return ([(0, plain)] if plain else []) + [g for g in groups if g[0] > 0]


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


def _run_lanes(work: Callable[[int], None], ended: list[threading.Event], stop: threading.Event, name: str) -> None:
    """work(k) for each lane k, each in its own daemon thread, and wait until all have ended; `stop` is
    set on the way out (an interrupt in this thread stops the lanes at their next step), and every
    lane that started is waited for (`_wait_all`)."""
    workers = [threading.Thread(target=work, args=(k,), name=f"{name}-{k}", daemon=True) for k in range(len(ended))]
    try:
        for w in workers:
            w.start()
        for e in ended:
            e.wait()
    finally:
        stop.set()
        _wait_all([e for w, e in zip(workers, ended, strict=True) if w.ident is not None])


def _llama(c: Any) -> bool:
    """Plain Llama: no biases, default RoPE, SiLU, no tensor-parallel slicing."""
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_type", "default")
    return (c.model_type == "llama" and rope == "default" and c.hidden_act == "silu"
            and not getattr(c, "attention_bias", False) and not getattr(c, "mlp_bias", False)
            and getattr(c, "pretraining_tp", 1) == 1)


GEMMA_LAYERS = ("sliding_attention", "full_attention")
STATIC_ROPE = ("default", "linear")  # inverse frequencies fixed at load (dynamic types change them per call)


def _gemma3(c: Any) -> bool:
    """Gemma 3's text model as transformers runs it: causal, GELU-tanh, no biases, static RoPE per layer
    type. An attention softcap is refused: transformers' Gemma 3 attention never applies it, so what it
    should mean is unclear; `generate` stays the reference there."""
    ropes = getattr(c, "rope_parameters", None) or {}
    return (c.model_type == "gemma3_text" and c.hidden_activation == "gelu_pytorch_tanh"
            and not c.attention_bias and not getattr(c, "use_bidirectional_attention", False)
            and c.attn_logit_softcapping is None and set(c.layer_types) <= set(GEMMA_LAYERS)
            and ("sliding_attention" not in c.layer_types or bool(c.sliding_window))
            and all((ropes.get(t) or {}).get("rope_type", "default") in STATIC_ROPE for t in set(c.layer_types)))


def supports(model: Any) -> bool:
    """True for the architectures this loop reproduces op for op: plain Llama (no biases, default RoPE)
    and Gemma 3's text model (sliding-window and global layers, qk-norm, GELU-tanh)."""
    c = model.config
    return _llama(c) or _gemma3(c)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's weights, as the arithmetic below uses them (shared with the model, not copied,
    but for the fused projections and Gemma's norm weights, kept as 1 + w in float32)."""

    norm_in: Any  # before attention
    qkv: Any  # q | k | v projections, one matmul
    o: Any
    norm_mlp: Any  # before the MLP (Llama's post_attention_layernorm, Gemma's pre_feedforward_layernorm)
    gate_up: Any  # gate | up, one matmul
    down: Any
    rope: int  # which rotary table: index into FastDecoder.ropes
    window: int | None = None  # a sliding-window layer attends to its last `window` positions, itself included
    qk_norm: Any = None  # Gemma: q_norm rows for the query heads then k_norm rows for the key heads
    norm_attn_out: Any = None  # Gemma: post_attention_layernorm, on the attention output
    norm_mlp_out: Any = None  # Gemma: post_feedforward_layernorm, on the MLP output


class FastDecoder:
    """Continuous-batching decoder over a loaded Hugging Face Llama or Gemma 3 model (weights shared)."""

    def __init__(self, model: Any, *, eos_ids: Sequence[int], decode: Decode | None = None,
                 max_rows: int = MAX_ROWS, candidates: int = CANDIDATES, lanes: int | None = None,
                 kernel: bool = True) -> None:
        import torch

        if not supports(model):
            raise ValueError(f"fast decoding supports plain Llama and Gemma 3 text models, "
                             f"not this {model.config.model_type}")
        c, m = model.config, model.model
        self.torch = torch
        self.gemma = c.model_type == "gemma3_text"
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.scale = (c.query_pre_attn_scalar if self.gemma else self.head_dim) ** -0.5
        self.inner = c.intermediate_size
        self.embed, self.lm_head = m.embed_tokens.weight, model.lm_head.weight
        self.dtype, self.device = self.embed.dtype, self.embed.device
        # Gemma scales embeddings by sqrt(hidden) rounded to the weights' dtype, as its embedding module does
        self.embed_scale = m.embed_tokens.embed_scale.to(self.dtype) if self.gemma else None
        self.softcap = getattr(c, "final_logit_softcapping", None) if self.gemma else None
        self.act = (lambda x: torch.nn.functional.gelu(x, approximate="tanh")) if self.gemma \
            else torch.nn.functional.silu
        self.norm = self._norm_weight(m.norm.weight)
        if self.gemma:  # one rotary table per layer type (local and global theta), as Gemma3RotaryEmbedding
            kinds = sorted(set(c.layer_types))
            self.ropes = [(getattr(m.rotary_emb, f"{t}_inv_freq"), getattr(m.rotary_emb, f"{t}_attention_scaling"))
                          for t in kinds]
            types = [kinds.index(t) for t in c.layer_types]
            windows = [c.sliding_window if t == "sliding_attention" else None for t in c.layer_types]
        else:
            self.ropes = [(m.rotary_emb.inv_freq, 1.0)]
            types, windows = [0] * len(m.layers), [None] * len(m.layers)
        self.layers = [self._layer(lay, t, w) for lay, t, w in zip(m.layers, types, windows, strict=True)]
        self.eos_ids, self.decode = set(eos_ids), decode
        self.max_rows, self.candidates, self.lanes = max_rows, candidates, lanes
        self.kernels = fast_kernel.load() if kernel and self.device.type == "cpu" else None  # C, or torch only
        # the C decode attention for bfloat16 caches (keys stored dim-major), else scaled_dot_product_attention
        self.kernel = self.kernels if self.kernels is not None and self.dtype == torch.bfloat16 \
            and fast_kernel.usable(self.heads // self.kv_heads, self.head_dim) else None

    def _norm_weight(self, w: Any) -> Any:
        """A norm weight as `_rms` applies it: Llama's as it is, Gemma's as 1 + w in float32 (its RMSNorm
        computes (1.0 + weight.float()) on every call; the same values, computed once)."""
        return 1.0 + w.float() if self.gemma else w

    def _layer(self, lay: Any, rope: int, window: int | None) -> _Layer:
        cat, a, mlp = self.torch.cat, lay.self_attn, lay.mlp  # fused projections: fewer, larger matmuls
        qkv, gate_up = cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), cat([mlp.gate_proj.weight,
                                                                                       mlp.up_proj.weight])
        if not self.gemma:
            return _Layer(lay.input_layernorm.weight, qkv, a.o_proj.weight, lay.post_attention_layernorm.weight,
                          gate_up, mlp.down_proj.weight, rope)
        qk_norm = cat([self._norm_weight(a.q_norm.weight).expand(self.heads, -1),
                       self._norm_weight(a.k_norm.weight).expand(self.kv_heads, -1)])
        return _Layer(self._norm_weight(lay.input_layernorm.weight), qkv, a.o_proj.weight,
                      self._norm_weight(lay.pre_feedforward_layernorm.weight), gate_up, mlp.down_proj.weight, rope,
                      window=window, qk_norm=qk_norm,
                      norm_attn_out=self._norm_weight(lay.post_attention_layernorm.weight),
                      norm_mlp_out=self._norm_weight(lay.post_feedforward_layernorm.weight))

    # ------------------------------------------------------------ model arithmetic (as in HF Llama and Gemma 3)

    def _rms(self, x: Any, w: Any) -> Any:
        """RMSNorm over the last dim. Llama rounds to the input's dtype before the weight; Gemma multiplies
        by 1 + w in float32 and rounds after."""
        h = x.to(self.torch.float32)
        h = h * self.torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * w).to(x.dtype) if self.gemma else w * h.to(x.dtype)

    def _embed(self, tokens: Any) -> Any:
        x = self.torch.nn.functional.embedding(tokens, self.embed)
        return x * self.embed_scale if self.embed_scale is not None else x

    def _rope(self, positions: Any, table: int = 0) -> tuple[Any, Any]:
        """cos and sign-folded sin, so that rotating is x*cos + roll(x)*sin: bitwise the same as
        HF's x*cos + rotate_half(x)*sin, since (-a)*b == -(a*b) exactly."""
        inv_freq, scaling = self.ropes[table]
        freqs = positions[..., None].float() * inv_freq.to(dtype=self.torch.float)
        emb = self.torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
        sin = sin.to(self.dtype)
        half = sin.shape[-1] // 2
        return cos.to(self.dtype), self.torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def _rotate(self, x: Any, cos: Any, sin: Any) -> Any:
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

    def _qk(self, qkv: Any, layer: _Layer, cos: Any, sin: Any) -> Any:
        """Queries | keys of a projection (heads on the second-to-last dim), normed (Gemma) and rotated."""
        qk = qkv[..., :self.heads + self.kv_heads, :]
        if layer.qk_norm is not None:
            qk = self._rms(qk, layer.qk_norm)
        return self._rotate(qk.contiguous() if qk.dim() == 4 else qk, cos, sin)

    def _attended(self, x: Any, a: Any, layer: _Layer) -> Any:
        """The residual stream after attention output `a`, then after the MLP."""
        F = self.torch.nn.functional
        o = F.linear(a, layer.o)
        x = x + (self._rms(o, layer.norm_attn_out) if layer.norm_attn_out is not None else o)
        gate, up = F.linear(self._rms(x, layer.norm_mlp), layer.gate_up).split(self.inner, dim=-1)
        d = F.linear(self.act(gate) * up, layer.down)
        return x + (self._rms(d, layer.norm_mlp_out) if layer.norm_mlp_out is not None else d)

    def _logits(self, h: Any) -> Any:
        """The output layer on final hidden states (one per row): the final norm, the (often tied)
        vocabulary projection, and Gemma's final logit softcap where the config sets one."""
        logits = self.torch.nn.functional.linear(self._rms(h, self.norm), self.lm_head)
        if self.softcap is not None:
            logits = self.torch.tanh(logits / self.softcap) * self.softcap
        return logits

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

    def _prompt_pass(self, prompts: list[list[int]], store: Callable[[int, Any, Any], None],
                     past: list[tuple[Any, Any]] | None = None) -> Any:
        """Prompts (right-padded, causal) through every layer at positions P.. after a shared prefix of P
        positions whose keys and values `past` holds per layer (1 x kv-head x P x dim; none: P = 0).
        `store(layer, k, v)` receives each layer's new keys and values (rows x kv-head x width x dim);
        returns the final hidden states (rows x width x hidden)."""
        torch, F = self.torch, self.torch.nn.functional
        n, width = len(prompts), max(len(p) for p in prompts)
        start = 0 if past is None else past[0][0].shape[2]
        tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)
        where = torch.arange(start, start + width, device=self.device)  # the queries' positions
        ropes = [tuple(t[:, :, None] for t in self._rope(where[None], i))  # (1, width, 1, d): contiguous layout
                 for i in range(len(self.ropes))]
        keys = torch.arange(start + width, device=self.device)
        windows = {lay.window for lay in self.layers if lay.window is not None and lay.window < start + width}
        # after a prefix, or with a window shorter than the prompt, an explicit mask: key j visible from
        # query i if j <= i (and i - window < j)
        masks = {w: (keys[None] <= where[:, None]) & (keys[None] > where[:, None] - w) for w in windows}
        if start:
            masks[None] = keys[None] <= where[:, None]
        x = self._embed(tokens)
        for index, layer in enumerate(self.layers):
            qkv = F.linear(self._rms(x, layer.norm_in), layer.qkv).view(n, width, -1, self.head_dim)
            qk = self._qk(qkv, layer, *ropes[layer.rope]).transpose(1, 2)
            q, k = qk[:, :self.heads], qk[:, self.heads:]
            v = qkv[:, :, self.heads + self.kv_heads:].transpose(1, 2)
            store(index, k, v)
            if past is not None:
                pk, pv = past[index]
                k = torch.cat([pk.expand(n, -1, -1, -1), k], dim=2)
                v = torch.cat([pv.expand(n, -1, -1, -1), v], dim=2)
            window = layer.window if layer.window in masks else None
            if window in masks:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[window], scale=self.scale,
                                                   enable_gqa=True)
            else:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            x = self._attended(x, a.transpose(1, 2).reshape(n, width, -1), layer)
        return x

    def _prefix(self, prompt: list[int]) -> list[tuple[Any, Any]]:
        """A shared prefix's keys and values per layer (1 x kv-head x length x dim), computed once."""
        kv: list[tuple[Any, Any]] = []
        self._prompt_pass([prompt], lambda _, k, v: kv.append((k, v)))
        return kv

    def _prefill(self, lane: _Lane, base: int, prompts: list[list[int]],
                 past: list[tuple[Any, Any]] | None = None) -> Any:
        """Run prompts (right-padded, causal) into cache rows base.., return last-token logits. With
        `past` (a shared prefix's keys and values, `_prefix`), `prompts` are what follows that prefix:
        the prefix is copied into every row's cache and the rest attends to it."""
        torch = self.torch
        n, start = len(prompts), 0 if past is None else past[0][0].shape[2]
        end = start + max(len(p) for p in prompts)

        def store(index: int, k: Any, v: Any) -> None:
            kc, vc = lane.cache[index]
            if past is not None:
                pk, pv = past[index]
                k, v = torch.cat([pk.expand(n, -1, -1, -1), k], dim=2), torch.cat([pv.expand(n, -1, -1, -1), v], dim=2)
            if self.kernel:
                kc[base:base + n, ..., :end] = k.transpose(-1, -2)
            else:
                kc[base:base + n, :, :end] = k
            vc[base:base + n, :, :end] = v

        x = self._prompt_pass(prompts, store, past)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self._logits(x[torch.arange(n), last])

    def _hidden(self, lane: _Lane, tokens: Any, positions: Any) -> Any:
        """One decode step for rows 0..n-1 up to the final hidden states: token at `positions`,
        attending to the cache up to it (the last `window` positions in a sliding-window layer)."""
        torch, F = self.torch, self.torch.nn.functional
        n, span = tokens.shape[0], int(positions.max()) + 1
        rows, group = torch.arange(n, device=self.device), self.heads // self.kv_heads
        ropes = [tuple(t[:, None] for t in self._rope(positions, i)) for i in range(len(self.ropes))]
        if self.kernel:
            lengths = positions + 1
        else:
            keys = torch.arange(span, device=self.device)[None]
            visible = keys <= positions[:, None]
            masks = {w: (visible & (keys > positions[:, None] - w) if w else visible).view(n, 1, 1, span)
                     for w in {lay.window for lay in self.layers}}  # None: every earlier position
        x = self._embed(tokens)
        for layer, (kc, vc) in zip(self.layers, lane.cache, strict=True):
            qkv = F.linear(self._rms(x, layer.norm_in), layer.qkv).view(n, -1, self.head_dim)
            qk = self._qk(qkv, layer, *ropes[layer.rope])
            if self.kernel:  # rotated q|k in place of the raw ones: one row layout for the kernel
                qkv[:, :self.heads + self.kv_heads] = qk
                a = fast_kernel.decode_attention(self.kernel, qkv.view(n, -1), kc, vc, lengths, heads=self.heads,
                                                 kv_heads=self.kv_heads, scale=self.scale, window=layer.window)
            else:
                kc[rows, :, positions] = qk[:, self.heads:]
                vc[rows, :, positions] = qkv[:, self.heads + self.kv_heads:]
                q = qk[:, :self.heads].view(n, self.kv_heads, group, self.head_dim)
                a = F.scaled_dot_product_attention(q, kc[:n, :, :span], vc[:n, :, :span],
                                                   attn_mask=masks[layer.window], scale=self.scale).reshape(n, -1)
            x = self._attended(x, a, layer)
        return x

    def _step(self, lane: _Lane, tokens: Any, positions: Any) -> Any:
        """One decode step for rows 0..n-1: the next-token logits of each."""
        return self._logits(self._hidden(lane, tokens, positions))

    # ------------------------------------------------------------ whole sequences, no decoding

    def final_states(self, batches: Sequence[list[list[int]]], use: Callable[[int, Any], Any],
                     lanes: int | None = None) -> list[Any]:
        """Each batch of token lists (right-padded, causal, from position 0: the prefill's arithmetic)
        through the model up to the final norm, in lanes like `run` (batch i in lane i % lanes, one
        intra-op thread each, so no OpenMP barrier waits on a busy machine); returns `use(i, states)`
        of every batch i in order (states: rows x width x hidden), `use` called in the lanes' threads.
        For scoring given text (NLL, IFD): the output layer only where the caller needs it."""
        torch = self.torch
        out: list[Any] = [None] * len(batches)
        threads = torch.get_num_threads()
        count = max(1, min(lanes or self.lanes or min(threads, MAX_LANES), len(batches)))
        stop, errors, ended = threading.Event(), [], [threading.Event() for _ in range(count)]

        def work(k: int) -> None:
            try:
                if count > 1:
                    torch.set_num_threads(max(1, threads // count))
                with torch.inference_mode():
                    for i in range(k, len(batches), count):
                        if stop.is_set():
                            return
                        x = self._prompt_pass(batches[i], lambda *_: None)
                        out[i] = use(i, self._rms(x, self.norm))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread below
                errors.append(e)
                stop.set()
            finally:
                ended[k].set()

        if count == 1:
            work(0)
        else:
            _run_lanes(work, ended, stop, "sift-states")
        if errors:
            raise errors[0]
        return out

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

        _run_lanes(work, ended, stop, "sift-decode")
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
                    for shared, group in shared_groups(rows):
                        past = self._prefix(group[0].job.prompt[:shared]) if shared else None
                        while group:  # chunks of about PREFILL_TOKENS keep the big activations in cache
                            chunk, group = _split(group, shared)
                            logits = self._prefill(lane, len(active), [r.job.prompt[shared:] for r in chunk], past)
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
