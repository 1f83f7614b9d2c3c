"""Evaluation-set contamination: word n-grams shared with held-out tasks.

    .venv/bin/python -m pytest tests/filters/test_contamination.py -q

The GPT-3 paper (Brown et al., 2020, appendix C) flags a training text that shares a 13-gram with an
evaluation example, words lower-cased and punctuation dropped; for evaluation texts shorter than 13
words it uses their whole text, from 8 words on. Short instructions are common in instruction sets
(the Self-Instruct seeds have a median of 11 words), so the index keeps those whole too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped (any script)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class NgramIndex:
    """The word n-grams of an evaluation set, plus its texts of min_len..n-1 words taken whole."""

    n: int
    min_len: int
    grams: frozenset[tuple[str, ...]]
    short_lengths: frozenset[int]  # lengths of the whole short texts stored in `grams`


def build_ngram_index(texts: Iterable[str], *, n: int = 13, min_len: int = 8) -> NgramIndex:
    """Index the evaluation texts (instructions, inputs, outputs) once; look candidates up after."""
    grams: set[tuple[str, ...]] = set()
    short: set[int] = set()
    for text in texts:
        w = words(text)
        if len(w) >= n:
            grams.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
        elif len(w) >= min_len:
            grams.add(tuple(w))
            short.add(len(w))
    return NgramIndex(n=n, min_len=min_len, grams=frozenset(grams), short_lengths=frozenset(short))


def ngram_overlap(text: str, index: NgramIndex) -> int:
    """How many of the text's word windows (n-grams, and windows the length of a short evaluation
    text) occur in the evaluation set."""
    w = words(text)
    hits = 0
    for size in {index.n, *index.short_lengths}:
        hits += sum(tuple(w[i : i + size]) in index.grams for i in range(len(w) - size + 1))
    return hits


def contaminated(text: str, index: NgramIndex, *, min_overlap: int = 1) -> str | None:
    """At least `min_overlap` shared windows with the evaluation set."""
    return "contaminated" if ngram_overlap(text, index) >= min_overlap else None
