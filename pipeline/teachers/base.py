"""The teacher protocol every backend implements.

    completions = teacher.generate(requests)

A `Request` is a prompt (plain text for completion-style templates, or chat messages for
chat-style ones) plus its `Sampling`; a `Completion` is the text with token counts and the
finish reason ("stop": EOS or a stop string; "length": hit max_tokens). Per-request seeds make
sampled runs reproducible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "error"]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, with the names of the OpenAI API."""

    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0  # nucleus mass; 1 disables
    top_k: int = 0  # 0 disables
    max_tokens: int = 256  # new tokens at most
    presence_penalty: float = 0.0  # OpenAI-style additive penalty on tokens already generated
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    seed: int | None = None  # per-request seed; None: nondeterministic

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass(frozen=True)
class Request:
    """One prompt: `prompt` for plain-text completion, or `messages` for a chat template."""

    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a Request has exactly one of prompt or messages")
        if self.messages is not None:
            object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    error: str | None = None  # set when finish_reason == "error" (a request that failed for good)
    teacher: dict | None = None  # who answered, set by a TeacherPool: {name, model, identity, backend}


class Teacher(Protocol):
    """What every backend provides."""

    name: str  # model identity recorded in provenance, e.g. "smollm2-135m-instruct"

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Complete every request, in order. Backends batch or parallelise internally."""
        ...
