"""A progress bar per stage (accepted of target, requests, tokens/s, ETA) and a closing summary.

The bar goes to stderr and only when stderr is a terminal (logs and CI stay clean; set
SIFT_PROGRESS=1 to force it, 0 to silence it). The summary is always printed: it is the
stage's one-paragraph answer to "what happened".
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import IO


def _enabled(stream: IO[str]) -> bool:
    forced = os.environ.get("SIFT_PROGRESS")
    if forced is not None:
        return forced not in ("", "0", "false", "no")
    return bool(getattr(stream, "isatty", lambda: False)())


class StageProgress:
    """tqdm bar over `total` units of work; the postfix carries requests and tokens/s."""

    def __init__(self, stage: str, total: int, *, unit: str = "rec", initial: int = 0,
                 stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.requests = 0
        self.tokens_out = 0
        self._bar = None
        if _enabled(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=min(initial, total), desc=stage, unit=unit,
                             file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def update(self, *, done: int = 0, requests: int = 0, tokens_out: int = 0, **counts: int) -> None:
        """Advance by `done` units; add requests and tokens made in this process (for tokens/s)."""
        self.requests += requests
        self.tokens_out += tokens_out
        if self._bar is None:
            return
        elapsed = max(time.monotonic() - self.started, 1e-9)
        post = {"req": self.requests, "tok/s": f"{self.tokens_out / elapsed:.0f}", **counts}
        self._bar.set_postfix(post, refresh=False)
        room = self._bar.total - self._bar.n if self._bar.total is not None else done
        self._bar.update(max(0, min(done, room)))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def format_summary(stage: str, stats: dict) -> str:
    """Lines like "generate: 100 accepted, 57 rejected (rouge_duplicate 30, ...)"."""
    rejected = stats.get("rejected_by_reason", {})
    parts = [f"{stage}: {stats.get('accepted', 0)} accepted, {sum(rejected.values())} rejected"]
    if rejected:
        parts[0] += " (" + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1])) + ")"
    parts.append(f"  requests {stats.get('requests', 0)} (cached {stats.get('cache_hits', 0)}), "
                 f"tokens in {stats.get('tokens_in', 0)}, out {stats.get('tokens_out', 0)}, "
                 f"wall {stats.get('wall_time_s', 0):.1f} s")
    for name, row in (stats.get("by_teacher") or {}).items():  # several teachers (teacher.pool)
        parts.append(f"  teacher {name}: {row.get('kept', 0)} accepted, {row.get('rejected', 0)} rejected; "
                     f"requests {row.get('requests', 0)}, tokens out {row.get('tokens_out', 0)}, "
                     f"{row.get('teacher_seconds', 0):.1f} s")
    for name, why in (stats.get("teachers_down") or {}).items():
        parts.append(f"  teacher {name} failed every request it was sent; its share went to the others: {why}")
    return "\n".join(parts)


def print_summary(stage: str, stats: dict, *, stream: IO[str] | None = None) -> None:
    print(format_summary(stage, stats), file=stream or sys.stderr)


_noted: set[str] = set()


def note(message: str, *, stream: IO[str] | None = None) -> None:
    """One line on stderr ("sift: note: ...") when sift falls back to something slower or recomputes:
    said once per process, so a fallback taken in a loop does not flood the log."""
    if message in _noted:
        return
    _noted.add(message)
    print(f"sift: note: {message}", file=stream or sys.stderr, flush=True)
