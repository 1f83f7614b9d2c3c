"""The one place that applies rules to a stream of records, and the funnel of their counts.

    .venv/bin/python -m pytest tests/filters/test_engine.py -q

Records are dicts with "id", "instruction", optional "input" and "output", optional "task_id".
`apply_rules` yields (record, reason, details) for every record in input order; reason is None for a
kept record, else the reason of the first rule that dropped it (rules run in the given order, and a
dropped record is not looked at again). Which rules apply where:
- instruction rules look at every record's instruction;
- instance, record and task rules only at records that carry an "output" (an instruction on its own
  has no instance to check); record rules see the instruction too; a task is the records sharing
  "task_id" (default: each record is its own task);
- `rouge` checks the first record of each task that is still alive against the pool (seeds, then
  every task accepted before), sequentially as Self-Instruct does; the task's other records follow
  that decision. A task enters the pool under its task key, so `nearest_id` names a task_id (or a
  record id). Details carry score, nearest_id, nearest_text, most_similar, mean_top_k, mean_all, for
  kept records too;
- `conflicting_outputs` must see a whole task before deciding, so it holds the stream back until its
  input ends (memory grows with the input); every other rule streams.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from filters import instances
from filters.contamination import NgramIndex, contaminated
from filters.rouge import Match, RougeIndex
from filters.rules import INSTANCE_RULES, INSTRUCTION_RULES, REASONS, RECORD_RULES, RULES

Record = Mapping[str, Any]
Item = list[Any]  # [record, reason or None, details]; reason and details are filled in by the stages
Stage = Iterator[Item]


def task_key(record: Record) -> Hashable:
    """The task a record belongs to: its "task_id", or the record itself."""
    key = record.get("task_id")
    return record["id"] if key is None else key


def _instance(record: Record) -> tuple[str, str]:
    return record.get("input") or "", record.get("output") or ""


def _per_record(stream: Stage, check: Callable[[Record], str | None]) -> Stage:
    for item in stream:
        if item[1] is None:
            item[1] = check(item[0])
        yield item


def _per_task(stream: Stage, rule: str, options: Mapping[str, Any]) -> Stage:
    """duplicate_instance / too_many_instances, streamed: each record is judged with its task's
    instances kept so far, by the same pure function that judges a whole task."""
    judge = instances.duplicate_instance if rule == "duplicate_instance" else instances.too_many_instances
    kept: dict[Hashable, list[tuple[str, str]]] = defaultdict(list)
    for item in stream:
        record = item[0]
        if item[1] is None and "output" in record:
            so_far = kept[task_key(record)]
            inst = _instance(record)
            item[1] = judge([*so_far, inst], **options)[-1]
            if item[1] is None:
                so_far.append(inst)
        yield item


def _conflicts(stream: Stage) -> Stage:
    """conflicting_outputs: hold everything back, then drop every alive record of a conflicting task."""
    held = list(stream)
    tasks: dict[Hashable, list[tuple[str, str]]] = defaultdict(list)
    for record, reason, _ in held:
        if reason is None and "output" in record:
            tasks[task_key(record)].append(_instance(record))
    bad = {key for key, insts in tasks.items() if instances.conflicting_outputs(insts)}
    for item in held:
        if item[1] is None and "output" in item[0] and task_key(item[0]) in bad:
            item[1] = "conflicting_outputs"
        yield item


def _match_details(match: Match) -> dict[str, Any]:
    return {
        "score": match.score,
        "nearest_id": match.nearest_id,
        "nearest_text": match.nearest_text,
        "most_similar": [{"id": n.id, "text": n.text, "score": n.score} for n in match.most_similar],
        "mean_top_k": match.mean_top_k,
        "mean_all": match.mean_all,
    }


def _rouge(stream: Stage, index: RougeIndex) -> Stage:
    """Sequential ROUGE-L dedup, a block at a time: every alive record without a task_id, and the
    first alive record of each task (its later records follow that decision)."""
    decided: dict[Hashable, tuple[str | None, Match]] = {}  # by task_id
    while True:
        held: list[Item] = []
        queries: list[tuple[Hashable, str]] = []  # (pool id, instruction)
        asks: list[tuple[int, Hashable]] = []  # (held position, task_id or None) per query
        pending: set[Hashable] = set()
        for item in stream:
            held.append(item)
            record, task = item[0], item[0].get("task_id")
            if item[1] is None and (task is None or (task not in decided and task not in pending)):
                queries.append((record["id"] if task is None else task, record["instruction"]))
                asks.append((len(held) - 1, task))
                pending.add(task)
            if len(queries) >= index.block_size or len(held) >= 8 * index.block_size:
                break
        if not held:
            return
        answers: dict[int, tuple[str | None, Match]] = {}
        for (position, task), (_, match, kept) in zip(asks, index.filter_stream(queries), strict=True):
            decision = (None if kept else REASONS["rouge"], match)
            if task is None:
                answers[position] = decision
            else:
                decided[task] = decision
        for position, item in enumerate(held):
            if item[1] is None:
                task = item[0].get("task_id")
                reason, match = answers[position] if task is None else decided[task]
                item[1], item[2] = reason, _match_details(match)
            yield item


def apply_rules(
    records: Iterable[Record],
    rules: Sequence[str],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    rouge_index: RougeIndex | None = None,
    contamination_index: NgramIndex | None = None,
) -> Iterator[tuple[Record, str | None, dict[str, Any]]]:
    """Apply `rules` in order; yields (record, reason or None, details) in input order.

    options: keyword arguments per rule, e.g. {"too_short": {"min_words": 3}, "rouge": {"threshold":
        0.7, "top_k": 10}} (the "rouge" ones build the RougeIndex when `rouge_index` is not given).
    rouge_index: a pool to check against, e.g. preloaded with seeds; it grows with accepted tasks.
    contamination_index: required by the `contaminated` rule.
    Bad arguments raise ValueError here, before any record is read; the records are read lazily.
    """
    options = options or {}
    unknown = [r for r in [*rules, *options] if r not in RULES]
    if unknown:
        raise ValueError(f"unknown rules {unknown}; valid: {', '.join(RULES)}")
    stream: Stage = ([record, None, {}] for record in records)
    for rule in rules:
        opts = options.get(rule, {})
        if rule in INSTRUCTION_RULES:
            fn = INSTRUCTION_RULES[rule]
            stream = _per_record(stream, lambda r, fn=fn, opts=opts: fn(r["instruction"], **opts))
        elif rule in INSTANCE_RULES:
            fn = INSTANCE_RULES[rule]
            stream = _per_record(stream, lambda r, fn=fn: fn(*_instance(r)) if "output" in r else None)
        elif rule in RECORD_RULES:
            fn = RECORD_RULES[rule]
            stream = _per_record(stream, lambda r, fn=fn, opts=opts: fn(r["instruction"], *_instance(r), **opts)
                                 if "output" in r else None)
        elif rule == "conflicting_outputs":
            stream = _conflicts(stream)
        elif rule in ("duplicate_instance", "too_many_instances"):
            stream = _per_task(stream, rule, opts)
        elif rule == "rouge":
            index = rouge_index if rouge_index is not None else RougeIndex(**opts)
            stream = _rouge(stream, index)
        elif rule == "contaminated":
            if contamination_index is None:
                raise ValueError("the contaminated rule needs a contamination_index")
            stream = _per_record(stream, lambda r, ix=contamination_index, opts=opts: _contaminated(r, ix, opts))
    return (tuple(item) for item in stream)  # type: ignore[misc]


def _contaminated(record: Record, index: NgramIndex, opts: Mapping[str, Any]) -> str | None:
    fields = (record.get("instruction") or "", record.get("input") or "", record.get("output") or "")
    return next((r for f in fields if (r := contaminated(f, index, **opts))), None)


def funnel(rules: Sequence[str], reason_counts: Mapping[str | None, int]) -> list[dict[str, Any]]:
    """Counts per rule in order: [{rule, in, out, dropped}]; `reason_counts` maps each reason (None
    for kept) to its number of records, so the first row's `in` is the input size and the last row's
    `out` the number kept."""
    total = sum(reason_counts.values())
    stray = set(reason_counts) - {None, *(REASONS[r] for r in rules)}
    if stray:
        raise ValueError(f"reasons {sorted(stray)} belong to none of the rules {list(rules)}")
    rows = []
    for rule in rules:
        dropped = reason_counts.get(REASONS[rule], 0)
        rows.append({"rule": rule, "in": total, "out": total - dropped, "dropped": dropped})
        total -= dropped
    return rows


def count_reasons(results: Iterable[tuple[Record, str | None, dict[str, Any]]]) -> Counter[str | None]:
    """Reason counts of finished results (for `funnel` when the results are already in a list)."""
    return Counter(reason for _, reason, _ in results)
