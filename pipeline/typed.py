"""Typed values from strings: a parameter's type hint turned into a converter.

Shared by the command line (`pipeline/cli.py`) and `--teacher-options` (`pipeline/teachers/options.py`),
so a value is checked the same way wherever it comes from.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); any other hint -> (hint, False)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False


def converter(hint: Any, name: str) -> Callable[[Any], Any]:
    """A function turning a command-line string or a config value into the parameter's type."""
    base, optional = unwrap_optional(hint)
    choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else None

    def convert(value: Any) -> Any:
        if value is None and optional:
            return None
        if choices is not None:
            if value not in choices:
                raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
            return value
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "yes", "1", "false", "no", "0"}:
                return value.lower() in {"true", "yes", "1"}
            raise ValueError(f"expected true or false, got {value!r}")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            return float(value)
        if base is Path:
            return Path(value)
        if base is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError(f"expected a string, got {value!r}")
            return str(value)
        return value

    convert.__name__ = getattr(base, "__name__", name)
    return convert
