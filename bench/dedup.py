"""Exact ROUGE-L dedup: sift's RougeIndex against rouge_score, side by side.

    .venv/bin/python bench/dedup.py            # 3,175 instructions for (a), 52,000 for (c)
    .venv/bin/python bench/dedup.py --quick    # smaller sizes
    .venv/bin/python bench/dedup.py --only-scale               # (c) only: the sift filter CLI on 52K
    .venv/bin/python bench/dedup.py --only-scale --top-k 10    # (c) with Self-Instruct's top 10 as well

(a) equivalence: the reference seeds plus synthetic instruction-like text with planted near-duplicates,
    deduplicated sequentially at 0.7 by RougeIndex and by the reference (rouge_score's own `_score_lcs`
    on rouge_score's tokens, exactly what Alpaca's generate_instruction.py calls, and what Self-Instruct's
    `scorer.score(candidate, pool_item)` computes). The reference scores each candidate against the pool
    that RougeIndex's earlier decisions built, in two processes; as long as every decision agrees the two
    pools are the same one by induction, so this is the sequential reference loop, and the first
    disagreement, if any, is reported. Decisions must be equal and max scores within 1e-9 (they are
    bit-identical). Both modes are checked: top_k=1 (every pair scored) and top_k=0 (the pruned dedup
    pass, which scores only the pairs near the threshold or above: those scores must equal the
    reference's, and every other candidate's reference maximum must lie below the threshold).
(b) throughput: pairs/s of exact scoring (one cdist plus rouge_score's formula on every cell) and of the
    dedup pass (pairs decided per second, most of them by the token-count and mask bounds alone)
    against RougeScorer.score on a sample of the same pairs.
(c) scale: 52,000 synthetic instructions (bench.synthetic) deduplicated sequentially at 0.7 after the
    175 seeds by the `sift filter` command itself (`--filter.rules rouge --seeds ...`, a fresh process: start-up,
    reading, writing all three outputs included; CPU and peak RSS of that process from getrusage), next
    to RougeIndex alone in a fresh process and the reference loop's time estimated from
    RougeScorer.score's pair rate. The CLI and the index must keep the same number of records.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rouge_score import rouge_scorer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.synthetic import make_synthetic_instructions  # noqa: E402
from filters.rouge import RougeIndex, rouge_l  # noqa: E402

SEEDS = ROOT.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
THRESHOLD = 0.7


def load_seeds() -> list[str]:
    if not SEEDS.exists():
        print(f"note: {SEEDS} not found; running without the reference seeds")
        return []
    return [json.loads(line)["instruction"] for line in SEEDS.open() if line.strip()]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def planted_stream(seeds: list[str], n: int, seed: int) -> list[str]:
    """Synthetic instructions, with near-duplicates of seeds and exact repeats mixed in."""
    rng = random.Random(seed)
    stream = make_synthetic_instructions(n, seed)
    for i in range(0, n, 15):  # every 15th: a near-duplicate of a seed, or a repeat of an earlier one
        if seeds and rng.random() < 0.5:
            words = rng.choice(seeds).split()
            j = rng.randrange(len(words))
            words.insert(j, rng.choice(["please", "also", "briefly"]))
            stream[i] = " ".join(words)
        elif i:
            stream[i] = stream[rng.randrange(i)].upper()
    return stream


# -- (a) equivalence -------------------------------------------------------------------------

_POOL: list[list[str]] = []  # the pool as RougeIndex built it, token lists (shared with workers by fork)
_PREFIX: list[int] = []  # pool size each candidate saw
_CANDS: list[list[str]] = []


def _reference_one(i: int) -> tuple[float, int]:
    """The reference's max score for candidate i against the pool it saw, and the first argmax."""
    cand = _CANDS[i]
    scores = [rouge_scorer._score_lcs(cand, item).fmeasure for item in _POOL[: _PREFIX[i]]]
    if not scores:
        return 0.0, -1
    best = max(scores)
    return best, scores.index(best)


def equivalence(seeds: list[str], n: int) -> None:
    candidates = planted_stream(seeds, n - len(seeds), seed=1)

    def run(top_k: int) -> tuple[list, float, float]:
        """The index's sequential decisions on the seeds + candidates, with wall and CPU seconds."""
        t0, c0 = time.perf_counter(), cpu_seconds()
        index = RougeIndex(threshold=THRESHOLD, top_k=top_k)
        for i, s in enumerate(seeds):
            index.add(f"s{i}", s)
        out = list(index.filter_stream((f"c{i}", c) for i, c in enumerate(candidates)))
        return out, time.perf_counter() - t0, cpu_seconds() - c0

    results, ours_s, ours_cpu = run(1)
    pruned, pruned_s, pruned_cpu = run(0)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    _POOL[:] = [scorer._tokenizer.tokenize(s) for s in seeds]
    _CANDS[:] = [scorer._tokenizer.tokenize(c) for c in candidates]
    _PREFIX[:] = []
    pool_ids = [f"s{i}" for i in range(len(seeds))]
    for (id_, _, kept), tokens in zip(results, _CANDS, strict=True):
        _PREFIX.append(len(_POOL))
        if kept:
            _POOL.append(tokens)
            pool_ids.append(id_)
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as workers:
        reference = workers.map(_reference_one, range(len(candidates)), chunksize=16)
    ref_s = time.perf_counter() - t0

    mismatches, first, worst = 0, None, 0.0
    for i, ((_, match, kept), (best, at)) in enumerate(zip(results, reference, strict=True)):
        ref_kept = not best > THRESHOLD
        worst = max(worst, abs(match.score - best))
        bad = kept != ref_kept or abs(match.score - best) > 1e-9 or (best > 0 and match.nearest_id != pool_ids[at])
        if bad:
            mismatches += 1
            first = i if first is None else first
    pruned_bad, pruned_first = 0, None
    for i, ((_, match, kept), (best, at)) in enumerate(zip(pruned, reference, strict=True)):
        ok = kept == (not best > THRESHOLD)
        if match.score is None:
            ok &= best < THRESHOLD - 1e-7  # left out: below the cutoff
        else:
            ok &= match.score == best and match.nearest_id == pool_ids[at]
        if not ok:
            pruned_bad += 1
            pruned_first = i if pruned_first is None else pruned_first
    pairs = sum(_PREFIX)
    kept = sum(k for _, _, k in results)
    print(f"(a) equivalence: {len(seeds)} seeds + {len(candidates)} candidates = {len(seeds) + len(candidates)}")
    print(f"    kept {kept}, rejected {len(candidates) - kept}; {pairs:,} candidate-pool pairs")
    print(f"    {'':24}{'rouge_score':>14}{'sift top_k=1':>14}{'sift top_k=0':>14}")
    print(f"    {'wall time (s)':24}{ref_s:>14.2f}{ours_s:>14.2f}{pruned_s:>14.2f}   (reference on 2 processes)")
    print(f"    {'sift CPU time (s)':24}{'':>14}{ours_cpu:>14.2f}{pruned_cpu:>14.2f}")
    print(f"    top_k=1: decisions, max scores, nearest ids: mismatches={mismatches}", end="")
    print(f" (first at candidate {first})" if first is not None else "", end="")
    print(f"; largest score difference {worst:.1e}")
    print(f"    top_k=0: decisions, scores near or above the threshold, nearest ids: mismatches={pruned_bad}", end="")
    print(f" (first at candidate {pruned_first})" if pruned_first is not None else "")


# -- (b) throughput --------------------------------------------------------------------------


def throughput(seeds: list[str], n_queries: int, n_pool: int, n_sample: int) -> None:
    texts = seeds + make_synthetic_instructions(n_queries + n_pool, seed=2)
    queries, pool = texts[:n_queries], texts[n_queries : n_queries + n_pool]
    pairs = len(queries) * len(pool)
    rates = {}
    for top_k, label in [(1, "sift exact scores, nearest"), (0, "sift dedup pass (pruned)")]:
        index = RougeIndex(threshold=THRESHOLD, top_k=top_k)
        for i, text in enumerate(pool):
            index.add(str(i), text)
        t0, c0 = time.perf_counter(), cpu_seconds()
        matches = list(index.check_many(queries))
        rates[label] = (pairs / (time.perf_counter() - t0), cpu_seconds() - c0)
        if top_k:
            exact = matches

    rng = random.Random(3)
    sample = [(rng.randrange(len(queries)), rng.randrange(len(pool))) for _ in range(n_sample)]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    t0 = time.perf_counter()
    ref = [scorer.score(queries[i], pool[j])["rougeL"].fmeasure for i, j in sample]
    ref_rate = n_sample / (time.perf_counter() - t0)
    same = all(rouge_l(queries[i], pool[j]) == r for (i, j), r in zip(sample, ref, strict=True))
    nearest = [max(scorer.score(queries[i], p)["rougeL"].fmeasure for p in pool) for i in range(20)]
    same_max = all(exact[i].score == nearest[i] for i in range(20))

    print(f"(b) throughput: {len(queries)} x {len(pool)} = {pairs:,} pairs; rouge_score on {n_sample:,} of them")
    print(f"    {'':30}{'pairs/s':>14}{'vs rouge_score':>16}{'CPU s':>8}")
    print(f"    {'RougeScorer.score':30}{ref_rate:>14,.0f}{1:>15.0f}x")
    for label, (rate, cpu) in rates.items():
        print(f"    {label:30}{rate:>14,.0f}{rate / ref_rate:>15,.0f}x{cpu:>8.1f}")
    print(f"    sampled pair scores bit-identical to rouge_score: {same}; max over the pool for 20 queries: {same_max}")


# -- (c) 52K ---------------------------------------------------------------------------------


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def scale_child(n: int, top_k: int) -> None:
    """RougeIndex alone, in a fresh process so that peak RSS is this part's own."""
    seeds = load_seeds()
    t0 = time.perf_counter()
    texts = make_synthetic_instructions(n, seed=0)
    gen_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), cpu_seconds()
    index = RougeIndex(threshold=THRESHOLD, top_k=top_k)
    for i, s in enumerate(seeds):
        index.add(f"s{i}", s)
    kept = sum(k for _, _, k in index.filter_stream((str(i), t) for i, t in enumerate(texts)))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "top_k": top_k, "kept": kept, "wall": wall, "cpu": cpu, "rss_mb": rss, "gen": gen_s}))


def measure_child(command: list[str]) -> None:
    """Run `command` and print its wall time, CPU time and peak RSS: a fresh process has had no other
    child, so RUSAGE_CHILDREN is that command's alone."""
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, rss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
    print(
        json.dumps({"wall": wall, "cpu": cpu, "rss_mb": rss, "rc": done.returncode, "out": done.stdout + done.stderr})
    )


def sift_command() -> list[str]:
    script = Path(sys.executable).parent / "sift"  # the installed console script, as a user runs it
    return [str(script)] if script.exists() else [sys.executable, "-c", "from pipeline.cli import main; main()"]


def cli_run(directory: Path, top_k: int) -> dict:
    out = directory / f"kept_{top_k}.jsonl"
    command = [
        *sift_command(),
        "filter",
        str(directory / "in.jsonl"),
        "-o",
        str(out),
        "--filter.rules",
        "rouge",
        "--filter.threshold",
        str(THRESHOLD),
        "--filter.top_k",
        str(top_k),
    ]
    if SEEDS.exists():
        command += ["--seeds", str(SEEDS)]
    done = subprocess.run([sys.executable, __file__, "--measure", "--", *command], capture_output=True, text=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    if r["rc"] != 0:
        raise SystemExit(f"sift filter failed:\n{r['out']}")
    with out.open() as f:
        r["kept"] = sum(1 for line in f if line.strip())
    return r


def reference_rate(n_sample: int = 2_000) -> float:
    """RougeScorer.score pairs per second on one core, on the same synthetic instructions."""
    texts = make_synthetic_instructions(2 * n_sample, seed=4)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    t0 = time.perf_counter()
    for a, b in zip(texts[::2], texts[1::2], strict=True):
        scorer.score(a, b)
    return n_sample / (time.perf_counter() - t0)


def scale(n: int, top_k: int) -> None:
    print(f"(c) scale: {n:,} synthetic instructions after the seeds, sequential at {THRESHOLD}; load before {load()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        with (directory / "in.jsonl").open("w") as f:
            for i, text in enumerate(make_synthetic_instructions(n, seed=0)):
                f.write(json.dumps({"id": f"i{i}", "instruction": text}) + "\n")
        for k in sorted({0, top_k}):
            rows.append((f"sift filter CLI, --filter.top_k {k}", cli_run(directory, k), load()))
    for k in sorted({0, top_k}):
        out = subprocess.run(
            [sys.executable, __file__, "--scale-child", str(n), "--top-k", str(k)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append((f"RougeIndex alone, top_k={k}", json.loads(out.strip().splitlines()[-1]), load()))
    kept = rows[0][1]["kept"]
    # The reference scores each candidate against the whole pool: seeds plus everything kept before it.
    pairs = sum(range(175, 175 + kept)) + (n - kept) * (175 + kept) // 2
    rate = reference_rate()
    print(f"    kept {kept:,} ({kept / n:.0%}); about {pairs:,} candidate-pool pairs")
    print(f"    {'':34}{'wall s':>9}{'CPU s':>9}{'peak MB':>9}{'kept':>8}   load after")
    for label, r, after in rows:
        print(f"    {label:34}{r['wall']:>9.1f}{r['cpu']:>9.1f}{r['rss_mb']:>9.0f}{r['kept']:>8}   {after}")
    print(
        f"    {'rouge_score loop (estimated)':34}{pairs / rate:>9.0f}{'':>18}"
        f"   ({pairs:,} pairs at {rate:,.0f} pairs/s, RougeScorer.score on one core)"
    )
    print(
        f"    CLI wall {rows[0][1]['wall']:.1f} s against the 15 s target; the naive loop is "
        f"{pairs / rate / rows[0][1]['wall']:,.0f}x slower"
    )
    if any(r["kept"] != kept for _, r, _ in rows):
        raise SystemExit("the CLI and the index disagree on the records kept")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--top-k", type=int, default=0, help="also time (c) with this top_k (0: the dedup alone)")
    parser.add_argument("--only-scale", action="store_true", help="run (c) only")
    parser.add_argument("--scale-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scale_child:
        scale_child(args.scale_child, args.top_k)
        return
    if args.measure:
        measure_child(args.command)
        return
    seeds = load_seeds()
    print(f"machine: {multiprocessing.cpu_count()} cores, load average {load()} (other processes share the cores)")
    if not args.only_scale:
        equivalence(seeds, 1_000 if args.quick else 3_175)
        throughput(
            seeds, 500 if args.quick else 2_000, 5_000 if args.quick else 20_000, 3_000 if args.quick else 10_000
        )
    scale(10_000 if args.quick else 52_000, args.top_k)


if __name__ == "__main__":
    main()
