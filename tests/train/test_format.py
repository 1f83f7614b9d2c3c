"""train/format.py: prompt masking, the EOS label, pad token choice, templates, overlong examples."""

from __future__ import annotations

import pytest

from tests.train.conftest import make_tokenizer
from train.format import (
    IGNORE,
    NEW_PAD,
    DataError,
    check_messages,
    prompt_ids,
    setup_tokenizer,
    to_messages,
    tokenize_example,
    tokenize_records,
)

QA = to_messages("what is the capital of france", "", "the capital of france is paris")


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_prompt_masked_and_eos_label_kept(template: str) -> None:
    tok = make_tokenizer()
    info = setup_tokenizer(tok, template)
    assert info["template"] == template
    ex = tokenize_example(tok, QA)
    n_prompt = len(prompt_ids(tok, QA[:1]))
    assert ex.input_ids[:n_prompt] == prompt_ids(tok, QA[:1])  # generation sees exactly this prompt
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    answer = tok(" the capital of france is paris", add_special_tokens=False)["input_ids"]
    assert ex.labels[n_prompt:] == [*answer, tok.eos_token_id]  # the answer, then EOS, nothing after
    assert ex.input_ids[-1] == ex.labels[-1] == tok.eos_token_id
    assert tok.pad_token_id != tok.eos_token_id


def test_auto_template_follows_the_tokenizer() -> None:
    assert setup_tokenizer(make_tokenizer(), "auto")["template"] == "chat"
    base = make_tokenizer(chat_template=None)
    assert setup_tokenizer(base, "auto")["template"] == "alpaca"
    text = base.apply_chat_template(to_messages("name a primary color", "red", "red"), tokenize=False)
    assert "### Instruction:\nname a primary color\n\nred\n\n### Response:\nred<|im_end|>" in text
    with pytest.raises(ValueError, match="no chat template"):
        setup_tokenizer(make_tokenizer(chat_template=None), "chat")


def test_pad_reuses_a_special_token_distinct_from_eos() -> None:
    tok = make_tokenizer()
    assert tok.pad_token == tok.eos_token  # like SmolLM2
    n = len(tok)
    info = setup_tokenizer(tok, "chat")
    assert (info["pad_token"], info["added_tokens"], len(tok)) == ("<|endoftext|>", 0, n)


def test_pad_is_added_when_no_candidate_exists() -> None:
    tok = make_tokenizer(specials=["<|im_start|>", "<|im_end|>", "<oov>"], unk="<oov>")
    n = len(tok)
    info = setup_tokenizer(tok, "chat")
    assert info["pad_token"] == NEW_PAD and info["added_tokens"] == 1 and len(tok) == n + 1
    assert tok.pad_token_id != tok.eos_token_id


def test_eos_appended_when_the_template_has_none() -> None:
    tok = make_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    setup_tokenizer(tok, "chat")
    ex = tokenize_example(tok, QA)
    assert ex.labels[-1] == tok.eos_token_id and ex.labels.count(tok.eos_token_id) == 1


def test_overlong_examples_are_counted_dropped_truncated_or_refused() -> None:
    tok = make_tokenizer()
    setup_tokenizer(tok, "chat")
    short = to_messages("name a primary color", "", "red")
    long = to_messages("summarize the text below", "a short story about a cat and a dog " * 6, "a cat")
    records = [("a", short), ("b", long), ("c", short)]
    limit = len(tokenize_example(tok, short).input_ids) + 2
    kept, stats = tokenize_records(tok, records, max_length=limit)
    assert (len(kept), stats.examples, stats.dropped_overlong, stats.overlong_ids) == (2, 2, 1, ["b"])
    _, cut = tokenize_records(tok, records, max_length=limit, overlong="truncate")
    assert cut.dropped_overlong == 1 and cut.truncated == 0  # the prompt alone fills the limit
    kept, cut = tokenize_records(tok, records, max_length=len(tokenize_example(tok, long).input_ids) - 1,
                                 overlong="truncate")
    assert cut.truncated == 1 and max(len(e.input_ids) for e in kept) == cut.longest - 1
    with pytest.raises(DataError, match="'b' has .* tokens, more than max_length"):
        tokenize_records(tok, records, max_length=limit, overlong="error")


@pytest.mark.parametrize(("messages", "reason"), [
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "last message must be a non-empty assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "non-empty assistant"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "string 'role' and 'content'"),
    ([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "assistant", "content": "x"}], "no user message"),
])
def test_bad_messages_are_refused(messages: list, reason: str) -> None:
    with pytest.raises(DataError, match=reason) as err:
        check_messages(messages)
    assert err.value.field == "messages"
