"""The Stanford Alpaca recipe (Taori et al. 2023), pure parts.

    sift generate --generate.recipe alpaca    # driven by pipeline/stages/generate.py

Each prompt shows 3 random seed tasks (seeds only) as "###"-separated instruction/input/output
chunks and asks for 20; the model writes instruction, input and output together. `<noinput>`
marks an empty input. When a response hits max_tokens only its last chunk is dropped.
"""

from __future__ import annotations

import random

from pipeline.recipes.self_instruct import clean
from pipeline.teachers.base import Sampling
from pipeline.teachers.parsers import NOINPUT, Problem, parse_alpaca

NAME = "alpaca"
PROMPT = "alpaca_generate"
RULES = "alpaca"
NUM_EXAMPLES = 3  # seed tasks shown per prompt
DROP_TRUNCATED_RESPONSE = False  # only the last chunk of a truncated response goes


def default_sampling() -> Sampling:
    """The reference's settings: temperature 1.0, top_p 1.0, max_tokens 3072, stop at task 20."""
    return Sampling(temperature=1.0, top_p=1.0, max_tokens=3072, stop=("\n20", "20.", "20 ."))


def format_task(number: int, seed: dict) -> str:
    first = (seed.get("instances") or [{}])[0]
    inp = str(first.get("input", "")).strip() or NOINPUT
    out = str(first.get("output", "")).strip()
    return (f"###\n{number}. Instruction: {clean(seed['instruction'])}\n"
            f"{number}. Input:\n{inp}\n{number}. Output:\n{out}")


def build_prompt(rng: random.Random, seeds: list[dict], machine: list[dict]) -> tuple[dict, list[str], list[str]]:
    """Template fields plus the seed ids shown (machine examples are never shown in Alpaca)."""
    del machine
    picked = rng.sample(seeds, min(NUM_EXAMPLES, len(seeds)))
    examples = "\n".join(format_task(i, s) for i, s in enumerate(picked, start=1))
    return {"examples": examples, "next": len(picked) + 1}, [str(s["id"]) for s in picked], []


def parse(text: str, *, truncated: bool, start: int) -> tuple[list[dict], list[Problem]]:
    """Candidates {instruction, input, output}; the last chunk goes when `truncated`."""
    parsed = parse_alpaca(text, start=start, truncated=truncated)
    return parsed.items, parsed.problems
