"""The pure parts of `sift loop` (LLM2LLM, Lee et al. 2024): which examples failed, what the teacher
is asked for each, and how its answer becomes new records that remember where they came from.

    failures = select_failures(scores, threshold=0.5, limit=16)
    request = augment_request(template, sampling, failure, answer="...", count=2)
    records, problems = parse_augmentation(completion.text, failure, round_index=1, count=2, truncated=False)

Only original examples (round 0: the seeds and the generated data the loop started from) are ever
evaluated and augmented, as LLM2LLM recommends: augmenting the augmentations drifts away from the
task. Every added record carries `loop`: {round, parent_id, parent_score, parent_instruction}.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.io.artifacts import content_id
from pipeline.teachers.base import Request, Sampling
from pipeline.teachers.parsers import NOINPUT, Problem, parse_alpaca, parse_yes_no
from pipeline.teachers.prompts import PromptTemplate

AUGMENT_PROMPT = "llm2llm_augment"
GRADE_PROMPT = "llm2llm_grade"
METRICS = ("rouge", "judge")
ECHOED_NUMBER = re.compile(r"^\s*\d{1,3}\.\s+(?=\S)")
AUGMENT_FIELDS = frozenset({"instruction", "input", "output", "student_answer", "count"})
GRADE_FIELDS = frozenset({"instruction", "input", "reference", "answer"})


def request_seed(seed: int, round_index: int, record_id: str) -> int:
    """A per-request sampling seed from the run seed, the round and the failed record."""
    digest = hashlib.sha256(f"{seed}:{round_index}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def select_failures(scores: Sequence[Mapping[str, Any]], *, threshold: float, limit: int = 0) -> list[dict]:
    """The scored examples below `threshold`, worst first (ties by id, so the choice is stable);
    `limit` > 0 keeps only that many of the worst."""
    failed = sorted((dict(s) for s in scores if s["score"] < threshold), key=lambda s: (s["score"], s["id"]))
    return failed[:limit] if limit > 0 else failed


def augment_request(template: PromptTemplate, sampling: Sampling, failure: Mapping[str, Any], *, answer: str,
                    count: int) -> Request:
    """The teacher request for one failed example: its task, the reference and the student's answer."""
    return template.request(sampling, instruction=failure["instruction"],
                            input=failure.get("input") or NOINPUT, output=failure["output"],
                            student_answer=answer.strip() or "(no answer)", count=count)


def augment_sampling(*, temperature: float, top_p: float, max_tokens: int, count: int, seed: int) -> Sampling:
    """Sampled, stopping before one task too many (the prompt shows task 1, the teacher writes 2...)."""
    return Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                    stop=(f"{count + 2}. Instruction", f"\n{count + 2}."))


def parse_augmentation(text: str, failure: Mapping[str, Any], *, round_index: int, count: int,
                       truncated: bool) -> tuple[list[dict], list[Problem]]:
    """New records from the teacher's reply (at most `count`), each with its lineage."""
    parsed = parse_alpaca(text, start=2, truncated=truncated)
    problems = list(parsed.problems)
    records = []
    for item in parsed.items:
        if len(records) == count:
            problems.append(Problem("over_count", item["instruction"]))
            continue
        records.append(new_record({**item, "instruction": unnumbered(item["instruction"])}, failure,
                                  round_index=round_index))
    return records, problems


def unnumbered(instruction: str) -> str:
    """The instruction without the task number small teachers echo after "N. Instruction:"
    ("2. Write a note..." -> "Write a note...")."""
    rest = ECHOED_NUMBER.sub("", instruction, count=1)
    return rest if rest.strip() else instruction


def new_record(item: Mapping[str, str], failure: Mapping[str, Any], *, round_index: int) -> dict:
    """A record for the data set: a content id, its own task, and where it came from."""
    rid = content_id([item["instruction"], item["input"], item["output"]], prefix="loop_")
    return {"id": rid, "task_id": rid, "instruction": item["instruction"], "input": item["input"],
            "output": item["output"], "source": "loop",
            "loop": {"round": round_index, "parent_id": failure["id"], "parent_score": failure["score"],
                     "parent_instruction": failure["instruction"]}}


def grade_request(template: PromptTemplate, sampling: Sampling, example: Mapping[str, Any], answer: str) -> Request:
    return template.request(sampling, instruction=example["instruction"], input=example.get("input") or NOINPUT,
                            reference=example["output"], answer=answer.strip() or "(no answer)")


def grade_score(text: str) -> float | None:
    """1.0 for yes, 0.0 for no, None when the grader said neither."""
    parsed = parse_yes_no(text)
    return (1.0 if parsed.items[0] else 0.0) if parsed.items else None
