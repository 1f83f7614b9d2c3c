"""Generation throughput of a transformers teacher: naive loop vs plain batched generate vs ours.

    .venv/bin/python bench/generate.py            # 256 prompts, 128 new tokens, 2 interleaved rounds
    .venv/bin/python bench/generate.py --quick    # 128 prompts, 64 new tokens, 1 round, generate at
                                                  # batch 64 only (under 3 minutes on an idle 2-core machine)
    .venv/bin/python bench/generate.py --quick --teacher gemma-3-270m   # Gemma 3 (sift model fetch gemma-3-270m)

Plain batched `model.generate` runs at each of `--batch-sizes` and its best rate is the baseline;
our TransformersTeacher (fast engine: continuous batching, `--rows` sequences at once, one decoding
thread per torch thread) runs on the same prompts and token budget, interleaved with the baseline
round by round so load from other processes hits both alike; each contender's best round counts.
Each row also gives the process CPU seconds it used: on a busy machine wall time says more about
the neighbours than about the code. The last line is `speedup_vs_hf_batched=X.XX`.

Every contender gets the same Self-Instruct bootstrap prompts (8 numbered seed instructions,
then "9."), the same sampling (temperature 0.7, top_p 0.5, no stop strings, so the same work)
and the same dtype. Output tokens are the generated tokens before the first EOS. The naive loop
(one prompt at a time) runs on a subset and its rate is extrapolated: it is per-prompt work,
so the rate does not depend on how many prompts there are. Needs `sift model fetch` first.

`--split` instead times one decode step of one lane (one thread, `--rows` rows at position 200)
in parts, as CPU milliseconds (thread time, best of 5, so neighbours on a shared machine count
less): the body (embedding and layers), the output layer (final norm and vocabulary projection)
in the model's dtype and in float32, the fast engine's sampler, and `generate`'s sampling
(float32 copy, temperature, top-p over the sorted vocabulary, softmax, multinomial) on the same
logits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.io.models import EMBEDDED_ALIAS  # noqa: E402
from pipeline.teachers.base import Request, Sampling  # noqa: E402
from pipeline.teachers.prompts import render  # noqa: E402

SEEDS = [REPO / "seeds" / "default.jsonl", REPO.parent / "shared" / "data" / "self_instruct_seed_tasks.jsonl"]


def build_prompts(n: int) -> list[str]:
    """n bootstrap prompts, each 8 seed instructions drawn with a fixed seed, then "9."."""
    path = next(p for p in SEEDS if p.is_file())
    instructions = [json.loads(line)["instruction"] for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    prompts = []
    for _ in range(n):
        picked = rng.sample(instructions, 8)
        examples = "\n".join(f"{i}. {text}" for i, text in enumerate(picked, 1))
        prompts.append(render("self_instruct_generate", examples=examples, next=9))
    return prompts


def kept_tokens(rows: list[list[int]], eos_ids: set[int]) -> int:
    return sum(next((i for i, t in enumerate(row) if t in eos_ids), len(row)) for row in rows)


def hf_generate(model, tok, prompts: list[str], max_new: int, eos_ids: set[int]) -> int:
    """Plain batched model.generate: left padding, sampling, prompts in the order given."""
    import torch

    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=True, temperature=0.7, top_p=0.5,
                             top_k=0, pad_token_id=tok.pad_token_id)
    return kept_tokens(out[:, enc["input_ids"].shape[1]:].tolist(), eos_ids)


def _cpu_ms(f, repeats: int = 5) -> float:
    """Best thread CPU time of `f` in ms, after one warm-up call."""
    f()
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        f()
        best = min(best, time.thread_time() - t)
    return best * 1e3


def step_split(teacher, rows: int, position: int = 200) -> None:
    """Print the per-step cost of the fast engine's parts for `rows` rows (see --split)."""
    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    from pipeline.teachers.fast_decode import FastDecoder, _Lane
    from pipeline.teachers.fast_sampler import sample_rows

    torch.set_num_threads(1)  # one lane's view: one intra-op thread
    dec = FastDecoder(teacher.model, eos_ids=teacher.eos_ids, max_rows=rows, lanes=1)
    lane = _Lane(rows)
    dec._ensure_capacity(lane, position + 1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (rows,), generator=g)
    positions = torch.full((rows,), position)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopPLogitsWarper(0.5)])
    history = torch.zeros(rows, 1, dtype=torch.long)
    with torch.inference_mode():
        hidden = dec._hidden(lane, tokens, positions)
        logits = dec._logits(hidden)
        head32 = dec.lm_head.float()
        normed32 = dec._rms(hidden, dec.norm).float()
        args = (torch.full((rows,), 0.7), torch.full((rows,), 0.5, dtype=torch.float64),
                torch.zeros(rows, dtype=torch.long), torch.rand(rows, generator=g, dtype=torch.float64))

        def hf_sampling() -> None:
            probs = warpers(history, logits.float()).softmax(-1)
            torch.multinomial(probs, 1)

        parts = {"body": _cpu_ms(lambda: dec._hidden(lane, tokens, positions)),
                 f"lm head ({teacher.dtype})": _cpu_ms(lambda: dec._logits(hidden)),
                 "lm head (float32)": _cpu_ms(lambda: torch.nn.functional.linear(normed32, head32)),
                 "sampler (fast engine)": _cpu_ms(lambda: sample_rows(logits, *args, candidates=dec.candidates,
                                                                      kernels=dec.kernels)),
                 "sampling as generate does": _cpu_ms(hf_sampling)}
    print(f"one decode step, {rows} rows at position {position}, 1 thread, vocabulary {logits.shape[1]}, "
          f"CPU ms (per token in brackets), load_avg={os.getloadavg()[0]:.1f}:")
    for name, ms in parts.items():
        print(f"  {name:28s} {ms:8.1f} ms  ({ms / rows:.2f} ms/token)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=EMBEDDED_ALIAS,
                    help=f"model alias, folder or .gguf (default {EMBEDDED_ALIAS}; gemma-3-270m after its fetch)")
    ap.add_argument("--quick", action="store_true", help="128 prompts, 64 new tokens, one round, generate at batch 64")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--batch-sizes", default=None,
                    help="plain generate batch sizes, the best one counts (default 32,64; --quick: 64)")
    ap.add_argument("--rows", type=int, default=128, help="sequences decoding at once in the fast engine")
    ap.add_argument("--lanes", type=int, default=None,
                    help="decoding threads of the fast engine (default: one per torch thread)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1 quick, 2 full)")
    ap.add_argument("--naive", type=int, default=None, help="prompts in the one-at-a-time subset (0: skip)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--split", action="store_true",
                    help="time the parts of one decode step (body, output layer, sampling) and exit")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice, one per core); the fast engine runs one "
                         "decoding thread per torch thread")
    args = ap.parse_args()
    n = args.prompts or (128 if args.quick else 256)
    max_new = args.tokens or (64 if args.quick else 128)
    sizes = [int(b) for b in (args.batch_sizes or ("64" if args.quick else "32,64")).split(",")]
    rounds = args.rounds or (1 if args.quick else 2)
    naive_n = args.naive if args.naive is not None else (2 if args.quick else 4)

    import torch

    from pipeline.teachers.fast_decode import MAX_LANES
    from pipeline.teachers.hf import TransformersTeacher

    if args.threads:
        torch.set_num_threads(args.threads)

    prompts = build_prompts(n)
    teacher = TransformersTeacher(args.teacher, batch_size=max(sizes), dtype=args.dtype, engine="fast",
                                  max_rows=args.rows, lanes=args.lanes)
    if args.split:
        step_split(teacher, min(args.rows, 64))
        return
    model, tok = teacher.model, teacher.tokenizer
    eos = set(teacher.eos_ids)
    print(f"model={teacher.name} dtype={teacher.dtype} threads={torch.get_num_threads()} prompts={n} "
          f"new_tokens={max_new} batch_sizes={sizes} rows={args.rows} engine={teacher.engine} "
          f"load_avg={os.getloadavg()[0]:.1f}")
    hf_generate(model, tok, prompts[:2], 2, eos)  # warm up
    requests = [Request(prompt=p, sampling=Sampling(temperature=0.7, top_p=0.5, max_tokens=max_new, seed=i))
                for i, p in enumerate(prompts)]
    teacher.generate(requests[:2])  # also builds the C kernels on a machine's first run
    fast = teacher._fast
    if fast is not None:
        print(f"fast engine: lanes={fast.lanes or min(torch.get_num_threads(), MAX_LANES)} "
              f"attention={'C kernel' if fast.kernel else 'torch sdpa'} "
              f"sampling candidates={'C kernel' if fast.kernels else 'torch topk'}")

    naive = None
    if naive_n:
        t = time.perf_counter()
        naive_tokens = sum(hf_generate(model, tok, [p], max_new, eos) for p in prompts[:naive_n])
        naive = naive_tokens / (time.perf_counter() - t)
        print(f"naive one-at-a-time:        {naive:8.1f} tok/s  ({naive_tokens} tokens from {naive_n} prompts, "
              f"rate extrapolated to all {n})")

    best_hf, ours = 0.0, 0.0
    for r in range(1, rounds + 1):
        for batch in sizes:
            t, c = time.perf_counter(), time.process_time()
            hf_tokens = sum(hf_generate(model, tok, prompts[i:i + batch], max_new, eos) for i in range(0, n, batch))
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            best_hf = max(best_hf, hf_tokens / wall)
            print(f"round {r} hf generate bs={batch:<4d} {hf_tokens / wall:8.1f} tok/s  ({hf_tokens} tokens, "
                  f"{wall:.1f} s wall, {cpu:.1f} s CPU, load_avg={os.getloadavg()[0]:.1f})", flush=True)
        t, c = time.perf_counter(), time.process_time()
        out = teacher.generate(requests)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        ours_tokens = sum(c.completion_tokens for c in out)
        ours = max(ours, ours_tokens / wall)
        print(f"round {r} fast engine rows={args.rows:<4d}{ours_tokens / wall:8.1f} tok/s  ({ours_tokens} tokens, "
              f"{wall:.1f} s wall, {cpu:.1f} s CPU, load_avg={os.getloadavg()[0]:.1f})", flush=True)
    print(f"hf batched generate (best): {best_hf:8.1f} tok/s")
    print(f"TransformersTeacher (fast): {ours:8.1f} tok/s")
    print(f"load_avg_end={os.getloadavg()[0]:.1f} (other processes on this machine slow every number)")
    if naive is not None:
        print(f"speedup_vs_naive={ours / naive:.2f}")
    print(f"speedup_vs_hf_batched={ours / best_hf:.2f}")


if __name__ == "__main__":
    main()
