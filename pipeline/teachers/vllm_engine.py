"""The `vllm` teacher: vLLM's offline engine on a GPU.

    pip install 'sift-instruct[vllm]'
    sift generate --teacher vllm --model Qwen/Qwen2.5-7B-Instruct

All pending requests go to one `LLM.generate` call, each with its own `SamplingParams`, so vLLM's
scheduler batches them continuously (feeding it small batches leaves the GPU idle). Chat requests
are rendered with the model's chat template and handed over as token ids encoded without special
tokens, so a template that writes BOS itself does not get a second one. A base model has no chat
template: its chat requests are rendered in Alpaca's plain-text layout (said once on stderr), as
the transformers teacher does.
The mapping functions are pure and tested without vLLM; the engine is imported and loaded only
when the first request arrives.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
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
        self.engine_args = {"model": model, "tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
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
        llm = self._engine()
        from vllm import SamplingParams

        tokenizer = llm.get_tokenizer()
        if not getattr(tokenizer, "chat_template", None) and any(r.messages is not None for r in requests) \
                and not getattr(self, "_plain_noted", False):
            self._plain_noted = True
            print(f"teacher {self.name}: no chat template (a base model); chat prompts are sent as plain "
                  f"text in the Alpaca layout ({PLAIN_CHAT_TEMPLATE})", file=sys.stderr)
        prompts = [render_prompt(r, tokenizer) for r in requests]
        params = [SamplingParams(**sampling_kwargs(r.sampling)) for r in requests]
        outputs = llm.generate(prompts, params, use_tqdm=True)
        if len(outputs) != len(requests):
            raise SiftError(f"vLLM returned {len(outputs)} outputs for {len(requests)} prompts")
        return [to_completion(o) for o in outputs]
