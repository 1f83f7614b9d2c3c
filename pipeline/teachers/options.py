"""Build the teacher a stage asks for from its `teacher:` settings, wrapped in the run's cache.

    teacher = open_teacher(run_dir, teacher="smollm2-135m-instruct", backend="transformers", batch_size=32)

Shared by `sift generate`, `sift classify` and `sift instances`, so the three take the same
settings (`--teacher.model`, `--teacher.backend`, `--teacher.base_url`, `--teacher.api_key_env`,
`--teacher.options`) and share one cache, runs/<run>/cache/teacher.jsonl.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.settings import API_KEY_ENV
from pipeline.teachers.base import Teacher
from pipeline.teachers.cache import CachedTeacher
from pipeline.typed import converter, short, unwrap_optional

BACKENDS = ("transformers", "vllm", "openai")
CACHE_FILE = Path("cache") / "teacher.jsonl"
OPTIONS_FIELD = "teacher.options"  # the setting errors about a backend's own options name


KINDS = {bool: "true or false", int: "an integer", float: "a number"}
# set by sift itself from its own settings, so teacher.options may not
RESERVED = {"base_url": "--teacher.base_url", "api_key_env": "--teacher.api_key_env",
            "batch_size": "the stage's batch_size (e.g. --generate.batch_size)", "on_batch": None}


def parse_teacher_options(text: str | None, backend: str) -> dict[str, Any]:
    """`--teacher.options "timeout=300,max_retries=10"` -> {"timeout": 300.0, "max_retries": 10}: the
    backend's own keyword options, each value converted to that option's type. An unknown key or a
    bad value is one SiftError naming it and listing what the backend takes."""
    if not text or not text.strip():
        return {}
    raw: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, eq, value = (x.strip() for x in item.partition("="))
        key = key.replace("-", "_")
        if not eq or not key:
            raise SiftError(f"expected key=value, got {item!r}", field=OPTIONS_FIELD)
        if key in raw:
            raise SiftError(f"{key} is given twice", field=OPTIONS_FIELD)
        raw[key] = value
    return check_teacher_options(raw, backend)


def check_teacher_options(raw: dict[str, Any], backend: str, *, field: str = OPTIONS_FIELD,
                          path: Path | None = None, line: int | None = None) -> dict[str, Any]:
    """The backend's own keyword options from raw values (strings from the command line, or typed
    values from a teachers file), each converted to the option's type; one SiftError otherwise."""
    from pipeline.teachers.registry import backend_options, option_hints

    hints = option_hints(backend)
    settable = {name: hints.get(name, str) for name in backend_options(backend)
                if name not in RESERVED and unwrap_optional(hints.get(name, str))[0] in (bool, int, float, str)}
    listing = ", ".join(f"{k} ({unwrap_optional(h)[0].__name__})" for k, h in settable.items())
    options: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key).replace("-", "_")
        if key in RESERVED and RESERVED[key]:
            raise SiftError(f"{key} has its own option: {RESERVED[key]}", field=field, path=path, line=line)
        if key not in settable:
            raise SiftError(f"the {backend} backend has no option {key!r}; it takes: {listing}",
                            field=field, path=path, line=line)
        hint = settable[key]
        given: Any = None if isinstance(value, str) and value.lower() == "none" and unwrap_optional(hint)[1] \
            else value
        kind = KINDS.get(unwrap_optional(hint)[0], "a string")
        try:
            converted = converter(hint, key)(given)
        except (ValueError, TypeError, OverflowError) as e:  # OverflowError: int(inf) from a YAML .inf
            reason = str(e) if "finite" in str(e) else f"expected {kind}, got {short(value)}"
            raise SiftError(f"{key}: {reason}", field=field, path=path, line=line) from None
        if isinstance(converted, float) and not math.isfinite(converted):  # nan, inf, 1e999: no setting means them
            raise SiftError(f"{key}: expected a finite number, got {value!r}", field=field, path=path, line=line)
        options[key] = converted
    return options


def make_backend(*, teacher: str, backend: str, batch_size: int, base_url: str | None = None,
                 api_key_env: str = API_KEY_ENV, teacher_options: str | None = None,
                 checked_options: dict[str, Any] | None = None) -> Teacher:
    """The uncached teacher (loads the model for in-process backends); `teacher_options` are the
    backend's own settings as key=value pairs (see `parse_teacher_options`), `checked_options` the
    same already converted (a teachers file's `options`)."""
    if backend not in BACKENDS:
        raise SiftError(f"unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})",
                        field="teacher.backend")
    own = {**parse_teacher_options(teacher_options, backend), **(checked_options or {})}
    options: dict = dict(own)
    if backend == "openai":
        if not base_url:
            raise SiftError("the openai backend needs --teacher.base_url (e.g. http://localhost:8000/v1)",
                            field="teacher.base_url")
        options.update(base_url=base_url, api_key_env=api_key_env)
    elif backend == "transformers":
        options["batch_size"] = batch_size  # vLLM schedules every pending request itself
    from pipeline.teachers.registry import make_teacher

    try:
        return make_teacher(backend, teacher, **options)
    except ValueError as e:  # the backend's own range checks (e.g. engine, lanes) on teacher.options
        if not own:
            raise
        raise SiftError(str(e), field=OPTIONS_FIELD) from None


def open_teacher(directory: Path, *, teacher: str, backend: str, batch_size: int,
                 base_url: str | None = None, api_key_env: str = API_KEY_ENV,
                 teacher_options: str | None = None) -> CachedTeacher:
    inner = make_backend(teacher=teacher, backend=backend, batch_size=batch_size, base_url=base_url,
                         api_key_env=api_key_env, teacher_options=teacher_options)
    return CachedTeacher(inner, directory / CACHE_FILE, backend=backend)
