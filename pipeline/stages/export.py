"""Export the kept records for training: chat messages and Alpaca's JSON list.

    sift export --run demo --export.valid-fraction 0.1       # or: make export

Reads runs/<run>/refined.jsonl (`sift refine`), else scored.jsonl (`sift score`), else filtered.jsonl,
applies the human review in runs/<run>/review.jsonl (`sift view`; pipeline/io/review.py) and writes,
atomically:
- train.jsonl / valid.jsonl: {"id", "messages": [user, assistant], "metadata"} a line;
- alpaca.json: the train split as Alpaca's list of {instruction, input, output};
- export.rejected.jsonl: records dropped as `contaminated`: they share a word 13-gram (or a whole
  8-12-word text) with a task of sift's general held-out set (train/general_set.py), so a student
  is never trained on what `sift eval` scores it on. The ledger names the task ids they overlap.
  Records a reviewer rejected are there too, with reason `human_review` and the note; an edited
  output replaces the teacher's, and metadata.provenance.review keeps the original;
- README.md: the dataset card (pipeline/views/card.py), whose `configs` make the folder load with
  `datasets.load_dataset(folder)` as train and validation splits.
The split hashes each id with the seed, so it is deterministic and a record stays on its side
when others are added or removed. All three load with `datasets.load_dataset("json", ...)`.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import (
    AtomicFile,
    JsonListWriter,
    all_or_none,
    file_sha256,
    iter_jsonl,
    json_line,
    require,
    write_json,
    write_jsonl,
    write_text,
)
from pipeline.io.review import REVIEW_FILE, is_stale, latest, read_review, review_record
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.io.stage_stats import stage_stats
from pipeline.settings import ExportSettings, to_dict
from pipeline.views.card import card_text, read_inputs
from train.format import to_messages
from train.general_set import GENERAL_PATH, EvalIndex, build_eval_index, load_general, overlapping_tasks

# carried if present
METADATA_FIELDS = ("provenance", "source", "task_id", "seed_id", "is_classification", "loop", "scores")


def split_score(record_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from the id and seed: below the valid fraction means validation."""
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_ids(ids: list[str], valid_fraction: float, seed: int) -> set[str]:
    """The ids of the validation split: at least one when there are two or more records."""
    scores = {i: split_score(i, seed) for i in ids}
    valid = {i for i, s in scores.items() if s < valid_fraction}
    if not valid and len(ids) >= 2 and valid_fraction > 0:
        valid = {min(ids, key=scores.__getitem__)}
    if len(valid) == len(ids) and ids:  # keep something to train on
        valid.discard(max(valid, key=scores.__getitem__))
    return valid


def read_filtered(path) -> list[dict]:
    return list(iter_filtered(path))


def iter_filtered(path, *, check_ids: bool = True) -> Iterator[dict]:
    """The export records of `path` ({id, instruction, input, output, metadata}) a line at a time, each
    checked; `check_ids` refuses a repeated id (it keeps every id seen, with its line)."""
    seen: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        rec = {k: require(obj, k, str, path=path, line=line) for k in ("id", "instruction", "input", "output")}
        for k in ("instruction", "output"):
            if not rec[k].strip():
                raise SiftError("is empty", path=path, line=line, field=k)
        if check_ids:
            if rec["id"] in seen:
                raise SiftError(f"duplicate id {rec['id']!r} (first on line {seen[rec['id']]})", path=path,
                                line=line, field="id")
            seen[rec["id"]] = line
        rec["metadata"] = {k: obj[k] for k in METADATA_FIELDS if k in obj}
        yield rec


def chat_record(r: dict) -> dict:
    """An exported line: the id, the chat messages, and the metadata carried along."""
    return {"id": r["id"], "messages": to_messages(r["instruction"], r["input"], r["output"]),
            "metadata": r.get("metadata", {})}


def decontaminate(records: list[dict], tasks: list[dict], *, eval_set: str = "general"
                  ) -> tuple[list[dict], list[dict]]:
    """Split records into kept ones and a rejected ledger of those whose instruction, input or output
    shares a 13-gram with an eval task: {id, reason: contaminated, score (shared windows), eval_set,
    eval_ids, record}."""
    index = build_eval_index(tasks)
    kept, rejected = [], []
    for r in records:
        row = contamination_row(r, index, eval_set=eval_set)
        (kept if row is None else rejected).append(r if row is None else row)
    return kept, rejected


def contamination_row(r: dict, index: EvalIndex, *, eval_set: str = "general") -> dict | None:
    """`decontaminate`'s ledger row for one record, or None when it shares no 13-gram with a task."""
    ids, shared = overlapping_tasks((r["instruction"], r["input"], r["output"]), index)
    if not ids:
        return None
    rec = {k: v for k, v in r.items() if k != "metadata"} | r.get("metadata", {})
    return {"id": r["id"], "reason": "contaminated", "score": shared, "eval_set": eval_set, "eval_ids": ids,
            "record": rec}


def write_splits(directory: Path, train: list[dict], valid: list[dict], rejected: list[dict] | None = None) -> None:
    """train.jsonl, valid.jsonl and alpaca.json in `directory`, and export.rejected.jsonl when a
    ledger is given (even an empty one, so no stale ledger stays): all or none."""
    names = ["train.jsonl", "valid.jsonl", "alpaca.json"] + (["export.rejected.jsonl"] if rejected is not None else [])
    with all_or_none(*(directory / n for n in names)):
        if rejected is not None:
            write_jsonl(directory / "export.rejected.jsonl", rejected)
        write_jsonl(directory / "train.jsonl", (chat_record(r) for r in train))
        write_jsonl(directory / "valid.jsonl", (chat_record(r) for r in valid))
        write_json(directory / "alpaca.json", [{"instruction": r["instruction"], "input": r["input"],
                                                "output": r["output"]} for r in train])


def export_source(directory: Path) -> Path:
    """refined.jsonl (`sift refine`) when the run has it, else scored.jsonl (the scored and selected
    records of `sift score`), else filtered.jsonl; a file older than the one it was made from is
    stale, and an error."""
    refined, scored, filtered = (directory / n for n in ("refined.jsonl", "scored.jsonl", "filtered.jsonl"))
    if refined.is_file():
        newest = max((p for p in (scored, filtered) if p.is_file()), key=lambda p: p.stat().st_mtime_ns, default=None)
        if newest is not None and newest.stat().st_mtime_ns > refined.stat().st_mtime_ns:
            raise SiftError(f"older than {newest.name}: rerun `sift refine` (make refine), or delete it to export "
                            f"the records unrefined", path=refined)
        return refined
    if not scored.is_file():
        return filtered
    if filtered.is_file() and filtered.stat().st_mtime_ns > scored.stat().st_mtime_ns:
        raise SiftError("older than filtered.jsonl: rerun `sift score` (make score), or delete it to export "
                        "the filtered records unscored", path=scored)
    return scored


@dataclass
class TrainingPlan:
    """What the first pass over a run's source learns, in memory the size of its ids: what `sift export`
    and `sift federate` train on is `training_rows` of this, a second pass that needs nothing else.

    kept_ids are the ids left after the review and the decontamination, in file order; contaminated
    the ids of those the decontamination drops; counts the review's (as `apply_review` counts them)."""

    source: Path
    decisions: dict[str, dict]
    eval_index: EvalIndex | None
    read: int = 0
    kept_ids: list[str] = field(default_factory=list)
    contaminated: set[str] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("accepted", "rejected", "edited", "stale", "unmatched"), 0))
    with_input: int = 0


def plan_training(directory: Path, *, decontaminate_general: bool = True) -> TrainingPlan:
    """The first pass: the source (`export_source`: the score stage's selection when there is one), every
    record checked, the review in review.jsonl applied (pipeline/io/review.py: rejected records leave,
    edits replace outputs), then records sharing a 13-gram with the general eval set dropped unless
    `decontaminate_general` is off. A broken review ledger or record, or nothing left to train on, is
    an error before anything is written."""
    source = export_source(directory)
    decisions = latest(read_review(directory / REVIEW_FILE))
    where = (source.name, file_sha256(source)) if decisions else None
    index = build_eval_index(load_general(GENERAL_PATH)) if decontaminate_general else None
    plan = TrainingPlan(source, decisions, index)
    matched: set[str] = set()
    first: dict | None = None
    for rec in iter_filtered(source):
        plan.read += 1
        d = decisions.get(rec["id"])
        kind, row = review_record(rec, d)
        if d is not None:
            matched.add(rec["id"])
            plan.counts[kind] += 1
            plan.counts["stale"] += is_stale(d, where)
        if kind == "rejected":
            continue
        if index is not None and (dropped := contamination_row(row, index)) is not None:
            plan.contaminated.add(rec["id"])
            first = first or dropped
            continue
        plan.kept_ids.append(rec["id"])
        plan.with_input += bool(row["input"])
    plan.counts["unmatched"] = len(decisions) - len(matched)
    if not plan.kept_ids:
        if first is None:
            raise SiftError(f"all {plan.read} records were rejected in review ({REVIEW_FILE}); nothing is left to "
                            "train on", path=directory / REVIEW_FILE)
        raise SiftError(f"all {plan.read - plan.counts['rejected']} records share a 13-gram with the general eval set "
                        f"(the first, {first['id']!r}, with {', '.join(first['eval_ids'])}); nothing is left to "
                        "train on", path=source)
    return plan


def training_rows(plan: TrainingPlan) -> Iterator[tuple[str, dict]]:
    """The second pass, a record at a time in file order: ("kept", record with reviewed edits applied),
    ("human_review", ledger row) or ("contaminated", ledger row). A source that no longer gives what the
    first pass saw (changed in between) is an error."""
    kept = 0
    for rec in iter_filtered(plan.source, check_ids=False):
        kind, row = review_record(rec, plan.decisions.get(rec["id"]))
        if kind == "rejected":
            yield "human_review", row
        elif rec["id"] in plan.contaminated and plan.eval_index is not None:
            dropped = contamination_row(row, plan.eval_index)
            if dropped is None:
                raise SiftError("changed while it was being exported; run again", path=plan.source)
            yield "contaminated", dropped
        else:
            if kept >= len(plan.kept_ids) or plan.kept_ids[kept] != rec["id"]:
                raise SiftError("changed while it was being exported; run again", path=plan.source)
            kept += 1
            yield "kept", row
    if kept != len(plan.kept_ids):
        raise SiftError("changed while it was being exported; run again", path=plan.source)


def training_records(directory: Path, *, decontaminate_general: bool = True
                     ) -> tuple[Path, list[dict], list[dict]]:
    """What a run trains on, for `sift federate` as for `sift export`: (the source file, the records
    kept, the `contaminated` ledger), in lists; see `plan_training` and `training_rows`."""
    plan = plan_training(directory, decontaminate_general=decontaminate_general)
    kept: list[dict] = []
    contaminated: list[dict] = []
    for kind, row in training_rows(plan):
        if kind != "human_review":
            (kept if kind == "kept" else contaminated).append(row)
    return plan.source, kept, contaminated


def write_export(directory: Path, rows: Iterable[tuple[str, dict]], valid_ids: set[str]) -> None:
    """`write_splits`' four files (the same bytes) from `training_rows`, a record at a time, into
    temporary files renamed at the end in write_splits' order. The ledger lists the human_review rows
    before the contaminated ones, so those are spooled to an unnamed temporary file until the end."""
    files: list[AtomicFile] = []
    try:
        for name in ("export.rejected.jsonl", "train.jsonl", "valid.jsonl", "alpaca.json"):
            files.append(AtomicFile(directory / name))
        rejected, train, valid, alpaca_file = files
        alpaca = JsonListWriter(alpaca_file, indent=2)
        try:
            with tempfile.TemporaryFile("w+", encoding="utf-8", dir=directory) as spool:
                for kind, row in rows:
                    if kind == "human_review":
                        rejected.write(json_line(row))
                    elif kind == "contaminated":
                        spool.write(json_line(row))
                    elif row["id"] in valid_ids:
                        valid.write(json_line(chat_record(row)))
                    else:
                        train.write(json_line(chat_record(row)))
                        alpaca.add({"instruction": row["instruction"], "input": row["input"],
                                    "output": row["output"]})
                spool.seek(0)
                for chunk in iter(lambda: spool.read(1 << 20), ""):
                    rejected.write(chunk)
        except OSError as e:
            raise SiftError(f"cannot write a temporary file: {e.strerror or e}", path=directory) from None
        alpaca.close()
        for f in files:
            f.commit()
    except BaseException:
        for f in files:
            f.abort()
        raise


def export(*, run: str = "demo", export: ExportSettings = ExportSettings()) -> None:
    """Write train.jsonl, valid.jsonl (chat messages) and alpaca.json from refined, scored or filtered.jsonl.

    Records that share a word 13-gram with sift's general held-out set go to export.rejected.jsonl
    (reason `contaminated`, with the ids of the tasks they overlap) instead, and so do records
    rejected in review.jsonl (`sift view`; reason `human_review`); reviewed edits replace outputs.
    Also writes README.md, the dataset card.

    Args:
        run: Run name; artifacts live in runs/<run>/.
        export: the split and the decontamination.
    """
    directory = run_dir(run)
    export_source(directory)  # a stale scored.jsonl is an error before the lock is taken
    with locked(directory):
        plan = plan_training(directory, decontaminate_general=export.decontaminate_general)
        valid_ids = split_ids(plan.kept_ids, export.valid_fraction, export.seed)
        kept, valid = len(plan.kept_ids), len(valid_ids)
        contaminated, c = len(plan.contaminated), plan.counts
        by_reason = {k: v for k, v in (("human_review", c["rejected"]), ("contaminated", contaminated)) if v}
        stats = stage_stats("export", "examples", read=plan.read, kept=kept, rejected_by_reason=by_reason,
                            extras={"train": kept - valid, "valid": valid, "with_input": plan.with_input,
                                    "review": {"decisions": len(plan.decisions), **c}})
        outputs = ("train.jsonl", "valid.jsonl", "alpaca.json", "export.rejected.jsonl", "README.md")
        with all_or_none(*(directory / n for n in outputs)):
            write_export(directory, training_rows(plan), valid_ids)
            write_text(directory / "README.md", card_text(run, read_inputs(directory), stats))
        record_stage(directory, "export", {"run": run} | to_dict(export=export), stats=stats)
    print(f"exported {kept - valid} train and {valid} validation records to {directory}/"
          " (train.jsonl, valid.jsonl, alpaca.json)")
    if contaminated:
        print(f"dropped {contaminated} record{'s' * (contaminated != 1)} that overlap the general eval set"
              f" (reason contaminated): {directory / 'export.rejected.jsonl'}")
    if plan.decisions:
        print(f"review ({REVIEW_FILE}): {c['rejected']} rejected (reason human_review), {c['edited']} edited, "
              f"{c['accepted']} accepted" + (f"; {c['stale']} decided on an earlier {plan.source.name}, applied by id"
                                             if c["stale"] else "")
              + (f"; {c['unmatched']} name no record of {plan.source.name}" if c["unmatched"] else ""))
    print(f"dataset card: {directory / 'README.md'} (datasets.load_dataset on the folder gives train and validation)")
