"""The prompts behind a record, rebuilt from its provenance, and the teacher's raw responses.

Provenance names each teacher call's template (name and SHA) and its fields, not the prompt text.
Where the fields are on the record (classify and instances ask about the instruction) and the
template in prompts/ still has the recorded SHA, the exact prompt is rendered again. Otherwise
(generate shows sampled examples whose order is not recorded; a template edited since) the page
says so and lists what it knows: the template and the examples' ids.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import SiftError
from pipeline.teachers import prompts as templates

RENDERABLE = {"classify", "instances"}  # stages whose only prompt field is the record's instruction


def _template(info: Any) -> tuple[Any, str]:
    """(template or None, why not) for a provenance `prompt` entry; only prompts/ names are opened."""
    if not isinstance(info, dict) or not isinstance(info.get("name"), str):
        return None, "no template recorded"
    if info["name"] not in templates.available():
        return None, f"template {info['name']!r} is not one of sift's prompts/ (a custom file)"
    try:
        t = templates.load(info["name"])
    except SiftError as e:
        return None, str(e)
    if info.get("sha") and t.sha != info["sha"]:
        return None, f"prompts/{info['name']}.txt changed since (recorded sha {info['sha']}, now {t.sha})"
    return t, ""


def calls(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per teacher call in the record's provenance (generate, classify, instances, ...):
    {stage, template, prompt (text or None), why (when None), raw_response, finish_reason, seed_ids,
    machine_ids}."""
    prov = record.get("provenance")
    if not isinstance(prov, dict):
        return []
    blocks = [("generate" if prov.get("stage") in (None, "generate") else str(prov.get("stage")), prov)]
    blocks += [(k, v) for k, v in prov.items() if isinstance(v, dict) and "raw_response" in v]
    out = []
    for stage, block in blocks:
        if "prompt" not in block and "raw_response" not in block:
            continue
        template, why = _template(block.get("prompt"))
        text = None
        if template is not None and stage in RENDERABLE and isinstance(record.get("instruction"), str):
            try:
                text = template.render(instruction=record["instruction"])
            except SiftError as e:
                why = str(e)
        elif template is not None:
            why = "built from sampled examples whose order is not recorded; the examples shown were:"
        out.append({"stage": stage, "template": (block.get("prompt") or {}).get("name"), "prompt": text,
                    "why": why, "template_text": template.body if template is not None and text is None else None,
                    "raw_response": block.get("raw_response"), "finish_reason": block.get("finish_reason"),
                    "seed_ids": block.get("seed_ids") or [], "machine_ids": block.get("machine_ids") or []})
    return out
