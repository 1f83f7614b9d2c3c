"""The fast decoder: same greedy tokens as `model.generate`, exact sampling, stops and budgets.

    .venv/bin/python -m pytest tests/pipeline/test_fast_decode.py            # tiny random Llama and Gemma 3
    .venv/bin/python -m pytest tests/pipeline/test_fast_decode.py -m slow    # the embedded models
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from pipeline.teachers import fast_kernel
from pipeline.teachers.base import Sampling
from pipeline.teachers.fast_decode import SHARED_MIN, FastDecoder, Job, _Row, shared_groups, supports
from pipeline.teachers.fast_sampler import apply_penalties, sample_rows
from tests.pipeline.kill_harness import REPO
from tests.pipeline.test_teacher_hf import PROMPTS, SENTENCES, make_tiny

KERNELS = fast_kernel.load()  # None where no C compiler is found: the torch paths still run
with_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler here: the C kernels are not built")
SAMPLERS = [pytest.param(None, id="torch"), pytest.param(KERNELS, id="kernel", marks=with_kernels)]


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


@pytest.mark.parametrize("kernels", SAMPLERS)
@pytest.mark.parametrize("t,top_k,top_p,candidates", [
    (1.0, 0, 0.5, 3),  # nucleus inside the candidates
    (0.7, 0, 0.95, 2),  # nucleus wider than the candidates: full-sort fallback
    (1.3, 4, 1.0, 2),  # top_k larger than the candidate cap
    (1.0, 0, 1.0, 3),  # the full distribution: tail draws past the candidates
    (0.5, 3, 0.6, 8),  # top_k then top_p
])
def test_sampler_draws_the_nucleus_distribution(t: float, top_k: int, top_p: float, candidates: int,
                                                kernels) -> None:
    import torch

    n = 40_000
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor(LOGITS).repeat(n, 1)
    picks = sample_rows(rows, torch.full((n,), t), torch.full((n,), top_p), torch.full((n,), top_k),
                        torch.rand(n, generator=g, dtype=torch.float64), candidates=candidates, kernels=kernels)
    counts = torch.bincount(picks, minlength=len(LOGITS)).tolist()
    expected = reference_probs(LOGITS, t, top_k, top_p)
    for tok, (c, p) in enumerate(zip(counts, expected, strict=True)):
        if p == 0:
            assert c == 0, f"token {tok} is outside the nucleus but was drawn {c} times"
        else:
            assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-4, (tok, c / n, p)


@pytest.mark.parametrize("kernels", SAMPLERS)
def test_sampler_rows_are_independent(kernels) -> None:
    """Each row uses only its own uniform: the same row in a different batch picks the same token
    (a neighbour's top_k widens the candidates of every row; that must not move a draw)."""
    import torch

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(3)) * 2
    u = torch.rand(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u[1] = 0.999  # past the candidates: the tail of an untruncated row
    args = (torch.tensor([0.7, 1.0, 1.2, 0.9, 1.0, 0.5]), torch.tensor([0.9, 1.0, 0.5, 0.99, 0.3, 1.0]),
            torch.tensor([0, 0, 5, 0, 0, 40]))
    together = sample_rows(logits, *args, u, candidates=4, kernels=kernels)
    for r in range(6):
        alone = sample_rows(logits[r:r + 1], *(a[r:r + 1] for a in args), u[r:r + 1], candidates=4,
                            kernels=kernels)
        assert int(alone[0]) == int(together[r])


def test_kernels_build_into_the_cache_or_stay_away(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh cache gets the compiled library under kernels/; a failing compiler or none at all
    gives None (the decoder then uses torch), never an exception."""
    import shutil

    monkeypatch.setenv("SIFT_CACHE", str(tmp_path / "cache"))
    if shutil.which("cc") or shutil.which("gcc"):
        monkeypatch.setattr(fast_kernel, "_loaded", {})
        built = fast_kernel.load()
        assert built is not None and len(list((tmp_path / "cache" / "kernels").glob("sift_kernels-*.so"))) == 1
        assert not list((tmp_path / "cache" / "kernels").glob("tmp*"))  # no build folder left behind
    broken = tmp_path / "bin" / "cc"
    broken.parent.mkdir()
    broken.write_text("#!/bin/sh\necho 'cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("SIFT_CACHE", str(tmp_path / "other"))
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setattr(fast_kernel, "_loaded", {})
    assert fast_kernel.load() is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC")
    monkeypatch.setattr(fast_kernel, "_loaded", {})
    assert fast_kernel.load() is None


@with_kernels
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kernel_candidates_are_a_stable_top_k(dtype: str) -> None:
    """The C candidates: the k largest logits, ties broken by the lower id (a stable descending sort),
    scaled by 1/T, and the full-vocabulary log-normaliser."""
    import torch

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(5, 3001, generator=g) * 3).to(getattr(torch, dtype))
    logits[0, 7:400] = logits[0].max()  # a wide tie at the top, wider than k
    logits[1, :] = 0.5  # all equal
    logits[2, -1] = 40.0  # the largest in the last, partial block of 16
    inv_t = torch.tensor([1 / 0.7, 1.0, 2.0, 1 / 1.3, 1.0])
    for k in (1, 16, 130):
        ids, vals, lse = fast_kernel.top_candidates(KERNELS, logits, inv_t, k)
        order = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(ids, order)
        scaled = logits.double() * inv_t.double()[:, None]
        assert torch.allclose(vals.double(), scaled.gather(1, ids), rtol=1e-6, atol=1e-6)
        assert torch.allclose(lse, torch.logsumexp(scaled, -1), rtol=0, atol=1e-5)


@with_kernels
@pytest.mark.parametrize("group,head_dim,window", [(3, 64, None), (1, 64, None), (4, 128, None), (4, 256, None),
                                                   (3, 64, 20), (4, 256, 7)])
def test_kernel_attention_matches_the_exact_one(group: int, head_dim: int, window: int | None) -> None:
    """The C decode attention stores each row's new key and value at its position and attends to its
    own prefix only (its last `window` positions in a sliding-window layer): against float64 attention
    it is at least as close as SDPA in bfloat16."""
    import torch

    F = torch.nn.functional
    g = torch.Generator().manual_seed(6)
    n, kv, cap, heads = 5, 2, 64, 2 * group
    kt = torch.randn(n + 1, kv, head_dim, cap, generator=g).to(torch.bfloat16)  # one slot more than rows
    v = torch.randn(n + 1, kv, cap, head_dim, generator=g).to(torch.bfloat16)
    qkv = torch.randn(n, (heads + 2 * kv) * head_dim, generator=g).to(torch.bfloat16)
    lengths = torch.tensor([1, 17, 33, 64, 5])
    before_kt, before_v = kt.clone(), v.clone()
    out = fast_kernel.decode_attention(KERNELS, qkv, kt, v, lengths, heads=heads, kv_heads=kv, scale=0.125,
                                       window=window)
    d = head_dim
    new_k = qkv[:, heads * d:(heads + kv) * d].view(n, kv, d)
    new_v = qkv[:, (heads + kv) * d:].view(n, kv, d)
    for r, length in enumerate(lengths.tolist()):
        assert torch.equal(kt[r, :, :, length - 1], new_k[r]) and torch.equal(v[r, :, length - 1], new_v[r])
        assert torch.equal(kt[r, :, :, length:], before_kt[r, :, :, length:])  # nothing else written
        assert torch.equal(v[r, :, :length - 1], before_v[r, :, :length - 1])
        first = max(0, length - window) if window else 0
        q = qkv[r, :heads * d].view(kv, group, d)
        keys, vals = kt[r, :, :, first:length].transpose(-1, -2), v[r, :, first:length]
        exact = ((q.double() @ keys.double().transpose(-1, -2)) * 0.125).softmax(-1) @ vals.double()
        sdpa = F.scaled_dot_product_attention(q[None], keys[None], vals[None], scale=0.125)[0]
        got = out[r].view(kv, group, d)
        assert (got.double() - exact).abs().max() <= (sdpa.double() - exact).abs().max() + 1e-2
        assert (got.double() - exact).abs().max() < 0.02
    assert torch.equal(kt[n], before_kt[n]) and torch.equal(v[n], before_v[n])  # the spare slot untouched


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


@pytest.mark.parametrize("max_rows,lanes", [(1, 1), (3, 1), (16, 1), (3, 2), (16, 3)])
def test_greedy_matches_generate(tiny, max_rows: int, lanes: int) -> None:
    """Continuous batching (rows finishing at different steps, slots refilled and compacted), in one
    lane or several threads, gives exactly the tokens plain `generate` gives each prompt alone."""
    model, tok = tiny
    prompts = encode(tok, PROMPTS + SENTENCES)
    budgets = [5 + 7 * (i % 4) for i in range(len(prompts))]
    dec = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=max_rows, lanes=lanes)
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


def test_lanes_report_every_job_once_and_pass_errors_on(tiny) -> None:
    model, tok = tiny
    prompts = encode(tok, SENTENCES)
    dec = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=4, lanes=2)
    jobs = [Job(p, Sampling(temperature=0.9, max_tokens=6 + i), i) for i, p in enumerate(prompts)]
    seen: list[int] = []
    got = dec.run(jobs, on_finish=lambda i, ids: seen.append(i))
    assert sorted(seen) == list(range(len(jobs))) and all(got)
    assert FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=4, lanes=1).run(jobs) == got  # same texts

    def boom(i: int, ids: list[int]) -> None:
        raise RuntimeError(f"journal full at job {i}")

    with pytest.raises(RuntimeError, match="journal full"):
        dec.run(jobs, on_finish=boom)


def bf16_llama_and_float32_copy(tok):  # noqa: ANN001, ANN201
    """A small random bfloat16 Llama with SmolLM2's head shape (head_dim 64, 3 query heads per key-value
    head), and the same (bf16-rounded) weights in float32 arithmetic."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    return model, copy.deepcopy(model).float()


@with_kernels
def test_bfloat16_kernel_path_agrees_with_torch_attention(tiny) -> None:
    """In bfloat16 the C attention (and the C sampler candidates) replace torch's. Which greedy token
    wins a near-tie depends on the CPU's bf16 kernels, so the texts are not compared with each other;
    instead every token either path picks must be one the same weights in float32 rate within
    TINY_BF16_GAP of their favourite at that step (teacher-forced along the path's own text), on a
    small random Llama with SmolLM2's head shape (head_dim 64, 3 query heads per key-value head)."""
    _, tok = tiny
    model, model32 = bf16_llama_and_float32_copy(tok)
    prompts = encode(tok, PROMPTS + SENTENCES)
    jobs = [Job(p, Sampling(temperature=0, max_tokens=12), 0) for p in prompts]
    fast = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=4, lanes=1)
    plain = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=4, lanes=1, kernel=False)
    assert fast.kernel is not None and plain.kernel is None
    for dec in (fast, plain):
        outs = dec.run(jobs)
        gaps = [g for p, ids in zip(prompts, outs, strict=True) for g in float32_gaps(model32, p, ids)]
        assert len(gaps) == sum(len(o) for o in outs) > 0
        assert max(gaps) <= TINY_BF16_GAP, (dec.kernel is not None, max(gaps))


# The tiny model's logits span about -9 to 10. Measured on an AMD EPYC (avx512_bf16): the largest gap of
# either bf16 path was 0.09 over 125 tokens, and a decoder that skipped one of the two layers picked
# tokens up to 8.9 below the float32 favourite; 0.25 leaves room for other CPUs' rounding.
TINY_BF16_GAP = 0.25


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


def test_only_plain_llama_and_gemma3_are_supported(tiny, tiny_gemma) -> None:
    model, _ = tiny
    assert supports(model)
    model.config.attention_bias = True
    try:
        assert not supports(model)
        with pytest.raises(ValueError, match="plain Llama and Gemma 3"):
            FastDecoder(model, eos_ids=[0])
    finally:
        model.config.attention_bias = False
    gemma = tiny_gemma()
    assert supports(gemma)
    for name, value in (("attn_logit_softcapping", 50.0), ("use_bidirectional_attention", True),
                        ("hidden_activation", "silu")):
        before = getattr(gemma.config, name)
        setattr(gemma.config, name, value)
        try:
            assert not supports(gemma), name
        finally:
            setattr(gemma.config, name, before)


# ---------------------------------------------------------------- the decoder on a tiny random Gemma 3

GEMMA_WINDOW = 5  # shorter than the prompts here: sliding layers see only part of them, in prefill and decode


@pytest.fixture(scope="module")
def tiny_gemma(tiny):
    """A factory of small random Gemma 3 text models on the tiny tokenizer: two sliding-window layers
    around a global one, qk-norm, a query scale that is not head_dim's, tied output layer, and random
    norm weights (Gemma's start at zero, and 1 + w must be what is applied)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    _, tok = tiny

    def make(*, head_dim: int = 16, kv_heads: int = 2, window: int = GEMMA_WINDOW, softcap: float | None = None,
             linear_rope: bool = False) -> Any:
        full = ({"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6} if linear_rope
                else {"rope_type": "default", "rope_theta": 1e6})
        config = Gemma3TextConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=window,
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                             "full_attention": full},
            final_logit_softcapping=softcap, max_position_embeddings=512, initializer_range=0.2,
            tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id)
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.5)
        model.generation_config.eos_token_id = tok.eos_token_id
        return model

    return make


@pytest.mark.parametrize("variant", ["plain", "softcap+linear-rope"])
@pytest.mark.parametrize("max_rows,lanes", [(1, 1), (16, 1), (3, 2)])
def test_gemma3_greedy_matches_generate(tiny, tiny_gemma, variant: str, max_rows: int, lanes: int) -> None:
    """Gemma 3 in float32: the fast engine's greedy tokens are plain `generate`'s for each prompt alone,
    but for true ties (the two tokens' float32 logits within 1e-4: batch shapes differ, so sums may round
    differently on another CPU). Also with a final logit softcap and linear RoPE scaling on the global layer."""
    _, tok = tiny
    model = tiny_gemma(softcap=3.0, linear_rope=True) if variant != "plain" else tiny_gemma()
    prompts = encode(tok, PROMPTS + SENTENCES)
    assert min(map(len, prompts)) > GEMMA_WINDOW  # the window cuts every prompt
    budgets = [5 + 7 * (i % 4) for i in range(len(prompts))]
    dec = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=max_rows, lanes=lanes)
    got = dec.run([Job(p, Sampling(temperature=0, max_tokens=b), 0) for p, b in zip(prompts, budgets, strict=True)])
    for p, b, ids in zip(prompts, budgets, got, strict=True):
        expected = plain_generate(model, tok, p, b)
        assert ids == expected or first_divergence_is_a_tie(model, p, ids, expected, tol=1e-4), (p, ids, expected)


def test_gemma3_softcapped_penalised_greedy_matches_the_plain_processor(tiny, tiny_gemma) -> None:
    """The final logit softcap never moves an argmax, but it sets the scale penalties act on: greedy with
    presence/frequency penalties picks what `generate` + PenaltyProcessor picks."""
    import torch
    from transformers import LogitsProcessorList

    from pipeline.teachers.hf import PenaltyProcessor

    _, tok = tiny
    model = tiny_gemma(softcap=3.0)
    prompts = encode(tok, PROMPTS + SENTENCES[:3])
    sampling = Sampling(temperature=0, max_tokens=16, presence_penalty=0.6, frequency_penalty=0.3)
    got = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=3).run([Job(p, sampling, 0) for p in prompts])
    for p, ids in zip(prompts, got, strict=True):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([PenaltyProcessor([0.6], [0.3], prompt_len=len(p))])
                             )[0, len(p):].tolist()
        assert ids == ref[:len(ids)] and (len(ids) == 16 or ids[-1] == tok.eos_token_id), (p, ids, ref)


def test_gemma3_tiny_models_answers_depend_on_the_window(tiny, tiny_gemma) -> None:
    """The test above can see a decoder that ignores the window: with the same weights and a window
    longer than every sequence, `generate` answers differently."""
    _, tok = tiny
    narrow, wide = tiny_gemma(), tiny_gemma(window=4096)
    prompts = encode(tok, PROMPTS + SENTENCES)
    assert any(plain_generate(narrow, tok, p, 12) != plain_generate(wide, tok, p, 12) for p in prompts)


@with_kernels
def test_gemma3_bfloat16_kernel_path_agrees_with_torch_attention(tiny, tiny_gemma) -> None:
    """Gemma 3 in bfloat16 with the 270M's head shape (head_dim 256, 4 query heads on one key-value head),
    through the C attention (with its window) and through torch's: every greedy pick is one the same
    weights in float32 rate within TINY_BF16_GAP of their favourite (teacher-forced along the path's text)."""
    import copy

    import torch

    _, tok = tiny
    model = tiny_gemma(head_dim=256, kv_heads=1).to(torch.bfloat16)
    model32 = copy.deepcopy(model).float()
    prompts = encode(tok, PROMPTS + SENTENCES)
    jobs = [Job(p, Sampling(temperature=0, max_tokens=12), 0) for p in prompts]
    fast = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=4, lanes=1)
    plain = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=4, lanes=1, kernel=False)
    assert fast.kernel is not None and plain.kernel is None
    for dec in (fast, plain):
        outs = dec.run(jobs)
        gaps = [g for p, ids in zip(prompts, outs, strict=True) for g in float32_gaps(model32, p, ids)]
        assert len(gaps) == sum(len(o) for o in outs) > 0
        assert max(gaps) <= TINY_BF16_GAP, (dec.kernel is not None, max(gaps))


# ---------------------------------------------------------------- a shared prompt prefix, prefilled once

FEW_SHOT = ("Decide whether each task is a classification task.\n\nTask: Sort the numbers.\nAnswer: No\n\n"
            "Task: Is the review positive?\nAnswer: Yes\n\nTask: ")
OTHER_SHOT = "Come up with examples for the following tasks, one per line, with an input where one is needed.\nTask: "


def few_shot_prompts(tok) -> list[list[int]]:
    """Two few-shot templates (two prefixes) around the test prompts, and two prompts without either."""
    texts = [FEW_SHOT + t for t in PROMPTS + SENTENCES] + [OTHER_SHOT + t for t in SENTENCES[:4]]
    return encode(tok, [*texts, *PROMPTS[:2]])


class Counting(FastDecoder):
    """The decoder, counting the shared prefixes it prefilled (to show the tests take that path)."""

    prefixes: list[int]

    def _prefix(self, prompt: list[int]) -> Any:
        self.prefixes = [*getattr(self, "prefixes", []), len(prompt)]
        return super()._prefix(prompt)


def test_shared_groups_group_by_common_prefix_and_keep_the_rest_in_order() -> None:
    def row(i: int, prompt: list[int], temperature: float = 0.0) -> _Row:
        return _Row(i, Job(prompt, Sampling(temperature=temperature), 0), None,  # type: ignore[arg-type]
                    length=len(prompt))

    head = list(range(100, 100 + SHARED_MIN))
    rows = [row(0, [1, 2, 3]), row(1, [*head, 7, 8]), row(2, [5, *head]), row(3, [*head, 7]), row(4, [*head, 9, 9, 9]),
            row(5, [*head, 4, 4, 4, 4]), row(6, [9, 9]), row(7, [*head, 8], temperature=0.7)]
    groups = shared_groups(rows)
    # a sampled row is never shared (its seeded text must not depend on last-bit differences)
    assert [(p, [r.index for r in g]) for p, g in groups] == [(0, [0, 2, 6, 7]), (SHARED_MIN, [3, 1, 4, 5])]
    assert shared_groups(rows[-1:]) == [(0, rows[-1:])]
    # never the whole of a prompt: the last token's logits come from the prefill
    twins = [row(0, [*head, 5]), row(1, [*head, 5]), row(2, [*head, 5, 1])]
    assert [(p, sorted(r.index for r in g)) for p, g in shared_groups(twins)] == [(SHARED_MIN, [0, 1, 2])]
    short = [row(0, head[:-2] + [1]), row(1, head[:-2] + [2])]  # common prefix one token below the minimum
    assert [(p, [r.index for r in g]) for p, g in shared_groups(short)] == [(0, [0, 1])]


@pytest.mark.parametrize("max_rows,lanes", [(16, 1), (5, 2)])
def test_shared_prefix_greedy_matches_generate(tiny, max_rows: int, lanes: int) -> None:
    """Prompts behind two few-shot templates: each template's prefix is prefilled once and copied to its
    rows; in float32 every row's greedy tokens are plain `generate`'s for that prompt alone (but for true
    ties, logits within 1e-4), as are those of the prompts without a template."""
    model, tok = tiny
    prompts = few_shot_prompts(tok)
    dec = Counting(model, eos_ids=[tok.eos_token_id], max_rows=max_rows, lanes=lanes)
    got = dec.run([Job(p, Sampling(temperature=0, max_tokens=12), 0) for p in prompts])
    assert len(dec.prefixes) >= 2 and min(dec.prefixes) >= SHARED_MIN, dec.prefixes
    for p, ids in zip(prompts, got, strict=True):
        expected = plain_generate(model, tok, p, 12)
        assert ids == expected or first_divergence_is_a_tie(model, p, ids, expected, tol=1e-4), (p, ids, expected)


def test_prefill_after_a_shared_prefix_gives_the_full_prefills_logits(tiny, tiny_gemma) -> None:
    """The last-token logits of prompts prefilled after their shared prefix equal those of the whole
    prompts prefilled from position 0, within 1e-4 in float32 (logits of the tiny models are of order
    10; only the order of float32 sums differs). Also for Gemma 3 with a window shorter than the prefix."""
    from pipeline.teachers.fast_decode import _Lane

    model, tok = tiny
    prompts = encode(tok, [FEW_SHOT + t for t in SENTENCES])
    shared = min(len(p) for p in prompts) - 1
    while len({tuple(p[:shared]) for p in prompts}) > 1:
        shared -= 1
    assert shared >= SHARED_MIN
    for m in (model, tiny_gemma()):
        dec = FastDecoder(m, eos_ids=[tok.eos_token_id], lanes=1)
        whole, split = _Lane(len(prompts)), _Lane(len(prompts))
        for lane in (whole, split):
            dec._ensure_capacity(lane, max(map(len, prompts)) + 1)
        full = dec._prefill(whole, 0, prompts)
        after = dec._prefill(split, 0, [p[shared:] for p in prompts], dec._prefix(prompts[0][:shared]))
        assert (full - after).abs().max() <= 1e-4
        for (k1, v1), (k2, v2) in zip(whole.cache, split.cache, strict=True):  # the same cache for decoding
            for i, p in enumerate(prompts):
                assert (k1[i, :, :len(p)] - k2[i, :, :len(p)]).abs().max() <= 1e-4
                assert (v1[i, :, :len(p)] - v2[i, :, :len(p)]).abs().max() <= 1e-4


def test_shared_prefix_gemma3_greedy_matches_generate(tiny, tiny_gemma) -> None:
    """Gemma 3 with sliding layers whose window is shorter than the shared prefix: the rest of each
    prompt sees only the window's part of the prefix, as in `generate`."""
    _, tok = tiny
    model = tiny_gemma()
    prompts = few_shot_prompts(tok)
    dec = Counting(model, eos_ids=[tok.eos_token_id], max_rows=16, lanes=1)
    got = dec.run([Job(p, Sampling(temperature=0, max_tokens=10), 0) for p in prompts])
    assert dec.prefixes and min(dec.prefixes) > GEMMA_WINDOW
    for p, ids in zip(prompts, got, strict=True):
        expected = plain_generate(model, tok, p, 10)
        assert ids == expected or first_divergence_is_a_tie(model, p, ids, expected, tol=1e-4), (p, ids, expected)


@with_kernels
def test_shared_prefix_bfloat16_kernel_path_picks_float32_near_favourites(tiny) -> None:
    """bfloat16 with the C attention reading the copied prefix: every greedy pick is one the same
    weights in float32 rate within SHARED_BF16_GAP of their favourite (as for the unshared path above)."""
    _, tok = tiny
    model, model32 = bf16_llama_and_float32_copy(tok)
    prompts = few_shot_prompts(tok)
    dec = Counting(model, eos_ids=[tok.eos_token_id], max_rows=8, lanes=1)
    assert dec.kernel is not None
    outs = dec.run([Job(p, Sampling(temperature=0, max_tokens=12), 0) for p in prompts])
    assert dec.prefixes
    gaps = [g for p, ids in zip(prompts, outs, strict=True) for g in float32_gaps(model32, p, ids)]
    assert max(gaps) <= SHARED_BF16_GAP, max(gaps)


# These prompts are three times as long as those of the unshared bf16 tests: on an AMD EPYC (avx512_bf16)
# the largest gap was 0.66 with the shared prefix and the same 0.66 without it (both attention paths);
# a prefix left out of the cache, or copied to the wrong positions, gives gaps of several units.
SHARED_BF16_GAP = 1.0


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_embedded_model_greedy_float32_matches_generate() -> None:
    """The hard requirement: float32 greedy tokens identical to plain batched `generate`, but for ties."""
    import torch

    from pipeline.io.models import EMBEDDED_ALIAS, load_model, load_tokenizer, resolve_model

    ref = resolve_model(EMBEDDED_ALIAS)
    model, tok = load_model(ref, dtype="float32", device="cpu"), load_tokenizer(ref)
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
    # Identical on the CPUs tried. Batch shapes differ between the two paths, so float32 sums may round
    # differently on another CPU's kernels; a difference is allowed only where the float32 model rates
    # the two tokens within 1e-3 of each other (a true tie), and at most one prompt in seven may show one.
    differing = [i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e]
    assert len(differing) <= 1, differing
    assert all(first_divergence_is_a_tie(model, prompts[i], got[i], expected[i], tol=1e-3) for i in differing)


def float32_gaps(model32, prompt: list[int], generated: list[int]) -> list[float]:
    """For each generated token, how far its float32 logit lies below the float32 favourite at that
    step (teacher-forced along `generated`): 0 where greedy float32 would pick the same token."""
    import torch

    with torch.inference_mode():
        logits = model32(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(generated)[:, None])[:, 0]
    return (logits.max(dim=1).values - chosen).tolist()


def first_divergence_is_a_tie(model32, prompt: list[int], a: list[int], b: list[int], tol: float) -> bool:
    """Two greedy texts agree up to their first difference, and there the float32 model can hardly tell
    the two tokens apart (logits within `tol`): a rounding tie, not a wrong computation."""
    import torch

    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if i is None:
        return True  # one is a prefix of the other: budgets and EOS are checked elsewhere
    with torch.inference_mode():
        logits = model32(torch.tensor([prompt + a[:i]])).logits[0, -1].float()
    return abs(float(logits[a[i]] - logits[b[i]])) <= tol


@pytest.mark.slow
def test_embedded_model_bfloat16_picks_only_float32_near_ties() -> None:
    """In bfloat16 the batch's shape and the CPU's bf16 kernels change rounding, so greedy texts of two
    paths drift apart at near-ties, differently on each CPU (AMD with avx512_bf16, Intel with AMX, or
    neither). What holds on every CPU: each token either path picks in bfloat16 is one the float32
    model rates within BF16_GAP of its favourite at that step (teacher-forced along the path's own
    text). A wrong kernel (a bad mask, a stale cache slot, a wrong rotary position) picks tokens far
    below the favourite (on the tiny model above, skipping one layer gave gaps up to 8.9).

    BF16_GAP = 1.0: bfloat16 keeps 8 significant bits (relative error 2^-9 per rounding); through 30
    layers the embedded model's logits (magnitudes up to ~30) move by a few tenths, and the largest
    gaps measured on an AMD EPYC with avx512_bf16 were 0.39 for the fast engine and 0.07 for `generate`
    (8 prompts x 48 tokens)."""
    from pipeline.io.models import EMBEDDED_ALIAS, load_model, load_tokenizer, resolve_model

    ref = resolve_model(EMBEDDED_ALIAS)
    model, model32 = load_model(ref, dtype="bfloat16", device="cpu"), load_model(ref, dtype="float32", device="cpu")
    tok = load_tokenizer(ref)
    texts = ["Write a haiku about autumn.", "List three prime numbers.", "Why is the sky blue?",
             "Give two tips for learning Python.", "Explain what a noun is.", "Name a famous painter.",
             "Describe a rainy day in one sentence.", "What is the boiling point of water?"]
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for t in texts]
    eos = tok.eos_token_id
    fast = FastDecoder(model, eos_ids=[eos], max_rows=len(prompts)).run(
        [Job(p, Sampling(temperature=0, max_tokens=48), 0) for p in prompts])
    plain = [plain_generate(model, tok, p, 48) for p in prompts]
    worst = largest_gaps(model32, prompts, {"fast": fast, "generate": plain})
    assert worst["fast"] <= BF16_GAP and worst["generate"] <= BF16_GAP, worst


BF16_GAP = 1.0


def largest_gaps(model32, prompts: list[list[int]], outputs: dict[str, list[list[int]]]) -> dict[str, float]:  # noqa: ANN001
    """Per path, the largest float32 gap of any bf16 greedy pick (a path may answer fewer prompts)."""
    worst = {}
    for name, outs in outputs.items():
        worst[name] = 0.0
        for p, ids in zip(prompts, outs, strict=False):
            assert ids, f"{name} produced nothing"
            worst[name] = max(worst[name], *float32_gaps(model32, p, ids))
    print(f"largest float32 gap of a bf16 greedy pick: {worst}")
    return worst


# ---------------------------------------------------------------- Gemma 3 270M (sift model fetch gemma-3-270m)

GEMMA_TEXTS = ["The capital of France is", "1. Sort the numbers.\n2. Translate the sentence.\n3.",
               "Once upon a time,", "def fibonacci(n):", "The three primary colors are", "Water boils at",
               "Instruction: Give two tips for learning Python.\nResponse:", "Q: What is a noun?\nA:"]


def gemma_or_skip(dtype: str) -> tuple[Any, Any]:
    from pipeline.errors import SiftError
    from pipeline.io.models import load_model, load_tokenizer, resolve_model

    try:
        ref = resolve_model("gemma-3-270m")
        return load_model(ref, dtype=dtype, device="cpu"), load_tokenizer(ref)
    except SiftError as e:
        pytest.skip(f"gemma-3-270m is not fetched here ({e})")


@pytest.mark.slow
def test_gemma3_270m_greedy_float32_matches_generate() -> None:
    """Gemma 3 270M (sliding window 512, 262K tied vocabulary) in float32: greedy tokens are plain
    `generate`'s for each prompt alone, but for true ties (float32 logits within 1e-3 at the first
    difference); identical on the CPU tried."""
    model, tok = gemma_or_skip("float32")
    prompts = [tok(t)["input_ids"] for t in GEMMA_TEXTS]
    got = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=4).run(
        [Job(p, Sampling(temperature=0, max_tokens=32), 0) for p in prompts])
    for p, ids in zip(prompts, got, strict=True):
        expected = plain_generate(model, tok, p, 32)
        assert ids == expected or first_divergence_is_a_tie(model, p, ids, expected, tol=1e-3), (p, ids, expected)


@pytest.mark.slow
def test_gemma3_270m_bfloat16_picks_only_float32_near_ties() -> None:
    """Gemma 3 270M in bfloat16 (the C attention with its window, the 262K-row output layer in bf16):
    every greedy pick of the fast engine and of `generate` is one the float32 model rates within
    GEMMA_BF16_GAP of its favourite, teacher-forced along the path's own text. Measured on an AMD EPYC
    with avx512_bf16 (8 prompts x 40 tokens): largest gap 0.06 to 0.09 for the fast engine, 0.01 for `generate`."""
    model, tok = gemma_or_skip("bfloat16")
    model32, _ = gemma_or_skip("float32")
    prompts = [tok(t)["input_ids"] for t in GEMMA_TEXTS]
    fast = FastDecoder(model, eos_ids=[tok.eos_token_id], max_rows=len(prompts)).run(
        [Job(p, Sampling(temperature=0, max_tokens=40), 0) for p in prompts])
    plain = [plain_generate(model, tok, p, 40) for p in prompts[:2]]  # generate is slow here: two suffice
    worst = largest_gaps(model32, prompts, {"fast": fast, "generate": plain})
    assert worst["fast"] <= GEMMA_BF16_GAP and worst["generate"] <= GEMMA_BF16_GAP, worst


# Gemma's logits reach ~40 and pass through 18 layers: as BF16_GAP for SmolLM2, a few tenths of movement
# is bf16 rounding; a wrong window or norm moves picks by whole units (the tiny model's mutations above).
GEMMA_BF16_GAP = 1.0


# ---------------------------------------------------------------- Ctrl-C

INTERRUPTED_RUN = """
import os, signal, sys, threading
from transformers import AutoModelForCausalLM, AutoTokenizer
from pipeline.teachers.base import Sampling
from pipeline.teachers.fast_decode import FastDecoder, Job

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="float32").eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
dec = FastDecoder(model, eos_ids=[], max_rows=4, lanes=2)
jobs = [Job(tok("a prompt")["input_ids"], Sampling(temperature=0, max_tokens=100 + i), 0) for i in range(40)]
lock, caught, steps, in_step = threading.Lock(), threading.Event(), [0], [0]
real_step = dec._step

def step(*args):  # the 5th decode step of either lane sends Ctrl-C from inside the step, and lingers there
    with lock:
        steps[0] += 1
        in_step[0] += 1
        fifth = steps[0] == 5
    try:
        if fifth:
            os.kill(os.getpid(), signal.SIGINT)
            caught.wait(2.0)  # without the fix, run() raises while this lane is still here
        return real_step(*args)
    finally:
        with lock:
            in_step[0] -= 1

dec._step = step
try:
    dec.run(jobs)
    print("finished")
except KeyboardInterrupt:
    with lock:
        print("lanes inside a step when run() raised:", in_step[0])
    caught.set()
    sys.exit(130)
"""


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A suite started in the background (nohup,
    `cmd &` in a script) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_lanes_before_run_returns(tmp_path) -> None:
    """SIGINT while two lanes decode (sent from inside a lane's step, which then lingers there):
    run() raises KeyboardInterrupt only once both lanes have left their loops, so the process exits
    130 instead of aborting ("terminate called without an active exception") with a lane still
    inside a torch op."""
    import subprocess
    import sys

    folder = make_tiny(tmp_path / "tiny")
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_RUN, str(folder)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, preexec_fn=_default_sigint)
    assert "terminate called" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 130 and "lanes inside a step when run() raised: 0" in done.stdout, (
        done.returncode, done.stdout, done.stderr[-2000:])


@pytest.mark.slow
def test_ctrl_c_during_sift_generate_exits_130_with_one_message(tmp_path) -> None:
    """`sift generate` on the embedded model, two lanes, interrupted in its second round (the first
    round's answers are in the teacher cache): exit 130, the one "interrupted" line, no abort."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.pipeline.kill_harness import _env, sift_ok

    runs = tmp_path / "runs"
    sift_ok(["seeds", "seeds/default.jsonl", "--run", "r"], runs=runs)
    cache = runs / "r" / "cache" / "teacher.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "generate", "--run", "r", "--generate.n", "500",
                             "--generate.batch_size", "8", "--generate.max_tokens", "96",
                             "--teacher.options", "lanes=2"],
                            cwd=REPO, env=_env(runs),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        while proc.poll() is None and not (cache.exists() and cache.stat().st_size):
            time.sleep(0.01)
        time.sleep(0.5)  # into the second round's decoding (not a bound: any moment inside it will do)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert "terminate called" not in err, err[-2000:]
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err.count("sift: interrupted; run the same command again to resume") == 1
