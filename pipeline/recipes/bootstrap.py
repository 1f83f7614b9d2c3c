"""Deciding one round of the generate loop: responses -> accepted and rejected records (no I/O).

    accepted, rejected = decide_round(recipe, planned, completions, index, check, base, known_ids)

Per response, in request order: a teacher error, a truncated response (Self-Instruct drops it
whole) or unparseable pieces become rejected records with the raw text; each parsed candidate
then meets the heuristic rules, and the survivors go through the ROUGE-L index in order, so a
candidate is compared with the seeds, everything accepted before, and the earlier accepted
candidates of its own round (the reference's sequential decision).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import ModuleType

from pipeline.errors import SiftError
from pipeline.io.artifacts import content_id
from pipeline.recipes import alpaca, self_instruct
from pipeline.teachers.base import Completion

Recipe = ModuleType  # a module of pipeline/recipes with NAME, PROMPT, RULES, build_prompt, parse, ...
RECIPES = {"self-instruct": self_instruct, "alpaca": alpaca}
Check = Callable[[dict], "str | None"]


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise SiftError(f"unknown recipe {name!r} (choose one of {', '.join(RECIPES)})", field="recipe")
    return RECIPES[name]


def heuristics_for(preset: str) -> Check:
    """The preset's rules as one check: the first rule's reason, or None to keep."""
    from filters import heuristics
    from filters import rules as rule_names

    try:
        rules = rule_names.preset(preset)
    except (KeyError, ValueError) as e:
        raise SiftError(str(e).strip("'\""), field="rules") from None

    def check(candidate: dict) -> str | None:
        return heuristics.first_reason(candidate, rules)

    return check


def normalise(text: str) -> str:
    """What two instructions must share to be the same one: words, case-folded."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def instruction_id(candidate: dict) -> str:
    key = normalise(candidate["instruction"])
    if "input" in candidate or "output" in candidate:  # Alpaca: the same instruction may come with another input
        key = [key, normalise(candidate.get("input", "")), normalise(candidate.get("output", ""))]
    return content_id(key, "ins_")


def _rejected(reason: str, text: str, prov: dict, *, raw: str | None = None, detail: str | None = None,
              **extra: object) -> dict:
    rec = {"reason": reason, "text": text, **extra, "detail": detail, "raw": raw, "provenance": prov}
    rec["id"] = content_id({"reason": reason, "text": text, "raw": raw, "detail": detail,
                            "request_index": prov.get("request_index")}, "rej_")
    return rec


def decide_round(recipe: Recipe, planned: list[tuple], completions: list[Completion], index,
                 check: Check, base: dict, known_ids: set[str]) -> tuple[list[dict], list[dict]]:
    """Accepted and rejected records of one round; `index` (a filters.rouge.RougeIndex) grows."""
    slots: list[dict | None] = []  # per candidate in order: a rejected record, or None while pending
    pending: list[tuple[int, dict, dict]] = []  # (slot, candidate, provenance)
    for (req, fields, seed_ids, machine_ids, req_index), comp in zip(planned, completions, strict=True):
        prov = {**base, "seed_ids": seed_ids, "machine_ids": machine_ids, "request_index": req_index,
                "request_seed": req.sampling.seed, "raw_response": comp.text,
                "finish_reason": comp.finish_reason}
        if comp.teacher:  # a TeacherPool says which of its teachers wrote this one
            prov["teacher"] = comp.teacher
        if comp.finish_reason == "error":
            slots.append(_rejected("teacher_error", "", prov, raw=comp.text, detail=comp.error))
            continue
        truncated = comp.finish_reason == "length"
        if truncated and recipe.DROP_TRUNCATED_RESPONSE:
            slots.append(_rejected("truncated_response", comp.text, prov, raw=comp.text))
            continue
        candidates, problems = recipe.parse(comp.text, truncated=truncated, start=fields["next"])
        for problem in problems:
            reason = "truncated_response" if problem.reason.startswith("truncated") else "parse_error"
            slots.append(_rejected(reason, problem.raw, prov, raw=comp.text, detail=problem.reason))
        for cand in candidates:
            reason = check(cand)
            if reason is not None:
                slots.append(_rejected(reason, cand["instruction"], prov, candidate=cand))
                continue
            slots.append(None)
            pending.append((len(slots) - 1, cand, prov))
    accepted_at: dict[int, dict] = {}
    seen = set(known_ids)
    stream = [(slot, instruction_id(cand), cand, prov) for slot, cand, prov in pending]
    decisions = index.filter_stream((cid, cand["instruction"]) for _, cid, cand, _ in stream)
    for (slot, cid, cand, prov), (_, match, kept) in zip(stream, decisions, strict=True):
        similar = [{"id": nb.id, "instruction": nb.text, "score": nb.score} for nb in match.most_similar]
        if kept and cid in seen:  # same words as an accepted one, yet no ROUGE tokens to match (e.g. "¿?")
            slots[slot] = _rejected("exact_duplicate", cand["instruction"], prov, candidate=cand, nearest_id=cid)
        elif kept:
            seen.add(cid)
            accepted_at[slot] = {"id": cid, **cand, "most_similar": similar,
                                 "avg_similarity_score": match.mean_all,
                                 "avg_top10_similarity": match.mean_top_k,
                                 "max_similarity": match.score, "nearest_id": match.nearest_id,
                                 "provenance": prov}
        else:
            slots[slot] = _rejected("rouge_duplicate", cand["instruction"], prov, candidate=cand,
                                    score=match.score, nearest_id=match.nearest_id,
                                    nearest_text=match.nearest_text)
    accepted = [accepted_at[i] for i in sorted(accepted_at)]
    rejected = [r for r in slots if r is not None]
    return accepted, rejected
