"""Stage `classify`: ask the teacher whether each instruction is a classification task.

    sift classify --run demo            # or: make classify

Reads instructions.jsonl; writes classified.jsonl (each record plus `is_classification` and
`provenance.classify`) and classified.rejected.jsonl. The few-shot yes/no prompt of
Self-Instruct, greedy, 3 tokens. An answer that is neither yes nor no defaults to false (the
input-first path works for any task) and keeps the raw answer with `parsed: false`, counted as
`unparsed` in classify.stats.json; only teacher errors go to the rejected ledger, and a rerun
retries them. Alpaca records are classified too (cheap, and the report uses it).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import iter_jsonl, write_json, write_jsonl
from pipeline.io.batched import check_ids, run_batches
from pipeline.io.progress import print_summary
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.io.stage_stats import stage_stats
from pipeline.settings import ClassifySettings, TeacherSettings, to_dict
from pipeline.teachers.base import Sampling, Teacher
from pipeline.teachers.parsers import parse_yes_no
from pipeline.teachers.pool import check_teachers, open_teachers, teacher_of
from pipeline.teachers.prompts import PromptTemplate, load
from pipeline.teachers.tally import per_teacher

PROMPT = "self_instruct_classify"
JOURNAL = "classify.journal"


def default_sampling(settings: ClassifySettings) -> Sampling:
    """Greedy, a few tokens, stop at the line end (the reference's settings)."""
    return Sampling(temperature=0.0, top_p=1.0, max_tokens=settings.max_tokens, stop=("\n", "Task:"))


def classify_records(records: list[dict], teacher: Teacher, template: PromptTemplate, sampling: Sampling
                     ) -> tuple[list[dict], list[dict], dict]:
    """One batch: every record gets `is_classification`, except on a teacher error."""
    completions = teacher.generate([template.request(sampling, instruction=r["instruction"]) for r in records])
    kept, rejected = [], []
    counters = {"requests": len(records), "tokens_in": sum(c.prompt_tokens for c in completions),
                "tokens_out": sum(c.completion_tokens for c in completions), "unparsed": 0, "yes": 0}
    for rec, comp in zip(records, completions, strict=True):
        prov = {"stage": "classify", "prompt": template.provenance(), "teacher": teacher_of(comp, teacher),
                "sampling": sampling.to_dict(), "raw_response": comp.text, "finish_reason": comp.finish_reason}
        if comp.finish_reason == "error":
            rejected.append({**rec, "reason": "teacher_error", "detail": comp.error,
                             "provenance": {**rec.get("provenance", {}), "classify": prov}})
            continue
        parsed = parse_yes_no(comp.text)
        label = parsed.items[0] if parsed.items else False
        prov["parsed"] = bool(parsed.items)
        if parsed.problems:
            prov["problem"] = parsed.problems[0].reason
            counters["unparsed"] += 1
        counters["yes"] += int(label)
        kept.append({**rec, "is_classification": label,
                     "provenance": {**rec.get("provenance", {}), "classify": prov}})
    if hasattr(teacher, "last_usage"):  # a TeacherPool: each teacher's figures of this batch
        counters["by_teacher"] = teacher.last_usage
    return kept, rejected, counters


def classify(*, run: str = "demo", teacher: TeacherSettings = TeacherSettings(),
             classify: ClassifySettings = ClassifySettings()) -> None:
    """Mark each generated instruction as a classification task or not (few-shot yes/no).

    Resumable: finished batches go to classify.journal; rerunning skips them.

    Args:
        run: run name; artifacts live in runs/<run>/.
        teacher: the teacher (or teacher.pool) that answers.
        classify: this stage's own settings.
    """
    sampling = default_sampling(classify)
    directory = run_dir(run)
    source = directory / "instructions.jsonl"
    records = _read_input(source)
    template = load(classify.prompt or PROMPT)
    template.check({"instruction"}, required={"instruction"})
    specs = check_teachers(teacher)
    options = {**to_dict(teacher=teacher, classify=classify), **({"teachers": specs} if specs else {})}
    with locked(directory):
        cached = open_teachers(directory, teacher, batch_size=classify.batch_size)
        stats = classify_in(directory, cached, template=template, sampling=sampling, settings=classify,
                            records=records, options=options)
    print_summary("classify", stats)
    print(f"wrote {directory / 'classified.jsonl'} ({stats['accepted']} records, {stats.get('yes', 0)} classification)")


def classify_in(directory: Path, teacher: Teacher, *, template: PromptTemplate | None = None,
                sampling: Sampling | None = None, settings: ClassifySettings = ClassifySettings(),
                records: list[dict] | None = None, options: dict | None = None) -> dict:
    """Classify a run directory's instructions (the caller holds its lock) and write the artifacts."""
    batch_size = settings.batch_size
    records = records if records is not None else _read_input(directory / "instructions.jsonl")
    template = template or load(PROMPT)
    sampling = sampling or default_sampling(settings)
    identity = getattr(teacher, "identity", teacher.name)
    fingerprint = {"prompt": template.provenance(), "sampling": sampling.to_dict(), "teacher": identity}
    kept, rejected, stats = run_batches(
        records, lambda batch: classify_records(batch, teacher, template, sampling), stage="classify",
        journal_path=directory / JOURNAL, fingerprint=fingerprint, batch_size=batch_size)
    stats["cache_hits"] = getattr(teacher, "hits", 0)
    if hasattr(teacher, "last_usage"):
        stats["by_teacher"] = per_teacher(kept, rejected, stage="classify", usage=stats.get("by_teacher"))
        stats["teachers_down"] = dict(getattr(teacher, "down", {}))
    write_jsonl(directory / "classified.rejected.jsonl", rejected)
    doc = stage_stats("classify", "instructions", read=stats["records_in"], kept=stats["accepted"],
                      rejected_by_reason=stats["rejected_by_reason"], extras=stats)
    write_json(directory / "classify.stats.json", doc)
    write_jsonl(directory / "classified.jsonl", kept)
    resolved = {**(options or {}), "prompt": template.provenance(), "sampling": sampling.to_dict()}
    record_stage(directory, "classify", resolved, models={"teacher": identity}, stats=doc)
    return stats


def _read_input(path: Path) -> list[dict]:
    if not path.exists():
        raise SiftError("not found; run `sift generate` first", path=path)
    records = []
    for line, rec in iter_jsonl(path):
        if not isinstance(rec.get("instruction"), str):
            raise SiftError("missing or not a string", path=path, line=line, field="instruction")
        records.append(rec)
    check_ids(records, path)
    return records
