"""The `sift` command line: one mapping from command name to function.

Each command is a plain function; its signature gives the options and its docstring the help
(summary line, then an `Args:` section). A parameter typed with a settings section of
`pipeline/settings.py` becomes nested flags (`--train.lr 1e-4`) and a config-file section
(`train:`), documented by the section's own docstring. Settings come from the defaults in
`pipeline/settings.py`, then a config file (`--config run.yaml`), then the command line; `--print-config`
shows the result. Usage: `sift --help`, `sift CMD --help`.

Why not jsonargparse (which litgpt uses)? This layer is about 300 lines and gives what sift's users rely on
and jsonargparse does not: one config file shared by every stage (each command takes the sections it
composes and ignores the rest, while an unknown or misplaced key anywhere is an error with a
did-you-mean), YAML read without aliases and with a size bound (an alias bomb cannot exhaust memory),
errors as one line naming file and field, and NaN refused in every float.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
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
from pipeline.redact import redact_urls
from pipeline.settings import SettingsError, is_section, to_dict
from pipeline.typed import converter, short, unwrap_optional

# command name -> "module:function"; a name with a space is a subcommand of a group.
COMMANDS: dict[str, str] = {
    "seeds": "pipeline.stages.seeds:seeds",
    "generate": "pipeline.stages.generate:generate",
    "classify": "pipeline.stages.classify:classify",
    "instances": "pipeline.stages.instances:instances",
    "filter": "pipeline.stages.filter:filter_records",
    "score": "pipeline.stages.score:score",
    "refine": "pipeline.stages.refine:refine",
    "export": "pipeline.stages.export:export",
    "train": "pipeline.stages.train:train",
    "merge": "pipeline.stages.merge:merge",
    "sample": "pipeline.stages.sample:sample",
    "eval": "pipeline.stages.eval:evaluate",
    "inspect": "pipeline.views.inspect:inspect_artifact",
    "view": "pipeline.views.viewer.command:view",
    "report": "pipeline.views.report:report",
    "loop": "pipeline.stages.loop:loop",
    "federate": "pipeline.stages.federate:federate",
    "clean": "pipeline.io.clean:clean",
    "model fetch": "pipeline.io.models:model_fetch",
    "model info": "pipeline.io.models:model_info",
}

_UNSET = object()
SHORT_FLAGS = {"output": "-o"}  # the few options common enough to deserve one letter
GLOBAL_KEYS = {"run"}  # plain options a config file may set at its top level, for every command that has one
EXCLUSIVE = {"teacher": ("model", "pool")}  # section -> two fields that cannot both be given


class _Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line like every other error (`sift: error: ...`, exit 2)."""

    def error(self, message: str) -> typing.NoReturn:
        raise SiftError(f"{message} (see `{self.prog} --help`)")


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


def section_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """A settings section's fields with their resolved type hints."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def plain_params(func: Callable[..., Any]) -> list[tuple[inspect.Parameter, Any]]:
    return [(p, h) for p, h in _params(func) if not is_section(h)]


def sections_of(func: Callable[..., Any]) -> list[tuple[inspect.Parameter, type]]:
    return [(p, h) for p, h in _params(func) if is_section(h)]


def _default_text(value: Any) -> str:
    return f" (default: {value!r})"


def _add_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup, flags: list[str], dest: str, hint: Any,
              help_text: str) -> None:
    base, _ = unwrap_optional(hint)
    if base is bool:
        p.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=_UNSET, help=help_text)
        return
    choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else None
    p.add_argument(*flags, dest=dest, type=_for_argparse(converter(hint, dest)), default=_UNSET, choices=choices,
                   metavar=dest.rpartition(".")[2].upper(), help=help_text)


def _for_argparse(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """argparse replaces a converter's ValueError by "invalid float value"; keep the converter's own
    reason ("expected a finite number, got 'nan'") by raising the one exception it passes through."""
    def wrapped(value: Any) -> Any:
        try:
            return convert(value)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    wrapped.__name__ = convert.__name__
    return wrapped


def add_command(sub: argparse._SubParsersAction, name: str, func: Callable[..., Any]) -> None:
    doc = parse_docstring(func.__doc__)
    # allow_abbrev off: `--train.l` must not quietly mean `--train.lr`, nor `--teacher` `--teacher.model`
    p = sub.add_parser(name, help=doc.summary, description=(doc.summary + "\n\n" + doc.description).strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, exit_on_error=False)
    p.set_defaults(_func=func, _name=name)
    _add_common(p)
    for param, hint in plain_params(func):
        help_text = doc.params.get(param.name, "")
        if param.kind is param.POSITIONAL_ONLY:
            nargs = "?" if param.default is not param.empty else None
            p.add_argument(param.name, type=_for_argparse(converter(hint, param.name)), help=help_text, nargs=nargs,
                           default=_UNSET)
            continue
        flags = [f"--{param.name.replace('_', '-')}"]
        if param.name in SHORT_FLAGS:
            flags.insert(0, SHORT_FLAGS[param.name])
        if "_" in param.name:
            flags.append(f"--{param.name}")
        default_text = "" if param.default is param.empty else _default_text(param.default)
        _add_flag(p, flags, param.name, hint, help_text + default_text)
    for param, cls in sections_of(func):
        cdoc = parse_docstring(cls.__doc__)
        group = p.add_argument_group(f"{param.name} (config section `{param.name}:`)", cdoc.summary)
        default = param.default if param.default is not param.empty else cls()
        for f, hint in section_fields(cls):
            flags = [f"--{param.name}.{f.name}"] + ([f"--{param.name}.{f.name.replace('_', '-')}"]
                                                    if "_" in f.name else [])
            _add_flag(group, flags, f"{param.name}.{f.name}", hint,
                      cdoc.params.get(f.name, "") + _default_text(getattr(default, f.name)))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="YAML or TOML settings: one section per component (teacher:, train:, ...), "
                        "`run:` at the top; the command line wins")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings as a config file and exit without running")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sift", description=__doc__.splitlines()[0] if __doc__ else "sift", allow_abbrev=False,
        exit_on_error=False,
        epilog="Stages in order: seeds, generate, classify, instances, filter, score, export, train, eval, report. "
               "Run `sift CMD --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"sift {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name in COMMANDS:
        func = load_command(name)
        if " " in name:
            group, leaf = name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands ({group} --help)")
                groups[group] = gp.add_subparsers(title=f"{group} commands", metavar="COMMAND", parser_class=_Parser)
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


def _yaml_without_aliases(text: str) -> Any:
    """YAML with anchors and aliases refused: nine nested aliases of nine items each are a billion
    elements once expanded (a 700-byte "billion laughs" file), and settings never need them."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed in a settings file",
                                           problem_mark=mark)
            return super().compose_node(parent, index)

    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_config(path: Path) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) settings file into a dict."""
    data = _config_bytes(path)
    try:
        if path.suffix == ".toml":
            import tomllib

            loaded = tomllib.loads(data.decode("utf-8"))
        else:
            loaded = _yaml_without_aliases(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SiftError("invalid UTF-8", path=path) from None
    except RecursionError:
        raise SiftError("invalid settings file: nested too deeply", path=path) from None
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


def _norm(key: Any) -> str:
    return str(key).replace("-", "_")


def config_schema() -> tuple[dict[str, type], dict[str, set[str]]]:
    """(section name -> its class, command name -> its own plain options) over every command: one file
    serves every stage, so a key is checked against all of them. A command named like a section
    (`filter`, `export`, ...) keeps its plain options in that section too (`filter: {seeds: ...}`)."""
    sections: dict[str, type] = {}
    plain: dict[str, set[str]] = {}
    for name in COMMANDS:
        func = load_command(name)
        for param, cls in sections_of(func):
            if sections.setdefault(param.name, cls) is not cls:
                raise TypeError(f"section {param.name!r} has two classes: {cls.__name__}, "
                                f"{sections[param.name].__name__}")
        plain[name.replace(" ", "_")] = {p.name for p, _ in plain_params(func) if p.kind is not p.POSITIONAL_ONLY}
    return sections, plain


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _suggest(word: str, dotted: list[str], *, exact: bool = False) -> str:
    """`; did you mean ...?` for a key: the sections' fields of that name (a key in the wrong place),
    else the closest names."""
    same = [d for d in dotted if d.rpartition(".")[2] == word]
    if not same and not exact:
        close = set(difflib.get_close_matches(word, sorted({d.rpartition(".")[2] for d in dotted}), n=1))
        same = [d for d in dotted if d.rpartition(".")[2] in close]
    if not same:
        return ""
    names = [f"`{d}`" for d in same[:3]]
    return f"; did you mean {', '.join(names[:-1]) + ' or ' if len(names) > 1 else ''}{names[-1]}?"


def check_config(raw: dict, path: Path) -> None:
    """Every key must be a known section and field, `run`, or a command's own plain option under its
    name: a typo or a key in the wrong section is an error naming it, never silently ignored."""
    sections, plain = config_schema()
    known_in = {k: {f.name for f in dataclasses.fields(cls)} for k, cls in sections.items()}
    for command, options in plain.items():
        known_in[command] = known_in.get(command, set()) | options
    dotted = sorted(f"{k}.{name}" for k, names in known_in.items() for name in names)
    for key, value in raw.items():
        k = _norm(key)
        if k in GLOBAL_KEYS:
            continue
        if k not in known_in:
            hint = _suggest(k, dotted, exact=True) or _did_you_mean(k, [*known_in, *GLOBAL_KEYS]) or _suggest(k, dotted)
            what = "section" if isinstance(value, dict) else "setting"
            raise SiftError(f"unknown {what}{hint}", path=path, field=str(key))
        if not isinstance(value, dict):
            raise SiftError(f"section `{k}` must be a mapping of settings, got {type(value).__name__}", path=path,
                            field=str(key))
        for sub in value:
            if _norm(sub) in known_in[k]:
                continue
            hint = _did_you_mean(_norm(sub), sorted(known_in[k]))
            hint = hint.replace("`", f"`{k}.", 1) if hint else _suggest(_norm(sub), dotted)
            raise SiftError(f"unknown setting in section `{k}`{hint}", path=path, field=f"{key}.{sub}")


def _from_config(config: dict, key: str) -> Any:
    return next((v for k, v in config.items() if _norm(k) == key), _UNSET)


def _convert(hint: Any, value: Any, *, field: str, path: Path | None) -> Any:
    try:
        return converter(hint, field)(value)
    except (ValueError, TypeError) as e:
        raise SiftError(str(e), path=path, field=field) from None


def _section(param: inspect.Parameter, cls: type, ns: argparse.Namespace, config: dict,
             path: Path | None) -> Any:
    """One settings section: its default, then the config file's section, then the flags."""
    default = param.default if param.default is not param.empty else cls()
    block = _from_config(config, param.name)
    block = {} if block is _UNSET else {_norm(k): v for k, v in block.items()}
    values, where = {}, {}
    for f, hint in section_fields(cls):
        dest = f"{param.name}.{f.name}"
        value = getattr(ns, dest, _UNSET)
        if value is not _UNSET:
            values[f.name], where[f.name] = value, None
        elif f.name in block:
            values[f.name], where[f.name] = _convert(hint, block[f.name], field=dest, path=path), path
    pair = EXCLUSIVE.get(param.name)
    # both given, and neither is a no-op (a printed config names the default model beside its pool)
    if pair and values.get(pair[1]) and values.get(pair[0], getattr(default, pair[0])) != getattr(default, pair[0]):
        a, b = (f"{param.name}.{n}" for n in pair)
        raise SiftError(f"give {a} or {b}, not both ({b} replaces {a})", path=where[pair[1]], field=b)
    try:
        return dataclasses.replace(default, **values)
    except SettingsError as e:
        raise SiftError(str(e), path=where.get(e.field), field=f"{param.name}.{e.field}") from None


def resolve_settings(func: Callable[..., Any], name: str, ns: argparse.Namespace) -> tuple[list, dict]:
    """Merge defaults < config file < command line into (positional args, keyword args)."""
    config: dict = {}
    if ns.config is not None:
        config = read_config(ns.config)
        check_config(config, ns.config)
    own = _from_config(config, name.replace(" ", "_"))
    own = {} if own is _UNSET else {_norm(k): v for k, v in own.items()}
    args, kwargs = [], {}
    for param, hint in _params(func):
        if is_section(hint):
            kwargs[param.name] = _section(param, hint, ns, config, ns.config)
            continue
        value = getattr(ns, param.name, _UNSET)
        if value is _UNSET and param.kind is not param.POSITIONAL_ONLY:
            raw = own.get(param.name, _from_config(config, param.name) if param.name in GLOBAL_KEYS else _UNSET)
            if raw is not _UNSET:
                value = _convert(hint, raw, field=param.name, path=ns.config)
        if value is _UNSET:
            if param.default is param.empty:
                raise SiftError(f"missing argument: {param.name}")
            value = param.default
        if param.kind is param.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[param.name] = value
    return args, kwargs


def effective_config(name: str, func: Callable[..., Any], kwargs: dict) -> dict:
    """The settings a command runs with, shaped as a config file (`--print-config`)."""
    out: dict[str, Any] = {k: v for k, v in kwargs.items() if k in GLOBAL_KEYS}
    sections = {p.name for p, _ in sections_of(func)}
    own = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()
           if k not in sections and k not in GLOBAL_KEYS and k in {p.name for p, _ in plain_params(func)
                                                                     if p.kind is not p.POSITIONAL_ONLY}}
    out.update(to_dict(**{k: v for k, v in kwargs.items() if k in sections}))
    if own:
        key = name.replace(" ", "_")
        out[key] = {**out.get(key, {}), **own}
    return out


def _unknown_option(parser: argparse.ArgumentParser, argv: list[str], extras: list[str]) -> SiftError:
    """argparse's "unrecognized arguments", with a did-you-mean over the command's own flags."""
    sub = parser
    for word in argv:  # walk down to the (sub)command's parser, where the flags are
        action = next((a for a in sub._actions if isinstance(a, argparse._SubParsersAction)), None)
        if action is None or word not in action.choices:
            continue
        sub = action.choices[word]
    flags = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    first = extras[0]
    word = first.split("=", 1)[0]
    if not word.startswith("-"):
        return SiftError(f"unexpected argument {short(first)}")
    in_section = [f for f in flags if f.startswith(word + ".") and "-" not in f[len(word) + 1:]]
    hint = f"; `{word}` is a section: {', '.join(in_section[:6])}" if in_section else _did_you_mean(word, flags)
    if not hint:
        nested = [f for f in flags if f.rpartition(".")[2] == word.lstrip("-").replace("-", "_")]
        hint = f"; did you mean `{nested[0]}`?" if nested else ""
    return SiftError(f"unknown option {word}{hint} (see `sift {sub.prog.removeprefix('sift ')} --help`)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("SIFT_DEBUG"))
    try:
        parser = build_parser()
        try:
            ns, extras = parser.parse_known_args(argv)
        except argparse.ArgumentError as e:  # a value the option cannot take: one line, like every error
            flag = (e.argument_name or "").split("/")[-1].lstrip("-")
            raise SiftError(e.message, field=None if flag in ("", "COMMAND") else flag) from None
        if extras:
            raise _unknown_option(parser, argv, extras)
        if not hasattr(ns, "_func"):
            parser.print_help()
            return 2
        args, kwargs = resolve_settings(ns._func, ns._name, ns)
        if ns.print_config:
            import yaml

            text = yaml.safe_dump(effective_config(ns._name, ns._func, kwargs), sort_keys=False)
            print(text.removesuffix("...\n").rstrip("\n"))  # PyYAML ends some documents with "..."
            return 0
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
        print(f"sift: internal error: {type(e).__name__}: {redact_urls(str(e))} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
