"""Checks on the project's own seed tasks, seeds/default.jsonl.

Run: .venv/bin/python -m pytest tests/test_seeds_default.py -q

The seeds must be in the Self-Instruct seed format, balanced the way the
reference set is (about 15% classification), and written for this project:
no instruction may equal or closely paraphrase one of the 175 reference
Self-Instruct seeds (ROUGE-L F-measure below 0.7, the paper's dedup threshold).
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "seeds" / "default.jsonl"
REFERENCE = ROOT.parent / "shared/data/self_instruct_seed_tasks.jsonl"
ROUGE_THRESHOLD = 0.7
# Self-Instruct / Alpaca instruction blacklist (whole words, case-insensitive).
BLACKLIST = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
)


def _load(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), f"{path} starts with a BOM"
    lines = raw.decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def tasks() -> list[dict]:
    return _load(SEEDS)


def test_count(tasks: list[dict]) -> None:
    assert len(tasks) >= 150


def test_fields_and_types(tasks: list[dict]) -> None:
    for t in tasks:
        assert set(t) == {"id", "name", "instruction", "instances", "is_classification"}, t
        assert isinstance(t["id"], str)
        assert isinstance(t["name"], str) and re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", t["name"]), t["name"]
        ins = t["instruction"]
        assert isinstance(ins, str) and re.match(r"[A-Za-z]", ins), ins
        assert 4 <= len(ins.split()) <= 60, ins
        assert not ins.lower().startswith("write a program"), ins
        for word in BLACKLIST:
            assert not re.search(rf"\b{re.escape(word)}\b", ins, re.I), (word, ins)
        assert isinstance(t["is_classification"], bool)
        assert isinstance(t["instances"], list) and 1 <= len(t["instances"]) <= 5
        for inst in t["instances"]:
            assert set(inst) == {"input", "output"}, inst
            assert isinstance(inst["input"], str) and isinstance(inst["output"], str)
            assert inst["output"].strip(), t["name"]
            assert inst["input"] != inst["output"], t["name"]
            assert not inst["input"].endswith(":") and not inst["output"].endswith(":"), t["name"]


def test_ids_and_names_unique(tasks: list[dict]) -> None:
    assert [t["id"] for t in tasks] == [f"seed_task_{i}" for i in range(len(tasks))]
    names = [t["name"] for t in tasks]
    assert len(set(names)) == len(names)
    instructions = [_norm(t["instruction"]) for t in tasks]
    assert len(set(instructions)) == len(instructions)


def test_classification_share(tasks: list[dict]) -> None:
    share = sum(t["is_classification"] for t in tasks) / len(tasks)
    assert 0.10 <= share <= 0.20, share


def test_input_share(tasks: list[dict]) -> None:
    with_input = sum(any(i["input"].strip() for i in t["instances"]) for t in tasks)
    assert with_input / len(tasks) >= 0.40


@pytest.fixture(scope="module")
def reference() -> list[str]:
    if not REFERENCE.exists():
        pytest.skip(f"reference seeds not found at {REFERENCE}")
    return [t["instruction"] for t in _load(REFERENCE)]


def test_no_reference_instruction_copied(tasks: list[dict], reference: list[str]) -> None:
    ref = {_norm(r) for r in reference}
    copied = [t["instruction"] for t in tasks if _norm(t["instruction"]) in ref]
    assert not copied


def _max_rouge_l(preds: list[str], targets: list[str], same: bool = False) -> tuple[float, str, str]:
    """Max ROUGE-L F over pred x target pairs, as rouge_score computes it.

    LCS lengths come from rapidfuzz's Indel distance over token sequences (each
    distinct token mapped to one character), which is exact and fast; the F-measure
    uses rouge_score's own formula, and the worst pair is re-scored with
    RougeScorer to confirm. With same=True, preds and targets are one list and
    only distinct pairs are compared.
    """
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    from rapidfuzz.distance import Indel
    from rouge_score import scoring, tokenizers

    tokenize = tokenizers.DefaultTokenizer(use_stemmer=False).tokenize
    codes: dict[str, str] = {}

    def encode(text: str) -> str:
        return "".join(codes.setdefault(tok, chr(0x4E00 + len(codes))) for tok in tokenize(text))

    enc_targets = [encode(t) for t in targets]
    worst = (0.0, "", "")
    for i, p in enumerate(preds):
        pred = encode(p)
        for j in range(i + 1 if same else 0, len(targets)):
            target = enc_targets[j]
            if not pred or not target:
                continue
            lcs = (len(pred) + len(target) - Indel.distance(pred, target)) // 2
            f = scoring.fmeasure(lcs / len(pred), lcs / len(target))
            if f > worst[0]:
                worst = (f, p, targets[j])
    if worst[1]:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        assert scorer.score(worst[2], worst[1])["rougeL"].fmeasure == pytest.approx(worst[0], abs=1e-12)
    return worst


def test_rouge_l_against_reference_below_threshold(tasks: list[dict], reference: list[str]) -> None:
    worst = _max_rouge_l([t["instruction"] for t in tasks], reference)
    assert worst[0] < ROUGE_THRESHOLD, worst


def test_rouge_l_between_seeds_below_threshold(tasks: list[dict]) -> None:
    instructions = [t["instruction"] for t in tasks]
    worst = _max_rouge_l(instructions, instructions, same=True)
    assert worst[0] < ROUGE_THRESHOLD, worst
