"""Rule names, what kind of rule each is, the reference presets, and the `--filter.rules` parser.

    .venv/bin/python -c "from filters.rules import parse_rules; print(parse_rules('self-instruct'))"

A rule's drop reason is its name, except `rouge`, whose reason is `rouge_duplicate`.
"""

from __future__ import annotations

from collections.abc import Callable

from filters import heuristics, instances, restates

# One text in, None or a reason out (the instruction).
INSTRUCTION_RULES: dict[str, Callable[..., str | None]] = heuristics.RULES
# (input, output) in, None or a reason out; only for records that carry an output.
INSTANCE_RULES: dict[str, Callable[..., str | None]] = {
    "input_equals_output": instances.input_equals_output,
    "empty_output": instances.empty_output,
    "trailing_colon": instances.trailing_colon,
}
# (instruction, input, output) in, None or a reason out; only for records that carry an output.
RECORD_RULES: dict[str, Callable[..., str | None]] = {
    "restates_instruction": restates.restates_instruction,
}
# Need the other instances of the same task.
TASK_RULES = ("conflicting_outputs", "duplicate_instance", "too_many_instances")
# Need state beyond one task: the ROUGE-L pool, an evaluation-set index.
POOL_RULES = ("rouge", "contaminated")

RULES = (*INSTRUCTION_RULES, "rouge", *INSTANCE_RULES, *RECORD_RULES, *TASK_RULES, "contaminated")
REASONS = {rule: ("rouge_duplicate" if rule == "rouge" else rule) for rule in RULES}

# In the references' order: instruction checks, the ROUGE-L pool, then (Self-Instruct only) instances;
# sift adds restates_instruction to self-instruct (measured in filters/restates.py).
PRESETS: dict[str, list[str]] = {
    "self-instruct": [*heuristics.PRESETS["self-instruct"], "rouge", *INSTANCE_RULES, *RECORD_RULES, *TASK_RULES],
    "alpaca": [*heuristics.PRESETS["alpaca"], "rouge"],
}


def parse_rules(spec: str) -> list[str]:
    """Turn "self-instruct", "alpaca", "rouge" or "too_short,blacklist,rouge" into an ordered list
    of rule names (presets expanded in place, repeats dropped)."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part in PRESETS:
            expanded = PRESETS[part]
        elif part in RULES:
            expanded = [part]
        else:
            raise ValueError(f"unknown rule {part!r}; presets: {', '.join(PRESETS)}; rules: {', '.join(RULES)}")
        names += [name for name in expanded if name not in names]
    if not names:
        raise ValueError(f"no rules in {spec!r}; presets: {', '.join(PRESETS)}; rules: {', '.join(RULES)}")
    return names


def preset(spec: str) -> list[str]:
    """The instruction rules named by a `filter.rules` string ("alpaca", "too_short,blacklist,rouge", ...),
    in order; other rules in it (rouge, instance rules) are left to their own stages. ValueError on an
    unknown name, listing the valid ones."""
    return [name for name in parse_rules(spec) if name in INSTRUCTION_RULES]
