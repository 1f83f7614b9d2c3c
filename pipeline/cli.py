"""The `sift` command line: one mapping from command name to function.

Each command is a plain function; its signature gives the options and its docstring the help
(summary line, then an `Args:` section). Settings come from the function's defaults, then a
config file (`--config run.yaml`), then the command line. Usage: `sift --help`, `sift CMD --help`.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.errors import SiftError
from pipeline.typed import converter, unwrap_optional

# command name -> "module:function"; a name with a space is a subcommand of a group.
COMMANDS: dict[str, str] = {
    "seeds": "pipeline.stages.seeds:seeds",
    "generate": "pipeline.stages.generate:generate",
    "classify": "pipeline.stages.classify:classify",
    "instances": "pipeline.stages.instances:instances",
    "filter": "pipeline.stages.filter:filter_records",
    "score": "pipeline.stages.score:score",
    "export": "train.export:export",
    "train": "train.lora:train",
    "merge": "train.merge:merge",
    "sample": "train.sample:sample",
    "eval": "train.evaluate:evaluate",
    "inspect": "pipeline.views.inspect:inspect_artifact",
    "report": "pipeline.views.report:report",
    "loop": "pipeline.stages.loop:loop",
    "federate": "pipeline.stages.federate:federate",
    "clean": "pipeline.io.clean:clean",
    "model fetch": "pipeline.io.models:model_fetch",
    "model info": "pipeline.io.models:model_info",
}

_UNSET = object()
SHORT_FLAGS = {"output": "-o"}  # the few options common enough to deserve one letter
# an option that, given more than once, means the plural option: `--teacher a --teacher b` is `--teachers a,b`
REPEATED = {"teacher": "teachers"}


class _Repeatable(argparse.Action):
    """Collects every use of the option in a list; `resolve_settings` turns two or more into the plural."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        got = getattr(namespace, self.dest, _UNSET)
        setattr(namespace, self.dest, [values] if got is _UNSET else [*got, values])


class _Doc(typing.NamedTuple):
    summary: str
    description: str
    params: dict[str, str]


def parse_docstring(doc: str | None) -> _Doc:
    """Split a Google-style docstring into summary, description and per-argument help."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary = lines[0].strip() if lines else ""
    body, params, current = [], {}, None
    in_args = False
    for line in lines[1:]:
        if line.strip() in {"Args:", "Arguments:"}:
            in_args = True
            continue
        if in_args:
            m = re.match(r"^\s{2,8}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
            if m:
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif line.strip() and current and line.startswith(" " * 5):
                params[current] += " " + line.strip()
            elif line.strip() and not line.startswith(" "):
                in_args = False
                body.append(line)
        else:
            body.append(line)
    return _Doc(summary, "\n".join(body).strip(), params)


def load_command(name: str) -> Callable[..., Any]:
    module, func = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def _params(func: Callable[..., Any]) -> list[tuple[inspect.Parameter, Any]]:
    hints = typing.get_type_hints(func)
    return [(p, hints.get(p.name, str)) for p in inspect.signature(func).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def add_command(sub: argparse._SubParsersAction, name: str, func: Callable[..., Any]) -> None:
    doc = parse_docstring(func.__doc__)
    p = sub.add_parser(name, help=doc.summary, description=(doc.summary + "\n\n" + doc.description).strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(_func=func, _name=name)
    _add_common(p)
    for param, hint in _params(func):
        help_text = doc.params.get(param.name, "")
        conv = converter(hint, param.name)
        if param.kind is param.POSITIONAL_ONLY:
            nargs = "?" if param.default is not param.empty else None
            p.add_argument(param.name, type=conv, help=help_text, nargs=nargs, default=_UNSET)
            continue
        flags = [f"--{param.name.replace('_', '-')}"]
        if param.name in SHORT_FLAGS:
            flags.insert(0, SHORT_FLAGS[param.name])
        if "_" in param.name:
            flags.append(f"--{param.name}")
        default_text = "" if param.default is param.empty else f" (default: {param.default!r})"
        base, _ = unwrap_optional(hint)
        if base is bool:
            p.add_argument(*flags, dest=param.name, action=argparse.BooleanOptionalAction, default=_UNSET,
                           help=help_text + default_text)
        else:
            choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else None
            names = {q.name for q, _ in _params(func)}
            repeatable = REPEATED.get(param.name) in names
            if repeatable:
                help_text += f" Given more than once: several teachers, as --{REPEATED[param.name]} a,b."
            p.add_argument(*flags, dest=param.name, type=conv, default=_UNSET, choices=choices,
                           metavar=param.name.upper(), help=help_text + default_text,
                           **({"action": _Repeatable} if repeatable else {}))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="YAML or TOML settings: top-level keys, or a section named after the command")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sift", description=__doc__.splitlines()[0] if __doc__ else "sift",
        epilog="Stages in order: seeds, generate, classify, instances, filter, score, export, train, eval, report. "
               "Run `sift CMD --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"sift {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for name in COMMANDS:
        func = load_command(name)
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands ({group} --help)")
                groups[group] = gp.add_subparsers(title=f"{group} commands", metavar="COMMAND")
            add_command(groups[group], leaf, func)
        else:
            add_command(sub, name, func)
    return parser


MAX_CONFIG_BYTES = 1024 * 1024  # a settings file beyond 1 MiB is a wrong path, not settings


def _config_bytes(path: Path) -> bytes:
    """The settings file's bytes: only a regular file (a FIFO would block, /dev/zero never ends), at
    most MAX_CONFIG_BYTES."""
    import stat

    try:
        mode, size = (st := path.stat()).st_mode, st.st_size
    except FileNotFoundError:
        raise SiftError("no such file", path=path) from None
    except OSError as e:
        raise SiftError(f"cannot read: {e.strerror or e}", path=path) from None
    if stat.S_ISDIR(mode):
        raise SiftError("is a directory, expected a settings file", path=path)
    if not stat.S_ISREG(mode):
        raise SiftError("is not a regular file (a pipe, device or socket); --config takes a YAML or TOML file",
                        path=path)
    too_big = f"is larger than {MAX_CONFIG_BYTES // 1024} KiB; a settings file is far smaller (wrong path?)"
    if size > MAX_CONFIG_BYTES:
        raise SiftError(too_big, path=path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise SiftError(f"cannot read: {e.strerror or e}", path=path) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise SiftError(too_big, path=path)
    return data


def read_config(path: Path) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) settings file into a dict."""
    data = _config_bytes(path)
    try:
        if path.suffix == ".toml":
            import tomllib

            loaded = tomllib.loads(data.decode("utf-8"))
        else:
            import yaml

            loaded = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SiftError("invalid UTF-8", path=path) from None
    except Exception as e:  # yaml/toml parse errors carry their own line info
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(e, "lineno", None)
        raise SiftError(f"invalid settings file: {getattr(e, 'problem', None) or e}", path=path,
                        line=line) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SiftError("expected a mapping of settings", path=path)
    return loaded


def check_config_keys(raw: dict, path: Path) -> None:
    """Every top-level key must be an option of some sift command (one file serves every stage), and
    every section a command's name: a typo is an error naming it, never silently ignored."""
    import difflib

    sections = {n.replace(" ", "_") for n in COMMANDS}
    options = {p.name for n in COMMANDS for p, _ in _params(load_command(n))}
    for key, value in raw.items():
        norm = str(key).replace("-", "_")
        if norm in sections and (isinstance(value, dict) or norm not in options):  # `seeds` is both
            if not isinstance(value, dict):
                raise SiftError(f"section for `sift {norm.replace('_', ' ')}` must be a mapping of settings, got "
                                f"{type(value).__name__}", path=path, field=str(key))
            continue
        if isinstance(value, dict) and norm not in options:
            close = difflib.get_close_matches(norm, sorted(sections), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else f"; sections are named after commands: " \
                f"{', '.join(sorted(sections))}"
            raise SiftError(f"unknown section{hint}", path=path, field=str(key))
        if norm not in options:
            close = difflib.get_close_matches(norm, sorted(options), n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise SiftError(f"unknown setting: no sift command has this option{hint}", path=path, field=str(key))


def resolve_settings(func: Callable[..., Any], name: str, ns: argparse.Namespace) -> tuple[list, dict]:
    """Merge defaults < config file < command line into (positional args, keyword args)."""
    params = _params(func)
    config: dict = {}
    if ns.config is not None:
        raw = read_config(ns.config)
        check_config_keys(raw, ns.config)
        section_name = name.replace(" ", "_")
        section = raw.get(section_name, {})
        known = {p.name for p, _ in params}
        for key in section:
            if str(key).replace("-", "_") not in known:
                raise SiftError(f"unknown setting for `sift {name}`", path=ns.config, field=f"{section_name}.{key}")
        top = {str(k).replace("-", "_"): v for k, v in raw.items() if not isinstance(v, dict)}
        config = {k: v for k, v in top.items() if k in known}
        config.update({str(k).replace("-", "_"): v for k, v in section.items()})
    args, kwargs = [], {}
    for param, hint in params:
        value = getattr(ns, param.name, _UNSET)
        if value is _UNSET and param.name in config:
            try:
                value = converter(hint, param.name)(config[param.name])
            except (ValueError, TypeError) as e:
                raise SiftError(str(e), path=ns.config, field=param.name) from None
        if value is _UNSET:
            if param.default is param.empty:
                raise SiftError(f"missing argument: {param.name}")
            value = param.default
        if param.kind is param.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[param.name] = value
    defaults = {p.name: p.default for p, _ in params}
    for single, plural in REPEATED.items():
        given = kwargs.get(single)
        if not isinstance(given, list):
            continue
        if len(given) == 1:
            kwargs[single] = given[0]
            continue
        if getattr(ns, plural, _UNSET) is not _UNSET:
            raise SiftError(f"give --{single} more than once or --{plural}, not both", field=plural)
        kwargs[single], kwargs[plural] = defaults[single], ",".join(given)
    return args, kwargs


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("SIFT_DEBUG"))
    try:
        parser = build_parser()
        ns = parser.parse_args(argv)
        if not hasattr(ns, "_func"):
            parser.print_help()
            return 2
        args, kwargs = resolve_settings(ns._func, ns._name, ns)
        result = ns._func(*args, **kwargs)
        return int(result) if isinstance(result, int) else 0
    except SiftError as e:
        if debug:
            raise
        print(f"sift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sift: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure: one line unless --debug
        if debug:
            raise
        print(f"sift: internal error: {type(e).__name__}: {e} (run again with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
