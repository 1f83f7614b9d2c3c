"""The README stays true: the two commands, every command and every option appear in it."""

from __future__ import annotations

import re

import pytest

from pipeline.cli import COMMANDS
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_two_commands_and_ci_runs_the_readme_test_command() -> None:
    assert "make all" in README and "make test" in README
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.M)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_in_the_readme_and_its_options_in_docs(name: str) -> None:
    assert f"`sift {name}`" in README or f"sift {name}" in README
    assert "docs/options.md" in README
    assert f"### `sift {name}`" in (REPO / "docs" / "options.md").read_text()


def test_options_page_is_written_from_the_cli() -> None:
    """docs/options.md comes from the commands and the settings sections; after changing one, run
    `python -m pipeline.cli_docs`."""
    from pipeline import cli_docs

    assert (REPO / "docs" / "options.md").read_text() == cli_docs.options_page(), "run python -m pipeline.cli_docs"


def test_readme_is_a_front_door() -> None:
    assert len(README.encode()) < 15_000, f"README is {len(README.encode())} bytes; move detail into docs/"


def _links(text: str) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]


def test_every_link_resolves_and_every_page_is_reachable() -> None:
    pages = {REPO / "README.md"} | set((REPO / "docs").glob("*.md"))
    seen, todo = set(), [REPO / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen:
            continue
        seen.add(page)
        for target in _links(page.read_text()):
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.relative_to(REPO)} links to missing {target}"
            if path.suffix == ".md":
                todo.append(path)
    unreachable = sorted(str(p.relative_to(REPO)) for p in pages - seen)
    assert not unreachable, f"no link leads to {unreachable}"
