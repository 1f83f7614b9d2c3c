"""Instance rules of Self-Instruct, as small pure functions.

    .venv/bin/python -m pytest tests/filters/test_instances.py -q

Source: yizhongw/self-instruct `self_instruct/prepare_for_finetuning.py` (`filter_invalid_instances`,
`filter_duplicate_instances`, and "we only allow max 5 instances per task"). The reference strips
inputs and outputs when it parses them, so the rules compare stripped text. Per-instance rules take
(input, output); task-level rules take a task's instances as (input, output) pairs in order and return
one reason (for the whole task) or one reason per instance.
"""

from __future__ import annotations

from collections.abc import Sequence

Instance = tuple[str, str]  # (input, output)


def input_equals_output(input: str, output: str) -> str | None:
    """The output repeats the input: the model copied instead of answering."""
    return "input_equals_output" if input.strip() == output.strip() else None


def empty_output(input: str, output: str) -> str | None:
    """Nothing to learn from."""
    return "empty_output" if output.strip() == "" else None


def trailing_colon(input: str, output: str) -> str | None:
    """Input or output ends with ":", usually a generation cut before its content."""
    return "trailing_colon" if input.strip().endswith(":") or output.strip().endswith(":") else None


def conflicting_outputs(instances: Sequence[Instance]) -> str | None:
    """Two instances share a non-empty input but differ in output: the whole task is dropped."""
    first_output: dict[str, str] = {}
    for input, output in instances:
        input, output = input.strip(), output.strip()
        if input and first_output.setdefault(input, output) != output:
            return "conflicting_outputs"
    return None


def duplicate_instance(instances: Sequence[Instance]) -> list[str | None]:
    """Exact repeats of an earlier (input, output) of the same task; the first one is kept."""
    seen: set[Instance] = set()
    reasons: list[str | None] = []
    for input, output in instances:
        key = (input.strip(), output.strip())
        reasons.append("duplicate_instance" if key in seen else None)
        seen.add(key)
    return reasons


def too_many_instances(instances: Sequence[Instance], *, max_instances: int = 5) -> list[str | None]:
    """Instances beyond the first `max_instances` of a task. The reference keeps a random sample of 5;
    keeping the first ones makes the result reproducible without a seed."""
    return [None if i < max_instances else "too_many_instances" for i in range(len(instances))]
