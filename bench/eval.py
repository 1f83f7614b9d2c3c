"""`sift eval`'s passes, today's fast path against the plain one it replaced, base and student.

    .venv/bin/python bench/eval.py --quick            # 64 tasks x 128 new tokens, both paths (about 4 minutes idle)
    .venv/bin/python bench/eval.py --fast-only        # the 252 user-oriented tasks x 128 tokens, fast path only
    .venv/bin/python bench/eval.py                    # 252 x 128, both paths (the plain one takes about an hour)

Both paths do the whole per-model work of `sift eval` on the same tasks (the user-oriented
instructions of ../shared/data, a seeded subset), the same token budget and dtype, for the base and
for the LoRA student: load the model, NLL of the references, greedy answers.
- plain: the path before this benchmark (train/eval_passes.py `load_side(merge=False)`, `answer_nll`,
  `greedy_answers`): the student as a PEFT model, `model.generate` on left-padded batches of 16
  (sift eval's batch size), full-vocabulary logits for the NLL batches of 16;
- fast: train/eval_passes.py: the student merged into a plain Llama, the fast decode engine
  (continuous batching, C kernels), NLL in length-sorted batches with logits only at answer positions.
The two run interleaved (plain base, fast base, plain student, fast student) so load from other
processes hits both alike. Each row gives wall and process CPU seconds; on a shared machine state
`uptime`. bf16 greedy answers of two engines can part ways after a near-tie, so the answer tokens
of the two paths differ a little; the ratio is of wall time for the same tasks and budget. The
student is runs/<--run>/student when it exists, else a rank-16 all-linear LoRA with small random
weights (a real adapter that the merge must carry, with answers close to the base's).
The last line is `speedup_vs_plain=X.XX`. Needs `sift model fetch` first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.io.models import EMBEDDED_ALIAS, resolve_model  # noqa: E402
from pipeline.settings import StudentSettings  # noqa: E402
from train.eval_passes import answer_nll, fast_answers, greedy_answers, load_side, reference_nll  # noqa: E402
from train.eval_sets import load_heldout, pick  # noqa: E402

TASKS = REPO.parent / "shared" / "data" / "user_oriented_instructions.jsonl"
BATCH = 16  # sift eval's batch size, the plain path's


def synthetic_student(folder: Path) -> Path:
    """A LoRA adapter on the embedded model: rank 16, all linear layers, B drawn small (std 1e-3)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from pipeline.io.models import load_model

    torch.manual_seed(0)
    ref = resolve_model(EMBEDDED_ALIAS)
    peft = get_peft_model(load_model(ref, dtype="float32", device="cpu"),
                          LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    peft.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ref.path_or_id).save_pretrained(folder)
    return folder


def timed(fn):  # noqa: ANN001, ANN201 - returns (result, wall s, cpu s)
    t0, c0 = time.perf_counter(), os.times()
    out = fn()
    c1 = os.times()
    return out, time.perf_counter() - t0, (c1.user - c0.user) + (c1.system - c0.system)


def plain_path(spec: str, tok, rows: list[dict], adapter: Path | None, max_new: int, dtype: str) -> int:  # noqa: ANN001
    model = load_side(spec, tok, adapter, student=StudentSettings(device="cpu", dtype=dtype), merge=False)
    answer_nll(model, tok, rows, batch_size=BATCH)
    return sum(a["tokens"] for a in greedy_answers(model, tok, rows, max_new_tokens=max_new, batch_size=BATCH))


def fast_path(spec: str, tok, rows: list[dict], adapter: Path | None, max_new: int, dtype: str) -> int:  # noqa: ANN001
    model = load_side(spec, tok, adapter, student=StudentSettings(device="cpu", dtype=dtype))
    reference_nll(model, tok, rows)
    return sum(a["tokens"] for a in fast_answers(model, tok, rows, max_new_tokens=max_new))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 tasks x 128 new tokens")
    ap.add_argument("--fast-only", action="store_true", help="skip the plain path (for the full-size timing)")
    ap.add_argument("--n", type=int, default=None, help="tasks (default 252, quick 64)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128")
    ap.add_argument("--run", default="evaldev", help="use runs/<run>/student when it exists")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    n = args.n or (64 if args.quick else 252)
    max_new = args.max_new_tokens or 128
    rows = pick(load_heldout(TASKS), n, 0)
    from transformers import AutoTokenizer

    from pipeline.io.runs import run_dir

    student = run_dir(args.run) / "student"
    tmp = tempfile.TemporaryDirectory()
    if not (student / "adapter_config.json").is_file():
        student = synthetic_student(Path(tmp.name) / "student")
    tok = AutoTokenizer.from_pretrained(str(student))
    spec = resolve_model(EMBEDDED_ALIAS).path_or_id
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{len(rows)} tasks x {max_new} new tokens, dtype {args.dtype}, student {student}; {load}", flush=True)
    totals = {"plain": 0.0, "fast": 0.0}
    print(f"{'model':8} {'path':6} {'wall s':>8} {'cpu s':>8} {'answer tok':>10} {'tok/s':>7}", flush=True)
    for side, adapter in (("base", None), ("student", student)):
        paths = (("fast", fast_path),) if args.fast_only else (("plain", plain_path), ("fast", fast_path))
        for name, fn in paths:
            made, wall, cpu = timed(lambda fn=fn, adapter=adapter: fn(spec, tok, rows, adapter, max_new, args.dtype))
            totals[name] += wall
            print(f"{side:8} {name:6} {wall:8.1f} {cpu:8.1f} {made:10d} {made / wall:7.1f}", flush=True)
    print(f"fast path, both models: {totals['fast']:.1f} s wall", flush=True)
    if not args.fast_only:
        print(f"plain path, both models: {totals['plain']:.1f} s wall")
        print(f"speedup_vs_plain={totals['plain'] / totals['fast']:.2f}")


if __name__ == "__main__":
    main()
