"""Did selection help? Students trained on the same budget from all records, a random quarter, the
top quarter by ifd and the top quarter by judge, side by side on the general held-out set.

    .venv/bin/python bench/selection.py --run sel --quick    # 24K training tokens per arm, 96 new tokens
    .venv/bin/python bench/selection.py --run sel            # 96K training tokens per arm, 128 new tokens

From one sift run's filtered.jsonl (at least --min-records, 400 by default, after export's 13-gram
decontamination against the general set, so no arm trains on an eval task):
1. scores: `sift score filtered.jsonl -o runs/<run>/selection/scored.jsonl --score.scorers ifd,judge,length`
   (cached per record and resumable, like the stage): ifd by the student's base model, judge by the
   run's teacher on the 1-5 rubric (G-Eval log-probabilities on the transformers backend);
2. arms, each of a quarter (ceil(n/4) records) except `all`:
   - all: every record;
   - random: a seeded random quarter;
   - top_ifd: `--score.keep "ifd<1,top=Q:ifd"`: drop answers the instruction does not help predict, then the
     highest IFD, the hardest examples, as Cherry LLM and Superfiltering select;
   - top_judge: the judge's highest ratings, as AlpaGasus selects;
3. the same budget: every arm trains on about the same number of tokens (--tokens, prompt and answer,
   packed rows), so steps = tokens / (effective batch x the arm's mean example length), with the
   settings of `sift train` (LoRA r 16 on all linear layers, lr 2e-4, cosine, packed rows of 512);
4. eval: the base and every student on train/evalsets/general.jsonl (175 tasks written for sift,
   never trained on): NLL per reference token, and ROUGE-L of greedy answers against the references,
   through `sift eval`'s fast passes; 95% paired bootstrap intervals of each arm minus `all` and
   minus the base (train/eval_stats.py).

Each arm's adapter and each model's eval columns are kept under runs/<run>/selection/, keyed by their
settings, so a killed benchmark run again continues where it stopped. The last lines are the table
(also written to runs/<run>/selection/selection.json and selection.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from filters.selection import parse_keep, select  # noqa: E402
from pipeline.io.artifacts import iter_jsonl, write_json, write_jsonl  # noqa: E402
from pipeline.io.runs import run_dir  # noqa: E402
from pipeline.stages.export import chat_record, decontaminate, read_filtered  # noqa: E402
from train.eval_stats import paired_bootstrap, per_example  # noqa: E402
from train.general_set import load_general  # noqa: E402

ARMS = ("all", "random", "top_ifd", "top_judge")
STUDENT = "smollm2-135m-instruct"
BATCH, ACCUM, MAX_LENGTH, LR = 4, 2, 512, 2e-4


def quarter_ids(records: list[dict], arm: str, seed: int) -> list[str]:
    """The ids an arm trains on, in the records' order."""
    q = math.ceil(len(records) / 4)
    if arm == "all":
        return [r["id"] for r in records]
    if arm == "random":
        key = {r["id"]: hashlib.sha256(f"{seed}:{r['id']}".encode()).digest() for r in records}
        chosen = set(sorted(key, key=key.__getitem__)[:q])
        return [r["id"] for r in records if r["id"] in chosen]
    if arm == "top_ifd":
        below = [r for r in records if (r["scores"].get("ifd") is not None and r["scores"]["ifd"] < 1)]
        fraction = min(1.0, q / max(len(below), 1))
        reasons, _ = select(records, parse_keep(f"ifd<1,top={fraction:.6f}:ifd"))
    elif arm == "top_judge":  # the quarter's count from the records the judge rated (it may leave some unrated)
        rated = [r for r in records if r["scores"].get("judge") is not None]
        reasons, _ = select(records, parse_keep(f"top={min(1.0, q / max(len(rated), 1)):.6f}:judge"))
    else:
        raise ValueError(arm)
    return [r["id"] for r, why in zip(records, reasons, strict=True) if why is None]


def score_file(src: Path, out: Path, teacher: str) -> list[dict]:
    """`sift score` stand-alone (cached and resumable), then the scored records."""
    if not out.is_file():
        cmd = [str(REPO / ".venv" / "bin" / "sift"), "score", str(src), "-o", str(out),
               "--score.scorers", "ifd,judge,length", "--student.model", STUDENT, "--teacher.model", teacher]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return [obj for _, obj in iter_jsonl(out)]


def example_tokens(records: list[dict]) -> dict[str, int]:
    from pipeline.io.models import load_tokenizer
    from train.format import setup_tokenizer, tokenize_example

    tok = load_tokenizer(STUDENT)
    setup_tokenizer(tok, "auto")
    return {r["id"]: len(tokenize_example(tok, chat_record(r)["messages"]).input_ids) for r in records}


def train_arm(folder: Path, records: list[dict], steps: int, seed: int, forget: Any = None) -> dict:
    """The arm's student, trained once: its summary (steps, tokens, seconds). `forget`: the remedies
    for forgetting the arm trains with (a ForgetSettings; bench/forgetting.py)."""
    from dataclasses import asdict

    from pipeline.settings import DistillSettings, ForgetSettings, LoraSettings, StudentSettings, TrainSettings
    from pipeline.stages.train import train_in

    forget = forget or ForgetSettings()
    settings = {"ids": [r["id"] for r in records], "steps": steps, "batch": BATCH, "accum": ACCUM,
                "max_length": MAX_LENGTH, "lr": LR, "seed": seed, "student": STUDENT,
                **({"forget": asdict(forget)} if forget.active else {})}
    done = folder / "arm.json"
    if done.is_file() and json.loads(done.read_text())["settings"] == settings:
        return json.loads(done.read_text())["summary"]
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", (chat_record(r) for r in records))
    train_in(folder, label=folder.name, student=StudentSettings(model=STUDENT), lora=LoraSettings(),
             train=TrainSettings(epochs=1000.0, lr=LR, max_length=MAX_LENGTH, batch_size=BATCH, grad_accum=ACCUM,
                                 eval_steps=10**6, save_steps=10**6, max_steps=steps, seed=seed),
             distill=DistillSettings(), forget=forget)
    summary = [obj for _, obj in iter_jsonl(folder / "student" / "metrics.jsonl") if obj.get("kind") == "summary"][-1]
    write_json(done, {"settings": settings, "summary": summary})
    return summary


def eval_model(cache: Path, adapter: Path | None, rows: list[dict], max_new: int, key: dict) -> dict:
    """Per-example NLL, ROUGE-L, stop and length columns of one model on the eval rows (cached)."""
    if cache.is_file() and json.loads(cache.read_text())["key"] == key:
        return json.loads(cache.read_text())["columns"]
    from pipeline.io.models import load_tokenizer, resolve_model
    from pipeline.settings import StudentSettings
    from train.eval_passes import fast_answers, load_side, reference_nll
    from train.eval_stats import rouge_l
    from train.format import setup_tokenizer

    if adapter is None:
        tok = load_tokenizer(STUDENT)
        setup_tokenizer(tok, "auto")
    else:  # the student's own tokenizer, as `sift eval` loads it (training may have added a pad token)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(adapter))
    model = load_side(resolve_model(STUDENT).path_or_id, tok, adapter, student=StudentSettings(device="cpu"))
    nll = reference_nll(model, tok, rows, label=f"{cache.stem} nll")
    answers = fast_answers(model, tok, rows, max_new_tokens=max_new, label=f"{cache.stem} answers")
    refs = [r["messages"][-1]["content"] for r in rows]
    columns = per_example(nll, answers, [rouge_l(a["text"], ref) for a, ref in zip(answers, refs, strict=True)])
    write_json(cache, {"key": key, "columns": columns})
    return columns


def mean(col: dict, metric: str) -> float:
    if metric == "nll":
        return sum(col["nll"]) / sum(col["nll_tokens"])
    return sum(col[metric]) / len(col[metric])


def interval(a: dict, b: dict, metric: str) -> list[float] | None:
    """95% paired bootstrap interval of mean(b) - mean(a)."""
    w = {"base_weights": a["nll_tokens"], "student_weights": b["nll_tokens"]} if metric == "nll" else {}
    return paired_bootstrap(a[metric], b[metric], **w)


def fmt_ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="sel", help="the sift run whose filtered.jsonl is selected from")
    ap.add_argument("--quick", action="store_true", help="24K training tokens per arm, 96 new tokens")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per arm (default 96000, quick 24000)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="greedy answer budget (default 128, quick 96)")
    ap.add_argument("--min-records", type=int, default=400)
    ap.add_argument("--teacher", default=STUDENT, help="the judge (the run's teacher by default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    budget = args.tokens or (24_000 if args.quick else 96_000)
    max_new = args.max_new_tokens or (96 if args.quick else 128)
    t_start = time.perf_counter()

    run = run_dir(args.run)
    work = run / "selection"
    work.mkdir(parents=True, exist_ok=True)
    tasks = load_general()
    clean, dropped = decontaminate(read_filtered(run / "filtered.jsonl"), tasks)
    if len(clean) < args.min_records:
        sys.exit(f"{run}/filtered.jsonl: {len(clean)} records after decontamination, want at least "
                 f"{args.min_records} (make filter RUN={args.run} N=480)")
    src = work / "filtered.clean.jsonl"
    write_jsonl(src, ({k: v for k, v in r.items() if k != "metadata"} | r["metadata"] for r in clean))
    t0 = time.perf_counter()
    scored = score_file(src, work / "scored.jsonl", args.teacher)
    score_s = time.perf_counter() - t0
    by_id = {r["id"]: r for r in clean}
    records = [by_id[s["id"]] | {"scores": s["scores"]} for s in scored]
    lengths = example_tokens(records)
    print(f"{len(records)} records ({len(dropped)} dropped as contaminated); scored in {score_s:.0f} s; "
          f"budget {budget} training tokens per arm; eval on general ({len(tasks)} tasks) x {max_new} new tokens",
          flush=True)

    rows = [{"id": t["id"], "messages": chat_record(t | {"metadata": {}})["messages"]} for t in tasks]
    eval_key = {"tasks": [r["id"] for r in rows], "max_new_tokens": max_new}
    base = eval_model(work / "eval-base.json", None, rows, max_new, eval_key)
    table = []
    columns = {}
    for arm in ARMS:
        ids = set(quarter_ids(records, arm, args.seed))
        chosen = [r for r in records if r["id"] in ids]
        mean_len = sum(lengths[r["id"]] for r in chosen) / len(chosen)
        steps = max(1, round(budget / (BATCH * ACCUM * mean_len)))
        t0 = time.perf_counter()
        summary = train_arm(work / arm, chosen, steps, args.seed)
        train_s = time.perf_counter() - t0
        columns[arm] = eval_model(work / f"eval-{arm}.json", work / arm / "student", rows, max_new,
                                  eval_key | {"arm": json.loads((work / arm / "arm.json").read_text())["settings"]})
        scores = [r["scores"] for r in chosen]
        table.append({
            "arm": arm, "records": len(chosen), "steps": summary["step"], "train_tokens": summary["train_tokens"],
            "train_s": round(train_s, 1),
            "mean_judge": _avg(s.get("judge") for s in scores), "mean_ifd": _avg(s.get("ifd") for s in scores),
            "mean_length_words": _avg(s.get("length") for s in scores)})
    for row in table:
        col = columns[row["arm"]]
        for metric in ("nll", "rouge_l"):
            row[metric] = mean(col, metric)
            row[f"{metric}_vs_base"] = interval(base, col, metric)
            row[f"{metric}_vs_all"] = None if row["arm"] == "all" else interval(columns["all"], col, metric)
    result = {"run": args.run, "records": len(records), "contaminated": len(dropped), "budget_tokens": budget,
              "eval": {"set": "general", "tasks": len(rows), "max_new_tokens": max_new},
              "base": {"nll": mean(base, "nll"), "rouge_l": mean(base, "rouge_l")}, "arms": table,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_json(work / "selection.json", result)
    md = render(result)
    (work / "selection.md").write_text(md)
    print(md)


def _avg(values) -> float | None:  # noqa: ANN001
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def render(result: dict) -> str:
    lines = [f"{result['records']} records, {result['budget_tokens']} training tokens per arm; general held-out "
             f"set, {result['eval']['tasks']} tasks, {result['eval']['max_new_tokens']} new tokens; "
             f"base NLL {result['base']['nll']:.3f}, ROUGE-L {result['base']['rouge_l']:.3f}", "",
             "| arm | records | steps | tokens | mean judge | mean ifd | NLL | vs all (95% CI) | vs base | "
             "ROUGE-L | vs all (95% CI) | vs base |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | --- |"]
    for r in result["arms"]:
        lines.append(
            f"| {r['arm']} | {r['records']} | {r['steps']} | {r['train_tokens']} | "
            f"{_f(r['mean_judge'])} | {_f(r['mean_ifd'])} | {r['nll']:.3f} | {fmt_ci(r['nll_vs_all'])} | "
            f"{fmt_ci(r['nll_vs_base'])} | {r['rouge_l']:.3f} | {fmt_ci(r['rouge_l_vs_all'])} | "
            f"{fmt_ci(r['rouge_l_vs_base'])} |")
    lines.append(f"\nwall {result['seconds']:.0f} s")
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
