"""What the viewer may show: a run's stages, funnels and artifacts, or the one file it was given.

Every path a request names is looked up here and only a file listed here is ever opened: the
JSON Lines files inside the root folder (or the one file given), resolved, symlinks included,
inside it. Anything else is refused, whatever `..`, absolute path or link the request holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError

# stage, its stats file, its kept artifacts, its rejected ledger (in pipeline order)
STAGES: tuple[tuple[str, str | None, tuple[str, ...], str | None], ...] = (
    ("seeds", "seeds.stats.json", ("seeds.jsonl",), None),
    ("generate", "generate.stats.json", ("instructions.jsonl",), "instructions.rejected.jsonl"),
    ("classify", "classify.stats.json", ("classified.jsonl",), "classified.rejected.jsonl"),
    ("instances", "instances.stats.json", ("instances.jsonl",), "instances.rejected.jsonl"),
    ("filter", "filter.stats.json", ("filtered.jsonl",), "filtered.rejected.jsonl"),
    ("score", "score.stats.json", ("scored.jsonl",), "scored.rejected.jsonl"),
    ("refine", "refine.stats.json", ("refined.jsonl",), "refined.rejected.jsonl"),
    ("export", None, ("train.jsonl", "valid.jsonl"), "export.rejected.jsonl"),
)
SKIPPED_DIRS = {"checkpoints", "merged", "__pycache__"}  # model folders: no records to read
KEPT_FOR = {rej: kept[0] for _, _, kept, rej in STAGES if rej}  # a ledger -> the artifact it was cut from


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class Stage:
    name: str
    stats: dict[str, Any]
    kept: list[str]
    rejected: str | None
    funnel: list[dict[str, Any]] = field(default_factory=list)


class Catalog:
    """The files a viewer serves: a run folder's JSONL artifacts, or a single file."""

    def __init__(self, root: Path, *, single: Path | None = None) -> None:
        self.root = root.resolve()
        self.single = single.resolve() if single is not None else None

    @classmethod
    def for_run(cls, directory: Path) -> Catalog:
        if not directory.is_dir():
            raise SiftError("no such run folder (run `sift seeds` first, or check --run)", path=directory)
        return cls(directory)

    @classmethod
    def for_file(cls, path: Path) -> Catalog:
        if not path.is_file():
            raise SiftError("no such file", path=path)
        return cls(path.resolve().parent, single=path)

    @property
    def is_run(self) -> bool:
        return self.single is None

    def artifacts(self) -> list[str]:
        """Every viewable file, relative to the root, stage artifacts first."""
        if self.single is not None:
            return [self.single.name]
        found = []
        for p in sorted(self.root.rglob("*.jsonl")):
            rel = p.relative_to(self.root)
            if any(part.startswith(".") or part in SKIPPED_DIRS for part in rel.parts[:-1]) or p.name.startswith("."):
                continue
            if p.is_file() and p.resolve().is_relative_to(self.root):
                found.append(rel.as_posix())
        order = {name: i for i, (_, _, kept, rej) in enumerate(STAGES) for name in (*kept, rej) if name}
        return sorted(found, key=lambda n: (order.get(n, len(STAGES)), n))

    def resolve(self, name: str) -> Path:
        """The file behind a request's artifact name; anything not listed is refused."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise PermissionError("no file named")
        if self.single is not None:
            if name != self.single.name:
                raise PermissionError(f"{name!r} is not the file this viewer serves")
            return self.single
        target = (self.root / name).resolve()
        if not target.is_relative_to(self.root) or not target.is_file() or name not in self.artifacts():
            raise PermissionError(f"{name!r} is not an artifact of this run")
        return target

    def index_file(self, name: str) -> Path:
        """Where an artifact's index lives: .view/ beside the artifacts."""
        return self.root / ".view" / (name.replace("/", "__") + ".sqlite")

    def stages(self) -> list[Stage]:
        """The run's stages that left something, with their stats and funnel rows."""
        if self.single is not None:
            return []
        manifest = _read_json(self.root / "manifest.json") or {}
        present = set(self.artifacts())
        out = []
        for name, stats_file, kept, rejected in STAGES:
            stats = _read_json(self.root / stats_file) if stats_file else None
            if stats is None:
                stats = ((manifest.get("stages") or {}).get(name) or {}).get("stats")
            kept_here = [k for k in kept if k in present]
            if not kept_here and not isinstance(stats, dict):
                continue
            stage = Stage(name, stats if isinstance(stats, dict) else {}, kept_here,
                          rejected if rejected in present else None)
            if name == "filter":
                funnel = _read_json(self.root / "funnel.json")
                rows = funnel.get("rules") if isinstance(funnel, dict) else funnel
                stage.funnel = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
            out.append(stage)
        return out

    def review_dir(self) -> Path:
        return self.root

    def eval_sets(self) -> dict[str, dict[str, Any]]:
        """eval.json's sets (an older single-set eval.json reads as one set named `eval`)."""
        if self.single is not None:
            return {}
        data = _read_json(self.root / "eval.json")
        if not isinstance(data, dict):
            return {}
        if "samples" in data or "base" in data:
            return {"eval": data}
        return {k: v for k, v in data.items() if isinstance(v, dict)}
