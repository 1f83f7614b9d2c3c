"""Build the teacher a stage asks for from its command-line options, wrapped in the run's cache.

    teacher = open_teacher(run_dir, teacher="smollm2-135m-instruct", backend="transformers", batch_size=32)

Shared by `sift generate`, `sift classify` and `sift instances`, so the three take the same
options (`--teacher`, `--backend`, `--base-url`, `--api-key-env`) and share one cache,
runs/<run>/cache/teacher.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import SiftError
from pipeline.teacher_cache import CachedTeacher
from pipeline.teachers.base import Teacher

BACKENDS = ("transformers", "vllm", "openai")
CACHE_FILE = Path("cache") / "teacher.jsonl"


def make_backend(*, teacher: str, backend: str, batch_size: int, base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY") -> Teacher:
    """The uncached teacher (loads the model for in-process backends)."""
    if backend not in BACKENDS:
        raise SiftError(f"unknown backend {backend!r} (choose one of {', '.join(BACKENDS)})", field="backend")
    options: dict = {}
    if backend == "openai":
        if not base_url:
            raise SiftError("the openai backend needs --base-url (e.g. http://localhost:8000/v1)",
                            field="base_url")
        options.update(base_url=base_url, api_key_env=api_key_env)
    elif backend == "transformers":
        options["batch_size"] = batch_size  # vLLM schedules every pending request itself
    from pipeline.teachers.registry import make_teacher

    return make_teacher(backend, teacher, **options)


def open_teacher(directory: Path, *, teacher: str, backend: str, batch_size: int,
                 base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY") -> CachedTeacher:
    inner = make_backend(teacher=teacher, backend=backend, batch_size=batch_size, base_url=base_url,
                         api_key_env=api_key_env)
    return CachedTeacher(inner, directory / CACHE_FILE, backend=backend)
