"""The options page, written from the command line itself: `docs/options.md`.

    .venv/bin/python -m pipeline.cli_docs           # rewrite it after changing a command or a section
    .venv/bin/python -m pipeline.cli_docs --check   # exit 1 if it is stale (tests/test_readme.py)

Each command's signature gives its options, its docstring their help, and each settings section's
docstring its fields' help, as for `--help`, so the page cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.cli import COMMANDS, load_command, parse_docstring, plain_params, section_fields, sections_of

REPO = Path(__file__).resolve().parent.parent
OPTIONS_PAGE = REPO / "docs" / "options.md"

INTRO = """# Options

Written by `python -m pipeline.cli_docs` from the commands' signatures and the settings sections'
docstrings (`pipeline/settings.py`, where every default is defined once); back to the [README](../README.md).

Settings come in sections, one per component, the same section meaning the same thing in every
command that takes it: `teacher` serves generate, classify, instances, the score and eval judges and
loop; `train` serves train, loop and federate. On the command line a field is a nested flag
(`--teacher.model X`, `--train.lr 1e-4`; dashes or underscores); in a config file (`--config FILE`,
YAML or TOML) it is a key of its section:

```yaml
run: demo
teacher:
  model: Qwen/Qwen2.5-7B-Instruct
  backend: openai
  base_url: http://localhost:8000/v1
train:
  epochs: 2
```

One file serves every stage: each command reads the sections it composes; an unknown or misplaced
key is an error with a did-you-mean. The command line wins over the file, the file over the
defaults. `--print-config` prints a command's effective settings (a valid config file) and exits;
every command records them in the run's `manifest.json`. Every command also takes `--help` and
`--debug` (full traceback on errors). Errors print one line naming the file, line and field, and
exit non-zero; no half-written artifact is left behind. Boolean options also take a `--no-` form
(`--no-train.packing`). [configs/cpu-demo.yaml](../configs/cpu-demo.yaml) holds `make all`'s CPU
budgets, [configs/gpu-example.yaml](../configs/gpu-example.yaml) the GPU worked example's.
"""


def _flag(param) -> str:  # noqa: ANN001 - an inspect.Parameter
    return param.name if param.kind is param.POSITIONAL_ONLY else "--" + param.name.replace("_", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section_classes() -> dict[str, type]:
    found: dict[str, type] = {}
    for name in COMMANDS:
        for param, cls in sections_of(load_command(name)):
            found.setdefault(param.name, cls)
    return found


def options_page() -> str:
    """docs/options.md: each command with its own options and the sections it takes, then each section once."""
    parts = [INTRO, "## Commands\n"]
    for name in COMMANDS:
        func = load_command(name)
        doc = parse_docstring(func.__doc__)
        text = f"### `sift {name}`\n\n{doc.summary}\n"
        own = plain_params(func)
        if own:
            rows = ["| option | default | meaning |", "| --- | --- | --- |"]
            for param, _ in own:
                default = "required" if param.default is param.empty else repr(param.default)
                rows.append(f"| `{_flag(param)}` | {_cell(default)} | {_cell(doc.params.get(param.name, ''))} |")
            text += "\n" + "\n".join(rows) + "\n"
        taken = [f"[`{p.name}`](#{p.name})" for p, _ in sections_of(func)]
        if taken:
            text += f"\nSections: {', '.join(taken)}.\n"
        parts.append(text)
    parts.append("## Sections\n")
    for section, cls in _section_classes().items():
        doc = parse_docstring(cls.__doc__)
        users = [f"`{n}`" for n in COMMANDS if any(p.name == section for p, _ in sections_of(load_command(n)))]
        rows = ["| flag / key | default | meaning |", "| --- | --- | --- |"]
        for f, _ in section_fields(cls):
            rows.append(f"| `--{section}.{f.name}` | {_cell(repr(getattr(cls(), f.name)))} | "
                        f"{_cell(doc.params.get(f.name, ''))} |")
        parts.append(f"### {section}\n\n{doc.summary} (`{cls.__name__}`; taken by {', '.join(users)})\n\n"
                     + "\n".join(rows) + "\n")
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    page = options_page()
    if "--check" in argv:
        if not (OPTIONS_PAGE.exists() and OPTIONS_PAGE.read_text() == page):
            print(f"stale: {OPTIONS_PAGE}; run python -m pipeline.cli_docs", file=sys.stderr)
            return 1
        return 0
    OPTIONS_PAGE.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
