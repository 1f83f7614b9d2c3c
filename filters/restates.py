"""An answer that only restates its instruction: "Provide a list of 5 ways to make coffee taste
better." answered "5 ways to make your favorite coffee taste better.".

    .venv/bin/python -m pytest tests/filters/test_restates.py -q

A record rule: it reads the instruction and the output of one record (the input is left out: an
answer that rewrites or corrects its input legitimately repeats it, and one that copies it is
input_equals_output's). Small teachers write such answers often: they echo the request and stop.
Not a rule of Self-Instruct or Alpaca; in sift's self-instruct preset.

Measured on the 93 kept records (filtered.jsonl) of an embedded-model run (configs/cpu-demo.yaml,
generate.n 100), hand-labelled as restating or not (restating: every content word of the answer is
the instruction's own or a trivial variant, and the answer is not a pick among alternatives the
instruction offers, a value it dictates, or a yes/no decision):
- the 50 of tests/data/restates_labelled.jsonl, which the rule was designed on: precision 5/5,
  recall 5/10;
- the other 43, tests/data/restates_heldout.jsonl, labelled before the rule was run on them:
  precision 4/6, recall 4/6 (its two false positives are "Never, never, never!" and "The sunset is
  the most beautiful thing you've ever seen." for `Answer "..." and explain why` instructions);
- all 93: precision 9/11 (0.82), recall 9/16 (0.56). It misses one- and two-word echoes ("Ball"
  for "How much does the ball cost?"), which cannot be told from a short answer by words alone.
tests/filters/test_restates.py recomputes these counts (MEASURED).
"""

from __future__ import annotations

import re

from filters.rouge import tokenize

# (true positives, false positives, false negatives) of the rule on each hand-labelled sample (see above)
MEASURED = {"restates_labelled": (5, 0, 5), "restates_heldout": (4, 2, 2)}
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
POLAR = frozenset({"yes", "no", "true", "false"})  # a decision's first word
_EMBEDDED = re.compile(r"[:\"“”«»]|(?<!\w)'(?=\w)")


def task_part(instruction: str) -> str:
    """The instruction up to the first colon or opening quotation mark: what it asks for."""
    m = _EMBEDDED.search(instruction)
    return instruction[:m.start()] if m else instruction


def content_words(text: str) -> list[str]:
    """rouge_score's tokens (lower-cased runs of [a-z0-9]) without the stopwords, then Porter-stemmed."""
    kept = [t for t in tokenize(text) if t not in STOPWORDS]
    return tokenize(" ".join(kept), use_stemmer=True) if kept else []


def restates_instruction(instruction: str, input: str, output: str, *, min_tokens: int = 3,
                         max_new_share: float = 0.2) -> str | None:
    """The answer (at least `min_tokens` tokens, so "Positive" or "Paris" pass) has content words and
    at most `max_new_share` of them are new: the rest are the instruction's own. Only the part of
    the instruction before an embedded text counts (`task_part`), so an answer that repeats the
    quoted material it was asked to work on passes; so does an answer that starts with a decision
    (yes, no, true, false): it takes a position, whatever words follow."""
    tokens = tokenize(output)
    if len(tokens) < min_tokens or tokens[0] in POLAR:
        return None
    words = content_words(output)
    if not words:
        return None
    asked = set(content_words(task_part(instruction)))
    new = sum(w not in asked for w in words)
    return "restates_instruction" if new <= max_new_share * len(words) else None
