"""An answer that only restates its instruction: "Provide a list of 5 ways to make coffee taste
better." answered "5 ways to make your favorite coffee taste better.".

    .venv/bin/python -m pytest tests/filters/test_restates.py -q

A record rule: it reads the instruction and the output of one record (the input is left out: an
answer that rewrites or corrects its input legitimately repeats it, and one that copies it is
input_equals_output's). Small teachers write such answers often: they echo the request as a title
and stop. Not a rule of Self-Instruct or Alpaca; measured in the rule's docstring.
"""

from __future__ import annotations

import re

from filters.rouge import tokenize

# Words that carry no content: an answer may add them without saying anything new.
STOPWORDS = frozenset("""
a an the and or but of to in on at for from by with about as into than then so if is are was were be been
being it its this that these those there here i you your yours we our my me he she they them their his her
do does did can could will would should may might must shall have has had not no yes very just also some any
all each every more most other such own same few many much how what which who whom whose when where why
sure okay ok please following below above let lets s t
""".split())
# The part of an instruction before an embedded text (a colon or a quotation mark) says what to do;
# what follows is material the answer may legitimately repeat ("Correct the grammar: She go home.").
_EMBEDDED = re.compile(r"[:\"“”«»]|(?<!\w)'(?=\w)")


def task_part(instruction: str) -> str:
    """The instruction up to the first colon or opening quotation mark: what it asks for."""
    m = _EMBEDDED.search(instruction)
    return instruction[:m.start()] if m else instruction


def content_words(text: str) -> list[str]:
    """Lower-cased, Porter-stemmed tokens (rouge_score's tokenizer) without the stopwords."""
    return [t for t in tokenize(text, use_stemmer=True) if t not in STOPWORDS]


def restates_instruction(instruction: str, input: str, output: str, *, min_words: int = 3,
                         max_new_share: float = 0.2) -> str | None:
    """The answer's content words (at least `min_words`, so "Positive" or "Paris" pass) are almost all
    the instruction's own: at most `max_new_share` of them are new. Only the part of the instruction
    before an embedded text counts (`task_part`), so an answer that repeats the quoted material it
    was asked to work on is not flagged.

    Measured precision and recall: see the docstring of RESTATES_MEASURED below, recomputed by
    tests/filters/test_restates.py from the hand-labelled sample in tests/data/restates_labelled.jsonl."""
    words = content_words(output)
    if len(words) < min_words:
        return None
    asked = set(content_words(task_part(instruction)))
    new = sum(w not in asked for w in words)
    return "restates_instruction" if new <= max_new_share * len(words) else None
