"""Does IFD tell an instruction's own answer from another task's answer? ROC AUC on real tasks.

    .venv/bin/python bench/ifd_auc.py                                   # both shared files, embedded model
    .venv/bin/python bench/ifd_auc.py --data ../shared/data/user_oriented_instructions.jsonl --limit 100

For every task of a Self-Instruct-format file (instruction + first instance's input and output),
two records: (instruction, its own answer) and (instruction, the answer of another task drawn by a
seeded derangement). IFD should be lower for the own answer (the instruction helps predict it);
the AUC is the probability that a mismatched pair's IFD is above a matched one's (ties count half).
Prints n, the AUC, and the mean IFD of both sides, per file and pooled.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io.models import load_model, load_tokenizer  # noqa: E402
from train.scorers import ifd_scores, prepare_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = ("self_instruct_seed_tasks.jsonl", "user_oriented_instructions.jsonl")


def tasks(path: Path, limit: int | None) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            t = json.loads(line)
            inst = t["instances"][0]
            out.append({"instruction": t["instruction"], "input": inst.get("input", ""), "output": inst["output"]})
    return out[:limit] if limit else out


def derangement(n: int, seed: int) -> list[int]:
    """A permutation with no fixed point, so every answer moves to another task."""
    rng = random.Random(seed)
    while True:
        p = list(range(n))
        rng.shuffle(p)
        if all(i != j for i, j in enumerate(p)):
            return p


def auc(positives: list[float], negatives: list[float]) -> float:
    """P(negative score > positive score), ties half: Mann-Whitney U over all pairs."""
    wins = sum((n > p) + 0.5 * (n == p) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, nargs="*", default=[DATA / f for f in FILES])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU), cpu, cuda, ...")
    ap.add_argument("--limit", type=int, default=None, help="tasks per file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device), load_tokenizer(args.model)
    template = prepare_tokenizer(tok)
    pooled_pos: list[float] = []
    pooled_neg: list[float] = []
    for path in args.data:
        own = tasks(path, args.limit)
        perm = derangement(len(own), args.seed)
        other = [{**own[i], "output": own[j]["output"]} for i, j in enumerate(perm)]
        started = time.time()
        scores = ifd_scores(model, tok, own + other, batch_size=8)
        pos = [s["value"] for s in scores[:len(own)]]
        neg = [s["value"] for s in scores[len(own):]]
        pooled_pos += pos
        pooled_neg += neg
        print(f"{path.name}: n={len(own)} pairs, AUC {auc(pos, neg):.3f}, mean IFD own {sum(pos) / len(pos):.3f} "
              f"other {sum(neg) / len(neg):.3f} ({time.time() - started:.0f}s, {args.model}, template {template})")
    if len(args.data) > 1:
        print(f"pooled: n={len(pooled_pos)} pairs, AUC {auc(pooled_pos, pooled_neg):.3f}")


if __name__ == "__main__":
    main()
