"""The pairwise judge's verdict parser: the first word of the reply, and nothing else.

    .venv/bin/python -m pytest -q tests/train/test_judge.py
"""

from __future__ import annotations

import pytest

from train.judge import parse_verdict


def test_an_article_a_later_in_the_reply_is_not_a_verdict_for_a() -> None:
    assert parse_verdict("Both are fine, but a slight edge to B") is None


@pytest.mark.parametrize(("reply", "verdict"), [
    ("A", "A"), ("b.", "B"), ("Tie", "tie"), ("tie: both equally good", "tie"), ("**B**", "B"), ("(A)", "A"),
    ("  B\nbecause it is complete", "B"), ("A is better, a clear win", "A"),
    ("B, though A has a good point", "B"),
])
def test_the_first_word_is_the_verdict(reply: str, verdict: str) -> None:
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize("reply", [
    "Answer A is better", "a better answer is B", "Both are good", "neither", "", "   ", "Ab", "tied", "I pick A",
])
def test_a_reply_whose_first_word_is_not_a_verdict_is_unreadable(reply: str) -> None:
    assert parse_verdict(reply) is None
