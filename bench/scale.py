"""CPU stages at scale: synthetic runs of 10K, 100K and 1M records, each stage a fresh `sift` process.

    .venv/bin/python bench/scale.py                      # every stage at 10K, 100K, 1M; filter: new and former search
    .venv/bin/python bench/scale.py --sizes 10000,100000 --no-old
    .venv/bin/python bench/scale.py --stages filter-rouge,inspect

Stages (STAGES below): `sift filter` on a data file with the default rules (self-instruct: the
heuristics, rouge, the instance and task rules) and with `--filter.rules rouge` alone; then, on a
synthetic run directory holding what a run holds after `sift filter` (seeds.jsonl, filtered.jsonl
with the `filter` field the stage writes, filtered.rejected.jsonl, funnel.json, filter.stats.json),
in this order: `sift score --score.scorers length --score.keep "length>=10"` (writes scored.jsonl),
`sift export` (reads scored.jsonl), `sift inspect runs/<run>/filtered.jsonl`, `sift report`, and
`view-index`: the SQLite index `sift view` builds of filtered.jsonl
(pipeline.views.viewer.index.build_index), in a fresh process like the others.

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
import shutil
import subprocess
import sys
import tempfile
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
    code: str = ""  # python -c code run with `args`; empty: the sift CLI (NEW / OLD)


RUN = "bench"  # the synthetic run's name, under a scratch $SIFT_RUNS_DIR
STAGES = (
    Stage("filter-rouge", ("filter", "{data}", "-o", "{out}/kept.jsonl", "--filter.rules", "rouge"), compare_old=True),
    Stage("filter-default", ("filter", "{data}", "-o", "{out}/kept.jsonl"), compare_old=True),
    # the run stages, in pipeline order on one synthetic run (score writes the scored.jsonl export reads)
    Stage("score-length", ("score", "--run", RUN, "--score.scorers", "length", "--score.keep", "length>=10")),
    Stage("export", ("export", "--run", RUN)),
    Stage("inspect", ("inspect", "{rundir}/filtered.jsonl")),
    Stage("report", ("report", "--run", RUN)),
    Stage("view-index", ("{rundir}/filtered.jsonl", "{rundir}/.view/filtered.jsonl.sqlite"),
          code="import sys; from pathlib import Path; from pipeline.views.viewer.index import build_index; "
               "build_index(Path(sys.argv[1]), Path(sys.argv[2]))"),
)

NEW = "from pipeline.cli import main; raise SystemExit(main())"
OLD = "import filters.rouge as r; r.SEARCH = 'scan'; from pipeline.cli import main; raise SystemExit(main())"


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# Each stage runs under this launcher, which forks and execs it and reports its wait4 figures. Linux
# counts the memory a process had when it called exec into its peak RSS (ru_maxrss), and a child of this
# bench starts as a copy of the bench (vfork included): timed directly, every stage would report at
# least the bench's own size, which at 1M (the synthetic data) is larger than most stages. The launcher
# is small when it forks, so the stage's figure is its own.
LAUNCHER = """import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "wall": time.perf_counter() - t0,
               "cpu": usage.ru_utime + usage.ru_stime, "rss_kb": usage.ru_maxrss}, f)
"""


def run(code: str, args: list[str], runs_dir: Path) -> dict:
    """Run `python -c code args` and return wall s, CPU s and peak RSS (MB) of that child alone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "SIFT_RUNS_DIR": str(runs_dir), "SIFT_PROGRESS": "0"}
    before = load()
    with tempfile.NamedTemporaryFile(suffix=".json") as figures:
        child = subprocess.run(
            [sys.executable, "-c", LAUNCHER, figures.name, sys.executable, "-c", code, *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        out = child.stdout
        got = json.loads(Path(figures.name).read_text() or "{}")
    if child.returncode or got.get("code"):
        raise SystemExit(f"{' '.join(args)} failed ({got.get('code', child.returncode)}):\n{out}")
    return {
        "wall": got["wall"],
        "cpu": got["cpu"],
        "rss_mb": got["rss_kb"] / 1024,
        "load": f"{before} -> {load()}",
        "out": out.strip().splitlines()[-1] if out.strip() else "",
    }


def write_data(path: Path, n: int) -> None:
    with path.open("w") as f:
        for record in make_synthetic_records(n, SEED):
            f.write(json.dumps(record) + "\n")


def filtered_record(k: int, text: str, rng: random.Random) -> dict:
    """One line of filtered.jsonl as `sift filter --run` writes it (an instance of a generated task)."""
    words = text.split()
    return {"id": f"ex_{k:016x}", "task_id": f"task_{k:016x}", "instruction": text,
            "is_classification": k % 7 == 0,
            "provenance": {"recipe": "self-instruct", "stage": "generate",
                           "teacher": {"name": f"teacher-{k % 3}", "backend": "transformers"},
                           "seed_ids": [f"seed_task_{rng.randrange(175)}" for _ in range(6)]},
            "input": "" if rng.random() < 0.6 else f"Example input number {k}: " + " ".join(words[:5]),
            "output": f"A worked answer to task {k}: " + " ".join(words[::-1][: rng.randint(2, len(words))]),
            "filter": {"max_similarity": round(rng.random() * 0.7, 4),
                       "nearest_id": f"task_{rng.randrange(k + 1):016x}", "mean_top_k": None}}


def write_run(directory: Path, n: int) -> None:
    """A run as it stands after `sift filter`: n kept examples, n // 2 rejected, seeds, funnel and stats.
    Written a record at a time, so the bench's own memory stays flat at 1M."""
    from bench.synthetic import make_synthetic_instructions

    directory.mkdir(parents=True)
    (directory / ".sift-run").write_text("a sift run folder: sift clean may delete it\n")
    rng = random.Random(SEED)
    with (directory / "seeds.jsonl").open("w") as f:
        for i, text in enumerate(make_synthetic_instructions(175, seed=SEED + 1)):
            f.write(json.dumps({"id": f"seed_task_{i}", "instruction": text, "is_classification": False,
                                "instances": [{"input": "", "output": f"Seed answer {i}."}]}) + "\n")
    chunk, rejected = 50_000, 0
    with (directory / "filtered.jsonl").open("w") as kept, (directory / "filtered.rejected.jsonl").open("w") as rej:
        for lo in range(0, n, chunk):
            for k, text in enumerate(make_synthetic_instructions(min(chunk, n - lo), seed=SEED + lo), start=lo):
                rec = filtered_record(k, text, rng)
                kept.write(json.dumps(rec, ensure_ascii=False) + "\n")
                if k % 2:
                    rejected += 1
                    dup = {**rec, "id": f"ex_r{k:015x}", "task_id": f"task_r{k:014x}"}
                    dup.pop("filter")
                    rej.write(json.dumps({"id": dup["id"], "line": k + 1, "reason": "rouge_duplicate",
                                          "score": 0.75, "nearest_id": rec["task_id"], "nearest_text": text,
                                          "record": dup}, ensure_ascii=False) + "\n")
    total = n + rejected
    rows = [{"rule": "rouge", "in": total, "out": n, "dropped": rejected}]
    (directory / "funnel.json").write_text(json.dumps({"input": total, "kept": n, "rules": rows}, indent=2) + "\n")
    (directory / "filter.stats.json").write_text(json.dumps(
        {"stage": "filter", "unit": "examples", "read": total, "kept": n, "rejected": rejected,
         "rejected_by_reason": {"rouge_duplicate": rejected}}, indent=2) + "\n")


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
    wanted = args.stages.split(",")
    unknown = set(wanted) - {s.name for s in STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    stages = [s for s in STAGES if s.name in wanted]
    print(f"machine: {os.cpu_count()} cores; load average {load()} (1, 5, 15 min; other users share the cores)")
    rng = random.Random(0)
    rows: dict[tuple[str, str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            data = Path(tmp) / f"synthetic_{n}.jsonl"
            runs_dir = Path(tmp) / f"runs_{n}"
            rundir = runs_dir / RUN
            if any(s.name.startswith("filter") for s in stages):
                write_data(data, n)
            if any(not s.name.startswith("filter") for s in stages):
                write_run(rundir, n)
            for stage in stages:
                variants = [("new", stage.code or NEW)]
                variants += [("old", OLD)] if stage.compare_old and not args.no_old else []
                outs = {}
                for label, code in variants:
                    out = Path(tmp) / f"{stage.name}_{label}_{n}"
                    out.mkdir()
                    argv = [a.format(data=data, out=out, rundir=rundir) for a in stage.args]
                    r = rows[(stage.name, label, n)] = run(code, argv, runs_dir)
                    outs[label] = out
                    print(
                        f"  {stage.name:16} {label:3} {n:>9,}  wall {r['wall']:7.1f} s  CPU {r['cpu']:7.1f} s  "
                        f"peak {r['rss_mb']:6.0f} MB  load {r['load']}  | {r['out'][:90]}",
                        flush=True,
                    )
                if stage.name.startswith("filter"):
                    print(f"    check: {spot_check(data, outs['new'], rng)}", flush=True)
                    if "old" in outs:
                        if not same_files(outs["new"], outs["old"]):
                            raise SystemExit(f"{stage.name} at {n:,}: new and former search disagree")
                        print("    check: new and former search wrote identical kept and rejected files")
                    for out in outs.values():
                        shutil.rmtree(out)
            data.unlink(missing_ok=True)
            shutil.rmtree(runs_dir, ignore_errors=True)
    print()
    print(f"load average at the end: {load()}")
    print(f"{'stage':16} {'search':6} " + "".join(f"{n:>24,}" for n in sizes) + "   1M/100K wall, CPU")
    for stage in stages:
        for label in ("new", "old"):
            found = [rows.get((stage.name, label, n)) for n in sizes]
            if not any(found):
                continue
            cells = "".join(
                f"{r['wall']:>9.1f}s {r['cpu']:>7.1f}c {r['rss_mb'] / 1024:>4.2f}G" if r else f"{'':>24}"
                for r in found
            )
            big, small = rows.get((stage.name, label, 1_000_000)), rows.get((stage.name, label, 100_000))
            ratio = f"{big['wall'] / small['wall']:.1f}x, {big['cpu'] / small['cpu']:.1f}x" if big and small else ""
            print(f"{stage.name:16} {label:6} {cells}   {ratio}")
        for n in sizes:
            new, old = rows.get((stage.name, "new", n)), rows.get((stage.name, "old", n))
            if new and old:
                print(f"    {n:>9,}: old/new wall {old['wall'] / new['wall']:.1f}x, CPU {old['cpu'] / new['cpu']:.1f}x")
    print("(s: wall seconds, c: CPU seconds, G: peak RSS in GB)")


if __name__ == "__main__":
    main()
