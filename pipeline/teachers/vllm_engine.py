"""The `vllm` teacher: vLLM's offline engine on a GPU.

    pip install 'sift-instruct[vllm]'
    sift generate --teacher.backend vllm --teacher.model Qwen/Qwen2.5-7B-Instruct

All pending requests go to one `LLM.generate` call, each with its own `SamplingParams`, so vLLM's
scheduler batches them continuously (feeding it small batches leaves the GPU idle). Chat requests
are rendered with the model's chat template and handed over as token ids encoded without special
tokens, so a template that writes BOS itself does not get a second one. A base model has no chat
template: its chat requests are rendered in Alpaca's plain-text layout (said once on stderr), as
the transformers teacher does.
`first_token_probs` asks for one greedy token with `SamplingParams(logprobs=20)` and reads
`outputs[0].logprobs[0]` ({token id: Logprob}), for the judge's G-Eval rating.
The mapping functions are pure and tested without vLLM; the engine is imported and loaded only
when the first request arrives.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from pipeline.errors import SiftError
from pipeline.teachers.base import Completion, FinishReason, Request, Sampling
from pipeline.teachers.prompts import PLAIN_CHAT_TEMPLATE, plain_chat_template

INSTALL_HINT = "pip install 'sift-instruct[vllm]' on a machine with a GPU"


def sampling_kwargs(sampling: Sampling) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams`, one completion per request.

    top_k is passed only when set: vLLM's "disabled" value was -1 in older releases (the 0.6-0.8
    docs) and is 0 now (still accepting -1), so leaving it out gets the disabled default on every
    version.
    """
    kwargs: dict[str, Any] = {"n": 1, "temperature": sampling.temperature, "top_p": sampling.top_p,
                              "max_tokens": sampling.max_tokens,
                              "presence_penalty": sampling.presence_penalty,
                              "frequency_penalty": sampling.frequency_penalty,
                              "stop": list(sampling.stop), "seed": sampling.seed}
    if sampling.top_k:
        kwargs["top_k"] = sampling.top_k
    return kwargs


def render_prompt(request: Request, tokenizer: Any) -> str | dict[str, list[int]]:
    """A vLLM prompt: the text as is, or chat messages as a TokensPrompt dict via the chat template
    (Alpaca's plain-text layout when the tokenizer has none)."""
    if request.messages is None:
        return request.prompt
    template = getattr(tokenizer, "chat_template", None) or plain_chat_template()
    text = tokenizer.apply_chat_template([dict(m) for m in request.messages], chat_template=template,
                                         tokenize=False, add_generation_prompt=True)
    return {"prompt_token_ids": list(tokenizer.encode(text, add_special_tokens=False))}


def finish_reason(reason: str | None) -> tuple[FinishReason, str | None]:
    """vLLM says "stop" (EOS or a stop string), "length", or "abort"/"error" (ours: "error")."""
    if reason in ("stop", "length"):
        return reason, None
    return "error", f"vLLM finished the request with reason {reason!r}"


def to_completion(output: Any) -> Completion:
    """Convert one `vllm.RequestOutput` (first of its outputs) into a Completion."""
    if not output.outputs:
        return Completion("", 0, 0, "error", error="vLLM returned no output for the request")
    first = output.outputs[0]
    finish, error = finish_reason(first.finish_reason)
    return Completion(text=first.text, prompt_tokens=len(output.prompt_token_ids or ()),
                      completion_tokens=len(first.token_ids or ()), finish_reason=finish, error=error)


def logprob_kwargs(sampling: Sampling, top: int) -> dict[str, Any]:
    """`SamplingParams` keywords for one greedy token with the `top` most likely first tokens'
    log-probabilities (vLLM's max_logprobs engine setting, 20 by default, caps `top`)."""
    return {**sampling_kwargs(replace(sampling, temperature=0.0, max_tokens=1)), "logprobs": top}


def first_token_dist(output: Any, tokenizer: Any = None) -> dict[str, float] | None:
    """{stripped token text: probability} of the first generated token of one `vllm.RequestOutput`,
    from `outputs[0].logprobs[0]` (a dict token id -> Logprob with .logprob and .decoded_token);
    tokens with the same stripped text are summed. A token without decoded text is decoded with
    `tokenizer` when given. None when the output carries no log-probabilities."""
    if not output.outputs:
        return None
    steps = getattr(output.outputs[0], "logprobs", None)
    if not steps:
        return None
    dist: dict[str, float] = {}
    for token_id, lp in steps[0].items():
        value = getattr(lp, "logprob", lp)
        if value is None or not math.isfinite(value):
            continue
        text = getattr(lp, "decoded_token", None)
        if text is None:
            if tokenizer is None:
                continue
            text = tokenizer.decode([token_id])
        key = text.strip()
        dist[key] = dist.get(key, 0.0) + math.exp(value)
    return dist or None


def engine_model(spec: str) -> str:
    """What vLLM loads for a sift model spec: an alias (gemma-3-270m) or a .gguf file becomes its
    converted folder in the cache, a folder its absolute path; a Hub id stays as it is."""
    from pipeline.io.models import resolve_model

    return resolve_model(spec).path_or_id


class VLLMTeacher:
    """A Teacher on vLLM's offline `LLM`, loaded at the first request (a cached rerun never loads it)."""

    def __init__(self, model: str, *, tensor_parallel_size: int = 1, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 seed: int = 0) -> None:
        """Args:
            model: Hub id or local folder of the teacher model.
            tensor_parallel_size: GPUs to shard the model over.
            dtype: weight dtype ("auto", "bfloat16", "float16", ...).
            gpu_memory_utilization: fraction of GPU memory vLLM may take for weights and KV cache.
            max_model_len: context length cap (saves KV cache memory); None: the model's own.
            seed: engine seed; each request's Sampling.seed still applies per request.
        """
        if importlib.util.find_spec("vllm") is None:
            raise SiftError(f"the vllm backend needs vLLM: {INSTALL_HINT}")
        self.name = model
        self.engine_args = {"model": engine_model(model), "tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
                            "gpu_memory_utilization": gpu_memory_utilization,
                            "max_model_len": max_model_len, "seed": seed}
        self._llm: Any = None

    def describe(self) -> dict:
        """Provenance: the model and the engine settings that affect its outputs."""
        return {"model": self.name, "dtype": self.engine_args["dtype"], "seed": self.engine_args["seed"],
                "tensor_parallel_size": self.engine_args["tensor_parallel_size"],
                "max_model_len": self.engine_args["max_model_len"]}

    def _engine(self) -> Any:
        if self._llm is None:
            try:
                from vllm import LLM
            except ImportError as e:
                raise SiftError(f"cannot import vllm ({e}): {INSTALL_HINT}") from None
            self._llm = LLM(**self.engine_args)
        return self._llm

    def generate(self, requests: Sequence[Request]) -> list[Completion]:
        """Complete every request in one engine call, in input order."""
        if not requests:
            return []
        return [to_completion(o) for o in self._run(requests, sampling_kwargs)]

    def first_token_probs(self, requests: Sequence[Request], *, top: int = 20,
                          include: Sequence[str] = ()) -> list[dict[str, float] | None]:
        """The first token's distribution of each request's greedy reply over the `top` most likely
        tokens ({stripped text: probability}), None where vLLM gave none. `include` is not asked for."""
        del include
        if not requests:
            return []
        tokenizer = self._engine().get_tokenizer()
        return [first_token_dist(o, tokenizer) for o in self._run(requests, lambda s: logprob_kwargs(s, top))]

    def _run(self, requests: Sequence[Request], params_of: Any) -> list[Any]:
        """One engine call over every request; `params_of(sampling)` gives each one's SamplingParams keywords."""
        llm = self._engine()
        from vllm import SamplingParams

        tokenizer = llm.get_tokenizer()
        if not getattr(tokenizer, "chat_template", None) and any(r.messages is not None for r in requests) \
                and not getattr(self, "_plain_noted", False):
            self._plain_noted = True
            print(f"teacher {self.name}: no chat template (a base model); chat prompts are sent as plain "
                  f"text in the Alpaca layout ({PLAIN_CHAT_TEMPLATE})", file=sys.stderr)
        prompts = [render_prompt(r, tokenizer) for r in requests]
        params = [SamplingParams(**params_of(r.sampling)) for r in requests]
        outputs = llm.generate(prompts, params, use_tqdm=True)
        if len(outputs) != len(requests):
            raise SiftError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        return outputs
