"""Instruction rules, each checked by its reason string, and against the references' own code."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filters import heuristics as h
from filters import rules as rules_mod


def reference_word_check(inst: str, words: tuple[str, ...]) -> bool:
    """Both references: any(re.compile(r"\\b({0})\\b".format(w), flags=re.IGNORECASE).search(inst))."""
    return any(re.compile(r"\b({0})\b".format(w), flags=re.IGNORECASE).search(inst) for w in words)  # noqa: UP030, UP032


def test_word_count_bounds_are_inclusive() -> None:
    assert h.too_short("Name three primes") == "too_short"
    assert h.too_short("Name three prime numbers") is None
    assert h.too_short("") == "too_short"
    assert h.too_short("a  b\tc\nd") is None  # whitespace split, like str.split()
    assert h.too_long(" ".join(["word"] * 150)) is None
    assert h.too_long(" ".join(["word"] * 151)) == "too_long"
    assert h.too_short("Name primes", min_words=2) is None
    assert h.too_long("one two three", max_words=2) == "too_long"


@pytest.mark.parametrize(
    "text",
    ["Describe the image below.", "Draw a cat.", "Plot these numbers", "Go to the store and buy milk.",
     "Open the FILES folder", "Read the map", "Make a GRAPH", "(picture) of a dog", "go to"],
)  # fmt: skip
def test_blacklist_drops(text: str) -> None:
    assert h.blacklist(text) == "blacklist"
    assert h.blacklist_alpaca(text) == "blacklist_alpaca"


@pytest.mark.parametrize(
    "text",
    ["Write a paragraph about imagery.", "Summarize the profile of a drawer maker.", "Explain mapping in math",
     "Discuss the plotline of Hamlet", "Go tomorrow to the store", "Describe a graphical user interface"],
)  # fmt: skip
def test_blacklist_is_whole_word(text: str) -> None:
    assert h.blacklist(text) is None
    assert h.blacklist_alpaca(text) is None


def test_alpaca_blacklist_adds_five_words() -> None:
    for word in ("video", "audio", "music", "flowchart", "diagram"):
        text = f"Describe the {word.upper()} in two sentences"
        assert h.blacklist(text) is None
        assert h.blacklist_alpaca(text) == "blacklist_alpaca"
    assert set(h.BLACKLIST_ALPACA) - set(h.BLACKLIST) == {"video", "audio", "music", "flowchart", "diagram"}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("imagefplotdrwgh tosMAPÉ_-'.0")), max_size=40))
def test_blacklist_equals_the_reference_search(text: str) -> None:
    assert (h.blacklist(text) is not None) == reference_word_check(text, h.BLACKLIST)
    assert (h.blacklist_alpaca(text) is not None) == reference_word_check(text, h.BLACKLIST_ALPACA)


def test_write_a_program() -> None:
    assert h.write_a_program("Write a program that sorts a list.") == "write_a_program"
    assert h.write_a_program("  Write a program to add numbers") == "write_a_program"
    assert h.write_a_program("Write a poem about programs.") is None
    assert h.write_a_program("write a program that sorts") is None  # case-sensitive, as in both references
    assert h.write_a_program("Please write a program") is None


def test_starts_with_punctuation() -> None:
    for ch in string.punctuation:
        assert h.starts_with_punctuation(f"{ch} Describe the water cycle") == "starts_with_punctuation"
    assert h.starts_with_punctuation("Describe the water cycle.") is None
    assert h.starts_with_punctuation("1. Describe the water cycle") is None
    assert h.starts_with_punctuation("") is None


def test_starts_non_ascii() -> None:
    assert h.starts_non_ascii("¿Qué hora es? Tell me") == "starts_non_ascii"
    assert h.starts_non_ascii("日本について説明してください") == "starts_non_ascii"
    assert h.starts_non_ascii("Émile wrote a book, summarize it") == "starts_non_ascii"
    assert h.starts_non_ascii("Translate 日本 into English") is None
    assert h.starts_non_ascii("") is None


def test_presets_and_first_reason() -> None:
    assert rules_mod.preset("self-instruct") == h.PRESETS["self-instruct"]
    assert rules_mod.preset("alpaca") == h.PRESETS["alpaca"]
    assert rules_mod.preset("too_short,rouge,blacklist") == ["too_short", "blacklist"]
    with pytest.raises(ValueError, match="too_short"):
        rules_mod.preset("no_such_rule")
    rules = rules_mod.preset("self-instruct")
    assert h.first_reason({"instruction": "Draw"}, rules) == "too_short"
    assert h.first_reason("Draw a picture of a cat", rules) == "blacklist"
    assert h.first_reason("Write a program that can draw a cat", rules) == "blacklist"  # first failing rule wins
    assert h.first_reason("Write a program that adds two numbers", rules) == "write_a_program"
    assert h.first_reason("Explain how tides work to a child", rules) is None
    assert h.first_reason("Name two primes", rules, {"too_short": {"min_words": 3}}) is None
