"""A cache of teacher calls, so a rerun or an edited later stage recomputes only what changed.

    teacher = CachedTeacher(make_teacher(...), run_dir / "cache" / "teacher.jsonl")
    completions = teacher.generate(requests)   # only misses reach the real teacher

The key is the hash of (model identity, the backend's `describe()` settings, prompt or messages,
sampling including the per-request seed): two OpenAI-compatible servers serving the same model name,
or one vLLM model at two dtypes or context lengths, never share entries. Entries live in a
`Journal`, appended after each chunk of misses, so a kill loses at most the chunk in flight. Failed
requests (finish_reason "error") are not cached: a rerun retries them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.io.artifacts import Journal, canonical_json, content_id
from pipeline.teachers.base import Completion, Request, Teacher


def teacher_identity(teacher: Teacher) -> str:
    """What identifies a model for the cache: `identity` when a backend has one, else its name
    plus the dtype it computes in (bfloat16 and float32 sample different texts)."""
    identity = getattr(teacher, "identity", None)
    if identity:
        return str(identity)
    dtype = getattr(teacher, "dtype", None)
    return f"{teacher.name}|dtype={dtype}" if dtype else str(teacher.name)


PROVENANCE_ONLY = frozenset({"api_key_env"})  # describe() entries that do not change what the model writes


def cache_identity(teacher: Teacher) -> str:
    """What the cache keys on: `teacher_identity` plus every setting of the backend's describe()
    that can change its outputs (vLLM dtype and max_model_len, an OpenAI server's base URL, ...)."""
    identity = teacher_identity(teacher)
    describe = getattr(teacher, "describe", None)
    if not callable(describe):
        return identity
    settings = {k: v for k, v in describe().items() if k not in PROVENANCE_ONLY}
    return f"{identity}|{canonical_json(settings)}"


def request_key(identity: str, request: Request) -> str:
    payload = {"model": identity, "prompt": request.prompt,
               "messages": list(request.messages) if request.messages is not None else None,
               "sampling": request.sampling.to_dict()}
    return content_id(payload, "tc_")


class CachedTeacher:
    """Wraps any Teacher; same protocol. `hits`/`misses` count requests since construction."""

    def __init__(self, teacher: Teacher, journal_path: str | Path, *, chunk_size: int | None = None,
                 backend: str | None = None) -> None:
        self.teacher = teacher
        self.name = teacher.name
        self.backend = backend or getattr(teacher, "backend", None)  # recorded in provenance
        self.identity = teacher_identity(teacher)  # provenance and the stages' journal fingerprints
        self.cache_identity = cache_identity(teacher)
        self.journal = Journal(journal_path)
        self.chunk_size = chunk_size  # None: all misses of one generate() call in one teacher call
        self._cache: dict[str, dict] = {e["key"]: e["completion"] for e in self.journal.read()
                                        if isinstance(e.get("key"), str) and isinstance(e.get("completion"), dict)}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def generate(self, requests: list[Request]) -> list[Completion]:
        keys = [request_key(self.cache_identity, r) for r in requests]
        results: list[Completion | None] = [None] * len(requests)
        todo: dict[str, list[int]] = {}  # key -> positions (identical requests are asked once)
        for i, key in enumerate(keys):
            if key in self._cache:
                results[i] = Completion(**self._cache[key])
                self.hits += 1
            else:
                todo.setdefault(key, []).append(i)
        pending = list(todo)
        step = self.chunk_size or max(1, len(pending))
        for lo in range(0, len(pending), step):
            chunk = pending[lo:lo + step]
            completions = self.teacher.generate([requests[todo[k][0]] for k in chunk])
            if len(completions) != len(chunk):
                raise RuntimeError(f"teacher {self.name} returned {len(completions)} completions "
                                   f"for {len(chunk)} requests")
            entries = []
            for key, comp in zip(chunk, completions, strict=True):
                self.misses += 1
                for i in todo[key]:
                    results[i] = comp
                if comp.finish_reason != "error":
                    self._cache[key] = asdict(comp)
                    entries.append({"key": key, "completion": asdict(comp)})
            self.journal.append(entries)
        return [r for r in results if r is not None]
