"""The general held-out set sift ships, and the 13-gram check that keeps it out of training data.

    .venv/bin/python -m pytest tests/train/test_general_set.py -q
    sift export --run demo            # drops records that overlap the set (reason `contaminated`)

train/evalsets/general.jsonl holds tasks written for sift, one a line: {"id", "category", "instruction",
"input", "output"}, spread over writing, rewriting, extraction, classification, reasoning, short
code, lists, markdown tables, open questions and summaries (docs/evalsets.md). It measures what a
student can still do outside its own synthetic data, so none of it may reach training: export drops
a record sharing a word 13-gram (or a whole 8-12-word text) with any task, as filters/contamination.py
defines the overlap after GPT-3's decontamination.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from filters.contamination import NgramIndex, build_ngram_index, contaminated, ngram_overlap
from pipeline.errors import SiftError
from pipeline.io.artifacts import iter_jsonl, require

GENERAL_PATH = Path(__file__).resolve().parent / "evalsets" / "general.jsonl"
CATEGORIES = ("writing", "rewriting", "extraction", "classification", "reasoning", "code", "lists", "tables",
              "qa", "summarization")
FIELDS = ("id", "category", "instruction", "input", "output")
TEXT_FIELDS = ("instruction", "input", "output")  # the texts indexed for the contamination check


def load_general(path: str | Path = GENERAL_PATH) -> list[dict]:
    """The tasks of the general set, checked: every field a string, id, instruction and output not
    empty, a known category, ids and instructions unique. A bad line is one SiftError naming the file,
    the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise SiftError("the general eval set is missing (it ships with sift in train/evalsets/)", path=path)
    tasks: list[dict] = []
    first_line: dict[tuple[str, str], int] = {}
    for line, obj in iter_jsonl(path):
        task = {k: require(obj, k, str, path=path, line=line) for k in FIELDS}
        for k in ("id", "instruction", "output"):
            if not task[k].strip():
                raise SiftError("is empty", path=path, line=line, field=k)
        if task["category"] not in CATEGORIES:
            raise SiftError(f"unknown category {task['category']!r}; one of {', '.join(CATEGORIES)}", path=path,
                            line=line, field="category")
        for k in ("id", "instruction"):
            key = (k, task[k].strip().lower() if k == "instruction" else task[k])
            if key in first_line:
                raise SiftError(f"duplicate {k} (first on line {first_line[key]})", path=path, line=line, field=k)
            first_line[key] = line
        tasks.append(task)
    return tasks


@dataclass(frozen=True)
class EvalIndex:
    """The n-grams of an evaluation set, all together (the fast check) and per task (which task)."""

    all: NgramIndex
    by_task: Mapping[str, NgramIndex]


def build_eval_index(tasks: Iterable[Mapping[str, str]], *, n: int = 13) -> EvalIndex:
    """Index each task's instruction, input and output once."""
    tasks = list(tasks)
    texts = [[t.get(k) or "" for k in TEXT_FIELDS] for t in tasks]
    return EvalIndex(all=build_ngram_index((x for ts in texts for x in ts), n=n),
                     by_task={t["id"]: build_ngram_index(ts, n=n) for t, ts in zip(tasks, texts, strict=True)})


def overlapping_tasks(texts: Iterable[str], index: EvalIndex) -> tuple[list[str], int]:
    """The ids of the tasks that share a window with any of `texts`, and the number of shared windows
    (the `contaminated` rule's score); ([], 0) for a clean record."""
    texts = [t for t in texts if t and contaminated(t, index.all)]
    if not texts:
        return [], 0
    ids = [i for i, ix in index.by_task.items() if any(ngram_overlap(t, ix) for t in texts)]
    return ids, sum(ngram_overlap(t, index.all) for t in texts)
