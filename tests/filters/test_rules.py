"""Rule names, presets and the --filter.rules parser; and filters/ stays free of pipeline/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from filters.rules import PRESETS, REASONS, RULES, parse_rules

FILTERS = Path(__file__).resolve().parents[2] / "filters"


def test_presets_follow_the_references() -> None:
    """The references' rules in their order; sift adds restates_instruction to self-instruct."""
    assert parse_rules("self-instruct") == [
        "too_short", "too_long", "blacklist", "write_a_program", "starts_with_punctuation", "starts_non_ascii",
        "rouge", "input_equals_output", "empty_output", "trailing_colon", "restates_instruction",
        "conflicting_outputs", "duplicate_instance", "too_many_instances",
    ]  # fmt: skip
    assert parse_rules("alpaca") == [
        "too_short", "too_long", "blacklist_alpaca", "write_a_program", "starts_with_punctuation",
        "starts_non_ascii", "rouge",
    ]  # fmt: skip
    assert all(rule in RULES for preset in PRESETS.values() for rule in preset)


def test_lists_and_mixtures() -> None:
    assert parse_rules("rouge") == ["rouge"]
    assert parse_rules("too_short,blacklist,rouge") == ["too_short", "blacklist", "rouge"]
    assert parse_rules(" too_short , rouge ,") == ["too_short", "rouge"]
    assert parse_rules("rouge,alpaca")[:2] == ["rouge", "too_short"]
    assert parse_rules("alpaca,rouge") == PRESETS["alpaca"]  # repeats dropped


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError) as err:
        parse_rules("too_short,rogue")
    message = str(err.value)
    assert "'rogue'" in message and "self-instruct" in message and "blacklist_alpaca" in message
    with pytest.raises(ValueError, match="no rules"):
        parse_rules(" , ")


def test_reasons_are_snake_case() -> None:
    assert REASONS["rouge"] == "rouge_duplicate"
    assert all(reason.isidentifier() and reason == reason.lower() for reason in REASONS.values())


def test_filters_import_nothing_from_pipeline() -> None:
    for path in FILTERS.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "pipeline" or n.startswith("pipeline.") for n in names), path
