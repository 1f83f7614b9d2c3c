"""The Self-Instruct bootstrap recipe (Wang et al., ACL 2023), pure parts.

    sift generate --generate.recipe self-instruct   # driven by pipeline/stages/generate.py

Each prompt lists 8 numbered tasks, 6 sampled seeds and 2 sampled machine-written ones (seeds
only while the pool has none), shuffled, then "9."; the model continues the list. A response
cut by max_tokens is thrown away whole.
"""

from __future__ import annotations

import random
import re

from pipeline.teachers.base import Sampling
from pipeline.teachers.parsers import Problem, parse_numbered_list

NAME = "self-instruct"
PROMPT = "self_instruct_generate"
RULES = "self-instruct"
NUM_EXAMPLES = 8  # numbered tasks shown per prompt
NUM_MACHINE = 2  # of which machine-written, once the pool has any
DROP_TRUNCATED_RESPONSE = True  # the reference discards a response that hit the length limit


def default_sampling() -> Sampling:
    """The reference's davinci settings: temperature 0.7, top_p 0.5, presence_penalty 2, stop on 16."""
    return Sampling(temperature=0.7, top_p=0.5, presence_penalty=2.0, max_tokens=1024,
                    stop=("\n\n", "\n16", "16.", "16 ."))


def clean(instruction: str) -> str:
    return re.sub(r"\s+", " ", instruction).strip().rstrip(":")


def build_prompt(rng: random.Random, seeds: list[dict], machine: list[dict]) -> tuple[dict, list[str], list[str]]:
    """Template fields plus the seed ids and machine ids shown, drawn with `rng` only."""
    picked_machine = rng.sample(machine, min(NUM_MACHINE, len(machine)))
    picked_seeds = rng.sample(seeds, min(NUM_EXAMPLES - len(picked_machine), len(seeds)))
    shown = [("seed", s) for s in picked_seeds] + [("machine", m) for m in picked_machine]
    rng.shuffle(shown)
    examples = "\n".join(f"{i}. {clean(rec['instruction'])}" for i, (_, rec) in enumerate(shown, start=1))
    fields = {"examples": examples, "next": len(shown) + 1}
    return (fields, [str(r["id"]) for kind, r in shown if kind == "seed"],
            [str(r["id"]) for kind, r in shown if kind == "machine"])


def parse(text: str, *, truncated: bool, start: int) -> tuple[list[dict], list[Problem]]:
    """Candidates {instruction} of one response (the caller drops truncated responses whole)."""
    del truncated, start  # the list continues at the prompt's own number; nothing to check
    parsed = parse_numbered_list(text)
    return [{"instruction": x} for x in parsed.items], parsed.problems
