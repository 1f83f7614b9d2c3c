"""Evaluate the base model and the student side by side on eval sets; writes runs/<run>/eval.json.

    sift eval --run demo --eval.sets valid,general                             # or: make eval
    sift eval --run demo --eval.eval_file ../shared/data/user_oriented_instructions.jsonl --eval.judge

For each side: mean NLL and perplexity of the reference answers (answer tokens only, EOS
included, prompts rendered exactly as training rendered them), ROUGE-L F1 of greedy answers
against the references, stop rate (EOS before the token limit), mean answer length in tokens and
distinct-2 (unique word bigrams over all answers / all bigrams). Per set: the change and its 95%
paired bootstrap interval (train/eval_stats.py), and findings in words: a `general` set that got
significantly worse says "the student forgot". With eval.judge the teacher (built like every stage's,
so its options, key variable, vLLM and pools work) also compares the two answers pairwise in both
orders (train/judge_both.py). Sets: the run's valid.jsonl, sift's own
general set, or any file of Self-Instruct tasks ({instruction, instances}), Alpaca records
({instruction, input, output}) or chat records ({messages}); eval.json keeps one entry per set
(train/eval_sets.py). The passes are fast: the student merged, the fast decode engine, NLL in
length-sorted batches (train/eval_passes.py; bench/eval.py measures them against the plain path).
Both sides run on `student.device` (auto: CUDA when torch sees a GPU).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import read_json
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.settings import EvalSettings, StudentSettings, TeacherSettings, to_dict
from pipeline.teachers.pool import check_teachers, open_teachers
from train.eval_passes import answer_nll, greedy_answers, load_side
from train.eval_sets import load_heldout, pick
from train.eval_stats import METRICS, distinct_n, rouge_l
from train.format import setup_tokenizer

SAMPLES_KEPT = 20  # answers stored in eval.json for reading


# ---------------------------------------------------------------- metrics (pure)


def side_metrics(nll: list[tuple[float, int]], answers: list[dict], references: list[str]) -> dict:
    """One model's numbers: token-weighted NLL, perplexity, ROUGE-L, stop rate, length, distinct-2."""
    tokens = sum(n for _, n in nll)
    mean_nll = sum(s for s, _ in nll) / tokens if tokens else math.nan
    texts = [a["text"] for a in answers]
    return {
        "nll": mean_nll,
        "perplexity": math.exp(mean_nll) if tokens else math.nan,
        "rouge_l": sum(rouge_l(t, r) for t, r in zip(texts, references, strict=True)) / len(texts),
        "stop_rate": sum(a["stopped"] for a in answers) / len(answers),
        "mean_output_tokens": sum(a["tokens"] for a in answers) / len(answers),
        "distinct_2": distinct_n(texts),
        "answer_tokens_scored": tokens,
    }


# ---------------------------------------------------------------- model passes


def run_side(
    name: str,
    spec: str,
    tokenizer: Any,
    rows: list[dict],
    *,
    adapter: Path | None,
    student: StudentSettings,
    eval: EvalSettings,
) -> tuple[list[tuple[float, int]], list[dict], float]:
    """One model over all rows, on `student.device`: (NLL per row, greedy answers, seconds). eval.engine
    "fast": the student merged, the fast decode engine where it runs (train/eval_passes.py); "plain": the
    PEFT model and batched `model.generate`, as sift did before (kept for comparison, and the fallback for
    other models and GPUs)."""
    from train.eval_passes import fast_answers, fast_supported, reference_nll

    t0 = time.perf_counter()
    fast = eval.engine == "fast"
    model = load_side(spec, tokenizer, adapter, student=student, merge=fast)
    if fast:
        nll = reference_nll(model, tokenizer, rows, label=f"{name} nll")
    else:
        nll = answer_nll(model, tokenizer, rows, batch_size=eval.batch_size)
    if fast and fast_supported(model):
        answers = fast_answers(model, tokenizer, rows, max_new_tokens=eval.max_new_tokens, label=f"{name} answers")
    else:
        answers = greedy_answers(model, tokenizer, rows, max_new_tokens=eval.max_new_tokens,
                                 batch_size=eval.batch_size)
    seconds = time.perf_counter() - t0
    made = sum(a["tokens"] for a in answers)
    rate = made / max(seconds, 1e-9)
    print(f"{name}: {len(rows)} examples in {seconds:.0f} s ({made} answer tokens, {rate:.0f} tok/s end to end)")
    del model
    return nll, answers, seconds


# ---------------------------------------------------------------- one eval set's entry


def set_entry(rows: list[dict], base: tuple, student: tuple, *, seed: int) -> dict:
    """base / student metrics, their delta and paired 95% intervals, from each side's (nll, answers)."""
    from train.eval_stats import per_example, set_intervals

    refs = [r["messages"][-1]["content"] for r in rows]
    sides, columns = {}, {}
    for key, (nll, answers) in (("base", base), ("student", student)):
        sides[key] = side_metrics(nll, answers, refs)
        columns[key] = per_example(nll, answers, [rouge_l(a["text"], r) for a, r in zip(answers, refs, strict=True)])
    samples = [
        {"id": r["id"], "instruction": r["messages"][-2]["content"], "reference": ref, "base": a["text"],
         "student": b["text"]}
        for r, ref, a, b in zip(rows, refs, base[1], student[1], strict=True)
    ]
    return {
        "examples": len(rows),
        "base": sides["base"],
        "student": sides["student"],
        "delta": {k: sides["student"][k] - sides["base"][k] for k, _, _ in METRICS},
        "ci95": set_intervals(columns["base"], columns["student"], seed=seed),
        "samples": samples,
    }


def add_judge(entry: dict, verdicts: list[dict], teacher_name: str, *, seed: int) -> None:
    """The judge's summary into a set's entry, and its win rate as a metric against 0.5 (the base
    judged against itself)."""
    from train.judge_both import summarize_both

    summary = summarize_both(verdicts, seed=seed)
    entry["judge"] = summary | {"teacher": teacher_name, "verdicts": verdicts}
    if summary["win_rate"] is not None and summary["ci95"] is not None:
        entry["delta"]["judge_win_rate"] = summary["win_rate"] - 0.5
        entry["ci95"]["judge_win_rate"] = [x - 0.5 for x in summary["ci95"]]


# ---------------------------------------------------------------- output


def _cell(b: float, s: float, d: float, ci: list[float] | None, higher_better: bool | None) -> str:
    from train.eval_stats import significant

    sig = significant(ci)
    style = "" if higher_better is None or not sig else ("green" if (sig > 0) == higher_better else "red")
    band = f" [{ci[0]:+.2g}, {ci[1]:+.2g}]" if ci else ""
    change = f"{d:+.3g}{band}"
    return f"{b:.4g} -> {s:.4g}\n" + (f"[{style}]{change}[/]" if style else change)


def print_table(sets: dict[str, dict]) -> None:
    """Every eval set side by side: base -> student, then the change and its 95% interval
    (green or red when the interval excludes zero), and the findings in words."""
    from rich.console import Console
    from rich.table import Table

    from train.eval_stats import findings

    table = Table(title="eval: base -> student, delta [95% paired bootstrap interval]", show_lines=True)
    table.add_column("metric")
    for name, e in sets.items():
        table.add_column(f"{name} ({e.get('examples', '?')})", justify="right")
    for key, label, higher_better in METRICS:
        cells = []
        for e in sets.values():
            b, s = e.get("base", {}).get(key), e.get("student", {}).get(key)
            ok = isinstance(b, int | float) and isinstance(s, int | float)
            cells.append(_cell(b, s, s - b, (e.get("ci95") or {}).get(key), higher_better) if ok else "")
        table.add_row(label, *cells)
    if any((e.get("judge") or {}).get("win_rate") is not None for e in sets.values()):
        cells = []
        for e in sets.values():
            j = e.get("judge") or {}
            if j.get("win_rate") is None:
                cells.append("")
                continue
            ci = j.get("ci95") or [math.nan, math.nan]
            cells.append(f"{j['win_rate']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]\nLC {j['length_controlled_win_rate']:.3f}")
        table.add_row("judge win rate (both orders)", *cells)
    console = Console()
    console.print(table)
    for name, e in sets.items():
        for line in findings(name, e):
            console.print(f"[bold red]{line}[/]" if line.startswith("the student forgot") else line)


def student_base_of(student_dir: Path, fallback: str | None = None) -> str:
    """The model a student was trained from, from PEFT's adapter_config.json (when sift's own
    train_config.json is missing), else `fallback`."""
    config_path = student_dir / "adapter_config.json"
    name = read_json(config_path).get("base_model_name_or_path") if config_path.is_file() else None
    if isinstance(name, str) and name:
        return name
    if fallback:
        return fallback
    raise SiftError("cannot tell the student's base model (no train_config.json, no base_model_name_or_path); "
                    "pass --eval.base", path=config_path)


def evaluate(
    *,
    run: str = "demo",
    student: StudentSettings = StudentSettings(),
    teacher: TeacherSettings = TeacherSettings(),
    eval: EvalSettings = EvalSettings(),
) -> None:
    """Compare the base model and the LoRA student on eval sets; results per set in runs/<run>/eval.json.

    Args:
        run: Run name; reads runs/<run>/student/ and (for the valid set) runs/<run>/valid.jsonl.
        student: where both sides run (device) and in what precision (dtype); the student's base is the
            one it was trained from.
        teacher: the judge (or teacher.pool, several judges), with eval.judge.
        eval: this stage's own settings: sets, limit, answer length, engine, judge.
    """
    from pipeline.io.models import resolve_device

    resolve_device(student.device)  # a device torch does not have fails here, before any work
    directory = run_dir(run)
    student_dir = directory / "student"
    judges = check_teachers(teacher) if eval.judge else None  # a bad teachers file fails before any work
    if not (student_dir / "adapter_config.json").is_file():
        raise SiftError(
            "no trained student here (adapter_config.json missing); run `sift train` first", path=student_dir
        )
    from train.eval_sets import merge_sets, resolve_sets

    with locked(directory):
        chosen = {name: (path, pick(load_heldout(path), eval.limit, eval.seed))
                  for name, path in resolve_sets(directory, eval.sets, eval.eval_file)}
        rows = [r for _, set_rows in chosen.values() for r in set_rows]
        from transformers import AutoTokenizer

        from pipeline.io.models import load_tokenizer, resolve_model
        from train.lora import trained_base

        config_path = student_dir / "train_config.json"
        train_config = read_json(config_path) if config_path.exists() else {}
        student_base = str(trained_base(train_config) or student_base_of(student_dir, eval.base))
        base = eval.base or student_base
        student_tok = AutoTokenizer.from_pretrained(str(student_dir))
        if resolve_model(base).path_or_id == resolve_model(student_base).path_or_id:
            base_tok = student_tok  # same model: same prompts, so the numbers compare
        else:
            base_tok = load_tokenizer(base)
            setup_tokenizer(base_tok, str(train_config.get("template", "auto")))
        b_nll, b_ans, b_sec = run_side("base", base, base_tok, rows, adapter=None, student=student, eval=eval)
        s_nll, s_ans, s_sec = run_side("student", student_base, student_tok, rows, adapter=student_dir,
                                       student=student, eval=eval)
        base_name = resolve_model(base).name
        student_name = f"{resolve_model(student_base).name} + LoRA ({student_dir})"
        entries, start = {}, 0
        for name, (_, set_rows) in chosen.items():
            cut = slice(start, start + len(set_rows))
            start += len(set_rows)
            entries[name] = set_entry(set_rows, (b_nll[cut], b_ans[cut]), (s_nll[cut], s_ans[cut]),
                                      seed=eval.seed)
        judge_name = None
        if eval.judge:
            from train.judge_both import judge_both_orders

            # uncached, like the score stage's judge: eval.json keeps every verdict
            judge_teacher = open_teachers(None, teacher, batch_size=eval.batch_size)
            judge_name = judge_teacher.name
            items = [s for e in entries.values() for s in e["samples"]]
            verdicts = judge_both_orders(judge_teacher, items, seed=eval.seed)
            start = 0
            for entry in entries.values():
                n = entry["examples"]
                add_judge(entry, verdicts[start:start + n], judge_name, seed=eval.seed)
                start += n
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        settings = to_dict(student=dataclasses.replace(student, model=student_base), eval=eval,
                           teacher=teacher if eval.judge else None)
        if judges:
            settings["teachers"] = judges
        for name, (path, _) in chosen.items():
            e = entries[name]
            e["samples"] = e["samples"][:SAMPLES_KEPT]
            e["base"]["model"], e["student"]["model"] = base_name, student_name
            e["base"]["seconds"], e["student"]["seconds"] = round(b_sec, 1), round(s_sec, 1)  # all sets together
            e["eval_file"] = str(path)
            e["evaluated_at"] = stamp
            e["settings"] = {"run": run, "set": name, "eval_file": str(path), "base": base,
                             "student_base": student_base, **settings}
        merged = merge_sets(directory / "eval.json", entries)
        record_stage(
            directory,
            "eval",
            {"run": run, "sets": list(entries), "base": base, **settings},
            stats={f"{name}.{k}": v for name, e in entries.items() for k, v in e["delta"].items()},
            models={"base": base_name, "student": student_name, **({"judge": judge_name} if judge_name else {})},
        )
    print_table(merged)
    print(f"wrote {directory / 'eval.json'} (sets: {', '.join(merged)}; this run: {', '.join(entries)})")
