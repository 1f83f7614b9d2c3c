"""Stage `filter`: quality heuristics and exact ROUGE-L dedup, with a ledger of every rejection.

    sift filter --run demo                                   # the stage: instances.jsonl -> filtered.jsonl
    sift filter alpaca_data.json -o kept.jsonl --filter.rules rouge   # stand-alone, on any dataset

Kept plus rejected always equals the input: every dropped record goes to the rejected ledger with
the reason (the rule's name), the rule's score, and for duplicates the nearest record's id and text.
The funnel counts records in and out per rule, in order.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filters.contamination import build_ngram_index
from filters.engine import apply_rules, funnel, task_key
from filters.rouge import PREFILTERS, RougeIndex
from filters.rules import parse_rules
from pipeline.errors import SiftError
from pipeline.io.artifacts import (
    RECORD_SUFFIXES,
    AtomicFile,
    JsonListWriter,
    all_or_none,
    check_output_suffix,
    content_id,
    iter_records,
    json_line,
    read_records,
    require,
    write_json,
)
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.io.stage_stats import stage_stats
from pipeline.settings import FilterSettings, to_dict
from pipeline.teachers.tally import TeacherTally, record_teacher


def flatten_tasks(rows: Iterable[tuple[int, dict]], path: Path) -> list[dict]:
    """Turn records into one record per example: {id, task_id, instruction, input, output, ...}.

    A record with an `instances` list (Self-Instruct tasks: the instances stage, seed files) gives
    one record per instance, sharing the task's id as `task_id`; a record with `output` (Alpaca
    data) is one example; a record with neither is an instruction alone.
    """
    return list(iter_flat(rows, path))


def iter_flat(rows: Iterable[tuple[int, dict]], path: Path) -> Iterator[dict]:
    """`flatten_tasks` a record at a time (only the ids seen so far are kept, to refuse a repeat)."""
    seen: dict[str, int] = {}
    for line, rec in rows:
        instruction = require(rec, "instruction", str, path=path, line=line)
        given_id = require(rec, "id", (str, int), path=path, line=line, optional=True)
        if given_id is not None:
            if str(given_id) in seen:
                raise SiftError(f"duplicate id {given_id!r} (first at line {seen[str(given_id)]})", path=path,
                                line=line, field="id")
            seen[str(given_id)] = line
        if "instances" in rec:
            instances = require(rec, "instances", list, path=path, line=line)
            task_id = str(given_id) if given_id is not None else content_id(instruction, prefix="task_")
            base = {k: v for k, v in rec.items() if k not in ("id", "instances")}
            for i, inst in enumerate(instances):
                if not isinstance(inst, dict):
                    raise SiftError("expected an object", path=path, line=line, field=f"instances[{i}]")
                inp = require(inst, "input", str, path=path, line=line, optional=True, default="")
                outp = require(inst, "output", str, path=path, line=line, optional=True, default="")
                yield {"id": content_id([task_id, inp, outp], prefix="ex_"), "task_id": task_id, **base,
                       "instruction": instruction, "input": inp, "output": outp, "line": line}
            continue
        for field in ("input", "output"):
            require(rec, field, str, path=path, line=line, optional=True)
        rid = str(given_id) if given_id is not None else content_id(
            [instruction, rec.get("input", ""), rec.get("output", ""), line], prefix="rec_")
        yield {**rec, "id": rid, "line": line}


def preload_pool(index: RougeIndex, seeds: Path) -> int:
    """Put every instruction of a seed or data file into the pool (Self-Instruct compares with seeds)."""
    n = 0
    for line, rec in read_records(seeds):
        text = require(rec, "instruction", str, path=seeds, line=line)
        index.add(str(rec.get("id", f"seed_{line}")), text)
        n += 1
    return n


def eval_texts(path: Path) -> list[str]:
    """Instructions, inputs and outputs of an evaluation file (Self-Instruct or Alpaca shape)."""
    texts: list[str] = []
    for _, rec in read_records(path):
        texts += [str(rec.get(k) or "") for k in ("instruction", "input", "output")]
        for inst in rec.get("instances") or []:
            if isinstance(inst, dict):
                texts += [str(inst.get("input") or ""), str(inst.get("output") or "")]
    return [t for t in texts if t]


def filter_stream(records: Iterable[dict], rules: list[str], *, settings: FilterSettings, seeds: Path | None,
                  decontaminate: Path | None, counts: FilterCounts,
                  task_sizes: Mapping[Hashable, int] | None = None) -> Iterator[tuple[bool, dict]]:
    """Apply the rules (parsed from settings.rules by the caller) a record at a time: yields (True, kept
    record) or (False, rejected ledger entry) in input order, and counts every reason into
    `counts.reasons` (None for kept). `task_sizes` (filters.engine.count_tasks of the records) lets the task rules
    hold back one task at a time instead of the whole input."""
    if decontaminate is not None and "contaminated" not in rules:
        rules = [*rules, "contaminated"]
    try:
        index = RougeIndex(threshold=settings.threshold, use_stemmer=settings.use_stemmer, top_k=settings.top_k,
                           workers=settings.workers, prefilter=settings.prefilter)
    except ValueError as e:
        field = "filter.prefilter" if "prefilter" in str(e) else "filter.threshold"
        raise SiftError(str(e), field=field) from None
    counts.pool = preload_pool(index, seeds) if seeds is not None else 0
    contamination = build_ngram_index(eval_texts(decontaminate)) if decontaminate is not None else None
    for record, reason, details in apply_rules(records, rules, rouge_index=index, contamination_index=contamination,
                                               task_sizes=task_sizes):
        counts.reasons[reason] += 1
        rec = {k: v for k, v in record.items() if k != "line"}
        if reason is None:
            if details:
                rec["filter"] = {"max_similarity": details.get("score"), "nearest_id": details.get("nearest_id"),
                                 "mean_top_k": details.get("mean_top_k")}
            yield True, rec
            continue
        entry: dict[str, Any] = {"id": record["id"], "line": record["line"], "reason": reason,
                                 "score": details.get("score")}
        if reason == "rouge_duplicate":
            entry.update(nearest_id=details.get("nearest_id"), nearest_text=details.get("nearest_text"))
        entry["record"] = rec
        yield False, entry


@dataclass
class FilterCounts:
    """What `filter_stream` counts as it goes: records per reason (None: kept), seeds in the pool."""

    reasons: Counter[str | None] = dataclasses.field(default_factory=Counter)
    pool: int = 0

    def stats(self) -> dict:
        total, kept = sum(self.reasons.values()), self.reasons.get(None, 0)
        return {"input": total, "kept": kept, "rejected": total - kept,
                "by_reason": {r: c for r, c in self.reasons.items() if r is not None}, "pool_preloaded": self.pool}


def run_filter(records: list[dict], rules: list[str], *, settings: FilterSettings, seeds: Path | None,
               decontaminate: Path | None) -> tuple[list[dict], list[dict], list[dict], dict]:
    """`filter_stream` into lists: kept records, the rejected ledger, the funnel and stats."""
    counts = FilterCounts()
    kept, rejected = [], []
    for is_kept, row in filter_stream(records, rules, settings=settings, seeds=seeds, decontaminate=decontaminate,
                                      counts=counts):
        (kept if is_kept else rejected).append(row)
    if decontaminate is not None and "contaminated" not in rules:
        rules = [*rules, "contaminated"]
    return kept, rejected, funnel(rules, counts.reasons), counts.stats()


def check_seeds(seeds: str | None) -> Path | None:
    """The --seeds file, which must exist as a file: a typo is an error, never a dedup without the pool."""
    if not seeds:
        return None
    path = Path(seeds)
    if not path.exists():
        raise SiftError("no such file", path=path, field="seeds")
    if not path.is_file():
        raise SiftError("is not a regular file; --seeds takes a seed or data file", path=path, field="seeds")
    return path


def check_prefilter(prefilter: str | None) -> None:
    """A known filter.prefilter whose library is installed, checked before any file is read."""
    if prefilter not in PREFILTERS:
        valid = ", ".join(p for p in PREFILTERS if p)
        raise SiftError(f"use {valid} (or leave it out for the exact dedup), got {prefilter!r}",
                        field="filter.prefilter")
    if prefilter == "minhash" and importlib.util.find_spec("datasketch") is None:
        raise SiftError("--filter.prefilter minhash needs the datasketch library, which is not installed: "
                        "pip install 'sift-instruct[minhash]' (or pip install datasketch)", field="filter.prefilter")


def filter_records(input: str | None = None, /, *, output: str | None = None, run: str = "demo",
                   seeds: str | None = None, decontaminate: str | None = None,
                   filter: FilterSettings = FilterSettings()) -> None:
    """Filter records: quality heuristics and exact ROUGE-L dedup, with a ledger of every rejection.

    With no INPUT, the stage: runs/<run>/instances.jsonl -> filtered.jsonl, filtered.rejected.jsonl
    and funnel.json, against the run's seeds. With INPUT (JSONL, or a JSON list like Alpaca's
    alpaca_data.json, of records with `instruction` and optional `input`, `output`, `id`, or
    Self-Instruct tasks with `instances`), writes OUT, OUT.rejected.jsonl and OUT.funnel.json.
    Kept records keep input order; kept plus rejected always equals the input.

    Args:
        input: a dataset to filter stand-alone; omit to run the stage on runs/<run>/instances.jsonl
        output: where kept records go (stand-alone; .jsonl, or .json for one JSON list); required with INPUT
        run: run name for the stage; artifacts live in runs/<run>/
        seeds: pre-load the ROUGE-L pool with this file's instructions (stage default: the run's seeds)
        decontaminate: an evaluation file; drop records sharing a 13-gram with it (reason contaminated)
        filter: the rules (default here: self-instruct; stand-alone on instruction-only data the instance
            rules keep all) and the ROUGE-L dedup.
    """
    started = time.time()
    try:
        rule_names = parse_rules(filter.rules or "self-instruct")
    except ValueError as e:
        raise SiftError(str(e), field="filter.rules") from None
    check_prefilter(filter.prefilter)
    given_seeds = check_seeds(seeds)
    if input is None:
        directory = run_dir(run)
        source = directory / "instances.jsonl"
        if not source.exists():
            raise SiftError("not found; run `sift instances` (or `make instances`) first", path=source)
        # the run's own seeds when present (a run started from data has none); a given file must exist
        seed_path = given_seeds or directory / "seeds.jsonl"
        if not seed_path.exists():
            seed_path = None
        targets = (directory / "filtered.jsonl", directory / "filtered.rejected.jsonl", directory / "funnel.json")
        with locked(directory):
            stats = _filter_files(source, targets, rule_names, settings=filter,
                                  seeds=seed_path,
                                  decontaminate=Path(decontaminate) if decontaminate else None)
            stats["wall_seconds"] = round(time.time() - started, 2)
            doc = stage_stats("filter", "examples", read=stats["input"], kept=stats["kept"],
                              rejected_by_reason=stats["by_reason"], extras=stats)
            write_json(directory / "filter.stats.json", doc)
            settings = to_dict(run=run, seeds=str(seed_path) if seed_path else None, decontaminate=decontaminate,
                               filter=filter)
            record_stage(directory, "filter", {**settings, "rules": rule_names}, stats=doc)
    else:
        if output is None:
            raise SiftError("-o/--output is required when filtering a file", field="output")
        out = check_output_suffix(output, RECORD_SUFFIXES)
        stem = out.with_suffix("")
        targets = (out, Path(f"{stem}.rejected.jsonl"), Path(f"{stem}.funnel.json"))
        stats = _filter_files(Path(input), targets, rule_names, settings=filter,
                              seeds=given_seeds,
                              decontaminate=Path(decontaminate) if decontaminate else None)
        stats["wall_seconds"] = round(time.time() - started, 2)
    reasons = ", ".join(f"{r} {c}" for r, c in sorted(stats["by_reason"].items(), key=lambda x: -x[1])) or "none"
    print(f"filter: {stats['input']} in, {stats['kept']} kept, {stats['rejected']} rejected ({reasons}) "
          f"in {stats['wall_seconds']:.1f}s -> {targets[0]}")


def _filter_files(source: Path, targets: tuple[Path, Path, Path], rules: list[str], **options: Any) -> dict:
    """Two passes over `source`: the first checks every record and counts each task's records (so a bad
    record fails before any work, and the task rules hold one task at a time), the second filters,
    writing kept and rejected records as they are decided into temporary files renamed at the end."""
    sizes: Counter[Hashable] = Counter()
    teachers: set[str] = set()
    for record in iter_flat(iter_records(source), source):
        sizes[task_key(record)] += 1
        if len(teachers) < 2 and (teacher := record_teacher(record)) is not None:
            teachers.add(teacher)
    kept_path, rejected_path, funnel_path = targets
    counts = FilterCounts()
    tally = TeacherTally()
    with all_or_none(*targets):
        files = [AtomicFile(rejected_path)]
        try:
            files.append(AtomicFile(kept_path))
            rejected_out, kept_out = files
            as_list = JsonListWriter(kept_out) if kept_path.suffix.lower() == ".json" else None
            stream = filter_stream(iter_flat(iter_records(source), source), rules, counts=counts,
                                   task_sizes=sizes, **options)
            for is_kept, row in stream:
                tally.add(row, kept=is_kept)
                if not is_kept:
                    rejected_out.write(json_line(row))
                elif as_list is not None:
                    as_list.add({k: v for k, v in row.items() if k not in ("filter",)})
                else:
                    kept_out.write(json_line(row))
            if as_list is not None:
                as_list.close()
            if options.get("decontaminate") is not None and "contaminated" not in rules:
                rules = [*rules, "contaminated"]
            stats = counts.stats()
            funnel_doc: dict[str, Any] = {"input": stats["input"], "kept": stats["kept"],
                                          "rules": funnel(rules, counts.reasons)}
            if len(teachers) > 1:  # several teachers (teacher.pool): each one's funnel
                funnel_doc["by_teacher"] = tally.table()
            rejected_out.commit()
            write_json(funnel_path, funnel_doc)
            kept_out.commit()  # last: the make target is only fresh when all three are written
        except BaseException:
            for f in files:
                f.abort()
            raise
    return stats
