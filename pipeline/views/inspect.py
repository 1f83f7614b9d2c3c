"""Summarise any artifact in the terminal: counts, fields, lengths, verbs, near-duplicates, reasons.

    sift inspect runs/demo/filtered.jsonl
    sift inspect runs/demo/filtered.rejected.jsonl --where reason=rouge_similar --sample 3
    sift inspect runs/demo/instructions.jsonl --grep "poem" --sample 5
    sift inspect runs/demo/filtered.jsonl --against ../shared/data/user_oriented_instructions.jsonl
    sift inspect runs/demo                      # every artifact of a run with its record count
    sift inspect runs/demo/instructions.rejected.jsonl --by teacher   # per teacher: records, reasons

Reads JSONL, a JSON list (alpaca.json) or one JSON document (funnel.json, manifest.json,
eval.json). `--where` and `--grep` narrow the records first; the summary describes what is left.
The file is read a record at a time (again for --sample) and no list of records is kept; above
PAIRWISE_CAP distinct instructions the near-duplicate buckets come from a seeded sample, and say so.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import iter_records, read_json, read_records
from pipeline.io.files import read_head
from pipeline.teachers.tally import record_teacher
from pipeline.views.scores import ScoreTally, ledger_record, print_percentiles
from pipeline.views.stats import (
    PAIRWISE_CAP,
    ContaminationTally,
    FieldTally,
    LengthTally,
    example_text,
    near_duplicate_buckets,
    pairwise_sample,
    record_examples,
    sample_note,
)
from pipeline.views.verbs import parse_verbs, top_verb_objects

SHOWN_BUCKETS = 5
SHOWN_ROWS = 5  # rows printed for --grep/--where without --sample


def lookup(record: dict, dotted: str) -> Any:
    """record["a"]["b"] for "a.b"; None when any step is missing."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def parse_where(where: str) -> tuple[str, str, bool]:
    """'field=value' or 'field!=value' -> (field, value, negate)."""
    m = re.fullmatch(r"\s*([\w.]+)\s*(!?=)\s*(.*?)\s*", where)
    if not m:
        raise SiftError(f"expected FIELD=VALUE or FIELD!=VALUE, got {where!r}", field="where")
    return m.group(1), m.group(3), m.group(2) == "!="


def matches(record: dict, *, grep: re.Pattern | None, where: tuple[str, str, bool] | None) -> bool:
    if where is not None:
        field, value, negate = where
        got = lookup(record, field)
        text = (
            json.dumps(got, ensure_ascii=False)
            if isinstance(got, dict | list)
            else ("" if got is None else str(got).lower() if isinstance(got, bool) else str(got))
        )
        if (text == value) == negate:
            return False
    return grep is None or bool(grep.search(json.dumps(record, ensure_ascii=False)))


def summarize(
    records: Iterable[dict], *, against: list[str] | None = None, threshold: float = 0.7, ngram: int = 13,
    cap: int = PAIRWISE_CAP,
) -> dict:
    """Everything `inspect` prints about records, as plain data, in one pass that keeps no record: the
    per-record figures are tallies, and only the distinct instructions are held. The near-duplicate
    buckets compare at most `cap` of them (a seeded sample above it: `compared` says how many)."""
    fields, lengths, scores = FieldTally(), LengthTally(), ScoreTally()
    found = ContaminationTally(against, n=ngram) if against is not None else None
    count, examples, seen_reasons = 0, 0, Counter[str]()
    distinct: dict[str, None] = {}
    for r in records:
        count += 1
        fields.add(r)
        scores.add(ledger_record(r))
        if r.get("reason") is not None:
            seen_reasons[str(r["reason"])] += 1
        for ex in record_examples(r):
            examples += 1
            lengths.add(ex)
            if ex.get("instruction"):
                distinct.setdefault(ex["instruction"])  # type: ignore[arg-type]
        if found is not None:
            found.add(r)
    instructions = list(distinct)
    pairs, parser = parse_verbs(instructions)
    compared = pairwise_sample(instructions, cap)
    buckets = near_duplicate_buckets(compared, threshold) if len(compared) > 1 else []
    out = {
        "records": count,
        "examples": examples,
        "instructions": len(instructions),
        "fields": fields.rows(),
        "lengths": lengths.table(),
        "scores": scores.table(),
        "reasons": seen_reasons,
        "verbs": top_verb_objects(pairs, verbs=10, objects=4),
        "parser": parser,
        "with_verb": sum(v is not None for v, _ in pairs),
        "near_duplicates": {
            "threshold": threshold,
            "buckets": len(buckets),
            "texts_in_buckets": sum(len(b) for b in buckets),
            "largest": [[compared[i] for i in b] for b in buckets[:SHOWN_BUCKETS]],
            "compared": len(compared),
        },
    }
    if found is not None:
        out["contamination"] = found.result()
    return out


def group_by(records: Iterable[dict], by: str) -> dict[str, dict]:
    """{value: {records, rejected_by_reason}} for `--by`: `teacher` (who wrote the instruction),
    `classify.teacher` or `instances.teacher` (who answered that stage), or any dotted field."""
    groups: dict[str, dict] = {}
    stage = by.removesuffix(".teacher") if by in ("classify.teacher", "instances.teacher") else None
    for r in records:
        if by == "teacher" or stage:
            value: Any = record_teacher(r, stage)
        else:
            value = lookup(r, by)
            if value is None and isinstance(r.get("record"), dict):  # a ledger row keeps its record inside
                value = lookup(r["record"], by)
        row = groups.setdefault("-" if value is None else str(value), {"records": 0, "rejected_by_reason": {}})
        row["records"] += 1
        if isinstance(r.get("reason"), str):
            row["rejected_by_reason"][r["reason"]] = row["rejected_by_reason"].get(r["reason"], 0) + 1
    return dict(sorted(groups.items()))


def _print_groups(by: str, groups: dict[str, dict], console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"records by {by}")
    t.add_column(by)
    t.add_column("records", justify="right")
    t.add_column("rejected, by reason")
    for value, row in groups.items():
        ranked = sorted(row["rejected_by_reason"].items(), key=lambda kv: -kv[1])
        reasons_text = ", ".join(f"{k} {v}" for k, v in ranked)
        t.add_row(value, str(row["records"]), reasons_text or "-")
    console.print(t)


def eval_texts(path: Path) -> list[str]:
    """Every instruction, input and output of an evaluation file (any record shape)."""
    return [example_text(ex) for _, r in read_records(path) for ex in record_examples(r)]


# ---------------------------------------------------------------- printing


def _print_summary(path: Path, s: dict, console: Any) -> None:
    from rich.table import Table

    console.print(
        f"[bold]{path}[/]: {s['records']} records, {s['examples']} examples, "
        f"{s['instructions']} distinct instructions"
    )
    t = Table(title="fields")
    for col in ("field", "present", "types", "values"):
        t.add_column(col)
    for f in s["fields"]:
        types = ", ".join(f"{k} {v}" for k, v in f["types"].items())
        t.add_row(f["field"], str(f["present"]), types, f["note"])
    console.print(t)
    if s["lengths"]:
        t = Table(title="length in words")
        cols = ["n", "empty", "p5", "p25", "p50", "p75", "p95", "max"]
        t.add_column("field")
        for c in cols:
            t.add_column(c, justify="right")
        for name, row in s["lengths"].items():
            t.add_row(name, *(f"{row[c]:.0f}" for c in cols))
        console.print(t)
    print_percentiles(s.get("scores") or [], console)
    if s["reasons"]:
        t = Table(title="rejected, by reason")
        t.add_column("reason")
        t.add_column("count", justify="right")
        t.add_column("share", justify="right")
        total = sum(s["reasons"].values())
        for reason, n in s["reasons"].most_common():
            t.add_row(reason, str(n), f"{n / total:.1%}")
        console.print(t)
    if s["verbs"]:
        t = Table(
            title=f"root verbs and their objects ({s['parser']} parser; "
            f"{s['with_verb']} of {s['instructions']} instructions start with a verb)"
        )
        t.add_column("verb")
        t.add_column("pairs", justify="right")
        t.add_column("most common objects")
        for verb, n, objs in s["verbs"]:
            t.add_row(verb, str(n), ", ".join(f"{o} ({c})" for o, c in objs))
        console.print(t)
    nd = s["near_duplicates"]
    if nd["compared"] < s["instructions"]:
        console.print(sample_note(nd["compared"], s["instructions"]))
    console.print(
        f"near-duplicate buckets (ROUGE-L > {nd['threshold']}): {nd['buckets']} buckets holding "
        f"{nd['texts_in_buckets']} instructions"
    )
    for i, bucket in enumerate(nd["largest"], 1):
        console.print(f"  {i}. ({len(bucket)}) " + " | ".join(_cut(x, 60) for x in bucket[:3]))
    c = s.get("contamination")
    if c is not None:
        console.print(
            f"contamination: {c['contaminated']} of {c['records']} records ({c['rate']:.1%}) "
            f"share a {c['n']}-gram with the evaluation file"
        )
        for h in c["hits"][:SHOWN_ROWS]:
            console.print(f'  {h["id"]}: {h["shared"]} shared, e.g. "{h["ngram"]}"')


def _cut(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _first_byte(path: Path) -> bytes:
    """The first non-blank byte of a regular file (b"" for an empty one): `[` a JSON list, `{` a document."""
    return read_head(path, 64 * 1024).lstrip()[:1]


def _print_directory(path: Path, console: Any) -> None:
    from rich.table import Table

    t = Table(title=str(path))
    t.add_column("artifact")
    t.add_column("records", justify="right")
    t.add_column("bytes", justify="right")
    for p in sorted(path.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        n = ""
        if p.suffix == ".jsonl" or (p.suffix == ".json" and _first_byte(p) == b"["):
            try:
                n = str(sum(1 for _ in iter_records(p)))
            except SiftError:
                n = "empty" if p.is_file() and not _first_byte(p) else "unreadable"
        t.add_row(p.name, n, f"{p.stat().st_size:,}")
    console.print(t)


def inspect_artifact(
    path: str,
    /,
    *,
    sample: int = 0,
    grep: str | None = None,
    where: str | None = None,
    against: str | None = None,
    ngram: int = 13,
    threshold: float = 0.7,
    seed: int = 0,
    by: str | None = None,
) -> None:
    """Summarise an artifact: count, fields, lengths, root verbs, near-duplicates, rejection reasons.

    Args:
        path: A JSONL artifact, a JSON list or document, or a run directory.
        sample: Also print this many records (a seeded random sample of those that match).
        grep: Keep only records whose JSON text matches this regular expression (case-insensitive).
        where: Keep only records with FIELD=VALUE or FIELD!=VALUE; dotted fields reach inside (a.b).
        against: An evaluation file; report records sharing a word n-gram with it (contamination).
        ngram: n of the contamination check's word n-grams.
        threshold: ROUGE-L F1 above which two instructions share a near-duplicate bucket.
        seed: Seed for --sample.
        by: Count records and rejection reasons per group instead of the summary: teacher (who wrote the
            instruction), classify.teacher, instances.teacher, or any dotted field (e.g. provenance.recipe).
    """
    from rich.console import Console

    if sample < 0:
        raise SiftError(f"must be >= 0, got {sample}", field="sample")
    console = Console()
    p = Path(path)
    if p.is_dir():
        _print_directory(p, console)
        return
    if p.suffix == ".json" and _first_byte(p) == b"{":
        console.print_json(json.dumps(read_json(p), ensure_ascii=False))
        return
    pattern = None
    if grep is not None:
        try:
            pattern = re.compile(grep, re.IGNORECASE)
        except re.error as e:
            raise SiftError(f"invalid regular expression: {e}", field="grep") from None
    condition = parse_where(where) if where is not None else None
    narrowed = pattern is not None or condition is not None

    def records() -> Iterator[dict]:
        """The records that match, read afresh from the file each time (no list of them is kept)."""
        for _, r in iter_records(p):
            if not narrowed or matches(r, grep=pattern, where=condition):
                yield r

    count = None
    if narrowed:
        count = sum(1 for _ in records())
        console.print(
            f"{count} records match"
            + (f" --grep {grep!r}" if grep else "")
            + (f" --where {where!r}" if where else "")
        )
        if not count:
            return
    if by:
        _print_groups(by, group_by(records(), by), console)
        return
    against_texts = eval_texts(Path(against)) if against else None
    summary = summarize(records(), against=against_texts, threshold=threshold, ngram=ngram)
    _print_summary(p, summary, console)
    shown = sample or (SHOWN_ROWS if narrowed else 0)
    if shown:
        n = summary["records"]
        # random.sample picks positions from the population's length alone: these are the records
        # `random.Random(seed).sample(records, k)` gives, fetched in a second pass
        picked = random.Random(seed).sample(range(n), min(shown, n))
        wanted = set(picked)
        rows = {i: r for i, r in enumerate(records()) if i in wanted}
        for i in picked:
            r = rows[i]
            console.rule(str(r.get("id", "")))
            console.print_json(json.dumps(r, ensure_ascii=False))
