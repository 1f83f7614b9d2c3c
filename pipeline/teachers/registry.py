"""Backend name -> teacher: the one place a stage turns `--teacher.backend openai` into an object.

    teacher = make_teacher("openai", "Qwen/Qwen2.5-7B-Instruct", base_url="http://localhost:8000/v1")

Each backend module is imported only when asked for, so choosing `openai` never imports torch
and `sift --help` stays fast.
"""

from __future__ import annotations

import importlib
import inspect
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
    """The keyword options a backend takes, with their defaults (inspect.Parameter.empty if required)."""
    params = inspect.signature(teacher_class(backend)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


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
