"""The README stays true: the two commands, every command and every option appear in it."""

from __future__ import annotations

import re

import pytest

from pipeline.cli import COMMANDS, _params, load_command
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_two_commands_and_ci_runs_the_readme_test_command() -> None:
    assert "make all" in README and "make test" in README
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.M)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_documented(name: str) -> None:
    assert f"`sift {name}`" in README
    for param, _ in _params(load_command(name)):
        flag = param.name if param.kind is param.POSITIONAL_ONLY else "--" + param.name.replace("_", "-")
        assert f"`{flag}`" in README, f"README lacks {flag} of sift {name}"
