"""Instance rules, each checked by its reason string."""

from __future__ import annotations

from filters import instances as ins


def test_input_equals_output() -> None:
    assert ins.input_equals_output("Paris", "Paris") == "input_equals_output"
    assert ins.input_equals_output(" Paris\n", "Paris") == "input_equals_output"
    assert ins.input_equals_output("", "") == "input_equals_output"
    assert ins.input_equals_output("France", "Paris") is None


def test_empty_output() -> None:
    assert ins.empty_output("x", "") == "empty_output"
    assert ins.empty_output("x", "  \n") == "empty_output"
    assert ins.empty_output("", "42") is None


def test_trailing_colon() -> None:
    assert ins.trailing_colon("Here is the list:", "a, b") == "trailing_colon"
    assert ins.trailing_colon("x", "The answer is: \n") == "trailing_colon"
    assert ins.trailing_colon("Ratio 1:2", "It is 1:2 here") is None


def test_conflicting_outputs_drops_the_whole_task() -> None:
    assert ins.conflicting_outputs([("2+2", "4"), ("3+3", "6"), ("2+2", "5")]) == "conflicting_outputs"
    assert ins.conflicting_outputs([("2+2", "4"), ("2+2 ", " 4")]) is None  # exact repeats do not conflict
    assert ins.conflicting_outputs([("", "a poem"), ("", "another poem")]) is None  # empty inputs never conflict
    assert ins.conflicting_outputs([]) is None


def test_duplicate_instance_keeps_the_first() -> None:
    got = ins.duplicate_instance([("a", "1"), ("b", "2"), ("a", "1"), ("a ", "1"), ("a", "2")])
    assert got == [None, None, "duplicate_instance", "duplicate_instance", None]


def test_too_many_instances_keeps_five() -> None:
    assert ins.too_many_instances([("x", "y")] * 7) == [None] * 5 + ["too_many_instances"] * 2
    assert ins.too_many_instances([("x", "y")] * 3, max_instances=2) == [None, None, "too_many_instances"]
