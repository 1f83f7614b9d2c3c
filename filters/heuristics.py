"""Instruction rules of Self-Instruct and Stanford Alpaca, one small pure function each.

    .venv/bin/python -m pytest tests/filters/test_heuristics.py -q

Each rule takes the instruction and returns None to keep it or its snake_case reason to drop it.
Sources: yizhongw/self-instruct `self_instruct/bootstrap_instructions.py` and tatsu-lab/stanford_alpaca
`generate_instruction.py`, both in `post_process_gpt3_response`. Both references strip the instruction
before these checks (Self-Instruct also collapses whitespace and capitalises the first letter), so the
rules here strip it too; the other normalisation belongs to the stage that parses the teacher's output.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Callable, Mapping, Sequence

# Self-Instruct's list: words that need a modality a language model does not have.
BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures",
    "file", "files", "map", "maps", "draw", "plot", "go to",
)  # fmt: skip
# Alpaca's own full list: Self-Instruct's plus five more.
BLACKLIST_ALPACA = BLACKLIST + ("video", "audio", "music", "flowchart", "diagram")


def too_short(instruction: str, *, min_words: int = 4) -> str | None:
    """Fewer than `min_words` whitespace-separated words (both references: `len(inst.split()) <= 3`)."""
    return "too_short" if len(instruction.split()) < min_words else None


def too_long(instruction: str, *, max_words: int = 150) -> str | None:
    """More than `max_words` whitespace-separated words (both references: `len(inst.split()) > 150`)."""
    return "too_long" if len(instruction.split()) > max_words else None


@functools.cache
def _words_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    # The references search r"\b({word})\b" with re.IGNORECASE once per word; one alternation finds a
    # match exactly when one of those searches does.
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", flags=re.IGNORECASE)


def blacklist(instruction: str, *, words: Sequence[str] = BLACKLIST) -> str | None:
    """A blacklisted word or phrase, whole-word and case-insensitive (Self-Instruct's list)."""
    return "blacklist" if _words_pattern(tuple(words)).search(instruction) else None


def blacklist_alpaca(instruction: str, *, words: Sequence[str] = BLACKLIST_ALPACA) -> str | None:
    """Alpaca's blacklist: Self-Instruct's words plus video, audio, music, flowchart, diagram."""
    return "blacklist_alpaca" if _words_pattern(tuple(words)).search(instruction) else None


def write_a_program(instruction: str, *, prefix: str = "Write a program") -> str | None:
    """Starts with "Write a program", case-sensitive like both references (`inst.startswith(...)`)."""
    return "write_a_program" if instruction.strip().startswith(prefix) else None


def starts_with_punctuation(instruction: str) -> str | None:
    """First character in `string.punctuation` (both references: `inst[0] in string.punctuation`)."""
    text = instruction.strip()
    return "starts_with_punctuation" if text and text[0] in string.punctuation else None


def starts_non_ascii(instruction: str) -> str | None:
    """First character not ASCII (both references: `not inst[0].isascii()`)."""
    text = instruction.strip()
    return "starts_non_ascii" if text and not text[0].isascii() else None


RULES: dict[str, Callable[..., str | None]] = {
    "too_short": too_short,
    "too_long": too_long,
    "blacklist": blacklist,
    "blacklist_alpaca": blacklist_alpaca,
    "write_a_program": write_a_program,
    "starts_with_punctuation": starts_with_punctuation,
    "starts_non_ascii": starts_non_ascii,
}
# The references' instruction checks, in their order (ROUGE-L and instance rules: filters.rules).
PRESETS: dict[str, list[str]] = {
    "self-instruct": ["too_short", "too_long", "blacklist", "write_a_program", "starts_with_punctuation",
                      "starts_non_ascii"],
    "alpaca": ["too_short", "too_long", "blacklist_alpaca", "write_a_program", "starts_with_punctuation",
               "starts_non_ascii"],
}  # fmt: skip


def first_reason(
    record: Mapping[str, object] | str, rules: Sequence[str], options: Mapping[str, Mapping] | None = None
) -> str | None:
    """The reason of the first rule in `rules` that drops the instruction, or None to keep it.
    `record` is an instruction or a record with an "instruction"; `options` holds keyword arguments
    per rule name, e.g. {"too_short": {"min_words": 3}}."""
    text = record if isinstance(record, str) else str(record["instruction"])
    options = options or {}
    for name in rules:
        reason = RULES[name](text, **options.get(name, {}))
        if reason is not None:
            return reason
    return None
