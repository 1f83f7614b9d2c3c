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
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import all_or_none, file_sha256, iter_jsonl, require, write_json, write_jsonl, write_text
from pipeline.io.review import REVIEW_FILE, Applied, apply_review, latest, read_review
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.io.stage_stats import stage_stats
from pipeline.settings import ExportSettings, to_dict
from pipeline.views.card import card_text, read_inputs
from train.format import to_messages
from train.general_set import GENERAL_PATH, build_eval_index, load_general, overlapping_tasks

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
    records, seen = [], {}
    for line, obj in iter_jsonl(path):
        rec = {k: require(obj, k, str, path=path, line=line) for k in ("id", "instruction", "input", "output")}
        for k in ("instruction", "output"):
            if not rec[k].strip():
                raise SiftError("is empty", path=path, line=line, field=k)
        if rec["id"] in seen:
            raise SiftError(f"duplicate id {rec['id']!r} (first on line {seen[rec['id']]})", path=path,
                            line=line, field="id")
        seen[rec["id"]] = line
        rec["metadata"] = {k: obj[k] for k in METADATA_FIELDS if k in obj}
        records.append(rec)
    return records


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
        ids, shared = overlapping_tasks((r["instruction"], r["input"], r["output"]), index)
        if not ids:
            kept.append(r)
            continue
        rec = {k: v for k, v in r.items() if k != "metadata"} | r.get("metadata", {})
        rejected.append({"id": r["id"], "reason": "contaminated", "score": shared,
                         "eval_set": eval_set, "eval_ids": ids, "record": rec})
    return kept, rejected


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
class TrainingSet:
    """What a run trains on: the source file, its records as read, those kept (reviewed edits
    applied), the rejected ledger (human_review, then contaminated) and what the review did."""

    source: Path
    read: list[dict]
    kept: list[dict]
    reviewed: Applied
    contaminated: list[dict]
    decisions: int

    @property
    def rejected(self) -> list[dict]:
        return self.reviewed.rejected + self.contaminated


def training_set(directory: Path, *, decontaminate_general: bool = True) -> TrainingSet:
    """The source (`export_source`: the score stage's selection when there is one), with the review in
    review.jsonl applied (pipeline/io/review.py: rejected records leave, edits replace outputs), then
    records sharing a 13-gram with the general eval set dropped unless `decontaminate_general` is off.
    A broken review ledger, or nothing left to train on, is an error before anything is written."""
    source = export_source(directory)
    read = read_filtered(source)
    decisions = latest(read_review(directory / REVIEW_FILE))
    reviewed = apply_review(read, decisions, source=(source.name, file_sha256(source)))
    tasks = load_general(GENERAL_PATH) if decontaminate_general else []
    records, contaminated = decontaminate(reviewed.kept, tasks)
    if not records:
        if not contaminated:
            raise SiftError(f"all {len(read)} records were rejected in review ({REVIEW_FILE}); nothing is left to "
                            "train on", path=directory / REVIEW_FILE)
        first = contaminated[0]
        raise SiftError(f"all {len(reviewed.kept)} records share a 13-gram with the general eval set (the first, "
                        f"{first['id']!r}, with {', '.join(first['eval_ids'])}); nothing is left to train on",
                        path=source)
    return TrainingSet(source, read, records, reviewed, contaminated, len(decisions))


def training_records(directory: Path, *, decontaminate_general: bool = True
                     ) -> tuple[Path, list[dict], list[dict], list[dict]]:
    """What a run trains on, for `sift export` and `sift federate` alike: (the source file, its
    records, those kept, the `contaminated` ledger); see `training_set`, which this unpacks."""
    t = training_set(directory, decontaminate_general=decontaminate_general)
    return t.source, t.read, t.kept, t.contaminated


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
        t = training_set(directory, decontaminate_general=export.decontaminate_general)
        records, rejected = t.kept, t.contaminated
        valid_ids = split_ids([r["id"] for r in records], export.valid_fraction, export.seed)
        train = [r for r in records if r["id"] not in valid_ids]
        valid = [r for r in records if r["id"] in valid_ids]
        by_reason = {k: v for k, v in (("human_review", len(t.reviewed.rejected)), ("contaminated", len(rejected)))
                     if v}
        stats = stage_stats("export", "examples", read=len(t.read), kept=len(records), rejected_by_reason=by_reason,
                            extras={"train": len(train), "valid": len(valid),
                                    "with_input": sum(bool(r["input"]) for r in records),
                                    "review": {"decisions": t.decisions, **t.reviewed.counts}})
        outputs = ("train.jsonl", "valid.jsonl", "alpaca.json", "export.rejected.jsonl", "README.md")
        with all_or_none(*(directory / n for n in outputs)):
            write_splits(directory, train, valid, t.rejected)
            write_text(directory / "README.md", card_text(run, read_inputs(directory), stats))
        record_stage(directory, "export", {"run": run} | to_dict(export=export), stats=stats)
    print(f"exported {len(train)} train and {len(valid)} validation records to {directory}/"
          " (train.jsonl, valid.jsonl, alpaca.json)")
    if rejected:
        print(f"dropped {len(rejected)} record{'s' * (len(rejected) != 1)} that overlap the general eval set"
              f" (reason contaminated): {directory / 'export.rejected.jsonl'}")
    if t.decisions:
        c = t.reviewed.counts
        print(f"review ({REVIEW_FILE}): {c['rejected']} rejected (reason human_review), {c['edited']} edited, "
              f"{c['accepted']} accepted" + (f"; {c['stale']} decided on an earlier {t.source.name}, applied by id"
                                             if c["stale"] else "")
              + (f"; {c['unmatched']} name no record of {t.source.name}" if c["unmatched"] else ""))
    print(f"dataset card: {directory / 'README.md'} (datasets.load_dataset on the folder gives train and validation)")
