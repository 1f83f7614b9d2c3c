"""Stage `seeds`: validate and normalise seed tasks into runs/<run>/seeds.jsonl.

    sift seeds seeds/default.jsonl --run demo

Seeds use the Self-Instruct format shared by Self-Instruct and Stanford Alpaca, one task a line:
{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}.
The reference file of 175 tasks loads unchanged.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import iter_jsonl, require, write_json, write_jsonl
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.io.stage_stats import stage_stats

SEED_FIELDS = ("id", "name", "instruction", "instances", "is_classification")
INSTANCE_FIELDS = ("input", "output")


def validate_seed(obj: dict, *, path: str | Path, line: int) -> dict:
    """Check one seed task and return it normalised (stripped text, defaults filled in).

    `name` defaults to the id and `is_classification` to false; every other field is required.
    Unknown fields are refused so a typo (e.g. "instance") is not silently ignored.
    """
    for key in obj:
        if key not in SEED_FIELDS:
            raise SiftError(f"unknown field (expected {', '.join(SEED_FIELDS)})", path=path, line=line,
                            field=key)
    seed_id = require(obj, "id", (str, int), path=path, line=line)
    seed_id = str(seed_id).strip()
    if not seed_id:
        raise SiftError("must not be empty", path=path, line=line, field="id")
    name = require(obj, "name", str, path=path, line=line, optional=True, default=seed_id)
    instruction = require(obj, "instruction", str, path=path, line=line).strip()
    if not instruction:
        raise SiftError("must not be empty", path=path, line=line, field="instruction")
    instances = require(obj, "instances", list, path=path, line=line)
    if not instances:
        raise SiftError("needs at least one {input, output} instance", path=path, line=line, field="instances")
    clean = []
    for i, inst in enumerate(instances):
        where = f"instances[{i}]"
        if not isinstance(inst, dict):
            raise SiftError(f"expected an object, got {type(inst).__name__}", path=path, line=line, field=where)
        for key in inst:
            if key not in INSTANCE_FIELDS:
                raise SiftError("unknown field (expected input, output)", path=path, line=line,
                                field=f"{where}.{key}")
        inp, out = inst.get("input", ""), inst.get("output")
        if out is None:
            raise SiftError("missing", path=path, line=line, field=f"{where}.output")
        for key, value in (("input", inp), ("output", out)):
            if not isinstance(value, str):
                raise SiftError(f"expected a string, got {type(value).__name__}", path=path, line=line,
                                field=f"{where}.{key}")
        if not out.strip():
            raise SiftError("must not be empty", path=path, line=line, field=f"{where}.output")
        clean.append({"input": inp.strip(), "output": out.strip()})
    is_cls = require(obj, "is_classification", bool, path=path, line=line, optional=True, default=False)
    return {"id": seed_id, "name": name.strip() or seed_id, "instruction": instruction,
            "instances": clean, "is_classification": is_cls}


def load_seeds(source: str | Path) -> list[dict]:
    """Read and validate a seed file, or every *.jsonl in a folder (sorted by name)."""
    source = Path(source)
    files = sorted(source.glob("*.jsonl")) if source.is_dir() else [source]
    if source.is_dir() and not files:
        raise SiftError("folder has no *.jsonl seed files", path=source)
    seeds: list[dict] = []
    seen: dict[str, str] = {}
    for path in files:
        for line, obj in iter_jsonl(path):
            seed = validate_seed(obj, path=path, line=line)
            where = f"{path}:{line}"
            if seed["id"] in seen:
                raise SiftError(f"duplicate id {seed['id']!r} (first at {seen[seed['id']]})", path=path,
                                line=line, field="id")
            seen[seed["id"]] = where
            seeds.append(seed)
    return seeds


def seed_stats(seeds: list[dict]) -> dict:
    words = sorted(len(s["instruction"].split()) for s in seeds)
    with_input = sum(any(i["input"] for i in s["instances"]) for s in seeds)
    return {
        "tasks": len(seeds),
        "classification": sum(s["is_classification"] for s in seeds),
        "with_input": with_input,
        "instances": sum(len(s["instances"]) for s in seeds),
        "instruction_words": {"min": words[0], "median": words[len(words) // 2], "max": words[-1]},
    }


def seeds(source: str = "seeds/default.jsonl", /, *, run: str = "demo") -> None:
    """Validate and normalise seed tasks into runs/<run>/seeds.jsonl.

    Reads the Self-Instruct seed format (one task a line: id, name, instruction, instances,
    is_classification). Any bad line stops the stage with file, line and field, and nothing is
    written.

    Args:
        source: a seed JSONL file, or a folder whose *.jsonl files are read in name order
        run: run name; artifacts go to runs/<run>/
    """
    tasks = load_seeds(source)
    out = run_dir(run)
    with locked(out):
        write_jsonl(out / "seeds.jsonl", tasks)
        stats = seed_stats(tasks)
        doc = stage_stats("seeds", "tasks", read=len(tasks), kept=len(tasks), rejected_by_reason={}, extras=stats)
        write_json(out / "seeds.stats.json", doc)
        record_stage(out, "seeds", {"source": str(source), "run": run}, stats=doc)
    print(f"seeds: {stats['tasks']} tasks ({stats['classification']} classification, "
          f"{stats['with_input']} with input) -> {out / 'seeds.jsonl'}")
