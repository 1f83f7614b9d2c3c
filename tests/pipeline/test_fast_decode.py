"""The fast decoder: same greedy tokens as `model.generate`, exact sampling, stops and budgets.

    .venv/bin/python -m pytest tests/pipeline/test_fast_decode.py            # tiny random Llama
    .venv/bin/python -m pytest tests/pipeline/test_fast_decode.py -m slow    # the embedded model
"""

from __future__ import annotations

import math

import pytest

from pipeline.teachers.base import Sampling
from pipeline.teachers.fast_decode import FastDecoder, Job, supports
from pipeline.teachers.fast_sampler import apply_penalties, sample_rows
from tests.pipeline.test_teacher_hf import PROMPTS, SENTENCES, make_tiny


def reference_probs(logits: list[float], t: float, top_k: int, top_p: float) -> list[float]:
    """The nucleus distribution written out plainly: sort, softmax, top_k, top_p, renormalise."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k:
        order = order[:top_k]
    z = [math.exp(logits[i] / t) for i in order]
    p = [x / sum(z) for x in z]
    kept, above = [], 0.0
    for i, q in zip(order, p, strict=True):
        if above < top_p:
            kept.append((i, q))
        above += q
    total = sum(q for _, q in kept)
    out = [0.0] * len(logits)
    for i, q in kept:
        out[i] = q / total
    return out


LOGITS = [2.0, 1.5, 1.4, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, 0.9, 1.45]


@pytest.mark.parametrize("t,top_k,top_p,candidates", [
    (1.0, 0, 0.5, 3),  # nucleus inside the candidates
    (0.7, 0, 0.95, 2),  # nucleus wider than the candidates: full-sort fallback
    (1.3, 4, 1.0, 2),  # top_k larger than the candidate cap
    (1.0, 0, 1.0, 3),  # the full distribution: tail draws past the candidates
    (0.5, 3, 0.6, 8),  # top_k then top_p
])
def test_sampler_draws_the_nucleus_distribution(t: float, top_k: int, top_p: float, candidates: int) -> None:
    import torch

    n = 40_000
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor(LOGITS).repeat(n, 1)
    picks = sample_rows(rows, torch.full((n,), t), torch.full((n,), top_p), torch.full((n,), top_k),
                        torch.rand(n, generator=g, dtype=torch.float64), candidates=candidates)
    counts = torch.bincount(picks, minlength=len(LOGITS)).tolist()
    expected = reference_probs(LOGITS, t, top_k, top_p)
    for tok, (c, p) in enumerate(zip(counts, expected, strict=True)):
        if p == 0:
            assert c == 0, f"token {tok} is outside the nucleus but was drawn {c} times"
        else:
            assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-4, (tok, c / n, p)


def test_sampler_rows_are_independent() -> None:
    """Each row uses only its own uniform: the same row in a different batch picks the same token."""
    import torch

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3)) * 2
    u = torch.rand(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    args = (torch.tensor([0.7, 1.0, 1.2, 0.9, 1.0, 0.5]), torch.tensor([0.9, 1.0, 0.5, 0.99, 0.3, 1.0]),
            torch.tensor([0, 0, 5, 0, 0, 40]))
    together = sample_rows(logits, *args, u, candidates=4)
    for r in range(6):
        alone = sample_rows(logits[r:r + 1], *(a[r:r + 1] for a in args), u[r:r + 1], candidates=4)
        assert int(alone[0]) == int(together[r])


def test_penalties_match_the_plain_processor() -> None:
    import torch

    from pipeline.teachers.hf import PenaltyProcessor

    generated = [[1, 1, 3, 0], [2, 6, 6, 6]]
    scores = torch.randn(2, 7)
    ref = PenaltyProcessor([2.0, 0.5], [0.25, 1.0], prompt_len=0)(torch.tensor(generated), scores.clone())
    counts = torch.zeros(2, 7)
    for r, ids in enumerate(generated):
        for t in ids:
            counts[r, t] += 1
    out = scores.clone()
    apply_penalties(out, torch.tensor(generated), counts, torch.tensor([2.0, 0.5]), torch.tensor([0.25, 1.0]))
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- the decoder on a tiny random Llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-fast")
    return AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval(), AutoTokenizer.from_pretrained(folder)


def plain_generate(model, tok, prompt: list[int], n: int) -> list[int]:
    """Reference: `model.generate` on the prompt alone, greedy, cut after the first EOS."""
    import torch

    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
    return out[:out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("max_rows", [1, 3, 16])
def test_greedy_matches_generate(tiny, max_rows: int) -> None:
    """Continuous batching (rows finishing at different steps, slots refilled and compacted) gives
    exactly the tokens plain `generate` gives each prompt alone."""
    model, tok = tiny
    prompts = encode(tok, PROMPTS + SENTENCES)
    budgets = [5 + 7 * (i % 4) for i in range(len(prompts))]
    dec = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=max_rows)
    got = dec.run([Job(p, Sampling(temperature=0, max_tokens=b), 0) for p, b in zip(prompts, budgets, strict=True)])
    for p, b, ids in zip(prompts, budgets, got, strict=True):
        assert ids == plain_generate(model, tok, p, b)


def test_max_tokens_eos_and_stop_strings(tiny) -> None:
    model, tok = tiny
    prompt = encode(tok, [PROMPTS[1]])[0]
    dec = FastDecoder(model, eos_ids=[tok.eos_token_id], decode=tok.decode, max_rows=4)
    full = dec.run([Job(prompt, Sampling(temperature=0, max_tokens=30), 0)])[0]
    assert len(full) == 30 and tok.eos_token_id not in full
    text = tok.decode(full)
    stop = text[6:9]
    first = text.find(stop)
    finished: list[int] = []
    cut, other = dec.run([Job(prompt, Sampling(temperature=0, max_tokens=30, stop=(stop,)), 0),
                          Job(prompt, Sampling(temperature=0, max_tokens=7), 0)],
                         on_finish=lambda i, ids: finished.append(i))
    # stops at the first token whose text completes the stop string, and not before
    assert stop in tok.decode(cut) and stop not in tok.decode(cut[:-1])
    assert cut == full[:len(cut)] and len(tok.decode(cut[:-1])) < first + len(stop)
    assert other == full[:7] and sorted(finished) == [0, 1]
    # EOS ends a row and is returned last: make EOS the model's favourite after 3 tokens
    eos_dec = FastDecoder(model, eos_ids=[tok.eos_token_id, full[3]], max_rows=4)
    assert eos_dec.run([Job(prompt, Sampling(temperature=0, max_tokens=30), 0)])[0] == full[:4]


def test_seeded_rows_ignore_their_neighbours(tiny) -> None:
    model, tok = tiny
    prompts = encode(tok, SENTENCES)
    dec = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=4, candidates=8)

    def job(i: int, seed: int) -> Job:
        return Job(prompts[i], Sampling(temperature=1.2, top_p=0.9, max_tokens=16), seed)

    alone = dec.run([job(0, 7)])[0]
    assert dec.run([job(0, 7)])[0] == alone  # reproducible
    mixed = dec.run([job(3, 1), job(0, 7), job(5, 2), job(2, 9), job(1, 4)])
    assert mixed[1] == alone
    assert dec.run([job(0, 8)])[0] != alone  # another seed, another text


def test_penalised_greedy_matches_the_plain_processor(tiny) -> None:
    """Greedy decoding with presence/frequency penalties picks what `generate` + PenaltyProcessor picks."""
    import torch
    from transformers import LogitsProcessorList

    from pipeline.teachers.hf import PenaltyProcessor

    model, tok = tiny
    prompts = encode(tok, PROMPTS)
    dec = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=2)
    got = dec.run([Job(p, Sampling(temperature=0, max_tokens=20, presence_penalty=1.5, frequency_penalty=0.3), 0)
                   for p in prompts])
    for p, ids in zip(prompts, got, strict=True):
        proc = PenaltyProcessor([1.5], [0.3], prompt_len=len(p))
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([proc]))[0, len(p):].tolist()
        assert ids == ref[:len(ids)] and (len(ids) == 20 or ids[-1] == tok.eos_token_id)
    plain = dec.run([Job(prompts[0], Sampling(temperature=0, max_tokens=20), 0)])[0]
    assert plain != got[0]  # the penalty did something


def test_only_plain_llama_is_supported(tiny) -> None:
    model, _ = tiny
    assert supports(model)
    model.config.attention_bias = True
    try:
        assert not supports(model)
        with pytest.raises(ValueError, match="plain Llama"):
            FastDecoder(model, eos_ids=[0])
    finally:
        model.config.attention_bias = False


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_model_greedy_float32_matches_generate() -> None:
    """The hard requirement: float32 greedy tokens identical to plain batched `generate`."""
    import torch

    from pipeline.models import EMBEDDED_ALIAS, load_model, load_tokenizer, resolve_model

    ref = resolve_model(EMBEDDED_ALIAS)
    model, tok = load_model(ref, dtype="float32"), load_tokenizer(ref)
    texts = ["Write a haiku about autumn.", "List three prime numbers.", "Why is the sky blue?",
             "Give two tips for learning Python.", "Explain what a noun is.", "Name a famous painter."]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for t in texts]
    prompts.append(tok("1. Sort the numbers.\n2. Translate the sentence.\n3.")["input_ids"])
    width, eos = max(map(len, prompts)), tok.eos_token_id
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                             pad_token_id=eos, eos_token_id=eos)[:, width:].tolist()
    expected = [row[:row.index(eos) + 1] if eos in row else row for row in out]
    got = FastDecoder(model, eos_ids=[eos], max_rows=4).run(
        [Job(p, Sampling(temperature=0, max_tokens=40), 0) for p in prompts])
    assert got == expected
