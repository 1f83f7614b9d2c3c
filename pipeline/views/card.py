"""The exported dataset's card: README.md in the Hugging Face format, beside train.jsonl and valid.jsonl.

    sift export --run demo      # writes runs/demo/README.md with the splits
    datasets.load_dataset("runs/demo")   # train and validation, as the card's `configs` say

`card_text` is a pure function of what the run's files say (`read_inputs` reads them): the
manifest, each stage's stats, the filter's funnel and the export's own counts. The YAML front
matter names the license, task categories, size category and the two splits' files, so the
folder loads as a dataset although it holds the run's other artifacts too; the text says in plain
words how the data was made and what it is not fit for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATS_FILES = {"seeds": "seeds.stats.json", "generate": "generate.stats.json", "classify": "classify.stats.json",
               "instances": "instances.stats.json", "filter": "filter.stats.json", "score": "score.stats.json",
               "refine": "refine.stats.json"}
SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"))


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_inputs(directory: Path) -> dict[str, Any]:
    """What the card is made from: manifest.json, every stage's stats and funnel.json, as found."""
    stats = {stage: _read(directory / name) for stage, name in STATS_FILES.items()}
    return {"manifest": _read(directory / "manifest.json") or {},
            "stats": {k: v for k, v in stats.items() if isinstance(v, dict)},
            "funnel": _read(directory / "funnel.json")}


def size_category(n: int) -> str:
    return next((label for limit, label in SIZES if n < limit), "n>10M")


def _teachers(manifest: dict[str, Any]) -> list[str]:
    """Every teacher model a stage of the run recorded, in stage order."""
    names: list[str] = []
    for stage in (manifest.get("stages") or {}).values():
        for key, value in (stage.get("models") or {}).items():
            if "teacher" in key or key == "judge":
                for name in (value if isinstance(value, list) else [value]):
                    text = name.get("name") if isinstance(name, dict) else name
                    if isinstance(text, str) and text.split("|")[0] not in names:  # "name|dtype=...": the name
                        names.append(text.split("|")[0])
    return names


def _reasons(stats: dict[str, Any]) -> str:
    by = stats.get("rejected_by_reason") or stats.get("by_reason") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(by.items(), key=lambda x: -x[1])) or "none"


def _count(stats: dict[str, Any], *names: str) -> Any:
    """The first of `names` a stats document has (the shared schema's name first, then older ones)."""
    return next((stats[n] for n in names if n in stats), "")


def _funnel_rows(stats: dict[str, dict[str, Any]], export: dict[str, Any]) -> list[str]:
    rows = ["| stage | unit | read | kept | dropped (by reason) |", "| --- | --- | ---: | ---: | --- |"]
    for stage, s in [*((k, stats.get(k)) for k in STATS_FILES), ("export", export)]:
        if s:
            rows.append(f"| {stage} | {s.get('unit', '')} | {_count(s, 'read', 'candidates', 'input', 'records_in')} "
                        f"| {_count(s, 'kept', 'accepted', 'tasks')} | {_reasons(s)} |")
    return rows


def card_text(run: str, inputs: dict[str, Any], export: dict[str, Any]) -> str:
    """The README.md of an exported run: front matter, how it was made, its fields, its limits."""
    manifest, stats = inputs["manifest"], inputs["stats"]
    stages = manifest.get("stages") or {}
    n = int(export.get("train", 0)) + int(export.get("valid", 0))
    gen = ((stages.get("generate") or {}).get("settings") or {}).get("generate") or {}
    recipe = gen.get("recipe") or "self-instruct"
    teachers = _teachers(manifest) or ["(not recorded)"]
    seeds = stats.get("seeds") or {}
    seed_file = ((stages.get("seeds") or {}).get("settings") or {}).get("source") or ""
    funnel = inputs.get("funnel")
    rules = [r.get("rule") for r in (funnel.get("rules") if isinstance(funnel, dict) else funnel or [])
             if isinstance(r, dict) and r.get("rule")]
    score = stats.get("score") or {}
    review = export.get("review") or {}
    front = [
        "---",
        "license: other  # the teacher models' terms govern text they wrote: set this before sharing",
        "task_categories:", "- text-generation",
        "tags:", "- synthetic", "- instruction-tuning", "- self-instruct", "- sift",
        "size_categories:", f"- {size_category(n)}",
        "configs:", "- config_name: default", "  data_files:",
        "  - split: train", "    path: train.jsonl", "  - split: validation", "    path: valid.jsonl",
        "---",
    ]
    made = [
        f"- **Recipe:** {recipe}: a teacher model wrote new instructions from a few example tasks, "
        "labelled each as classification or not, and wrote inputs and outputs for them.",
        f"- **Teachers:** {', '.join(teachers)}.",
        f"- **Seeds:** {_count(seeds, 'kept', 'tasks') or '?'} human-written seed tasks"
        + (f" ({seed_file})" if seed_file else "") + ".",
        f"- **Filters:** {', '.join(rules) if rules else 'the default heuristics'}, then exact ROUGE-L "
        "deduplication against the seeds and every kept instruction (a near-duplicate is dropped).",
        (f"- **Scores:** {', '.join(score.get('scorers') or [])}; kept by "
         f"{', '.join(score.get('keep') or []) or 'no rule (all kept)'}." if score
         else "- **Scores:** none (`sift score` did not run)."),
        (f"- **Human review:** a person read records in `sift view`: {review.get('rejected', 0)} rejected, "
         f"{review.get('edited', 0)} edited (the original answer stays in `metadata.provenance.review`), "
         f"{review.get('accepted', 0)} accepted."
         if review.get("decisions") else "- **Human review:** none; no record was read by a person."),
        f"- **Decontamination:** {(export.get('rejected_by_reason') or {}).get('contaminated', 0)} records sharing "
        "a 13-gram with sift's general "
        "held-out set were dropped.",
        f"- **Split:** {export.get('train', 0)} train, {export.get('valid', 0)} validation, by a hash of each id.",
    ]
    body = [
        f"# sift run `{run}`", "",
        "Instruction-following data (Self-Instruct / Alpaca style) written by a language model and filtered "
        "by sift. Every number below comes from the run's own files.", "",
        "## How it was made", "", *made, "",
        "### Funnel", "", *_funnel_rows(stats, export), "",
        "## Fields", "",
        "`train.jsonl` and `valid.jsonl`: one record a line, `{id, messages: [user, assistant], metadata}`; "
        "`metadata.provenance` holds the prompt template, teacher, sampling settings and raw response of "
        "every teacher call, and `metadata.scores` the scores. `alpaca.json` holds the train split as "
        "`{instruction, input, output}`.", "",
        "## What it is not fit for", "",
        "- **Facts:** nothing was fact-checked. The answers are as right or wrong as the teacher.",
        "- **Evaluation:** it is training data. It was decontaminated only against sift's general set, "
        "not against public benchmarks.",
        "- **High-stakes advice:** medical, legal, financial or safety-critical use.",
        "- **Human preference or human-written text:** no person wrote it"
        + (" and only some of it was reviewed." if review.get("decisions") else " or reviewed it."),
        "- **Languages and domains the seeds do not cover:** the data inherits the seeds' topics and the "
        "teacher's biases.", "",
        "## Loading", "", "```python", "from datasets import load_dataset", "",
        f"splits = load_dataset(\"path/to/{run}\")  # train and validation", "```", "",
    ]
    return "\n".join(front + [""] + body)
