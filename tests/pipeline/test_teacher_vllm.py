"""The vllm teacher: pure mapping functions always; the real engine only with vLLM and a GPU.

    .venv/bin/python -m pytest tests/pipeline/test_teacher_vllm.py
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.errors import SiftError
from pipeline.teachers.base import Request, Sampling
from pipeline.teachers.vllm_engine import (
    VLLMTeacher,
    finish_reason,
    first_token_dist,
    logprob_kwargs,
    render_prompt,
    sampling_kwargs,
    to_completion,
)

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def _has_vllm_and_gpu() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A word-level tokenizer trained here, adding BOS by default, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<system>", "<assistant>"]
    trainer = trainers.WordLevelTrainer(special_tokens=specials)
    tok.train_from_iterator(["write a poem about the sea", "name three colours", "be brief"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)


def test_sampling_kwargs_map_every_field() -> None:
    s = Sampling(temperature=0.7, top_p=0.5, top_k=0, max_tokens=1024, presence_penalty=2.0,
                 frequency_penalty=0.1, stop=("\n\n", "16"), seed=3)
    assert sampling_kwargs(s) == {"n": 1, "temperature": 0.7, "top_p": 0.5, "max_tokens": 1024,
                                  "presence_penalty": 2.0, "frequency_penalty": 0.1,
                                  "stop": ["\n\n", "16"], "seed": 3}
    assert sampling_kwargs(Sampling(top_k=50))["top_k"] == 50
    assert sampling_kwargs(Sampling())["seed"] is None


def test_plain_prompt_passes_through(tokenizer: Any) -> None:
    assert render_prompt(Request(prompt="1. write a poem\n2."), tokenizer) == "1. write a poem\n2."


def test_chat_is_rendered_with_the_template_and_one_bos(tokenizer: Any) -> None:
    req = Request(messages=({"role": "system", "content": "be brief"},
                            {"role": "user", "content": "name three colours"}))
    rendered = render_prompt(req, tokenizer)
    ids = rendered["prompt_token_ids"]
    assert tokenizer.decode(ids) == ("<s> <system> be brief </s> <user> name three colours </s> <assistant>")
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's BOS only
    text = tokenizer.apply_chat_template(list(req.messages), tokenize=False, add_generation_prompt=True)
    assert tokenizer.encode(text).count(tokenizer.bos_token_id) == 2  # what a plain-text prompt would get


def test_chat_without_template_is_rendered_in_the_alpaca_layout(tokenizer: Any) -> None:
    import copy

    base = copy.deepcopy(tokenizer)
    base.chat_template = None  # a base model
    ids = render_prompt(Request(messages=({"role": "user", "content": "name three colours"},)), base)
    expected = ("<s>Below is an instruction that describes a task. Write a response that appropriately "
                "completes the request.\n\n### Instruction:\nname three colours\n\n### Response:\n")
    assert ids["prompt_token_ids"] == base.encode(expected, add_special_tokens=False)
    assert ids["prompt_token_ids"].count(base.bos_token_id) == 1


def _output(text: str, tokens: int, reason: str | None, prompt_tokens: int = 4) -> SimpleNamespace:
    """The shape of vllm.RequestOutput (vllm/outputs.py): prompt_token_ids and outputs[0]."""
    first = SimpleNamespace(index=0, text=text, token_ids=list(range(tokens)), finish_reason=reason)
    return SimpleNamespace(prompt_token_ids=list(range(prompt_tokens)), outputs=[first])


def test_output_conversion() -> None:
    done = to_completion(_output("a poem", 2, "stop"))
    assert (done.text, done.prompt_tokens, done.completion_tokens, done.finish_reason, done.error) == (
        "a poem", 4, 2, "stop", None)
    assert to_completion(_output("cut", 8, "length")).finish_reason == "length"
    aborted = to_completion(_output("", 0, "abort"))
    assert aborted.finish_reason == "error" and "abort" in aborted.error
    empty = to_completion(SimpleNamespace(prompt_token_ids=[1], outputs=[]))
    assert empty.finish_reason == "error"
    assert finish_reason(None)[0] == "error"


@dataclass
class FakeLogprob:
    """Shaped like vllm.logprobs.Logprob: logprob, rank, decoded_token (None without detokenizing)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def _with_logprobs(steps: list[dict[int, FakeLogprob]] | None) -> SimpleNamespace:
    """A RequestOutput whose first CompletionOutput carries `logprobs` (one {id: Logprob} per token)."""
    return SimpleNamespace(prompt_token_ids=[1, 2], outputs=[SimpleNamespace(
        text="4", token_ids=[7], finish_reason="length", logprobs=steps)])


def test_first_token_distribution_from_vllm_logprobs(tokenizer: Any) -> None:
    step = {7: FakeLogprob(math.log(0.5), 1, "4"), 8: FakeLogprob(math.log(0.2), 2, " 4"),
            9: FakeLogprob(math.log(0.2), 3, "5"), 10: FakeLogprob(-math.inf, 4, "2")}
    later = {11: FakeLogprob(0.0, 1, "ignored")}  # only the first generated token counts
    assert first_token_dist(_with_logprobs([step, later])) == pytest.approx({"4": 0.7, "5": 0.2})
    # a token without decoded text is decoded with the tokenizer, or skipped without one
    word = tokenizer.convert_tokens_to_ids("poem")
    bare = {word: FakeLogprob(math.log(0.3), 1, None), 7: FakeLogprob(math.log(0.6), 2, "3")}
    assert first_token_dist(_with_logprobs([bare]), tokenizer) == pytest.approx({"poem": 0.3, "3": 0.6})
    assert first_token_dist(_with_logprobs([bare])) == pytest.approx({"3": 0.6})
    assert first_token_dist(_with_logprobs(None)) is None  # logprobs were not asked for
    assert first_token_dist(SimpleNamespace(prompt_token_ids=[1], outputs=[])) is None


def test_logprob_sampling_params_are_greedy_one_token() -> None:
    kwargs = logprob_kwargs(Sampling(temperature=0.7, max_tokens=8, seed=0), 20)
    assert (kwargs["max_tokens"], kwargs["temperature"], kwargs["logprobs"], kwargs["seed"]) == (1, 0.0, 20, 0)


@pytest.mark.slow
@pytest.mark.skipif(not _has_vllm_and_gpu(), reason="needs vllm and a GPU (vLLM cannot run on this machine)")
def test_real_engine_gives_first_token_probs() -> None:  # pragma: no cover - GPU machines only
    teacher = VLLMTeacher("HuggingFaceTB/SmolLM2-135M-Instruct", gpu_memory_utilization=0.3, max_model_len=512)
    reqs = [Request(messages=({"role": "user", "content": "Rate 1 to 5. Reply with one digit."},))]
    dist = teacher.first_token_probs(reqs)[0]
    assert dist and 0 < sum(dist.values()) <= 1.0 + 1e-6


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_missing_vllm_names_the_install_command() -> None:
    with pytest.raises(SiftError, match=r"pip install 'sift-instruct\[vllm\]' on a machine with a GPU"):
        VLLMTeacher("some/model")


@pytest.mark.slow
@pytest.mark.skipif(not _has_vllm_and_gpu(), reason="needs vllm and a GPU")
def test_real_engine_generates_in_order() -> None:  # pragma: no cover - GPU machines only
    teacher = VLLMTeacher("HuggingFaceTB/SmolLM2-135M-Instruct", gpu_memory_utilization=0.3, max_model_len=512)
    greedy = Sampling(temperature=0.0, max_tokens=8)
    reqs = [Request(prompt=f"Count: {i}, {i + 1},", sampling=greedy) for i in range(5)]
    reqs.append(Request(messages=({"role": "user", "content": "Say hi."},), sampling=greedy))
    out = teacher.generate(reqs)
    assert len(out) == 6 and all(c.finish_reason in ("stop", "length") for c in out)
    assert all(c.prompt_tokens > 0 and c.completion_tokens > 0 for c in out)
    assert teacher.generate(reqs[:1])[0].text == out[0].text  # greedy: same prompt, same text


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_registry_vllm_backend_without_vllm_is_a_clear_error() -> None:
    from pipeline.teachers.registry import make_teacher

    with pytest.raises(SiftError, match="sift-instruct"):
        make_teacher("vllm", "some/model", max_model_len=None, seed=1)


def test_vllm_loads_the_converted_folder_of_an_alias_and_keeps_a_hub_id() -> None:
    from pipeline.io.models import EMBEDDED_ALIAS, alias_dir
    from pipeline.teachers.vllm_engine import engine_model

    try:
        got = engine_model(EMBEDDED_ALIAS)
    except SiftError as e:  # the embedded model not fetched on this machine
        pytest.skip(f"needs `sift model fetch`: {e}")
    assert got == str(alias_dir(EMBEDDED_ALIAS))
    assert engine_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
