"""The transformers teacher: the embedded default, on CPU or GPU.

    teacher = TransformersTeacher("smollm2-135m-instruct")
    completions = teacher.generate(requests)            # bench: .venv/bin/python bench/generate.py --quick

Two engines. `engine="fast"`, the default for the Llama family (SmolLM2 included) and Gemma 3, is the decode
loop of `fast_decode.py`: continuous batching of up to `max_rows` requests in one decoding thread
per torch thread, a pre-allocated cache, C kernels for decode attention and sampling candidates
(`fast_kernel.py`), and sampling from top-k candidates instead of sorting the vocabulary. Greedy
float32 tokens are identical to `generate`'s (tested on both embedded models, allowing float32 ties
on Gemma 3). Its seeded samples are reproducible (same requests, seeds, dtype, torch version and
thread count: the same texts) but are not the texts the "hf" engine draws for the same seed (one
uniform draw per row instead of torch.multinomial), so its cache identity says `engine=fast`.
Other architectures, GPUs, or `engine="hf"`, use plain `model.generate`:

Requests are grouped by stop strings, sorted by prompt length and cut into batches of
`batch_size`, left-padded, so padding stays small. One `generate` call per batch; sampling is
done per row by `RowSampler` (a logits processor that draws from the row's own seeded
generator and hands generate a one-hot row, so generate itself runs greedy), so each row keeps
its own temperature, top_p, top_k and seed inside a shared batch.

Reproducibility of the "hf" engine, exactly: the same list of requests with the same seeds, batch
size, dtype, device and torch version gives the same texts. A row's random draws come only from its own
seed, never from its batch-mates; but its logits can differ in the last bits with the batch's
shape (padding, matmul blocking), most of all in bfloat16, so the same seeded request in a
different batch is only *usually* the same text. Greedy requests (temperature 0) in float32
match their single-prompt output (tested). `seed=None` draws a fresh seed.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.io.models import load_model, load_tokenizer, resolve_dtype, resolve_model
from pipeline.teachers.base import Completion, FinishReason, Request, Sampling
from pipeline.teachers.prompts import PLAIN_CHAT_TEMPLATE, plain_chat_template

OnBatch = Callable[[int, int], None]  # (requests finished in this batch, new tokens kept in it)


class PenaltyProcessor:
    """OpenAI presence/frequency penalties over the tokens generated so far (not the prompt):
    logits[t] -= presence * (count[t] > 0) + frequency * count[t], per row."""

    def __init__(self, presence: Sequence[float], frequency: Sequence[float], prompt_len: int) -> None:
        import torch

        self.presence = torch.tensor(presence, dtype=torch.float32)[:, None]
        self.frequency = torch.tensor(frequency, dtype=torch.float32)[:, None]
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_len:]
        scores = scores.float()
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence.to(scores.device) * (counts > 0) - self.frequency.to(scores.device) * counts


class RowSampler:
    """Per-row temperature / top_k / top_p sampling with a per-row torch.Generator, plus a
    per-row token budget (a row past its max_tokens is forced to EOS). Returns one-hot scores
    (0 for the chosen token, -inf elsewhere) so generate's greedy step picks exactly it."""

    def __init__(self, samplings: Sequence[Sampling], seeds: Sequence[int], prompt_len: int,
                 eos_id: int) -> None:
        import torch

        self.samplings = list(samplings)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.prompt_len, self.eos_id = prompt_len, eos_id

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_len
        chosen = choose_tokens(scores.float().cpu(), self.samplings, self.generators)
        for row, s in enumerate(self.samplings):
            if step >= s.max_tokens:
                chosen[row] = self.eos_id
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None].to(scores.device), 0.0)
        return out


NUCLEUS_K = 64  # candidates looked at first; a row whose nucleus is wider falls back to a full sort


def choose_tokens(scores: Any, samplings: Sequence[Sampling], generators: Sequence[Any]) -> Any:
    """One token per row: argmax for temperature 0, else a draw from softmax(scores / T) cut to
    the top_k and then the top_p nucleus (the order transformers applies them), drawn with the
    row's own generator. The nucleus is found among the top NUCLEUS_K probabilities (a top-k
    scan, not a full sort of the vocabulary) and exactly by a full sort when it is wider."""
    import torch

    temps = torch.tensor([s.temperature or 1.0 for s in samplings])[:, None]
    probs = (scores / temps).softmax(-1)
    k = min(scores.shape[1], max([NUCLEUS_K] + [s.top_k for s in samplings]))
    cut = any(s.temperature > 0 and (s.top_k or s.top_p < 1) for s in samplings)
    top_p, top_i = probs.topk(k) if cut else (None, None)
    chosen = scores.argmax(-1)
    for row, s in enumerate(samplings):
        if s.temperature == 0:
            continue
        if not (s.top_k or s.top_p < 1):
            chosen[row] = torch.multinomial(probs[row], 1, generator=generators[row])[0]
            continue
        p, i = nucleus(probs[row], s, top_p[row], top_i[row])
        chosen[row] = i[torch.multinomial(p, 1, generator=generators[row])[0]]
    return chosen


def nucleus(probs: Any, s: Sampling, top_p: Any, top_i: Any) -> tuple[Any, Any]:
    """The candidates of one row (probabilities, token ids) after top_k then top_p, given the
    row's probabilities and its top NUCLEUS_K (values, ids) in descending order."""
    p, i = top_p, top_i
    if s.top_p < 1 and not s.top_k and p.sum() < s.top_p:
        p, i = probs.sort(descending=True)  # a wide nucleus: do it exactly
    if s.top_k:
        p, i = p[:s.top_k], i[:s.top_k]
        p = p / p.sum()
    if s.top_p < 1:
        keep = (p.cumsum(-1) - p) < s.top_p  # mass strictly above a token; the top one stays
        p, i = p[keep], i[keep]
    return p, i


def sample_token(logits: Any, s: Sampling, generator: Any) -> int:
    """`choose_tokens` for one row of logits."""
    return int(choose_tokens(logits[None, :].float(), [s], [generator])[0])


def _sort_key(sampling: Sampling) -> tuple:
    return tuple(sampling.stop)


class TransformersTeacher:
    """A Hugging Face causal LM as teacher: local folder, .gguf, Hub id or the embedded alias."""

    def __init__(self, model: str, *, batch_size: int = 32, dtype: str = "auto", device: str = "cpu",
                 on_batch: OnBatch | None = None, engine: str = "fast", max_rows: int = 128,
                 lanes: int | None = None) -> None:
        """`batch_size`: requests per `generate` call (engine "hf") and per progress report;
        `engine`: "fast" (continuous batching, Llama family and Gemma 3 on CPU; others use "hf") or "hf"
        (plain `model.generate`); `max_rows`: requests decoding at once in the fast engine, all
        lanes together; `lanes`: its decoding threads (None: one per torch thread, at most 4)."""
        if batch_size < 1 or max_rows < 1 or (lanes is not None and lanes < 1):
            raise ValueError(f"batch_size, max_rows and lanes must be >= 1, got {batch_size}, {max_rows}, {lanes}")
        if engine not in ("fast", "hf"):
            raise ValueError(f"engine must be 'fast' or 'hf', got {engine!r}")
        ref = resolve_model(model)
        self.name = ref.name
        self.batch_size, self.device, self.on_batch = batch_size, device, on_batch
        self.dtype = str(resolve_dtype(dtype, device)).replace("torch.", "")
        self.model = load_model(ref, dtype=self.dtype, device=device)
        self.tokenizer = load_tokenizer(ref)
        self.tokenizer.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        if not eos_ids:
            raise ValueError(f"model {self.name} has no EOS token")
        self.eos_ids = sorted(eos_ids)
        self.eos_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.eos_ids[0]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        from pipeline.teachers.fast_decode import supports

        # the fast engine is built and measured for CPUs; on a GPU `generate` is the tested path
        self.engine = engine if supports(self.model) and str(device) == "cpu" else "hf"
        self.max_rows, self.lanes, self._fast = max_rows, lanes, None
        self._plain_chat: str | None = None  # the plain rendering of chat prompts, once needed
        why = "" if self.engine == engine else (
            f": the fast engine is for the Llama family and Gemma 3 on CPU, this is {self.model.config.model_type} "
            f"on {device}" if str(device) == "cpu" else f": the fast engine is for CPUs, this is {device}")
        print(f"teacher {self.name}: engine {self.engine}{why}", file=sys.stderr)

    @property
    def context(self) -> int | None:
        """Positions the model was trained for (prompt and new tokens together), if it says."""
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def identity(self) -> str:
        """The cache identity. The fast engine samples other texts than `generate` for a seed, so it says
        so; the "hf" engine keeps the plain `name|dtype=...` it had before the fast engine existed."""
        plain = f"{self.name}|dtype={self.dtype}"
        return f"{plain}|engine=fast" if self.engine == "fast" else plain

    # ------------------------------------------------------------ prompts

    def prompt_ids(self, request: Request) -> list[int]:
        """Chat messages go through the chat template (generation prompt added); plain prompts
        are tokenized as they are, with the tokenizer's usual special tokens. A base model has no
        chat template: its chat messages are rendered as plain text (Alpaca's instruction/response
        layout, prompts/alpaca_chat_template.jinja), said once on stderr."""
        if request.messages is not None:
            template = self.tokenizer.chat_template or self._plain_chat_template()
            text = self.tokenizer.apply_chat_template(list(request.messages), chat_template=template,
                                                      add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(request.prompt)["input_ids"]

    def _plain_chat_template(self) -> str:
        if self._plain_chat is None:
            self._plain_chat = plain_chat_template()
            print(f"teacher {self.name}: no chat template (a base model); chat prompts are sent as plain "
                  f"text in the Alpaca layout ({PLAIN_CHAT_TEMPLATE})", file=sys.stderr)
        return self._plain_chat

    # ------------------------------------------------------------ generation

    def generate(self, requests: list[Request], *, on_batch: OnBatch | None = None) -> list[Completion]:
        """Complete every request, in order. `on_batch(done, new_tokens)` after each batch."""
        encoded = [self.prompt_ids(r) for r in requests]
        fits = fit_to_context(requests, [len(e) for e in encoded], self.context)
        runnable = [(i, f) for i, f in enumerate(fits) if isinstance(f, Request)]  # too long: an error row
        done = self._generate_encoded([f for _, f in runnable], [encoded[i] for i, _ in runnable],
                                      on_batch or self.on_batch) if runnable else []
        answers = {i: c for (i, _), c in zip(runnable, done, strict=True)}
        return [answers[i] if isinstance(f, Request) else f for i, f in enumerate(fits)]

    def _generate_encoded(self, requests: list[Request], encoded: list[list[int]],
                          on_batch: OnBatch | None) -> list[Completion]:
        """Complete requests that fit the context, their prompts already tokenized, in order."""
        seeds = [r.sampling.seed if r.sampling.seed is not None else secrets.randbits(63) for r in requests]
        if self.engine == "fast":
            return self._generate_fast(requests, encoded, seeds, on_batch)
        order = sorted(range(len(requests)), key=lambda i: (_sort_key(requests[i].sampling), len(encoded[i])))
        results: list[Completion | None] = [None] * len(requests)
        start = 0
        while start < len(order):
            stop = _sort_key(requests[order[start]].sampling)
            end = start
            while end < len(order) and end - start < self.batch_size \
                    and _sort_key(requests[order[end]].sampling) == stop:
                end += 1
            batch = order[start:end]
            done = self._generate_batch([requests[i] for i in batch], [encoded[i] for i in batch],
                                        [seeds[i] for i in batch])
            for i, c in zip(batch, done, strict=True):
                results[i] = c
            if on_batch is not None:
                on_batch(len(batch), sum(c.completion_tokens for c in done))
            start = end
        return [c for c in results if c is not None]

    def _generate_fast(self, requests: list[Request], encoded: list[list[int]], seeds: list[int],
                       on_batch: OnBatch | None) -> list[Completion]:
        """All requests through the continuous-batching loop, shortest prompts admitted first;
        progress is reported every `batch_size` finished requests."""
        from pipeline.teachers.fast_decode import FastDecoder, Job

        if self._fast is None:
            self._fast = FastDecoder(self.model, eos_ids=self.eos_ids, decode=self._decode, max_rows=self.max_rows,
                                     lanes=self.lanes)
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]))
        results: list[Completion | None] = [None] * len(requests)
        pending = [0, 0]  # finished requests and their tokens not yet reported

        def finished(j: int, ids: list[int]) -> None:
            i = order[j]
            results[i] = c = self._finish(ids, len(encoded[i]), requests[i].sampling)
            pending[0] += 1
            pending[1] += c.completion_tokens
            if on_batch is not None and (pending[0] >= self.batch_size or all(r is not None for r in results)):
                on_batch(pending[0], pending[1])
                pending[0] = pending[1] = 0

        self._fast.run([Job(encoded[i], requests[i].sampling, seeds[i]) for i in order], on_finish=finished)
        return [c for c in results if c is not None]

    def _generate_batch(self, requests: list[Request], encoded: list[list[int]],
                        seeds: list[int]) -> list[Completion]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        samplings = [r.sampling for r in requests]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in encoded])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
        budget = max(s.max_tokens for s in samplings)
        processors = []
        if any(s.presence_penalty or s.frequency_penalty for s in samplings):
            processors.append(PenaltyProcessor(
                [s.presence_penalty for s in samplings], [s.frequency_penalty for s in samplings], width))
        if any(s.temperature > 0 or s.max_tokens < budget for s in samplings):
            processors.append(RowSampler(samplings, seeds, width, self.eos_id))
        stop = [x for x in samplings[0].stop if x]
        config = GenerationConfig(max_new_tokens=budget, do_sample=False, eos_token_id=self.eos_ids,
                                  pad_token_id=self.pad_id, stop_strings=stop or None)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids.to(self.device),
                                      attention_mask=attention.to(self.device), generation_config=config,
                                      logits_processor=LogitsProcessorList(processors),
                                      tokenizer=self.tokenizer if stop else None)
        new = out[:, width:].tolist()
        return [self._finish(ids, len(enc), s) for ids, enc, s in zip(new, encoded, samplings, strict=True)]

    def _finish(self, ids: list[int], prompt_tokens: int, s: Sampling) -> Completion:
        """Cut at the first EOS and the first stop string; count only the tokens kept."""
        eos_at = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        ids = ids[:eos_at] if eos_at is not None else ids
        reason: FinishReason = "stop" if eos_at is not None and eos_at < s.max_tokens else "length"
        ids = ids[:s.max_tokens]
        text = self._decode(ids)
        cut = min((p for p in (text.find(x) for x in s.stop if x) if p >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            ids = ids[:self._tokens_covering(ids, cut)]
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=len(ids),
                          finish_reason=reason)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _tokens_covering(self, ids: list[int], chars: int) -> int:
        """Fewest leading tokens whose text reaches `chars` characters (binary search)."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self._decode(ids[:mid])) >= chars:
                hi = mid
            else:
                lo = mid + 1
        return lo


def fit_to_context(requests: list[Request], prompt_lengths: list[int], context: int | None
                   ) -> list[Request | Completion]:
    """Each request as it can run within the model's context: unchanged, with max_tokens cut to the
    room left after its prompt, or (no room at all) an error Completion for the ledger, as an
    OpenAI-compatible server would refuse it."""
    if not context:
        return list(requests)
    out: list[Request | Completion] = []
    for r, n in zip(requests, prompt_lengths, strict=True):
        if n >= context:
            out.append(Completion("", n, 0, "error", f"prompt of {n} tokens leaves no room in the model's "
                                                       f"context of {context} tokens"))
        elif n + r.sampling.max_tokens > context:
            out.append(dataclasses.replace(r, sampling=dataclasses.replace(r.sampling, max_tokens=context - n)))
        else:
            out.append(r)
    return out
