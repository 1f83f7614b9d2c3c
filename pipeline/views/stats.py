"""Pure summaries of artifact records, shared by `sift inspect` and `sift report` (no file I/O here).

    examples = [ex for rec in records for ex in record_examples(rec)]
    nearest_similarity(queries, pool)      # ROUGE-L F1 of each query to its closest pool text
    near_duplicate_buckets(texts, 0.7)     # groups of texts linked by ROUGE-L above the threshold
    contamination(records, eval_texts)     # shared 13-grams with an evaluation file

ROUGE-L here is rouge_score's (lower-case, tokens of [a-z0-9], F1 with beta 1) computed as
2·LCS/(|a|+|b|) with rapidfuzz's bit-parallel Indel similarity (filters/rouge.py explains why that is exact); these
numbers describe data, they decide nothing, so float ties at a threshold do not matter here.
"""

from __future__ import annotations

import math
import random
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

_TOKEN = re.compile(r"[a-z0-9]+")
CHUNK = 512  # query rows per cdist call, so memory stays rows x pool
# Distinct instructions compared all against all (near-duplicate buckets, nearest other instruction):
# the work grows with the square of the count, so 20,000 (4e8 pairs, well under a minute on two cores)
# is the most compared exactly; above it a seeded random sample of this many stands for the whole, and
# the output says so. Per-record figures (counts, lengths, verbs) always cover every record.
PAIRWISE_CAP = 20_000


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenizer without stemming: lower-case runs of [a-z0-9]."""
    return _TOKEN.findall(text.lower())


def record_examples(rec: dict) -> list[dict[str, str | None]]:
    """(instruction, input, output) triples of any record shape: Alpaca/filtered, Self-Instruct
    tasks (one per instance, or one with no input/output), or chat messages."""
    if isinstance(rec.get("messages"), list):
        msgs = [m for m in rec["messages"] if isinstance(m, dict)]
        user = next((m.get("content") for m in msgs if m.get("role") == "user"), None)
        answer = next((m.get("content") for m in reversed(msgs) if m.get("role") == "assistant"), None)
        return [{"instruction": _str(user), "input": None, "output": _str(answer)}]
    instruction = _str(rec.get("instruction"))
    if isinstance(rec.get("instances"), list) and rec["instances"]:
        return [
            {"instruction": instruction, "input": _str(i.get("input")), "output": _str(i.get("output"))}
            for i in rec["instances"]
            if isinstance(i, dict)
        ]
    return [{"instruction": instruction, "input": _str(rec.get("input")), "output": _str(rec.get("output"))}]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def words(text: str | None) -> int:
    return len(text.split()) if text else 0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, like numpy's default."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def field_stats(records: Iterable[dict]) -> list[dict]:
    """Per top-level field: how many records have it, its JSON types, and a short value summary."""
    tally = FieldTally()
    for r in records:
        tally.add(r)
    return tally.rows()


class _Field:
    """What field_stats needs of one field's values, in arrays rather than the values themselves."""

    def __init__(self) -> None:
        self.present, self.types = 0, Counter[str]()
        self.trues, self.bools, self.empty, self.lists = 0, 0, 0, 0
        self.hashes, self.chars, self.list_lengths = array("q"), array("q"), array("q")
        self.numbers: list[float] = []


class FieldTally:
    """`field_stats` a record at a time: per field, counts and arrays of hashes and lengths. Distinct
    strings are counted by their 64-bit hashes, so memory is 8 bytes a value whatever its length (two
    different strings would have to share a hash to be miscounted: about 1 in 10^7 at a million)."""

    def __init__(self) -> None:
        self.fields: dict[str, _Field] = {}

    def add(self, record: dict) -> None:
        for key, v in record.items():
            f = self.fields.get(key)
            if f is None:
                f = self.fields[key] = _Field()
            f.present += 1
            f.types[_json_type(v)] += 1
            if isinstance(v, bool):
                f.bools += 1
                f.trues += v
            elif isinstance(v, str):
                f.hashes.append(hash(v))
                f.chars.append(len(v))
                f.empty += not v.strip()
            elif isinstance(v, int | float):
                f.numbers.append(v)
            elif isinstance(v, list):
                f.lists += 1
                f.list_lengths.append(len(v))

    def rows(self) -> list[dict]:
        import numpy as np

        out = []
        for key, f in self.fields.items():
            note = ""
            if f.bools:
                note = f"true {f.trues}, false {f.bools - f.trues}"
            elif f.hashes:
                distinct = len(np.unique(np.frombuffer(f.hashes, dtype=np.int64)))
                note = f"{distinct} distinct, {f.empty} empty, median {percentile(f.chars, 50):.0f} chars"
            elif f.numbers:
                note = f"min {min(f.numbers):.4g}, median {percentile(f.numbers, 50):.4g}, max {max(f.numbers):.4g}"
            elif f.present and f.lists == f.present:
                note = f"median length {percentile(f.list_lengths, 50):.0f}"
            out.append({"field": key, "present": f.present, "types": dict(f.types), "note": note})
        return out


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    names = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object"}
    return names.get(type(v), "?")


LENGTH_FIELDS = ("instruction", "input", "output")
LENGTH_QS = (5, 25, 50, 75, 95)


def length_table(
    examples: Iterable[dict],
    fields: Iterable[str] = LENGTH_FIELDS,
    qs: Sequence[int] = LENGTH_QS,
) -> dict[str, dict]:
    """Word-length percentiles per text field over the examples that have it (empty inputs count 0)."""
    tally = LengthTally(fields)
    for e in examples:
        tally.add(e)
    return tally.table(qs)


class LengthTally:
    """`length_table` an example at a time: one array of word counts per field."""

    def __init__(self, fields: Iterable[str] = LENGTH_FIELDS) -> None:
        self.lengths = {f: array("q") for f in fields}

    def add(self, example: dict) -> None:
        for f, lengths in self.lengths.items():
            if example.get(f) is not None:
                lengths.append(words(example[f]))

    def table(self, qs: Sequence[int] = LENGTH_QS) -> dict[str, dict]:
        out = {}
        for f, lengths in self.lengths.items():
            if lengths:
                out[f] = {
                    "n": len(lengths),
                    "empty": lengths.count(0),
                    "max": max(lengths),
                    **{f"p{q}": percentile(lengths, q) for q in qs},
                }
        return out


def reasons(records: Sequence[dict]) -> Counter[str]:
    """Rejected records per reason (the `reason` field of a *.rejected.jsonl ledger)."""
    return Counter(str(r["reason"]) for r in records if r.get("reason") is not None)


# ---------------------------------------------------------------- ROUGE-L in bulk


def pairwise_sample(texts: Sequence[str], cap: int = PAIRWISE_CAP, seed: int = 0) -> list[str]:
    """`texts` when there are at most `cap`, else a seeded random sample of `cap` of them, in their order:
    what an all-against-all comparison runs on (see PAIRWISE_CAP)."""
    if len(texts) <= cap:
        return list(texts)
    return [texts[i] for i in sorted(random.Random(seed).sample(range(len(texts)), cap))]


def sample_note(compared: int, total: int) -> str:
    """What a page or summary says when the pairwise figures come from `pairwise_sample`."""
    return f"near-duplicate figures on a seeded sample of {compared:,} of {total:,} instructions"


def _encode(token_lists: Iterable[list[str]], vocab: dict[str, str]) -> list[str]:
    """One character per distinct token, so rapidfuzz compares token sequences."""
    return ["".join(vocab.setdefault(t, chr(0x100 + len(vocab))) for t in toks) for toks in token_lists]


def similarity_matrix_rows(
    queries: Sequence[str], pool: Sequence[str], *, cutoff: float = 0.0
) -> Iterable[Any]:
    """Yield (row offset, float32 matrix of ROUGE-L F1) in chunks of query rows; empty texts score 0."""
    import numpy as np
    from rapidfuzz import process
    from rapidfuzz.distance import Indel

    vocab: dict[str, str] = {}
    q = _encode((rouge_tokens(t) for t in queries), vocab)  # a text's tokens at a time: a million lists of
    p = _encode((rouge_tokens(t) for t in pool), vocab)  # token strings at once were most of report's memory
    empty_p = np.array([not s for s in p])
    for start in range(0, len(q), CHUNK):
        block = process.cdist(
            q[start : start + CHUNK],
            p,
            scorer=Indel.normalized_similarity,
            dtype=np.float32,
            score_cutoff=cutoff,
            workers=-1,
        )
        block[:, empty_p] = 0.0
        block[[i for i, s in enumerate(q[start : start + CHUNK]) if not s], :] = 0.0
        yield start, block


def nearest_similarity(
    queries: Sequence[str], pool: Sequence[str], *, exclude_self: bool = False
) -> list[float]:
    """ROUGE-L F1 of each query to its closest pool text (`exclude_self`: the queries are the pool;
    a text is not its own neighbour)."""
    if not queries or not pool:
        return [0.0] * len(queries)
    out: list[float] = []
    for start, block in similarity_matrix_rows(queries, pool):
        if exclude_self:
            for i in range(block.shape[0]):
                block[i, start + i] = 0.0
        out.extend(float(x) for x in block.max(axis=1))
    return out


def near_duplicate_buckets(texts: Sequence[str], threshold: float = 0.7) -> list[list[int]]:
    """Groups (indices, largest first) of distinct texts chained by ROUGE-L F1 above `threshold`."""
    import numpy as np

    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start, block in similarity_matrix_rows(texts, texts, cutoff=threshold):
        rows, cols = np.nonzero(block > threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            a, b = find(start + r), find(c)
            if a != b:
                parent[a] = b
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


# ---------------------------------------------------------------- contamination


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    toks = rouge_tokens(text)
    return {tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def example_text(ex: dict) -> str:
    return "\n".join(t for t in (ex.get("instruction"), ex.get("input"), ex.get("output")) if t)


def contamination(records: Iterable[dict], eval_texts: Sequence[str], *, n: int = 13) -> dict:
    """Records sharing at least one word n-gram (13 by default, as GPT-3's decontamination) with the
    evaluation texts: how many, which, and one shared n-gram each."""
    tally = ContaminationTally(eval_texts, n=n)
    for r in records:
        tally.add(r)
    return tally.result()


class ContaminationTally:
    """`contamination` a record at a time: only the records that share an n-gram are kept."""

    def __init__(self, eval_texts: Sequence[str], *, n: int = 13) -> None:
        self.n, self.records, self.hits = n, 0, []
        self.index = set().union(*(ngrams(t, n) for t in eval_texts)) if eval_texts else set()

    def add(self, r: dict) -> None:
        self.records += 1
        text = "\n".join(example_text(ex) for ex in record_examples(r))
        shared = ngrams(text, self.n) & self.index
        if shared:
            self.hits.append(
                {
                    "id": r.get("id"),
                    "shared": len(shared),
                    "ngram": " ".join(sorted(shared)[0]),
                    "instruction": (record_examples(r)[0].get("instruction") or "")[:120],
                }
            )

    def result(self) -> dict:
        return {
            "n": self.n,
            "records": self.records,
            "contaminated": len(self.hits),
            "rate": len(self.hits) / self.records if self.records else 0.0,
            "eval_ngrams": len(self.index),
            "hits": sorted(self.hits, key=lambda h: -h["shared"]),
        }
