"""Parsers of teacher output: table-driven on good, ragged and garbage responses, plus real
responses of the embedded model (tests/data/responses/, collected with scripts in its README)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.teachers.parsers import (
    parse_alpaca,
    parse_input_first,
    parse_input_output,
    parse_numbered_list,
    parse_output_first,
    parse_yes_no,
)

RESPONSES = Path(__file__).resolve().parents[1] / "data" / "responses"


def fixtures(name: str) -> list[dict]:
    path = RESPONSES / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- numbered list


@pytest.mark.parametrize("text, items, problems", [
    (" Write a poem about rain.\n10. Name three rivers in Africa.\n11. Sort the list of numbers.",
     ["Write a poem about rain.", "Name three rivers in Africa.", "Sort the list of numbers."], []),
    (" give me a haiku:\n10.  Explain   gravity\n   to a child.",
     ["Give me a haiku", "Explain gravity to a child."], []),
    ("\n10. Only the next one.", ["Only the next one."], []),  # empty continuation: not a problem
    (" 9. Restarted the numbering.\n10) Paren style.", ["Restarted the numbering.", "Paren style."], []),
    (" First.\n10.\n11. Third.", ["First.", "Third."], ["empty_item"]),
    ("", [], ["empty_response"]),
    ("   \n  ", [], ["empty_response"]),
    (" A task with a list inside: steps 1, 2 and 3.", ["A task with a list inside: steps 1, 2 and 3."], []),
    (" Keep iPhone casing.", ["Keep iPhone casing."], []),
    (" Convert the weight\n10.5 kg to pounds.", ["Convert the weight 10.5 kg to pounds."], []),
    (" Last one.\n10.", ["Last one."], ["empty_item"]),
])
def test_numbered_list(text: str, items: list[str], problems: list[str]) -> None:
    parsed = parse_numbered_list(text)
    assert parsed.items == items
    assert [p.reason for p in parsed.problems] == problems


def test_numbered_list_on_real_embedded_responses() -> None:
    rows = fixtures("self_instruct")
    assert len(rows) >= 6
    for row in rows:
        parsed = parse_numbered_list(row["text"])
        numbered = len(re.findall(r"\n\d+\. ", row["text"]))
        assert len(parsed.items) + len(parsed.problems) == numbered + 1, row["text"]
        for item in parsed.items:
            assert "\n" not in item and item == item.strip() and item[0].isupper()
            assert not re.match(r"\d+\.", item)
    first = parse_numbered_list(rows[0]["text"])
    assert first.items[0] == ("Provide a personal anecdote that demonstrates your ability to handle "
                              "a difficult situation.")
    assert first.items[1] == "Write a story about a person who has been a hero."


# ---------------------------------------------------------------- yes / no


@pytest.mark.parametrize("text, expected, problem", [
    (" Yes", True, None), (" No", False, None), ("yes.", True, None), ("NO\n", False, None),
    (" True", True, None), ("  no, it is not", False, None),
    ("", None, "empty_response"), (" Maybe", None, "not_yes_or_no"), ("123", None, "not_yes_or_no"),
    (" Nope", None, "not_yes_or_no"),
])
def test_yes_no(text: str, expected: bool | None, problem: str | None) -> None:
    parsed = parse_yes_no(text)
    assert parsed.items == ([] if expected is None else [expected])
    assert [p.reason for p in parsed.problems] == ([] if problem is None else [problem])


def test_yes_no_on_real_embedded_answers() -> None:
    rows = fixtures("classify")
    answers = [parse_yes_no(r["text"]).items for r in rows]
    assert all(len(a) == 1 for a in answers)
    by_task = {r["instruction"]: a[0] for r, a in zip(rows, answers, strict=True)}
    assert by_task["Classify the animal as a mammal or a bird."] is True
    assert by_task["Generate a one-sentence description for each of the following people."] is False


# ---------------------------------------------------------------- instances


@pytest.mark.parametrize("chunk, expected", [
    ("Input: 2, 3\nOutput: 5", ("2, 3", "5")),
    ("Paragraph: Rome is old.\nOutput: Rome", ("Paragraph: Rome is old.", "Rome")),
    ("Output:\n- a\n- b", ("", "- a\n- b")),
    ("just an answer", ("", "just an answer")),
    ("Input: x\nOutput: y\nInput: z\nOutput: w", ("x", "y")),
    ("Input 1: x\nOutput 1: y", ("x", "y")),
    ("- a\n- b\n\nOutput:\nA\n\nOutput:\nB", ("- a\n- b", "A")),
])
def test_input_output(chunk: str, expected: tuple[str, str]) -> None:
    assert parse_input_output(chunk) == expected


@pytest.mark.parametrize("text, truncated, n, problems", [
    ("\nExample 1\nInput: I walk.\nOutput: I walked.\nExample 2\nInput: We run.\nOutput: We ran.", False, 2, []),
    ("\nExample 1\nInput: I walk.\nOutput: I walked.\nExample 2\nInput: We run.\nOutput: We", True, 1,
     ["truncated_instance"]),
    ("Output: The Daily Loaf", False, 1, []),
    ("\nExample 1\nInput: a\nOutput:\nExample 2\nInput: b\nOutput: c", False, 1, ["empty_output"]),
    ("", False, 0, ["empty_response"]),
    ("Sure! Here you go.\nExample 1\nInput: a\nOutput: b", False, 1, ["text_before_examples"]),
    ("Output: fine\n\nTask: Another task\nOutput: not ours", False, 1, []),
])
def test_input_first(text: str, truncated: bool, n: int, problems: list[str]) -> None:
    parsed = parse_input_first(text, truncated=truncated)
    assert len(parsed.items) == n
    assert [p.reason for p in parsed.problems] == problems
    assert all(i["output"] for i in parsed.items)


@pytest.mark.parametrize("text, truncated, expected, problems", [
    ("Class label: Even\nInput: 4\nClass label: Odd\nInput: 7", False,
     [{"input": "Input: 4", "output": "Even"}, {"input": "Input: 7", "output": "Odd"}], []),
    ("Class label: Positive\nSentence: Great day.\nClass label: Neg", True,
     [{"input": "Sentence: Great day.", "output": "Positive"}], ["truncated_instance"]),
    ("Class label: apple", False, [{"input": "", "output": "apple"}], []),
    ("The answer is yes.", False, [], ["no_class_label"]),
    ("Class label:\n\nClass label: B\nx", False, [{"input": "x", "output": "B"}], ["empty_label"]),
    ("", False, [], ["empty_response"]),
])
def test_output_first(text: str, truncated: bool, expected: list[dict], problems: list[str]) -> None:
    parsed = parse_output_first(text, truncated=truncated)
    assert parsed.items == expected
    assert [p.reason for p in parsed.problems] == problems


def test_instances_on_real_embedded_responses() -> None:
    rows = fixtures("instances_input_first")
    parsed = [parse_input_first(r["text"], truncated=r["finish_reason"] == "length") for r in rows]
    assert parsed[0].items == [{"input": "", "output": "No, there is no such thing."}]
    assert parsed[1].items == [] and [p.reason for p in parsed[1].problems] == ["empty_output"]  # input, no output
    assert parsed[2].items == [] and parsed[2].problems[-1].reason == "truncated_instance"
    assert parsed[3].items[0]["input"].startswith("The company has a policy")
    for p in parsed:
        assert all(i["output"] and "Output:" not in i["output"] for i in p.items)


# ---------------------------------------------------------------- Alpaca

GOOD_ALPACA = (" Name a primary colour.\n4. Input:\n<noinput>\n4. Output:\nRed\n###\n"
               "5. Instruction: Add the numbers.\n5. Input:\n2, 3\n5. Output:\n5\n###\n"
               "6. Instruction: Reverse the word.\n6. Input:\nabc\n6. Output:\ncb")


@pytest.mark.parametrize("text, truncated, instructions, problems", [
    (GOOD_ALPACA, False, ["Name a primary colour.", "Add the numbers.", "Reverse the word."], []),
    (GOOD_ALPACA, True, ["Name a primary colour.", "Add the numbers."], ["truncated_chunk"]),
    (" Say hi.\n4. Output:\nhi\n###\n5. Instruction: Ok.\n5. Input:\n<noinput>\n5. Output:\nok", False,
     ["Ok."], ["malformed_chunk"]),
    (" Miscounted.\n7. Input:\n<noinput>\n9. Output:\nfine\n###\n", False, ["Miscounted."], []),
    (" Empty output.\n4. Input:\nx\n4. Output:\n", False, [], ["empty_field"]),
    ("", False, [], ["empty_response"]),
    ("lorem ipsum ### dolor", False, [], ["malformed_chunk", "malformed_chunk"]),
])
def test_alpaca(text: str, truncated: bool, instructions: list[str], problems: list[str]) -> None:
    parsed = parse_alpaca(text, start=4, truncated=truncated)
    assert [i["instruction"] for i in parsed.items] == instructions
    assert [p.reason for p in parsed.problems] == problems


def test_alpaca_noinput_becomes_empty_and_fields_are_kept() -> None:
    items = parse_alpaca(GOOD_ALPACA, start=4).items
    assert items[0] == {"instruction": "Name a primary colour.", "input": "", "output": "Red"}
    assert items[1] == {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"}


# ---------------------------------------------------------------- never raise


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab \n:.#<>19") + ["###", "Example 1", "Input:", "Output:", "Class label:",
                                                         "4. Instruction:", "\n10. "]), max_size=40).map("".join))
def test_no_parser_raises_on_any_text(text: str) -> None:
    for parsed in (parse_numbered_list(text), parse_yes_no(text), parse_input_first(text, truncated=True),
                   parse_output_first(text, truncated=True), parse_alpaca(text, start=4, truncated=True)):
        assert isinstance(parsed.items, list) and isinstance(parsed.problems, list)
        for p in parsed.problems:
            assert re.fullmatch(r"[a-z_]+", p.reason)


@pytest.mark.parametrize("garbage", [None, 17, b"bytes", "\x00\x01\x02", "🙂" * 50])
def test_garbage_inputs_give_problems_not_exceptions(garbage: object) -> None:
    items = parse_numbered_list(garbage).items  # type: ignore[arg-type]
    assert items == ([garbage] if isinstance(garbage, str) else [])
    assert parse_yes_no(garbage).problems  # type: ignore[arg-type]
    parse_input_first(garbage)  # type: ignore[arg-type]
    parse_output_first(garbage)  # type: ignore[arg-type]
    parse_alpaca(garbage, start=4)  # type: ignore[arg-type]
