"""Training speed: `sift train` beside a stripped loop; packing and length grouping against naive padding.

    .venv/bin/python bench/train.py                  # the embedded SmolLM2-135M if fetched, else a random Llama
    .venv/bin/python bench/train.py --steps 4 --batch-size 8 --max-length 512 --examples 2000
    .venv/bin/python bench/train.py --path-only --run demo    # `sift train`'s own path on runs/demo/train.jsonl
    .venv/bin/python bench/train.py --path-only --trl-head    # also the path with TRL's own LM head (before)
    .venv/bin/python bench/train.py --quick                   # make bench

Part 1, the training path against the stripped loop, side by side in one process: `sift train`
itself (train/lora.py: SFTTrainer, PEFT, packing, callbacks, checkpoint, precision as `auto`
picks it) for one epoch over chat records (a run's train.jsonl with --run, else synthetic text of
Alpaca-like lengths), and the stripped loop below over the very same packed rows, batch and
accumulation. tokens/s is trained non-pad tokens per second of wall time of the training loop
(`sift train`'s summary; its evaluations before and after are outside it). The stripped loop runs
before and after the path and their mean is the reference, so a change in load shows up.

Part 2, a stripped copy of the training hot loop (LoRA rank 16 on all linear layers, AdamW, bf16 autocast
where the CPU has it) over synthetic examples whose lengths follow an Alpaca-like distribution:
a ~30-token template, an instruction of median 20 tokens, an input on 40% of examples, and an
answer of median 50 tokens with a long tail (log-normal), cut at max_length as training does.
Padding waste is counted over the whole data set; tokens/s (real, non-pad tokens) is timed on
the first `--steps` batches of each method after one warm-up batch.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.packing import IGNORE, Collator, pack_rows, padding_waste  # noqa: E402


def alpaca_like_lengths(n: int, max_length: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt tokens, answer tokens) pairs; answers include the EOS token."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        prompt = 30 + round(rng.lognormvariate(3.0, 0.5))  # template + instruction, median ~20
        if rng.random() < 0.4:
            prompt += round(rng.lognormvariate(3.0, 0.9))  # an input on 40% of examples
        answer = 1 + round(rng.lognormvariate(3.9, 0.9))  # median ~50, long tail
        if prompt + answer <= max_length:
            out.append((prompt, answer))
    return out


def make_examples(lengths: list[tuple[int, int]], vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for p, a in lengths:
        ids = [rng.randrange(10, vocab) for _ in range(p + a)]
        examples.append({"input_ids": ids, "labels": [IGNORE] * p + ids[p:]})
    return examples


def naive_batches(examples: list[dict], batch: int, seed: int) -> list[list[dict]]:
    order = examples[:]
    random.Random(seed).shuffle(order)
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def grouped_batches(examples: list[dict], batch: int, seed: int) -> list[list[dict]]:
    """transformers' LengthGroupedSampler: shuffle, sort mega-batches of 50 batches by length."""
    order = examples[:]
    random.Random(seed).shuffle(order)
    mega = 50 * batch
    out = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i:i + mega], key=lambda e: -len(e["input_ids"]))
        out += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    random.Random(seed + 1).shuffle(out)
    return out


def packed_batches(examples: list[dict], batch: int, max_length: int, seed: int) -> list[list[dict]]:
    """Rows of max_length; as many rows per batch as hold about `batch` examples (as `sift train`)."""
    rows = pack_rows(examples, max_length)
    random.Random(seed).shuffle(rows)
    per = max(1, round(len(rows) * batch / len(examples)))
    return [rows[i:i + per] for i in range(0, len(rows), per)]


def synthetic_records(n: int, max_length: int, seed: int) -> list[dict]:
    """Chat records whose word counts follow `alpaca_like_lengths` (a word is about a token)."""
    rng = random.Random(seed)
    words = ("the a of to and in is for on with as by at from this that it be are was can your time data "
             "water light city plan story reason number simple write list explain give name").split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, k)))

    return [{"id": f"bench-{i}", "messages": [{"role": "user", "content": text(p - 30)},
                                               {"role": "assistant", "content": text(a - 1)}]}
            for i, (p, a) in enumerate(alpaca_like_lengths(n, max_length // 2, seed))]


def path_vs_stripped(model_spec: str, records: list[dict], *, batch_size: int, max_length: int, seed: int,
                     trl_head: bool = False) -> None:
    """`sift train`'s own path for one epoch, and the stripped loop on the same packed rows."""
    import json
    import shutil
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.io.artifacts import write_jsonl
    from pipeline.io.models import cpu_supports_bf16, load_tokenizer
    from pipeline.settings import DistillSettings, LoraSettings, StudentSettings, TrainSettings
    from pipeline.stages.train import train_in
    from train.format import setup_tokenizer, tokenize_records
    from train.lora import packed_batch, read_split

    folder = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        write_jsonl(folder / "train.jsonl", records)
        settings = dict(label="bench", student=StudentSettings(model=model_spec), lora=LoraSettings(),
                        train=TrainSettings(epochs=1.0, max_length=max_length, batch_size=batch_size,
                                            eval_steps=10**6, seed=seed), distill=DistillSettings())
        tokenizer = load_tokenizer(model_spec)
        setup_tokenizer(tokenizer, "auto")
        examples, stats = tokenize_records(tokenizer, read_split(folder / "train.jsonl"), max_length=max_length,
                                           overlong="drop")
        rows = pack_rows([{"input_ids": e.input_ids, "labels": e.labels} for e in examples], max_length)
        per_device, accum = packed_batch(len(examples), len(rows), batch_size, 4)
        random.Random(seed).shuffle(rows)
        bf16 = cpu_supports_bf16() and not torch.cuda.is_available()
        collate = Collator(tokenizer.pad_token_id)

        def stripped() -> float:
            torch.manual_seed(seed)
            _, base = load_model(model_spec)
            model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                    target_modules="all-linear", task_type="CAUSAL_LM")).train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
            t0 = time.perf_counter()
            for start in range(0, len(rows), per_device * accum):
                for i in range(start, min(start + per_device * accum, len(rows)), per_device):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = model(**collate(rows[i:i + per_device]), use_cache=False).loss
                    (loss / accum).backward()
                opt.step()
                opt.zero_grad()
            return stats.tokens / (time.perf_counter() - t0)

        print(f"training path vs stripped loop: {stats.examples} examples, {stats.tokens} tokens in {len(rows)} "
              f"packed rows, {per_device} rows x {accum} accumulation; {'bf16 autocast' if bf16 else 'fp32'}")
        def path() -> float:
            train_in(folder, **settings)
            return json.loads((folder / "student" / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_s"]

        first = stripped()
        rates = {"sift train (path)": path()}
        if trl_head:  # the same path with TRL's own LM head, as before train/lm_head.py
            import train.lm_head

            ours, train.lm_head.plain_lm_head = train.lm_head.plain_lm_head, lambda model: False
            try:
                rates["path, TRL's LM head"] = path()
            finally:
                train.lm_head.plain_lm_head = ours
        second = stripped()
        ref = (first + second) / 2
        print(f"{'stripped loop':<22} {ref:>9.0f} tokens/s  (before {first:.0f}, after {second:.0f})")
        for label, rate in rates.items():
            print(f"{label:<22} {rate:>9.0f} tokens/s  {rate / ref:.2f}x the stripped loop")
        print()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_model(name: str):
    import torch

    from pipeline.io.models import EMBEDDED_ALIAS, embedded_dir, folder_problem, load_model

    if name == "auto":
        name = EMBEDDED_ALIAS if folder_problem(embedded_dir(), converted=True) is None else "random"
    if name == "random":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        return "random Llama (256 hidden, 4 layers)", LlamaForCausalLM(cfg)
    return name, load_model(name, dtype="float32", device="cpu")


def time_method(model, optimizer, batches: list[list[dict]], collate: Collator, steps: int, bf16: bool) -> float:
    """Real tokens per second over `steps` optimizer steps after one warm-up step."""
    import torch

    def step(rows: list[dict]) -> int:
        batch = collate(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return sum(len(r["input_ids"]) for r in rows)

    step(batches[0])
    t0, tokens = time.perf_counter(), 0
    for rows in batches[1:steps + 1]:
        tokens += step(rows)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto", help="auto, random, or a model spec for pipeline.io.models")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method; 0: padding waste only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--run", help="part 1 on runs/RUN/train.jsonl instead of synthetic records")
    ap.add_argument("--path-examples", type=int, default=96, help="synthetic records for part 1")
    ap.add_argument("--path-only", action="store_true", help="part 1 only")
    ap.add_argument("--quick", action="store_true", help="small counts (make bench)")
    ap.add_argument("--trl-head", action="store_true", help="part 1 also with TRL's own LM head (the old path)")
    args = ap.parse_args()
    if args.quick:
        args.examples, args.steps, args.path_examples = 400, 2, 48

    from pipeline.io.artifacts import iter_jsonl
    from pipeline.io.models import EMBEDDED_ALIAS, embedded_dir, folder_problem

    spec = args.model
    if spec == "auto":
        spec = EMBEDDED_ALIAS if folder_problem(embedded_dir(), converted=True) is None else "random"
    if spec != "random":  # part 1 loads the model through `sift train`, which needs a real model folder
        records = [obj for _, obj in iter_jsonl(Path("runs") / args.run / "train.jsonl")] if args.run else \
            synthetic_records(args.path_examples, args.max_length, args.seed)
        path_vs_stripped(spec, records, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                         trl_head=args.trl_head)
    else:
        print("part 1 (sift train beside the stripped loop) needs a model folder: run `sift model fetch`")
    if args.path_only:
        return

    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.io.models import cpu_supports_bf16

    torch.manual_seed(args.seed)
    name, base = load_model(args.model)
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                            task_type="CAUSAL_LM")).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_supports_bf16())
    lengths = alpaca_like_lengths(args.examples, args.max_length, args.seed)
    totals = [p + a for p, a in lengths]
    print(f"model: {name}; precision: {'bf16 autocast' if bf16 else 'fp32'}; torch threads: "
          f"{torch.get_num_threads()}")
    print(f"{len(totals)} Alpaca-like examples: mean {statistics.mean(totals):.0f} tokens, median "
          f"{statistics.median(totals):.0f}, p90 {sorted(totals)[int(0.9 * len(totals))]}, max {max(totals)}")
    examples = make_examples(lengths, model.config.vocab_size, args.seed)
    collate = Collator(pad_token_id=0)
    methods = {
        "naive padding": naive_batches(examples, args.batch_size, args.seed),
        "length grouping": grouped_batches(examples, args.batch_size, args.seed),
        "packing (BFD)": packed_batches(examples, args.batch_size, args.max_length, args.seed),
    }
    print(f"\n{'method':<16} {'batches':>7} {'slots/batch':>11} {'padding waste':>13} {'tokens/s':>9} {'speedup':>8}")
    base_rate = None
    for label, batches in methods.items():
        shapes = [[len(r["input_ids"]) for r in b] for b in batches]
        real, slots = padding_waste(shapes)
        row = f"{label:<16} {len(batches):>7} {slots / len(batches):>11.0f} {1 - real / slots:>12.1%}"
        if args.steps < 1:  # padding only
            print(row)
            continue
        rate = time_method(model, optimizer, batches, collate, args.steps, bf16)
        base_rate = base_rate or rate
        print(f"{row} {rate:>9.0f} {rate / base_rate:>7.2f}x")
    print("\ntokens/s counts real (non-pad) tokens through forward, backward and an AdamW step; "
          "the model trains on as it goes, which does not change step cost.")


if __name__ == "__main__":
    main()
