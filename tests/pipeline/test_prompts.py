"""Prompt templates: loading by name and path, headers, placeholders, and the recipes' prompts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.recipes import alpaca, self_instruct
from pipeline.teachers import prompts
from pipeline.teachers.base import Sampling
from tests.conftest import REFERENCE_SEEDS

STAGE_FIELDS = {
    "self_instruct_generate": {"examples", "next"},
    "alpaca_generate": {"examples", "next"},
    "self_instruct_classify": {"instruction"},
    "self_instruct_instances_input_first": {"instruction"},
    "self_instruct_instances_output_first": {"instruction"},
}


def seeds() -> list[dict]:
    from pipeline.io.artifacts import read_jsonl

    return read_jsonl(REFERENCE_SEEDS)


@pytest.mark.parametrize("name", sorted(STAGE_FIELDS))
def test_every_shipped_prompt_has_exactly_its_stage_fields(name: str) -> None:
    t = prompts.load(name)
    assert t.kind == "completion"
    assert t.placeholders == STAGE_FIELDS[name]
    assert len(t.sha) == 16
    assert not t.body.startswith(("kind:", "about:", "---"))


def test_available_lists_the_shipped_prompts() -> None:
    assert set(STAGE_FIELDS) <= set(prompts.available())


def test_classify_prompt_has_twelve_yes_and_nineteen_no_examples() -> None:
    body = prompts.load("self_instruct_classify").body
    assert body.count("Is it classification? Yes") == 12
    assert body.count("Is it classification? No") == 19
    assert body.endswith("Task: {instruction}\nIs it classification?")


def test_render_by_path_with_header_braces_and_chat_kind(tmp_path: Path) -> None:
    p = tmp_path / "mine.txt"
    p.write_text("kind: chat\nsystem: Be brief.\n---\nSay {word} in {{json}}.\n", encoding="utf-8")
    t = prompts.load(str(p))
    assert (t.name, t.kind, t.system) == ("mine", "chat", "Be brief.")
    assert t.render(word="hi", unused=1) == "Say hi in {json}."
    req = t.request(Sampling(max_tokens=5), word="yo")
    assert req.prompt is None
    assert req.messages == ({"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Say yo in {json}."})


def test_a_file_without_header_is_all_body_and_completion(tmp_path: Path) -> None:
    p = tmp_path / "plain.txt"
    p.write_text("Note: this line looks like a header but no --- follows\n{instruction}\n", encoding="utf-8")
    t = prompts.load(p)
    assert t.kind == "completion"
    assert t.body == "Note: this line looks like a header but no --- follows\n{instruction}"
    assert prompts.render(t, instruction="X").endswith("\nX")


def test_missing_placeholder_is_a_sift_error_naming_the_file(tmp_path: Path) -> None:
    p = tmp_path / "gen.txt"
    p.write_text("List:\n{examples}\n{nxt}.", encoding="utf-8")
    with pytest.raises(SiftError, match=r"gen\.txt.*\{nxt\}"):
        prompts.render(str(p), examples="1. a", next=2)


@pytest.mark.parametrize("text, message", [
    ("kind: poem\n---\nhello", "kind: poem"),
    ("kind: chat\n---\n\n", "empty"),
])
def test_bad_templates_are_refused(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.txt"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(SiftError, match=message):
        prompts.load(p)


def test_unknown_names_and_missing_files_are_sift_errors(tmp_path: Path) -> None:
    with pytest.raises(SiftError, match="no prompt named 'nope'.*self_instruct_generate"):
        prompts.load("nope")
    with pytest.raises(SiftError, match="no such prompt file"):
        prompts.load(str(tmp_path / "absent.txt"))


def test_self_instruct_prompt_shows_six_seeds_two_machine_then_nine() -> None:
    pool = seeds()
    machine = [{"id": f"ins_{i}", "instruction": f"Machine task number {i}:"} for i in range(5)]
    fields, seed_ids, machine_ids = self_instruct.build_prompt(random.Random(1), pool, machine)
    text = prompts.render("self_instruct_generate", **fields)
    lines = text.splitlines()
    assert lines[0] == "Come up with a series of tasks:"
    assert [ln.split(".")[0] for ln in lines[1:9]] == [str(i) for i in range(1, 9)]
    assert lines[9] == "9." and text.endswith("\n9.")
    assert len(seed_ids) == 6 and len(machine_ids) == 2
    assert sum("Machine task number" in ln for ln in lines) == 2
    assert not any(ln.endswith(":") for ln in lines[1:9])  # trailing ':' stripped, as the reference
    again = self_instruct.build_prompt(random.Random(1), pool, machine)
    assert again == (fields, seed_ids, machine_ids)  # the rng alone decides


def test_self_instruct_prompt_without_machine_tasks_shows_eight_seeds() -> None:
    fields, seed_ids, machine_ids = self_instruct.build_prompt(random.Random(0), seeds(), [])
    assert len(seed_ids) == 8 and machine_ids == [] and fields["next"] == 9


def test_alpaca_prompt_shows_three_seed_tasks_with_noinput() -> None:
    pool = [{"id": "a", "instruction": "Name a colour.", "instances": [{"input": "", "output": "Red"}]},
            {"id": "b", "instruction": "Add the numbers.", "instances": [{"input": "2, 3", "output": "5"}]},
            {"id": "c", "instruction": "Say hi.", "instances": [{"input": "", "output": "Hi"}]}]
    fields, seed_ids, _ = alpaca.build_prompt(random.Random(0), pool, [])
    text = prompts.render("alpaca_generate", **fields)
    assert sorted(seed_ids) == ["a", "b", "c"]
    assert text.count("###\n") == 4 and text.endswith("###\n4. Instruction:")
    assert text.count("Input:\n<noinput>\n") == 2 and "Input:\n2, 3\n" in text
    assert "List of 20 tasks:" in text
