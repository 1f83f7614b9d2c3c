"""IFD, r-IFD, length and reward scorers on tiny models built here, and IFD on the embedded model.

    .venv/bin/python -m pytest tests/train/test_scorers.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.train.conftest import make_model, make_tokenizer
from train.scorers import (
    REVERSE_PROMPT,
    ifd_scores,
    ifd_sequences,
    length_scores,
    prepare_tokenizer,
    reward_scores,
    rifd_scores,
    rifd_sequences,
)

RECORDS = [
    {"instruction": "what is the capital of france", "input": "", "output": "the capital of france is paris"},
    {"instruction": "name a primary color", "input": "", "output": "red is a primary color"},
    {"instruction": "translate hello to spanish", "input": "hello", "output": "hola"},
    {"instruction": "give three tips for staying healthy", "input": "",
     "output": "eat vegetables sleep well and walk every day"},
]


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer()
    prepare_tokenizer(tok)
    return make_model(len(tok)), tok


def reference_loss(model, prefix: list[int], answer: list[int]) -> float:
    """Mean cross-entropy of the answer tokens, one unpadded sequence, the whole logits tensor."""
    import torch

    ids = torch.tensor([prefix + answer])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return -sum(float(logp[len(prefix) - 1 + k, t]) for k, t in enumerate(answer)) / len(answer)


@pytest.mark.parametrize("path", ["engine, 2 lanes", "engine, 1 lane", "decoder"])
def test_ifd_matches_an_unbatched_float64_reference(tiny, path: str) -> None:
    """Through the fast engine's prefill in lanes (a plain Llama) or the model's own decoder (the same
    weights with attention biases declared, which the engine refuses): the same losses."""
    import copy

    from train.eval_passes import fast_supported
    from train.scorers import loss_ratios

    model, tok = tiny
    if path == "decoder":
        model = copy.deepcopy(model)
        model.config.attention_bias = True
    assert fast_supported(model) == path.startswith("engine")
    seqs = [ifd_sequences(tok, r) for r in RECORDS]
    pairs = loss_ratios(model, tok, seqs, batch_size=3, lanes=1 if path == "engine, 1 lane" else 2)
    got = ifd_scores(model, tok, RECORDS, batch_size=3)
    for res, (given, alone) in zip(got, pairs, strict=True):  # the lanes' thread counts may round differently
        assert (res["loss_given_prompt"], res["loss_alone"]) == (pytest.approx(given, rel=1e-5),
                                                                  pytest.approx(alone, rel=1e-5))
    got = [{"loss_given_prompt": given, "loss_alone": alone, "value": given / alone,
            "answer_tokens": res["answer_tokens"]} for res, (given, alone) in zip(got, pairs, strict=True)]
    for rec, res in zip(RECORDS, got, strict=True):
        prompt, empty, answer = ifd_sequences(tok, rec)
        given, alone = reference_loss(model, prompt, answer), reference_loss(model, empty, answer)
        assert res["loss_given_prompt"] == pytest.approx(given, rel=1e-4)
        assert res["loss_alone"] == pytest.approx(alone, rel=1e-4)
        assert res["value"] == pytest.approx(given / alone, rel=2e-4)
        assert res["answer_tokens"] == len(answer) > 0


def test_batch_size_does_not_change_scores(tiny) -> None:
    model, tok = tiny
    one = ifd_scores(model, tok, RECORDS, batch_size=1)
    many = ifd_scores(model, tok, RECORDS, batch_size=8)
    for a, b in zip(one, many, strict=True):
        assert a["value"] == pytest.approx(b["value"], rel=1e-4)


def test_the_two_sides_differ_only_by_the_instruction(tiny) -> None:
    _, tok = tiny
    prompt, empty, answer = ifd_sequences(tok, RECORDS[0])
    assert tok.decode(answer) == RECORDS[0]["output"]
    assert "capital" in tok.decode(prompt) and "capital" not in tok.decode(empty)
    # same template around both: the assistant header ends both prefixes
    assert prompt[-2:] == empty[-2:]


def test_a_model_that_ignores_its_context_gives_ifd_exactly_1(tiny) -> None:
    """Hand-checked: with every weight of the output layer zero, each token has probability 1/V
    whatever came before, so both losses are ln V and their ratio is 1."""
    import torch

    _, tok = tiny
    model = make_model(len(tok), seed=1)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    for res in ifd_scores(model, tok, RECORDS, batch_size=8):
        assert res["loss_given_prompt"] == pytest.approx(math.log(len(tok)), rel=1e-5)
        assert res["loss_alone"] == pytest.approx(math.log(len(tok)), rel=1e-5)
        assert res["value"] == pytest.approx(1.0, abs=1e-5)


def test_an_empty_answer_has_no_ifd(tiny) -> None:
    model, tok = tiny
    got = ifd_scores(model, tok, [{"instruction": "name a primary color", "output": "  "}, RECORDS[1]], batch_size=8)
    assert got[0] == {"value": None, "reason": "empty_answer", "answer_tokens": 0}
    assert got[1]["value"] > 0


def test_rifd_matches_an_unbatched_float64_reference(tiny) -> None:
    """r-IFD: the instruction's loss after the bridging prompt holding the answer, over its loss alone,
    each checked against one unpadded float64 pass over the whole logits tensor."""
    model, tok = tiny
    got = rifd_scores(model, tok, RECORDS, batch_size=3)
    for rec, res in zip(RECORDS, got, strict=True):
        prompt, empty, instruction = rifd_sequences(tok, rec)
        given, alone = reference_loss(model, prompt, instruction), reference_loss(model, empty, instruction)
        assert res["loss_given_answer"] == pytest.approx(given, rel=1e-4)
        assert res["loss_alone"] == pytest.approx(alone, rel=1e-4)
        assert res["value"] == pytest.approx(given / alone, rel=2e-4)
        assert res["instruction_tokens"] == len(instruction) > 0
    one = rifd_scores(model, tok, RECORDS, batch_size=1)
    assert [r["value"] for r in one] == pytest.approx([r["value"] for r in got], rel=1e-4)


def test_rifd_conditions_the_instruction_and_input_on_the_answer(tiny) -> None:
    _, tok = tiny
    record = RECORDS[2]  # with an input: the target is what the student sees, instruction then input
    prompt, empty, target = rifd_sequences(tok, record)
    assert tok.decode(target) == "translate hello to spanish hello"
    bridge = tok.decode(prompt)
    assert "hola" in bridge and "Below" in bridge and "hola" not in tok.decode(empty)
    assert REVERSE_PROMPT.startswith("Below is the response to an instruction")
    assert prompt[-2:] == empty[-2:]  # the same assistant header ends both prefixes


def test_a_model_that_ignores_its_context_gives_rifd_exactly_1(tiny) -> None:
    import torch

    _, tok = tiny
    model = make_model(len(tok), seed=1)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    for res in rifd_scores(model, tok, RECORDS, batch_size=8):
        assert res["loss_given_answer"] == pytest.approx(math.log(len(tok)), rel=1e-5)
        assert res["value"] == pytest.approx(1.0, abs=1e-5)


def test_an_empty_answer_or_instruction_has_no_rifd(tiny) -> None:
    model, tok = tiny
    got = rifd_scores(model, tok, [{"instruction": "name a primary color", "output": " "},
                                   {"instruction": "  ", "output": "hola"}, RECORDS[1]], batch_size=8)
    assert got[0] == {"value": None, "reason": "empty_answer", "instruction_tokens": 0}
    assert got[1]["value"] is None and got[1]["reason"] == "empty_instruction"
    assert got[2]["value"] > 0


def test_length_counts_words_and_characters() -> None:
    assert length_scores([{"output": "two  words\n"}, {"output": ""}]) == [
        {"value": 2, "chars": 11}, {"value": 0, "chars": 0}]


def test_reward_model_scores_match_its_own_logits(tmp_path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(config).eval()
    got = reward_scores(model, tok, RECORDS[:2], batch_size=2)
    for rec, res in zip(RECORDS[:2], got, strict=True):
        text = tok.apply_chat_template([{"role": "user", "content": rec["instruction"]},
                                        {"role": "assistant", "content": rec["output"]}], tokenize=False)
        with torch.no_grad():
            alone = float(model(**tok(text, return_tensors="pt")).logits[0, 0])
        assert res["value"] == pytest.approx(alone, rel=1e-4, abs=1e-5)


def test_ifd_on_the_embedded_model_copy_own_and_unrelated_answers() -> None:
    """On SmolLM2: an answer that copies the instruction and the instruction's own answer are
    easier with the instruction (IFD < 1); another task's answer is not (IFD > the own answer's)."""
    from pipeline.io.models import embedded_dir, load_model, load_tokenizer

    folder = embedded_dir()
    if not (folder / "config.json").is_file():
        pytest.skip("the embedded model is not converted here (sift model fetch)")
    model, tok = load_model(str(folder), dtype="float32", device="cpu"), load_tokenizer(str(folder))
    prepare_tokenizer(tok)
    instruction = "Translate the following sentence into French: The cat sleeps on the red sofa."
    recs = [{"instruction": instruction, "output": instruction},
            {"instruction": instruction, "output": "Le chat dort sur le canapé rouge."},
            {"instruction": instruction, "output": "Preheat the oven to 200 degrees and bake the bread for 40 min."}]
    copy, own, unrelated = (r["value"] for r in ifd_scores(model, tok, recs, batch_size=8))
    assert copy < 1 and own < 1
    assert unrelated > own
