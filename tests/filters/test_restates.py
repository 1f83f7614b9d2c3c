"""restates_instruction: the issue's example, what must pass, the engine and preset, and the measured
precision and recall recomputed from the hand-labelled samples of a real embedded-model run.

    .venv/bin/python -m pytest tests/filters/test_restates.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from filters import restates
from filters.engine import apply_rules
from filters.restates import MEASURED, restates_instruction
from filters.rules import PRESETS, parse_rules

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize(("instruction", "output"), [
    ("Provide a list of 5 ways to make coffee taste better.", "5 ways to make your favorite coffee taste better."),
    ("What is the best part of being in my own home?",
     "Being in my own home is the best part of being in my own home."),
    ("What do you love about yourself?", "You love yourself."),
    ("How can I create a new language learning app that uses AI?", "AI-powered language learning app"),
])
def test_an_answer_that_restates_its_instruction_is_dropped(instruction: str, output: str) -> None:
    assert restates_instruction(instruction, "", output) == "restates_instruction"


@pytest.mark.parametrize(("instruction", "input", "output"), [
    ("Is this review positive or negative?", "I loved it.", "Positive"),  # a short answer
    ("What is the capital of France?", "", "The capital of France is Paris."),  # one new word in three
    ("Correct the grammar of this sentence: She go to school every day.", "", "She goes to school every day."),
    ('Rewrite "the cat sat on the mat" in the passive voice.', "", "The mat was sat on by the cat."),
    ("Decide whether it is acceptable to have two tattoos.", "", "Yes, it is acceptable to have two tattoos."),
    ("Rewrite the sentence in the passive voice.", "The dog chased the ball.", "The ball was chased by the dog."),
    ("Provide a list of 5 ways to make coffee taste better.", "",
     "5 ways to make coffee taste better: add cinnamon, use fresh beans, grind them finely."),
    ("Name a color.", "", "It is what it is."),  # no content word at all: nothing to compare
])
def test_answers_that_answer_pass(instruction: str, input: str, output: str) -> None:
    assert restates_instruction(instruction, input, output) is None


def test_it_is_a_record_rule_of_the_self_instruct_preset() -> None:
    assert "restates_instruction" in PRESETS["self-instruct"] and "restates_instruction" not in PRESETS["alpaca"]
    records = [{"id": "a", "instruction": "What do you love about yourself?", "output": "You love yourself."},
               {"id": "b", "instruction": "What do you love about yourself?"},  # no output: not looked at
               {"id": "c", "instruction": "What do you love about yourself?", "output": "My patience."}]
    got = [reason for _, reason, _ in apply_rules(records, parse_rules("restates_instruction"))]
    assert got == ["restates_instruction", None, None]


def counts(name: str) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of the rule on a hand-labelled sample."""
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    flagged = [restates_instruction(r["instruction"], r["input"], r["output"]) is not None for r in rows]
    labels = [r["restates"] for r in rows]
    return (sum(f and x for f, x in zip(flagged, labels, strict=True)),
            sum(f and not x for f, x in zip(flagged, labels, strict=True)),
            sum(x and not f for f, x in zip(flagged, labels, strict=True)))


@pytest.mark.parametrize(("name", "size"), [("restates_labelled", 50), ("restates_heldout", 43)])
def test_the_stated_precision_and_recall_hold(name: str, size: int) -> None:
    """The samples: kept records of one embedded-model run, labelled by hand (the module says how);
    the docstring's figures come from these counts."""
    rows = (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == size
    tp, fp, fn = counts(name)
    assert (tp, fp, fn) == MEASURED[name]
    assert f"precision {tp}/{tp + fp}" in restates.__doc__ and f"recall {tp}/{tp + fn}" in restates.__doc__
    total = [sum(c) for c in zip(*MEASURED.values(), strict=True)]
    assert f"precision {total[0]}/{total[0] + total[1]}" in restates.__doc__
