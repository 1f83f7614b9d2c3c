"""Everything a record's page shows, gathered from the run: its texts, the ledger's verdict, the kept
record a duplicate lost to, its prompts and raw responses, its scores, its refinement, whether it
reached the student (split, IFD, the student's answer in eval.json) and its review history."""

from __future__ import annotations

import json
from typing import Any

from pipeline.views.viewer import prompts
from pipeline.views.viewer.catalog import KEPT_FOR, Catalog
from pipeline.views.viewer.fields import content, texts
from pipeline.views.viewer.indexes import Indexes

ENTRY_FIELDS = ("reason", "score", "score_name", "nearest_id", "nearest_text", "detail", "eval_set", "eval_ids",
                "note", "line")
# where a duplicate's nearest record may live, the stage's own kept artifact first
NEAREST_IN = ("filtered.jsonl", "instances.jsonl", "classified.jsonl", "instructions.jsonl", "seeds.jsonl")
SCORES_FROM = ("scored.jsonl", "scored.rejected.jsonl", "refined.jsonl")


def nearest(catalog: Catalog, indexes: Indexes, artifact: str, rec: dict[str, Any]) -> dict[str, Any] | None:
    """For a rouge_duplicate: the kept record it duplicates, looked up by the ledger's nearest_id
    (a record id, or a task_id when the pool holds tasks), with the ROUGE-L the filter measured."""
    nid = rec.get("nearest_id")
    if rec.get("reason") != "rouge_duplicate" or not isinstance(nid, str):
        return None
    order = [KEPT_FOR.get(artifact.rsplit("/", 1)[-1], ""), *NEAREST_IN]
    found = None
    for name in dict.fromkeys(n for n in order if n):
        found = indexes.find(name, nid) or _by_task(indexes, name, nid)
        if found:
            break
    kept = texts(found["record"]) if found else {"instruction": str(rec.get("nearest_text") or ""),
                                                  "input": "", "output": ""}
    return {"id": nid, "rouge_l": rec.get("score"), "found": found, "texts": kept}


def _by_task(indexes: Indexes, name: str, task_id: str) -> dict[str, Any] | None:
    idx = indexes.open(name) if name else None
    if idx is None:
        return None
    with idx:
        if "task_id" not in idx.columns:
            return None
        from pipeline.views.viewer.index import Query

        total, rows = idx.query(Query(where=(("task_id", task_id),), per=1))
        return {"artifact": name, "rowid": rows[0].rowid, "record": idx.read(rows[0])} if rows else None


def student(catalog: Catalog, indexes: Indexes, rec: dict[str, Any]) -> dict[str, Any] | None:
    """Whether the record reached the student: its split, its IFD, and the base's and student's
    answers in each eval set that evaluated it."""
    rid = rec.get("id")
    if not isinstance(rid, str) or not catalog.is_run:
        return None
    split = next((name for name in ("train.jsonl", "valid.jsonl") if indexes.find(name, rid)), None)
    if split is None:
        return None
    scores = rec.get("scores") if isinstance(rec.get("scores"), dict) else None
    if not scores or "ifd" not in scores:
        for name in SCORES_FROM:
            hit = indexes.find(name, rid)
            if hit and isinstance(content(hit["record"]).get("scores"), dict):
                scores = content(hit["record"])["scores"]
                break
    answers = []
    for set_name, entry in catalog.eval_sets().items():
        for s in entry.get("samples") or []:
            if isinstance(s, dict) and s.get("id") == rid:
                answers.append({"set": set_name, **s})
    return {"split": split.removesuffix(".jsonl"), "ifd": (scores or {}).get("ifd"), "answers": answers}


def page(catalog: Catalog, indexes: Indexes, artifact: str, raw: dict[str, Any],
         history: list[dict[str, Any]]) -> dict[str, Any]:
    """The record page's context (the template escapes every string it prints)."""
    rec = content(raw)
    entry = {k: raw[k] for k in ENTRY_FIELDS if k in raw and "record" in raw}
    entry.update({k: rec[k] for k in ("reason",) if k in rec and "reason" not in entry})
    shown = {k: v for k, v in rec.items() if k not in ("provenance", "instruction", "input", "output", "messages",
                                                       "scores", "score_details", "refinement", "most_similar")}
    return {
        "id": rec.get("id"),
        "texts": texts(raw),
        "messages": rec.get("messages") if isinstance(rec.get("messages"), list) else None,
        "instances": rec.get("instances") if isinstance(rec.get("instances"), list) else None,
        "entry": entry,
        "duplicate": nearest(catalog, indexes, artifact, {**rec, **entry}),
        "calls": prompts.calls(rec),
        "provenance": json.dumps(rec.get("provenance"), indent=2, ensure_ascii=False)
        if rec.get("provenance") is not None else None,
        "scores": rec.get("scores") if isinstance(rec.get("scores"), dict) else None,
        "score_details": json.dumps(rec["score_details"], indent=2, ensure_ascii=False)
        if rec.get("score_details") else None,
        "refinement": rec.get("refinement") if isinstance(rec.get("refinement"), dict) else None,
        "student": student(catalog, indexes, rec),
        "fields": json.dumps(shown, indent=2, ensure_ascii=False, default=str),
        "history": history,
        "decision": history[-1] if history and history[-1]["decision"] != "undo" else None,
    }
