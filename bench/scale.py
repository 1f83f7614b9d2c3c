"""CPU stages at scale: synthetic runs of 10K, 100K and 1M records, each stage a fresh `sift` process.

    .venv/bin/python bench/scale.py                      # filter at 10K, 100K, 1M; new and former search
    .venv/bin/python bench/scale.py --sizes 10000,100000 --no-old
    .venv/bin/python bench/scale.py --stages filter-rouge,inspect

Data: `bench.synthetic.make_synthetic_records(n, seed=7)`, Self-Instruct-like instructions of 5 to 40
words with about 15% planted near-duplicates (one to three word edits of an earlier instruction); the
templates collide under ROUGE-L as well, so about 40% of 100K and 63% of 1M are duplicates at 0.7.

Each stage runs as `python -c "...; main()" ARGS` with this checkout first on PYTHONPATH, and its wall
time, CPU time (user + system, all threads) and peak RSS come from os.wait4 on that child. "old" runs
the same command with `filters.rouge.SEARCH = "scan"`: the dedup pass's former candidate search (a
mask test on every length-feasible candidate-pool pair), so both columns come from one sitting.

Exactness, checked on every filter run: the new and former searches write byte-identical outputs;
and on a sample, every rejected record's reported score is rouge_score's F1 with its reported nearest
instruction (> 0.7), and random pairs of kept records (the later one was compared with the earlier
one) score <= 0.7 under rouge_score itself.

STAGES below is the one place where stage command lines are written (the CLI flags are moving to
nested names such as `--filter.rules`; change them there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic import make_synthetic_records  # noqa: E402

SEED = 7
THRESHOLD = 0.7
SIZES = (10_000, 100_000, 1_000_000)
SAMPLE = 300  # records and pairs spot-checked against rouge_score per filter run


@dataclass(frozen=True)
class Stage:
    """One timed command: `args` may use {data} (the input JSONL) and {out} (a scratch directory)."""

    name: str
    args: tuple[str, ...]
    compare_old: bool = False  # also run with the former candidate search and compare outputs
    default: bool = True


STAGES = (
    Stage("filter-rouge", ("filter", "{data}", "-o", "{out}/kept.jsonl", "--filter.rules", "rouge"), compare_old=True),
    Stage(
        "filter-heuristics+rouge",
        ("filter", "{data}", "-o", "{out}/kept.jsonl", "--filter.rules", "self-instruct"),
        compare_old=True,
    ),
    Stage("inspect", ("inspect", "{data}"), default=False),
    # to come when they take a plain file or a synthetic run directory: score --scorers length --keep ...,
    # export, report, the index behind view
)

NEW = "from pipeline.cli import main; raise SystemExit(main())"
OLD = "import filters.rouge as r; r.SEARCH = 'scan'; from pipeline.cli import main; raise SystemExit(main())"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run(code: str, args: list[str]) -> dict:
    """Run `python -c code args` and return wall s, CPU s and peak RSS (MB) of that child alone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    before = load()
    t0 = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({child.returncode}):\n{out}")
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
        "load": f"{before} -> {load()}",
        "out": out.strip().splitlines()[-1] if out.strip() else "",
    }


def write_data(path: Path, n: int) -> None:
    with path.open("w") as f:
        for record in make_synthetic_records(n, SEED):
            f.write(json.dumps(record) + "\n")


def spot_check(data: Path, out: Path, rng: random.Random) -> str:
    """rouge_score itself on a sample of the decisions in `out` (see the module docstring)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    order = {}
    with data.open() as f:
        for i, line in enumerate(f):
            order[json.loads(line)["id"]] = i
    with (out / "kept.jsonl").open() as f:
        kept = [json.loads(line) for line in f]
    rejected = []
    with (out / "kept.rejected.jsonl").open() as f:
        rejected = [r for r in map(json.loads, f) if r["reason"] == "rouge_duplicate"]
    kept_at = {r["id"]: order[r["id"]] for r in kept}
    for r in rng.sample(rejected, min(SAMPLE, len(rejected))):
        score = scorer.score(r["record"]["instruction"], r["nearest_text"])["rougeL"].fmeasure
        if not (score == r["score"] > THRESHOLD and kept_at.get(r["nearest_id"], -1) < order[r["id"]]):
            raise SystemExit(f"spot check failed for rejected {r['id']}: {score} vs {r['score']}")
    pairs = 0
    while pairs < min(SAMPLE, len(kept) * (len(kept) - 1) // 2):
        a, b = sorted(rng.sample(range(len(kept)), 2))
        score = scorer.score(kept[b]["instruction"], kept[a]["instruction"])["rougeL"].fmeasure
        if score > THRESHOLD:
            raise SystemExit(f"spot check failed: kept {kept[b]['id']} scores {score} with kept {kept[a]['id']}")
        pairs += 1
    return f"{min(SAMPLE, len(rejected))} rejections and {pairs} kept pairs agree with rouge_score"


def same_files(a: Path, b: Path) -> bool:
    names = ("kept.jsonl", "kept.rejected.jsonl")
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma list of record counts")
    parser.add_argument(
        "--stages",
        default=",".join(s.name for s in STAGES if s.default),
        help=f"comma list of: {', '.join(s.name for s in STAGES)}",
    )
    parser.add_argument("--no-old", action="store_true", help="skip the former candidate search")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = [s for s in STAGES if s.name in args.stages.split(",")]
    print(f"machine: {os.cpu_count()} cores; load average {load()} (1, 5, 15 min; other users share the cores)")
    rng = random.Random(0)
    rows: dict[tuple[str, str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            data = Path(tmp) / f"synthetic_{n}.jsonl"
            write_data(data, n)
            for stage in stages:
                variants = [("new", NEW)] + ([("old", OLD)] if stage.compare_old and not args.no_old else [])
                outs = {}
                for label, code in variants:
                    out = Path(tmp) / f"{stage.name}_{label}_{n}"
                    out.mkdir()
                    argv = [a.format(data=data, out=out) for a in stage.args]
                    r = rows[(stage.name, label, n)] = run(code, argv)
                    outs[label] = out
                    print(
                        f"  {stage.name:24} {label:3} {n:>9,}  wall {r['wall']:7.1f} s  CPU {r['cpu']:7.1f} s  "
                        f"peak {r['rss_mb']:6.0f} MB  load {r['load']}  | {r['out'][:90]}",
                        flush=True,
                    )
                if stage.name.startswith("filter"):
                    print(f"    check: {spot_check(data, outs['new'], rng)}", flush=True)
                    if "old" in outs:
                        if not same_files(outs["new"], outs["old"]):
                            raise SystemExit(f"{stage.name} at {n:,}: new and former search disagree")
                        print("    check: new and former search wrote identical kept and rejected files")
            data.unlink()
    print()
    print(f"{'stage':24} {'search':6} " + "".join(f"{n:>20,}" for n in sizes) + "   1M/100K (wall)")
    for stage in stages:
        for label in ("new", "old"):
            found = [rows.get((stage.name, label, n)) for n in sizes]
            if not any(found):
                continue
            cells = "".join(
                f"{r['wall']:>8.1f}s {r['cpu']:>6.1f}c {r['rss_mb'] / 1024:>3.1f}G" if r else f"{'':>20}" for r in found
            )
            big, small = rows.get((stage.name, label, 1_000_000)), rows.get((stage.name, label, 100_000))
            ratio = f"{big['wall'] / small['wall']:.1f}x" if big and small else ""
            print(f"{stage.name:24} {label:6} {cells}   {ratio}")
        for n in sizes:
            new, old = rows.get((stage.name, "new", n)), rows.get((stage.name, "old", n))
            if new and old:
                print(f"    {n:>9,}: old/new wall {old['wall'] / new['wall']:.1f}x, CPU {old['cpu'] / new['cpu']:.1f}x")
    print("(s: wall seconds, c: CPU seconds, G: peak RSS in GB)")


if __name__ == "__main__":
    main()
