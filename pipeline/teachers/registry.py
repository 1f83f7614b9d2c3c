"""Backend name -> teacher: the one place a stage turns `--teacher.backend openai` into an object.

    teacher = make_teacher("openai", "Qwen/Qwen2.5-7B-Instruct", base_url="http://localhost:8000/v1")

Each backend module is imported only when asked for, so choosing `openai` never imports torch
and `sift --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from typing import Any

from pipeline.errors import SiftError
from pipeline.teachers.base import Teacher

# backend name -> (module, class); each class takes the model first, then keyword-only options
BACKENDS: dict[str, tuple[str, str]] = {
    "transformers": ("pipeline.teachers.hf", "TransformersTeacher"),
    "openai": ("pipeline.teachers.openai_compat", "OpenAITeacher"),
    "vllm": ("pipeline.teachers.vllm_engine", "VLLMTeacher"),
}


def teacher_class(backend: str) -> type:
    """The class behind a backend name; a SiftError lists the valid names."""
    if backend not in BACKENDS:
        raise SiftError(f"unknown teacher backend {backend!r}; valid: {', '.join(BACKENDS)}")
    module, name = BACKENDS[backend]
    return getattr(importlib.import_module(module), name)


def backend_options(backend: str) -> dict[str, Any]:
    """The keyword options a backend takes, with their defaults (inspect.Parameter.empty if required):
    its constructor's keyword-only parameters, and the fields of its OPTIONS dataclass if it keeps
    its own settings in one (the openai backend: more options than a signature should carry)."""
    cls = teacher_class(backend)
    params = inspect.signature(cls).parameters.values()
    found = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if dataclasses.is_dataclass(getattr(cls, "OPTIONS", None)):
        found.update({f.name: f.default for f in dataclasses.fields(cls.OPTIONS)})
    return found


def option_hints(backend: str) -> dict[str, Any]:
    """The type of each option of `backend_options`."""
    cls = teacher_class(backend)
    hints = typing.get_type_hints(cls.__init__)
    if dataclasses.is_dataclass(getattr(cls, "OPTIONS", None)):
        hints.update(typing.get_type_hints(cls.OPTIONS))
    return hints


def make_teacher(backend: str, model: str, **options: Any) -> Teacher:
    """Build a teacher; options set to None are left out, so the backend's default applies.

    Unknown or missing options end in a SiftError naming them, not a TypeError.
    """
    cls = teacher_class(backend)
    accepted = backend_options(backend)
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SiftError(f"teacher backend {backend!r} takes no option {', '.join(unknown)}; "
                        f"it takes: {', '.join(accepted) or 'none'}")
    missing = [k for k, default in accepted.items() if default is inspect.Parameter.empty and k not in options]
    if missing:
        raise SiftError(f"teacher backend {backend!r} needs {', '.join(missing)}")
    return cls(model, **options)
