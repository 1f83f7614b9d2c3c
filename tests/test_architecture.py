"""The layout holds: every module imports, no import cycles, and no import runs up a layer.

Layers, lowest first (docs/architecture.md draws them):
  0  pipeline.errors, pipeline.typed, pipeline.settings, pipeline.redact,  no sift imports above these
     filters, prompts
  1  pipeline.io                                          artifacts, journals, runs, models, progress
  2  pipeline.teachers                                    backends, cache, prompts, parsers
  3  train                                                the student side
  4  pipeline.recipes, pipeline.federated, pipeline.llm2llm   helpers the stages drive (not stages)
  5  pipeline.stages, pipeline.views                      the stages and what reads their outputs
  6  pipeline.cli, pipeline.cli_docs                      the command line and its pages
A module may import its own layer or any lower one. Imports inside functions count too: a lazy
import that runs upward is still a dependency upward, and so are relative imports and the modules a
table names by string ("module:attribute" in the command table, the teacher backends, the Flower app
sift federate writes). No module imports another's private (underscore) names.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "filters", "train", "prompts")
LAYERS: list[tuple[str, ...]] = [
    ("pipeline.errors", "pipeline.typed", "pipeline.settings", "pipeline.redact", "filters", "prompts", "pipeline"),
    ("pipeline.io",),
    ("pipeline.teachers",),
    ("train",),
    ("pipeline.recipes", "pipeline.federated", "pipeline.llm2llm"),
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


def _module_of(target: str) -> str | None:
    """The sift module a dotted name lives in (the longest prefix that is one), or None."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target if target and target.split(".")[0] in PACKAGES else None


def _base(node: ast.ImportFrom, module: str) -> str:
    """The absolute module an ImportFrom reads from: `from . import x` in pipeline.stages.a is pipeline.stages."""
    if node.level == 0:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def imported_names(module: str) -> list[tuple[str, str]]:
    """(module read from, name) of every `from X import name` in `module`, relative ones resolved."""
    tree = ast.parse(MODULES[module].read_text())
    return [(_base(node, module), a.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for a in node.names]


def imports_of(module: str) -> set[str]:
    """The sift modules `module` imports anywhere in its file (resolved to modules, not names)."""
    tree = ast.parse(MODULES[module].read_text())
    targets: list[str] = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    # `from pipeline.io import models` (or `from ..io import models`) imports the module pipeline.io.models
    targets += [f"{base}.{name}" if f"{base}.{name}" in MODULES else base for base, name in imported_names(module)]
    return {m for t in targets if (m := _module_of(t)) and m != module}


def _constant(module: str, name: str) -> object:
    """A module-level constant's value, read from the source without importing it."""
    for node in ast.parse(MODULES[module].read_text()).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{module} has no constant {name}")


def flower_targets() -> set[tuple[str, str]]:
    """What Flower loads for `sift federate`'s deployment engine: the app's pyproject.toml names
    `shim:attribute`, and the shim module federate writes beside it takes each from a sift module."""
    app = tomllib.loads(str(_constant("pipeline.stages.federate", "FLOWER_APP")).format(folder="."))
    shim = ast.parse(str(_constant("pipeline.stages.federate", "FLOWER_SHIM")))
    imported: dict[str, tuple[str, str | None]] = {}  # local name -> (module, attribute or None for a module)
    assigned: dict[str, tuple[str, str]] = {}
    for node in shim.body:
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                imported[a.asname or a.name] = (full, None) if full in MODULES else (str(node.module), a.name)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name):
                assigned[node.targets[0].id] = (imported[value.value.id][0], value.attr)
            elif isinstance(value, ast.Name):
                source, attr = imported[value.id]
                assigned[node.targets[0].id] = (source, attr or value.id)
    out = set()
    for ref in app["tool"]["flwr"]["app"]["components"].values():
        shim_module, attr = ref.split(":")
        assert f'"{shim_module}.py"' in MODULES["pipeline.stages.federate"].read_text(), f"no {shim_module}.py written"
        assert attr in assigned, f"the Flower app names {ref}, which the shim does not define"
        out.add(assigned[attr])
    return out


def named_by_string() -> dict[str, set[tuple[str, str]]]:
    """Module -> the (module, attribute) pairs it names by string rather than imports: the command
    table, the teacher backends and the Flower app of sift federate."""
    commands = _constant("pipeline.cli", "COMMANDS")
    backends = _constant("pipeline.teachers.registry", "BACKENDS")
    assert isinstance(commands, dict) and isinstance(backends, dict)
    return {"pipeline.cli": {tuple(v.split(":", 1)) for v in commands.values()},
            "pipeline.teachers.registry": {tuple(v) for v in backends.values()},
            "pipeline.stages.federate": flower_targets()}


NAMED = named_by_string()
GRAPH = {m: imports_of(m) | {t for t, _ in NAMED.get(m, ()) if t in MODULES} for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


@pytest.mark.parametrize(("owner", "target"), sorted((o, t) for o, ts in NAMED.items() for t in ts))
def test_modules_named_by_string_exist(owner: str, target: tuple[str, str]) -> None:
    module, attr = target
    assert module in MODULES, f"{owner} names {module}:{attr}, and there is no module {module}"
    assert hasattr(importlib.import_module(module), attr), f"{owner} names {module}:{attr}, which is not there"


def test_every_table_names_something() -> None:
    assert all(NAMED.values()) and ("pipeline.stages.export", "export") in NAMED["pipeline.cli"]
    assert NAMED["pipeline.stages.federate"] == {("pipeline.federated.apps", "client_app"),
                                                 ("pipeline.federated.apps", "server_app")}


def test_relative_imports_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.py").write_text("from . import b\nfrom .b import _hidden\nfrom ..io import runs\n")
    monkeypatch.setitem(MODULES, "pipeline.stages.a", tmp_path / "a.py")
    monkeypatch.setitem(MODULES, "pipeline.stages.b", tmp_path / "b.py")
    assert imports_of("pipeline.stages.a") == {"pipeline.stages.b", "pipeline.io.runs"}
    assert ("pipeline.stages.b", "_hidden") in imported_names("pipeline.stages.a")


def private_imports() -> list[str]:
    """`from X import _name` where X is another sift module: a private name used across modules."""
    return [f"{m} imports {name} from {source}" for m in MODULES for base, name in imported_names(m)
            if name.startswith("_") and not name.endswith("__") and (source := _module_of(base)) and source != m]


def test_no_private_name_is_imported_across_modules() -> None:
    bad = private_imports()
    assert not bad, "\n".join(bad)


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
