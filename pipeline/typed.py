"""Typed values from strings: a parameter's type hint turned into a converter.

Shared by the command line (`pipeline/cli.py`) and `--teacher-options` (`pipeline/teachers/options.py`),
so a value is checked the same way wherever it comes from.
"""

from __future__ import annotations

import math
import reprlib
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


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def short(value: Any) -> str:
    """A bounded repr for error messages: a config value can be a huge (or aliased) structure, and
    its full repr could take gigabytes."""
    return _SHORT.repr(value)


def converter(hint: Any, name: str) -> Callable[[Any], Any]:
    """A function turning a command-line string or a config value into the parameter's type."""
    base, optional = unwrap_optional(hint)
    choices = typing.get_args(base) if typing.get_origin(base) is typing.Literal else None

    def convert(value: Any) -> Any:
        if value is None and optional:
            return None
        if choices is not None:
            if value not in choices:
                raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {short(value)}")
            return value
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "yes", "1", "false", "no", "0"}:
                return value.lower() in {"true", "yes", "1"}
            raise ValueError(f"expected true or false, got {short(value)}")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()) \
                    or not isinstance(value, int | float | str):
                raise ValueError(f"expected an integer, got {short(value)}")
            try:
                return int(value)
            except (ValueError, OverflowError):
                raise ValueError(f"expected an integer, got {short(value)}") from None
        if base is float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(f"expected a number, got {short(value)}")
            try:
                number = float(value)
            except (ValueError, OverflowError):
                raise ValueError(f"expected a number, got {short(value)}") from None
            # NaN passes every range check (all comparisons are false) and infinity is never a setting
            if not math.isfinite(number):
                raise ValueError(f"expected a finite number, got {short(value)}")
            return number
        if base is Path:
            if not isinstance(value, str):
                raise ValueError(f"expected a path, got {short(value)}")
            return Path(value)
        if base is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError(f"expected a string, got {short(value)}")
            return str(value)
        return value

    convert.__name__ = getattr(base, "__name__", name)
    return convert
