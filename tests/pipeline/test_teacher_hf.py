"""TransformersTeacher on a tiny random Llama with a byte-level BPE tokenizer trained here.

    .venv/bin/python -m pytest tests/pipeline/test_teacher_hf.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.teachers.base import Request, Sampling

SENTENCES = [
    "Give three tips for staying healthy.", "What is the capital of France?",
    "Translate the sentence into Spanish: hello, how are you?", "Name a primary color and explain why.",
    "Summarize the text below in two sentences.", "Write a short story about a cat and a dog.",
    "1. Classify the sentiment of the review.\n2. Find the odd one out.\n3. Sort the numbers.",
    "Below is an instruction that describes a task. Write a response that completes the request.",
]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny(folder: Path, seed: int = 0) -> Path:
    """Save a random 2-layer Llama and a byte-level BPE (SmolLM2-like: pad = EOS = <|im_end|>)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory):
    from pipeline.teachers.hf import TransformersTeacher

    folder = make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-bpe")
    return TransformersTeacher(str(folder), batch_size=8, dtype="float32")


def greedy(max_tokens: int = 24, stop: tuple[str, ...] = ()) -> Sampling:
    return Sampling(temperature=0, max_tokens=max_tokens, stop=stop)


def hf_greedy(teacher, prompt: str, n: int) -> list[int]:
    """Reference: plain model.generate on the prompt alone (no padding), new token ids."""
    import torch

    ids = torch.tensor([teacher.prompt_ids(Request(prompt=prompt))])
    out = teacher.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=teacher.pad_id)
    return out[0, ids.shape[1]:].tolist()


PROMPTS = ["Name a color.", "Give three tips for staying healthy. Write a short story about a cat.",
           "1. Classify the sentiment of the review.\n2. Find the odd one out.\n3."]


def test_left_padding_gives_the_single_prompt_output(teacher) -> None:
    short = Request(prompt=PROMPTS[0], sampling=greedy())
    alone = teacher.generate([short])[0]
    batch = teacher.generate([Request(prompt=PROMPTS[1], sampling=greedy()), short,
                              Request(prompt=PROMPTS[2], sampling=greedy())])
    assert teacher.tokenizer.padding_side == "left"
    assert len(teacher.prompt_ids(short)) < len(teacher.prompt_ids(Request(prompt=PROMPTS[2])))
    assert batch[1] == alone
    assert alone.completion_tokens > 0 and alone.prompt_tokens == len(teacher.prompt_ids(short))
    # results come back in request order
    assert batch[0] == teacher.generate([Request(prompt=PROMPTS[1], sampling=greedy())])[0]


def test_max_tokens_gives_length(teacher) -> None:
    out = teacher.generate([Request(prompt=p, sampling=greedy(max_tokens=5)) for p in PROMPTS])
    for c in out:
        assert c.finish_reason == "length" and c.completion_tokens == 5
    for p, c in zip(PROMPTS, out, strict=True):
        assert c.text == teacher.tokenizer.decode(hf_greedy(teacher, p, 5), skip_special_tokens=True)


def test_mixed_budgets_in_one_batch(teacher) -> None:
    long, short = Request(prompt=PROMPTS[1], sampling=greedy(20)), Request(prompt=PROMPTS[2], sampling=greedy(3))
    both = teacher.generate([long, short])
    assert both[1].completion_tokens == 3 and both[1].finish_reason == "length"
    assert both[0] == teacher.generate([long])[0]
    assert teacher.generate([Request(prompt=PROMPTS[2], sampling=greedy(20))])[0].text.startswith(both[1].text)


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_requests_are_fitted_to_the_context_window(teacher, engine: str) -> None:
    """The tiny model knows 512 positions: a prompt that fills them is an error row (as a server
    would refuse it); one near the end gets only the room left; the others are untouched, in order."""
    assert teacher.context == 512
    words = "word " * 600
    long_prompt = " ".join(words.split()[:600])
    n_long = len(teacher.prompt_ids(Request(prompt=long_prompt)))
    assert n_long >= 512
    near = next(p for k in range(1, 600) if 490 <= len(teacher.prompt_ids(Request(prompt=(p := " ".join(
        words.split()[:k]))))) <= 505)
    room = 512 - len(teacher.prompt_ids(Request(prompt=near)))
    teacher.engine, before = engine, teacher.engine
    try:
        out = teacher.generate([Request(prompt=PROMPTS[0], sampling=greedy(8)),
                                Request(prompt=long_prompt, sampling=greedy(8)),
                                Request(prompt=near, sampling=greedy(64))])
    finally:
        teacher.engine = before
    assert out[0].finish_reason in ("stop", "length") and out[0].completion_tokens <= 8
    assert out[0].text == teacher.generate([Request(prompt=PROMPTS[0], sampling=greedy(8))])[0].text
    assert out[1].finish_reason == "error" and "context of 512 tokens" in (out[1].error or "")
    assert out[2].completion_tokens <= room < 64


def test_stop_strings_trim_and_set_stop(teacher) -> None:
    full = teacher.generate([Request(prompt=PROMPTS[1], sampling=greedy(30))])[0]
    assert full.finish_reason == "length" and len(full.text) > 8
    stop = full.text[5:8]
    cut = full.text.find(stop)
    out = teacher.generate([Request(prompt=PROMPTS[1], sampling=greedy(30, stop=(stop,))),
                            Request(prompt=PROMPTS[0], sampling=greedy(30))])
    assert out[0].text == full.text[:cut] and out[0].finish_reason == "stop"
    assert out[0].completion_tokens < full.completion_tokens
    assert len(teacher._decode(teacher.tokenizer(full.text)["input_ids"])) >= cut  # sanity of decode
    # the other group (no stop strings) is untouched by this request's stop string
    assert out[1] == teacher.generate([Request(prompt=PROMPTS[0], sampling=greedy(30))])[0]


def test_eos_gives_stop_and_is_not_counted(teacher) -> None:
    import torch

    new = hf_greedy(teacher, PROMPTS[1], 12)
    assert teacher.eos_id not in new
    k = next(i for i in range(1, 12) if new[i] not in new[:i])  # first fresh token after the start
    head = teacher.model.lm_head.weight
    saved = head[teacher.eos_id].clone()
    try:
        with torch.no_grad():
            head[teacher.eos_id] = head[new[k]]  # EOS ties with it and wins (lower id): EOS at step k
        ended = teacher.generate([Request(prompt=PROMPTS[1], sampling=greedy(12))])[0]
    finally:
        with torch.no_grad():
            head[teacher.eos_id] = saved
    assert teacher.eos_id < new[k]
    assert ended.finish_reason == "stop" and ended.completion_tokens == k
    assert ended.text == teacher.tokenizer.decode(new[:k], skip_special_tokens=True)


def test_seeds_are_reproducible_and_private(teacher) -> None:
    def req(seed: int, prompt: str = PROMPTS[0]) -> Request:
        return Request(prompt=prompt, sampling=Sampling(temperature=1.5, max_tokens=20, seed=seed))

    a = teacher.generate([req(1), req(2, PROMPTS[1]), req(3)])
    assert teacher.generate([req(1), req(2, PROMPTS[1]), req(3)]) == a
    assert a[0].text != a[2].text  # same prompt, different seeds
    # a row's draws come from its own seed only: changing a batch-mate's seed leaves it alone
    b = teacher.generate([req(1), req(99, PROMPTS[1]), req(3)])
    assert b[0] == a[0] and b[2] == a[2] and b[1] != a[1]


def test_penalty_processor_follows_openai_formula() -> None:
    import torch

    from pipeline.teachers.hf import PenaltyProcessor

    prompt = [[5, 5, 1], [4, 4, 4]]
    generated = [[1, 1, 3, 0], [2, 0, 0, 0]]
    ids = torch.tensor([p + g for p, g in zip(prompt, generated, strict=True)])
    scores = torch.randn(2, 7)
    out = PenaltyProcessor([2.0, 0.5], [0.25, 1.0], prompt_len=3)(ids, scores.clone())
    expected = scores.clone()
    for row, (pres, freq) in enumerate([(2.0, 0.25), (0.5, 1.0)]):
        for t in set(generated[row]):
            n = generated[row].count(t)
            expected[row, t] -= pres + freq * n
    assert torch.allclose(out, expected)
    assert out[0, 5] == scores[0, 5]  # prompt tokens are not penalised


def test_presence_penalty_changes_generation(teacher) -> None:
    plain = teacher.generate([Request(prompt=PROMPTS[0], sampling=greedy(24))])[0]
    ids = teacher.tokenizer(plain.text, add_special_tokens=False)["input_ids"]
    assert len(set(ids)) < len(ids)  # the random model repeats itself greedily
    banned = teacher.generate([Request(prompt=PROMPTS[0], sampling=Sampling(
        temperature=0, max_tokens=24, presence_penalty=1e4))])[0]
    assert banned.text != plain.text


def test_sample_token_limits() -> None:
    import torch

    from pipeline.teachers.hf import sample_token

    logits = torch.tensor([0.1, 3.0, 2.9, -1.0, 0.5])
    g = torch.Generator().manual_seed(0)
    assert {sample_token(logits, Sampling(temperature=5.0, top_k=1), g) for _ in range(20)} == {1}
    assert {sample_token(logits, Sampling(temperature=5.0, top_p=0.01), g) for _ in range(20)} == {1}
    assert {sample_token(logits, Sampling(temperature=5.0, top_k=2), g) for _ in range(200)} == {1, 2}
    assert len({sample_token(logits, Sampling(temperature=5.0), g) for _ in range(300)}) == 5


def test_chat_template_path(teacher) -> None:
    messages = ({"role": "user", "content": "What is the capital of France?"},)
    req = Request(messages=messages, sampling=greedy(8))
    rendered = teacher.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    ids = teacher.prompt_ids(req)
    assert ids == teacher.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    out = teacher.generate([req])[0]
    assert out.prompt_tokens == len(ids)
    assert out == teacher.generate([Request(prompt=rendered, sampling=greedy(8))])[0]


def test_on_batch_reports_progress(teacher) -> None:
    from pipeline.teachers.hf import TransformersTeacher

    calls: list[tuple[int, int]] = []
    small = TransformersTeacher(teacher.model.name_or_path, batch_size=2, dtype="float32",
                                on_batch=lambda n, t: calls.append((n, t)))
    out = small.generate([Request(prompt=p, sampling=greedy(4)) for p in PROMPTS * 2])
    assert [n for n, _ in calls] == [2, 2, 2]
    assert sum(t for _, t in calls) == sum(c.completion_tokens for c in out)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.8), (0, 0.999), (20, 0.9), (5, 1.0)])
def test_candidates_match_transformers_warpers(top_k: int, top_p: float) -> None:
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from pipeline.teachers.hf import NUCLEUS_K, choose_tokens, nucleus

    torch.manual_seed(0)
    scores = torch.randn(1, 300) * 2
    warped = TemperatureLogitsWarper(0.7)(None, scores.clone())
    if top_k:
        warped = TopKLogitsWarper(top_k)(None, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(None, warped)
    allowed = set(torch.isfinite(warped[0]).nonzero()[:, 0].tolist())
    assert len(allowed) > (NUCLEUS_K if top_p == 0.999 else 1)  # 0.999 needs the full-sort fallback
    s = Sampling(temperature=0.7, top_k=top_k, top_p=top_p)
    probs = (scores[0] / 0.7).softmax(-1)
    _, ids = nucleus(probs, s, *probs.topk(max(NUCLEUS_K, top_k)))
    assert set(ids.tolist()) == allowed
    g = torch.Generator().manual_seed(1)
    assert {int(choose_tokens(scores, [s], [g])[0]) for _ in range(300)} <= allowed
