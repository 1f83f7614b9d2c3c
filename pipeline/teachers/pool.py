"""Several teachers behind the one Teacher protocol: requests spread by shares, each teacher cached on
its own, every completion naming the teacher that wrote it.

    pool = open_teachers(run_dir, TeacherSettings(pool="teachers.yaml"), batch_size=16)   # or pool="a,b=2"
    completions = pool.generate(requests)       # completion.teacher = {name, model, identity, backend}

Each generate() call (a round of `sift generate`, a batch of classify or instances) is apportioned
afresh by `apportion`: request k goes to the teacher furthest below its share after k requests, so
every prefix of a call, and the call itself, gives each teacher its share to within one request,
and the same call on a resume gets the same assignment. A teacher that fails every request it is
sent in a call is marked down (`pool.down` says why): those requests go to the others, and so does
its share while it cools down, for 1, 2, 4, ... calls (at most COOL_DOWN_MAX) after 1, 2, 3, ...
such calls in a row (`Health`). Then it is sent its share again; the first request it serves
brings it back (`pool.recovered` counts the outages it came back from). When every teacher is down
or cooling down, all are tried at once rather than none. Each teacher keeps its own cache,
runs/<run>/cache/teachers/<name>.jsonl, and its own figures (`usage`: requests, tokens, seconds,
errors, cache hits). Without teacher.pool, `open_teachers` returns the single cached teacher as before.

`first_token_probs(requests, names=pool.assign(n))` (the judge's G-Eval rating, logprobs.py) asks
each request's member for its first-token distribution: a pool of judges gives log-probabilities
where its members do, and None for the requests of members that cannot.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import canonical_json
from pipeline.settings import TeacherSettings
from pipeline.teachers.base import Completion, Request, Teacher
from pipeline.teachers.cache import CachedTeacher, teacher_identity
from pipeline.teachers.specs import TeacherSpec, parse_teachers

CACHE_DIR = Path("cache") / "teachers"
USAGE_KEYS = ("requests", "tokens_in", "tokens_out", "teacher_seconds", "errors", "cache_hits")
COOL_DOWN_MAX = 16  # calls a down teacher sits out at most before it is tried again


def cool_down(failed_calls: int) -> int:
    """Calls a teacher sits out after `failed_calls` calls in a row in which it failed everything:
    1, 2, 4, ... up to COOL_DOWN_MAX (exponential backoff counted in calls, so a resumed run and a
    test see the same schedule whatever the clock says)."""
    return min(COOL_DOWN_MAX, 2 ** max(0, failed_calls - 1))


@dataclass
class Health:
    """Which members are down, since how many failed calls, and for how many more calls they rest.
    Shared by a pool and its `with_shares` copies."""

    down: dict[str, str] = field(default_factory=dict)  # name -> the error of its last all-failed call
    failed_calls: dict[str, int] = field(default_factory=dict)  # all-failed calls in a row
    resting: dict[str, int] = field(default_factory=dict)  # calls still to sit out
    recovered: dict[str, int] = field(default_factory=dict)  # outages a member came back from

    def start_call(self) -> set[str]:
        """The members that sit this call out (counting the call against their rest)."""
        out = {n for n, left in self.resting.items() if left > 0}
        for n in out:
            self.resting[n] -= 1
        return out

    def failed(self, name: str, why: str) -> None:
        self.failed_calls[name] = self.failed_calls.get(name, 0) + 1
        self.resting[name] = cool_down(self.failed_calls[name])
        self.down[name] = why

    def served(self, name: str) -> None:
        if name in self.down:
            self.recovered[name] = self.recovered.get(name, 0) + 1
        self.down.pop(name, None)
        self.failed_calls.pop(name, None)
        self.resting.pop(name, None)


def apportion(count: int, shares: Sequence[float]) -> list[int]:
    """The teacher index of each of `count` requests: each goes to the teacher with the largest
    deficit (its share of the requests so far, this one included, minus what it got), the first on
    ties. Every prefix gives teacher i within one request of prefix * share_i / sum(shares), and a
    zero share gets nothing."""
    total = float(sum(shares))
    if not shares or total <= 0:
        raise ValueError("apportion needs a positive share")
    weights = [s / total for s in shares]
    given = [0] * len(shares)
    out = []
    for k in range(1, count + 1):
        best = max(range(len(weights)), key=lambda j: (k * weights[j] - given[j], -j))
        given[best] += 1
        out.append(best)
    return out


@dataclass
class Member:
    """One teacher of a pool."""

    name: str
    teacher: Teacher  # usually a CachedTeacher over the backend
    share: float
    backend: str | None = None

    def provenance(self) -> dict:
        return {"name": self.name, "model": self.teacher.name,
                "identity": getattr(self.teacher, "identity", teacher_identity(self.teacher)),
                "backend": self.backend or getattr(self.teacher, "backend", None)}


class TeacherPool:
    """Implements the Teacher protocol over several members (see the module docstring)."""

    backend = "pool"

    def __init__(self, members: list[Member]) -> None:
        if not members:
            raise SiftError("a pool needs at least one teacher", field="teachers")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise SiftError(f"teacher names must differ: {names}", field="teachers")
        if not any(m.share > 0 for m in members):
            raise SiftError("every share is 0", field="teachers")
        self.members = {m.name: m for m in members}
        self.name = "+".join(names)
        # what the stages' journal fingerprints see: each member's identity and share
        self.identity = "pool:" + canonical_json([[m.name, m.provenance()["identity"], m.share] for m in members])
        self.health = Health()
        self.usage: dict[str, dict[str, float]] = {n: dict.fromkeys(USAGE_KEYS, 0) for n in names}
        self.last_usage: dict[str, dict[str, float]] = {}  # the last generate() call's, per member called

    @property
    def down(self) -> dict[str, str]:
        """The members down now (failed every request of their last call), with that call's error."""
        return self.health.down

    @property
    def recovered(self) -> dict[str, int]:
        return self.health.recovered

    @property
    def shares(self) -> dict[str, float]:
        return {n: m.share for n, m in self.members.items()}

    @property
    def hits(self) -> int:
        return sum(getattr(m.teacher, "hits", 0) for m in self.members.values())

    def with_shares(self, shares: dict[str, float]) -> TeacherPool:
        """The same loaded teachers with other shares (a loop round's); their health carries over."""
        pool = TeacherPool([replace(m, share=float(shares.get(n, 0.0))) for n, m in self.members.items()])
        pool.health, pool.usage = self.health, self.usage
        return pool

    def provenance(self, name: str) -> dict:
        return self.members[name].provenance()

    def describe(self) -> dict:
        return {"teachers": [{**m.provenance(), "share": m.share} for m in self.members.values()],
                "down": dict(self.down), "recovered": dict(self.recovered)}

    def assign(self, count: int) -> list[str]:
        """The member name of each of `count` requests, by share among the teachers not resting
        (among all of them when every one is)."""
        return self._assign(count, self._resting())

    def _resting(self) -> set[str]:
        out = {n for n, left in self.health.resting.items() if left > 0}
        return out if self._assign(1, out) else set()

    def _assign(self, count: int, out: set[str]) -> list[str]:
        """As `assign`, leaving out the members in `out` (resting, or failed in this call)."""
        live = [n for n, m in self.members.items() if m.share > 0 and n not in out]
        if not live:
            live = [n for n in self.members if n not in out]  # shares all gone to members left out
        if not live:
            return []
        shares = [self.members[n].share for n in live]
        if sum(shares) <= 0:
            shares = [1.0] * len(live)
        return [live[i] for i in apportion(count, shares)]

    def generate(self, requests: list[Request]) -> list[Completion]:
        return self.generate_for(requests, self.assign(len(requests)))

    def generate_for(self, requests: list[Request], names: Sequence[str | None]) -> list[Completion]:
        """Complete each request with the named member (None or a down member: reassigned by share)."""
        if len(names) != len(requests):
            raise ValueError(f"{len(names)} teacher names for {len(requests)} requests")
        results: list[Completion | None] = [None] * len(requests)
        self.last_usage = {}
        pending = list(range(len(requests)))
        wanted: list[str | None] = list(names)
        last_error: dict[int, Completion] = {}
        if not requests:
            return []
        out = self.health.start_call()  # resting members; those that fail in this call join them
        if not self._assign(1, out):
            out = set()  # every teacher is resting: try them all rather than none
        while pending:
            moved = [i for i in pending if wanted[i] is None or wanted[i] not in self.members
                     or wanted[i] in out]
            for i, name in zip(moved, self._assign(len(moved), out), strict=False):
                wanted[i] = name
            if moved and not self._assign(1, out):  # every teacher failed in this call: the last errors stand
                for i in pending:
                    results[i] = last_error.get(i) or Completion("", 0, 0, "error", error="every teacher is down")
                break
            by_member: dict[str, list[int]] = {}
            for i in pending:
                by_member.setdefault(str(wanted[i]), []).append(i)
            pending = []
            for name, positions in by_member.items():
                completions = self._call(name, [requests[i] for i in positions])
                prov = self.members[name].provenance()
                stamped = [replace(c, teacher=prov) for c in completions]
                if all(c.finish_reason == "error" for c in stamped):
                    self.health.failed(name, stamped[0].error or "error")
                    out.add(name)
                    for i, c in zip(positions, stamped, strict=True):
                        last_error[i] = c
                    pending += positions  # their share goes to the others
                    continue
                self.health.served(name)
                for i, c in zip(positions, stamped, strict=True):
                    results[i] = c
            pending.sort()
        return [r for r in results if r is not None]

    def supports_logprobs(self) -> bool:
        """True when any member can give a first-token distribution."""
        from pipeline.teachers.logprobs import supports_logprobs

        return any(supports_logprobs(m.teacher) for m in self.members.values())

    def first_token_probs(self, requests: list[Request], *, top: int = 20, include: Sequence[str] = (),
                          names: Sequence[str | None] | None = None) -> list[dict[str, float] | None]:
        """Each request's first-token distribution from the member named for it (`names`, as from
        `assign`; None or a down member: assigned by share), None where that member gives none."""
        from pipeline.teachers.logprobs import first_token_probs

        wanted = list(names) if names is not None else self.assign(len(requests))
        if len(wanted) != len(requests):
            raise ValueError(f"{len(wanted)} teacher names for {len(requests)} requests")
        resting = self._resting()
        moved = [i for i, n in enumerate(wanted) if n is None or n not in self.members or n in resting]
        for i, name in zip(moved, self.assign(len(moved)), strict=False):
            wanted[i] = name
        out: list[dict[str, float] | None] = [None] * len(requests)
        by_member: dict[str, list[int]] = {}
        for i, name in enumerate(wanted):
            if name in self.members:
                by_member.setdefault(str(name), []).append(i)
        for name, positions in by_member.items():
            dists = first_token_probs(self.members[name].teacher, [requests[i] for i in positions], top=top,
                                      include=include)
            if dists is None:
                continue
            if len(dists) != len(positions):
                raise RuntimeError(f"teacher {name} returned {len(dists)} distributions for {len(positions)} requests")
            for i, d in zip(positions, dists, strict=True):
                out[i] = d
        return out

    def _call(self, name: str, requests: list[Request]) -> list[Completion]:
        member = self.members[name]
        hits = getattr(member.teacher, "hits", 0)
        t0 = time.monotonic()
        completions = member.teacher.generate(requests)
        if len(completions) != len(requests):
            raise RuntimeError(f"teacher {name} returned {len(completions)} completions for {len(requests)} requests")
        figures = {"requests": len(requests), "tokens_in": sum(c.prompt_tokens for c in completions),
                   "tokens_out": sum(c.completion_tokens for c in completions),
                   "teacher_seconds": round(time.monotonic() - t0, 3),
                   "errors": sum(c.finish_reason == "error" for c in completions),
                   "cache_hits": getattr(member.teacher, "hits", 0) - hits}
        for table in (self.usage, self.last_usage):
            row = table.setdefault(name, dict.fromkeys(USAGE_KEYS, 0))
            for k, v in figures.items():
                row[k] = round(row[k] + v, 3)
        return completions


def open_pool(directory: Path | None, specs: list[TeacherSpec], *, batch_size: int) -> TeacherPool:
    """Load every teacher of `specs`, each wrapped in its own cache under runs/<run>/cache/teachers/
    (no cache with `directory` None: the score stage's judges, whose ratings its own cache keeps)."""
    from pipeline.teachers.options import make_backend

    members = []
    for spec in specs:
        inner = make_backend(teacher=spec.model, backend=spec.backend, batch_size=batch_size, base_url=spec.base_url,
                             api_key_env=spec.api_key_env, checked_options=spec.options)
        if directory is not None:
            inner = CachedTeacher(inner, directory / CACHE_DIR / f"{spec.name}.jsonl", backend=spec.backend)
        members.append(Member(spec.name, inner, spec.share, spec.backend))
    return TeacherPool(members)


def open_teachers(directory: Path | None, teacher: TeacherSettings, *, batch_size: int) -> Teacher:
    """The one place a teacher is built from settings: a TeacherPool with `teacher.pool`, else the single
    teacher, each cached under runs/<run>/cache/ (no cache with `directory` None: the judges, whose
    ratings their own stage's cache keeps). Every stage, judge and loop gets its teacher here, so every
    backend, option and pool works everywhere."""
    if not teacher.pool:
        from pipeline.teachers.options import make_backend, open_teacher

        if directory is None:
            return make_backend(teacher=teacher.model, backend=teacher.backend, batch_size=batch_size,
                                base_url=teacher.base_url, api_key_env=teacher.api_key_env,
                                teacher_options=teacher.options)
        return open_teacher(directory, teacher=teacher.model, backend=teacher.backend, batch_size=batch_size,
                            base_url=teacher.base_url, api_key_env=teacher.api_key_env,
                            teacher_options=teacher.options)
    return open_pool(directory, _specs(teacher), batch_size=batch_size)


def _specs(teacher: TeacherSettings) -> list[TeacherSpec]:
    return parse_teachers(teacher.pool or "", backend=teacher.backend, base_url=teacher.base_url,
                          api_key_env=teacher.api_key_env, teacher_options=teacher.options)


def check_teachers(teacher: TeacherSettings) -> list[dict] | None:
    """The resolved specs of `teacher.pool` (checked before any model loads), for the settings a stage
    records; None for a single teacher."""
    if not teacher.pool:
        return None
    return [s.to_dict() for s in _specs(teacher)]


def teacher_of(completion: Completion, teacher: Teacher) -> dict:
    """Provenance of who wrote a completion: the pool member, or the single teacher."""
    if completion.teacher:
        return completion.teacher
    return {"name": teacher.name, "identity": getattr(teacher, "identity", teacher.name),
            "backend": getattr(teacher, "backend", None)}
