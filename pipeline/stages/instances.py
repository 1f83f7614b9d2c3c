"""Stage `instances`: have the teacher write input/output examples for each instruction.

    sift instances --run demo           # or: make instances

Reads classified.jsonl; writes instances.jsonl (each record: id, instruction, is_classification,
instances [{input, output}], provenance with `instances.raw_response`) and instances.rejected.jsonl
(no parseable instance, truncated to nothing, teacher errors; each with the raw response).
Classification tasks go output-first (a class label, then an input for it), the others
input-first, as in Self-Instruct. Greedy, presence_penalty 1.5. Alpaca records already carry
their input and output: they pass through as one instance, with no teacher call. Instance
filters (input == output, conflicting outputs, ...) belong to `sift filter`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import iter_jsonl, write_json, write_jsonl
from pipeline.io.batched import check_ids, run_batches
from pipeline.io.progress import print_summary
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.io.stage_stats import stage_stats
from pipeline.settings import InstancesSettings, TeacherSettings, to_dict
from pipeline.teachers.base import Sampling, Teacher
from pipeline.teachers.parsers import parse_input_first, parse_output_first
from pipeline.teachers.pool import check_teachers, open_teachers, teacher_of
from pipeline.teachers.prompts import PromptTemplate, load
from pipeline.teachers.tally import per_teacher

PROMPT_INPUT_FIRST = "self_instruct_instances_input_first"
PROMPT_OUTPUT_FIRST = "self_instruct_instances_output_first"
JOURNAL = "instances.journal"


def default_sampling(settings: InstancesSettings) -> Sampling:
    """Greedy with presence_penalty 1.5; stop before one example too many or the next task."""
    return Sampling(temperature=0.0, top_p=1.0, max_tokens=settings.max_tokens, presence_penalty=1.5,
                    stop=(f"Example {settings.max_instances + 1}", "Task:"))


def _provenance(rec: dict, prov: dict) -> dict:
    return {**rec.get("provenance", {}), "instances": prov}


def instance_records(records: list[dict], teacher: Teacher, templates: dict[bool, PromptTemplate],
                     sampling: Sampling, max_instances: int) -> tuple[list[dict], list[dict], dict]:
    """One batch: records with instances, and the rejected ones with the raw response."""
    asked = [r for r in records if "output" not in r]
    completions = teacher.generate([templates[bool(r.get("is_classification"))].request(
        sampling, instruction=r["instruction"]) for r in asked]) if asked else []
    answer = dict(zip([r["id"] for r in asked], completions, strict=True))
    counters = {"requests": len(asked), "tokens_in": sum(c.prompt_tokens for c in completions),
                "tokens_out": sum(c.completion_tokens for c in completions), "passthrough": 0,
                "instances": 0, "instances_dropped": 0}
    kept, rejected = [], []
    for rec in records:
        if rec["id"] not in answer:  # Alpaca: instruction, input and output came together
            base = {k: v for k, v in rec.items() if k not in ("input", "output")}
            counters["passthrough"] += 1
            counters["instances"] += 1
            kept.append({**base, "is_classification": bool(rec.get("is_classification", False)),
                         "instances": [{"input": rec.get("input", ""), "output": rec["output"]}],
                         "provenance": _provenance(rec, {"stage": "instances", "passthrough": True})})
            continue
        comp = answer[rec["id"]]
        clf = bool(rec.get("is_classification"))
        template = templates[clf]
        prov = {"stage": "instances", "mode": "output_first" if clf else "input_first",
                "prompt": template.provenance(), "teacher": teacher_of(comp, teacher),
                "sampling": sampling.to_dict(), "raw_response": comp.text, "finish_reason": comp.finish_reason}
        if comp.finish_reason == "error":
            rejected.append({**rec, "reason": "teacher_error", "detail": comp.error,
                             "provenance": _provenance(rec, prov)})
            continue
        parse = parse_output_first if clf else parse_input_first
        parsed = parse(comp.text, truncated=comp.finish_reason == "length")
        items = parsed.items[:max_instances]
        prov["problems"] = [{"reason": p.reason, "raw": p.raw} for p in parsed.problems]
        counters["instances_dropped"] += len(parsed.problems) + len(parsed.items) - len(items)
        if not items:
            truncated = any(p.reason == "truncated_instance" for p in parsed.problems)
            reason = "truncated_response" if truncated else "parse_error"
            detail = parsed.problems[0].reason if parsed.problems else "no_instances"
            rejected.append({**rec, "reason": reason, "detail": detail, "raw": comp.text,
                             "provenance": _provenance(rec, prov)})
            continue
        counters["instances"] += len(items)
        kept.append({**rec, "is_classification": clf, "instances": items, "provenance": _provenance(rec, prov)})
    if hasattr(teacher, "last_usage") and asked:  # a TeacherPool: each teacher's figures of this batch
        counters["by_teacher"] = teacher.last_usage
    return kept, rejected, counters


def instances(*, run: str = "demo", teacher: TeacherSettings = TeacherSettings(),
              instances: InstancesSettings = InstancesSettings()) -> None:
    """Generate input/output instances for each classified instruction (input- or output-first).

    Resumable: finished batches go to instances.journal; rerunning skips them.

    Args:
        run: run name; artifacts live in runs/<run>/.
        teacher: the teacher (or teacher.pool) that writes the instances.
        instances: this stage's own settings.
    """
    directory = run_dir(run)
    records = read_classified(directory / "classified.jsonl")
    templates = {False: load(instances.prompt_input_first or PROMPT_INPUT_FIRST),
                 True: load(instances.prompt_output_first or PROMPT_OUTPUT_FIRST)}
    for t in templates.values():
        t.check({"instruction"}, required={"instruction"})
    sampling = default_sampling(instances)
    specs = check_teachers(teacher)
    options = {**to_dict(teacher=teacher, instances=instances), **({"teachers": specs} if specs else {})}
    with locked(directory):
        cached = open_teachers(directory, teacher, batch_size=instances.batch_size)
        stats = instances_in(directory, cached, templates=templates, sampling=sampling, settings=instances,
                             records=records, options=options)
    print_summary("instances", stats)
    print(f"wrote {directory / 'instances.jsonl'} ({stats['accepted']} records, {stats.get('instances', 0)} instances)")


def instances_in(directory: Path, teacher: Teacher, *, templates: dict[bool, PromptTemplate] | None = None,
                 sampling: Sampling | None = None, settings: InstancesSettings = InstancesSettings(),
                 records: list[dict] | None = None, options: dict | None = None) -> dict:
    """Write instances for a run directory's classified records (the caller holds its lock)."""
    batch_size, max_instances = settings.batch_size, settings.max_instances
    records = records if records is not None else read_classified(directory / "classified.jsonl")
    templates = templates or {False: load(PROMPT_INPUT_FIRST), True: load(PROMPT_OUTPUT_FIRST)}
    sampling = sampling or default_sampling(settings)
    identity = getattr(teacher, "identity", teacher.name)
    prompts = [templates[False].provenance(), templates[True].provenance()]
    fingerprint = {"prompts": prompts, "sampling": sampling.to_dict(), "teacher": identity,
                   "max_instances": max_instances}
    kept, rejected, stats = run_batches(
        records, lambda batch: instance_records(batch, teacher, templates, sampling, max_instances),
        stage="instances", journal_path=directory / JOURNAL, fingerprint=fingerprint, batch_size=batch_size)
    stats["cache_hits"] = getattr(teacher, "hits", 0)
    if hasattr(teacher, "last_usage"):
        stats["by_teacher"] = per_teacher(kept, rejected, stage="instances", usage=stats.get("by_teacher"))
        stats["teachers_down"] = dict(getattr(teacher, "down", {}))
    write_jsonl(directory / "instances.rejected.jsonl", rejected)
    doc = stage_stats("instances", "tasks", read=stats["records_in"], kept=stats["accepted"],
                      rejected_by_reason=stats["rejected_by_reason"], extras=stats)
    write_json(directory / "instances.stats.json", doc)
    write_jsonl(directory / "instances.jsonl", kept)
    resolved = {**(options or {}), "prompts": prompts, "sampling": sampling.to_dict()}
    record_stage(directory, "instances", resolved, models={"teacher": identity}, stats=doc)
    return stats


def read_classified(path: Path) -> list[dict]:
    """classified.jsonl, checked: ids unique, instruction a string, is_classification a boolean."""
    if not path.exists():
        raise SiftError("not found; run `sift classify` first", path=path)
    records = []
    for line, rec in iter_jsonl(path):
        if not isinstance(rec.get("instruction"), str):
            raise SiftError("missing or not a string", path=path, line=line, field="instruction")
        if not isinstance(rec.get("is_classification"), bool):
            raise SiftError("missing or not true/false", path=path, line=line, field="is_classification")
        if "output" in rec and not isinstance(rec["output"], str):
            raise SiftError("not a string", path=path, line=line, field="output")
        records.append(rec)
    check_ids(records, path)
    return records
