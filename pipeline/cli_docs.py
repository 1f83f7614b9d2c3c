"""The options pages, written from the command line itself: `docs/options.md` in full, and the README's
short list of every command's flags (between its `options:begin` and `options:end` markers).

    .venv/bin/python -m pipeline.cli_docs           # rewrite both after changing a command
    .venv/bin/python -m pipeline.cli_docs --check   # exit 1 if either is stale (tests/test_readme.py)

Each command's signature gives its options and its docstring their help, as for `--help`, so the
pages cannot drift from the code.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipeline.cli import COMMANDS, _params, load_command, parse_docstring

REPO = Path(__file__).resolve().parent.parent
OPTIONS_PAGE = REPO / "docs" / "options.md"
README = REPO / "README.md"
BEGIN, END = "<!-- options:begin (python -m pipeline.cli_docs) -->", "<!-- options:end -->"

INTRO = """# Options

Written by `python -m pipeline.cli_docs` from the commands' signatures and docstrings; back to the
[README](../README.md).

Every command takes `--help`, `--config FILE` (YAML or TOML: top-level keys apply to any command
that has that option, a section named after the command applies to it alone; the command line
wins) and `--debug` (full traceback on errors). Errors print one line naming the file, line and
field, and exit non-zero; no half-written artifact is left behind. Boolean options also take a
`--no-` form.
"""


def _flag(param) -> str:  # noqa: ANN001 - an inspect.Parameter
    return param.name if param.kind is param.POSITIONAL_ONLY else "--" + param.name.replace("_", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def options_page() -> str:
    """docs/options.md: one section per command, a table of option, default and meaning."""
    parts = [INTRO]
    for name in COMMANDS:
        func = load_command(name)
        doc = parse_docstring(func.__doc__)
        rows = ["| option | default | meaning |", "| --- | --- | --- |"]
        for param, _ in _params(func):
            default = "required" if param.default is param.empty else repr(param.default)
            rows.append(f"| `{_flag(param)}` | {_cell(default)} | {_cell(doc.params.get(param.name, ''))} |")
        parts.append(f"## `sift {name}`\n\n{doc.summary}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def readme_block() -> str:
    """The README's list: each command, its one-line summary, and its flags."""
    lines = [BEGIN]
    for name in COMMANDS:
        func = load_command(name)
        flags = " ".join(f"`{_flag(p)}`" for p, _ in _params(func))
        lines.append(f"- `sift {name}`: {parse_docstring(func.__doc__).summary} {flags}")
    lines.append(END)
    return "\n".join(lines)


def with_block(readme: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"{README}: no {BEGIN} ... {END} markers")
    return pattern.sub(lambda _: readme_block(), readme)


def main(argv: list[str]) -> int:
    page, readme = options_page(), README.read_text()
    new_readme = with_block(readme)
    if "--check" in argv:
        stale = [str(p) for p, ok in ((OPTIONS_PAGE, OPTIONS_PAGE.exists() and OPTIONS_PAGE.read_text() == page),
                                      (README, readme == new_readme)) if not ok]
        if stale:
            print(f"stale: {', '.join(stale)}; run python -m pipeline.cli_docs", file=sys.stderr)
            return 1
        return 0
    OPTIONS_PAGE.write_text(page)
    README.write_text(new_readme)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
