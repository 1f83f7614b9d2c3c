"""What the viewer sees in one record of any artifact: its texts, its filterable fields, its search text.

Pure functions over one parsed JSON object. They accept every artifact shape sift writes: plain
records ({id, instruction, input, output, ...}), Self-Instruct tasks ({instruction, instances}),
rejection ledger rows ({id, reason, score, ..., record}: the record's own fields are looked at
too), and exported chat lines ({id, messages, metadata}).
"""

from __future__ import annotations

from typing import Any

TEXT_KEYS = ("instruction", "input", "output")
# long free text: searched, never a filter column (a filter on a whole answer helps nobody)
FREE_TEXT = frozenset({"instruction", "input", "output", "nearest_text", "text", "reference", "detail", "raw",
                       "raw_response", "prompt", "messages", "instances", "most_similar", "note", "base",
                       "student", "critique", "original"})
NOT_SEARCHED = frozenset({"provenance", "score_details", "most_similar"})  # prompts and raw responses: noise
MAX_SHORT = 100  # a string field whose first value is longer is free text, not a category
MAX_DEPTH = 3


def content(obj: dict[str, Any]) -> dict[str, Any]:
    """The record proper: a ledger row's `record` (its entry fields on top), a chat line's metadata
    merged in, else the object itself."""
    inner = obj.get("record")
    if isinstance(inner, dict):
        return {**inner, **{k: v for k, v in obj.items() if k != "record"}}
    meta = obj.get("metadata")
    if isinstance(meta, dict) and "messages" in obj:
        return {**meta, **{k: v for k, v in obj.items() if k != "metadata"}}
    return obj


def texts(obj: dict[str, Any]) -> dict[str, str]:
    """instruction, input and output as strings ('' when absent) from any shape."""
    c = content(obj)
    out = {k: c[k] if isinstance(c.get(k), str) else "" for k in TEXT_KEYS}
    messages = c.get("messages")
    if isinstance(messages, list) and not out["instruction"]:
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        answers = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        out["instruction"] = str(users[0]) if users else ""
        out["output"] = str(answers[-1]) if answers else ""
    instances = c.get("instances")
    if isinstance(instances, list) and instances and isinstance(instances[0], dict) and not out["output"]:
        out["input"] = str(instances[0].get("input") or "")
        out["output"] = str(instances[0].get("output") or "")
    return out


def _flat(prefix: str, obj: dict[str, Any], depth: int, out: dict[str, Any], parts: list[str]) -> None:
    """Scalars of a nested object into `out` as dotted keys, its strings into `parts`."""
    for k, v in obj.items():
        t = type(v)
        if t is str:
            parts.append(v)
            if len(v) <= MAX_SHORT and k not in FREE_TEXT:
                out.setdefault(prefix + k, v)
        elif t is bool or t is int or t is float:
            out.setdefault(prefix + k, v)
        elif t is dict and depth < MAX_DEPTH and k not in NOT_SEARCHED:
            _flat(f"{prefix}{k}.", v, depth + 1, out, parts)


def describe(obj: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(facets, search text) of one record in one pass.

    Facets are the filterable, sortable fields: every scalar outside the free text (scores.ifd,
    reason, is_classification, filter.max_similarity, ...), the teacher, recipe and stage from the
    provenance, and the characters of instruction, input and output (len.*). The search text is
    every string except the provenance's (the prompt and raw response would make every common
    word match every record)."""
    c = content(obj)
    out: dict[str, Any] = {}
    parts: list[str] = []
    for k, v in c.items():
        t = type(v)
        if t is str:
            parts.append(v)
            if len(v) <= MAX_SHORT and k not in FREE_TEXT:
                out[k] = v
        elif t is bool or t is int or t is float:
            out[k] = v
        elif t is dict:
            if k == "provenance":
                _provenance_facets(v, out)
            elif k not in NOT_SEARCHED:
                _flat(k + ".", v, 2, out, parts)
        elif t is list and k not in NOT_SEARCHED:
            for item in v:
                if type(item) is str:
                    parts.append(item)
                elif type(item) is dict:
                    parts.extend(x for x in item.values() if type(x) is str)
    for k, v in texts(obj).items():
        out[f"len.{k}"] = len(v)
    return out, "\n".join(parts)


def _provenance_facets(prov: dict[str, Any], out: dict[str, Any]) -> None:
    teacher = prov.get("teacher")
    name = teacher.get("name") if isinstance(teacher, dict) else teacher
    if isinstance(name, str):
        out["teacher"] = name
    for key in ("recipe", "stage"):
        if isinstance(prov.get(key), str):
            out[key] = prov[key]


def facets(obj: dict[str, Any]) -> dict[str, Any]:
    return describe(obj)[0]


def search_text(obj: dict[str, Any]) -> str:
    return describe(obj)[1]


def kind_of(value: Any) -> str:
    """A column's kind from a value: bool, num or text."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "num"
    return "text"
