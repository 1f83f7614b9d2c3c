"""The layout holds: every module imports, no import cycles, and no import runs up a layer.

Layers, lowest first (docs/architecture.md draws them):
  0  pipeline.errors, pipeline.typed, pipeline.redact,  no sift imports above these
     filters, prompts
  1  pipeline.io                                          artifacts, journals, runs, models, progress
  2  pipeline.teachers                                    backends, cache, prompts, parsers
  3  train                                                the student side
  4  pipeline.stages, pipeline.views                      the stages and what reads their outputs
  5  pipeline.cli, pipeline.cli_docs                      the command line and its pages
A module may import its own layer or any lower one. Imports inside functions count too: a lazy
import that runs upward is still a dependency upward.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "filters", "train", "prompts")
LAYERS: list[tuple[str, ...]] = [
    ("pipeline.errors", "pipeline.typed", "pipeline.redact", "filters", "prompts", "pipeline"),
    ("pipeline.io",),
    ("pipeline.teachers",),
    ("train",),
    ("pipeline.stages", "pipeline.views"),
    ("pipeline.cli", "pipeline.cli_docs"),
]


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def layer(module: str) -> int:
    """The layer of a module: the longest matching prefix wins (pipeline.io before pipeline)."""
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no layer; add it to LAYERS and docs/architecture.md"
    return rank


def imports_of(module: str) -> set[str]:
    """The sift modules `module` imports anywhere in its file (resolved to modules, not names)."""
    tree = ast.parse(MODULES[module].read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.io import models` imports the module pipeline.io.models
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                       for a in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] in PACKAGES and target != module:
                out.add(target)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_no_import_runs_up_a_layer() -> None:
    upward = [f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
              for m, targets in GRAPH.items() for t in sorted(targets)
              if layer(t) > layer(m) and not m.startswith(t + ".")]
    assert not upward, "\n".join(upward)


def test_filters_and_train_never_reach_stages_or_views() -> None:
    bad = [f"{m} imports {t}" for m, targets in GRAPH.items() if m.split(".")[0] in ("filters", "train")
           for t in targets if t.startswith(("pipeline.stages", "pipeline.views", "pipeline.cli"))]
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    # a package's __init__ importing its own submodules is not a cycle worth flagging
    graph = {m: {t for t in ts if not t.startswith(m + ".") and not m.startswith(t + ".")} for m, ts in GRAPH.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
