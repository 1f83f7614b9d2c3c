"""Evaluate the base model and the student side by side on eval sets; writes runs/<run>/eval.json.

    sift eval --run demo --sets valid,general                             # or: make eval
    sift eval --run demo --eval-file ../shared/data/user_oriented_instructions.jsonl --judge

For each side: mean NLL and perplexity of the reference answers (answer tokens only, EOS
included, prompts rendered exactly as training rendered them), ROUGE-L F1 of greedy answers
against the references, stop rate (EOS before the token limit), mean answer length in tokens and
distinct-2 (unique word bigrams over all answers / all bigrams). Per set: the change and its 95%
paired bootstrap interval (train/eval_stats.py), and findings in words: a `general` set that got
significantly worse says "the student forgot". With --judge the teacher also compares the two
answers pairwise in both orders (train/judge_both.py). Sets: the run's valid.jsonl, sift's own
general set, or any file of Self-Instruct tasks ({instruction, instances}), Alpaca records
({instruction, input, output}) or chat records ({messages}); eval.json keeps one entry per set
(train/eval_sets.py). The passes are fast: the student merged, the fast decode engine, NLL in
length-sorted batches (train/eval_passes.py; bench/eval.py measures them against the plain path).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import read_json, read_records
from pipeline.io.runs import locked, record_stage, run_dir
from train.format import DataError, check_messages, prompt_ids, setup_tokenizer, to_messages, tokenize_example

METRICS = (  # name, label, True when higher is better
    ("nll", "NLL / answer token", False),
    ("perplexity", "perplexity", False),
    ("rouge_l", "ROUGE-L F1", True),
    ("stop_rate", "stop rate", True),
    ("mean_output_tokens", "mean answer tokens", None),
    ("distinct_2", "distinct-2", True),
)
SAMPLES_KEPT = 20  # answers stored in eval.json for reading


# ---------------------------------------------------------------- held-out data


def load_heldout(path: Path) -> list[dict]:
    """Rows {id, messages} from chat, Alpaca or Self-Instruct records; one row per instance."""
    rows: list[dict] = []
    for pos, rec in read_records(path):
        rec_id = str(rec.get("id", f"row{pos}"))
        try:
            if "messages" in rec:
                rows.append({"id": rec_id, "messages": check_messages(rec["messages"])})
            elif isinstance(rec.get("instances"), list):
                for k, inst in enumerate(rec["instances"]):
                    out = inst.get("output", "") if isinstance(inst, dict) else ""
                    if isinstance(out, str) and out.strip():
                        rows.append(
                            {
                                "id": f"{rec_id}#{k}",
                                "messages": to_messages(
                                    str(rec.get("instruction", "")), str(inst.get("input", "") or ""), out
                                ),
                            }
                        )
            elif isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str):
                messages = to_messages(rec["instruction"], str(rec.get("input") or ""), rec["output"])
                rows.append({"id": rec_id, "messages": messages})
            else:
                raise DataError(
                    "expected messages, instances, or instruction and output", field="instruction"
                )
        except DataError as e:
            raise SiftError(str(e), path=path, line=pos, field=e.field) from None
    rows = [r for r in rows if r["messages"][-1]["content"].strip()]
    if not rows:
        raise SiftError("no record with a reference answer", path=path)
    return rows


def pick(rows: list[dict], limit: int, seed: int) -> list[dict]:
    """A seeded subset that does not depend on file order (the file may be grouped by source)."""
    key = {r["id"]: hashlib.sha256(f"{seed}:{r['id']}".encode()).digest() for r in rows}
    return sorted(rows, key=lambda r: key[r["id"]])[:limit] if limit > 0 else rows


# ---------------------------------------------------------------- metrics (pure)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 as rouge_score computes it (filters.rouge when present, else rouge_score itself)."""
    try:
        from filters.rouge import rouge_l as fast
    except ImportError:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        return scorer.score(reference, prediction)["rougeL"].fmeasure
    return fast(prediction, reference)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams over all n-grams of all texts (Li et al., 2016); 0 when there are none."""
    grams = [tuple(w[i : i + n]) for w in (t.lower().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


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


def answer_nll(
    model: Any, tokenizer: Any, rows: list[dict], *, batch_size: int = 8
) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each reference answer given its prompt, as in training's labels."""
    import torch

    examples = [tokenize_example(tokenizer, r["messages"]) for r in rows]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [examples[i] for i in idx]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch])
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
        )
        for row, i in enumerate(idx):
            out[i] = (loss[row].sum().item(), int((shift_labels[row] != -100).sum()))
    return out


def greedy_answers(
    model: Any, tokenizer: Any, rows: list[dict], *, max_new_tokens: int, batch_size: int = 16
) -> list[dict]:
    """Greedy answers {text, tokens, stopped}; left-padded batches of similar prompt length."""
    import torch
    from transformers import GenerationConfig

    prompts = [prompt_ids(tokenizer, r["messages"][:-1]) for r in rows]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )
    out: list[dict] = [{}] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            stopped = eos in new
            new = new[: new.index(eos)] if stopped else new
            out[i] = {
                "text": tokenizer.decode(new, skip_special_tokens=True).strip(),
                "tokens": len(new),
                "stopped": stopped,
            }
    return out


def _load_side(spec: str, tokenizer: Any, dtype: str, adapter: Path | None) -> Any:
    from pipeline.io.models import load_model

    model = load_model(spec, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # training added a pad token
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model


def run_side(
    name: str,
    spec: str,
    tokenizer: Any,
    rows: list[dict],
    *,
    adapter: Path | None,
    dtype: str,
    max_new_tokens: int,
    batch_size: int,
    engine: str = "fast",
) -> tuple[list[tuple[float, int]], list[dict], float]:
    """One model over all rows: (NLL per row, greedy answers, seconds). engine "fast": the student
    merged, the fast decode engine where it runs (train/eval_passes.py); "plain": the PEFT model and
    batched `model.generate`, as sift did before (kept for comparison, and the fallback for other models)."""
    from train.eval_passes import fast_answers, fast_supported, load_side, reference_nll

    t0 = time.perf_counter()
    model = load_side(spec, tokenizer, dtype, adapter, merge=engine == "fast")
    if engine == "fast":
        nll = reference_nll(model, tokenizer, rows, label=f"{name} nll")
    else:
        nll = answer_nll(model, tokenizer, rows, batch_size=batch_size)
    if engine == "fast" and fast_supported(model):
        answers = fast_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, label=f"{name} answers")
    else:
        answers = greedy_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
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
                    "pass --base", path=config_path)


def evaluate(
    *,
    run: str = "demo",
    sets: str | None = None,
    eval_file: str | None = None,
    base: str | None = None,
    limit: int = 0,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    dtype: str = "auto",
    engine: str = "fast",
    judge: bool = False,
    teacher: str = "smollm2-135m-instruct",
    backend: str = "transformers",
    base_url: str | None = None,
    seed: int = 0,
) -> None:
    """Compare the base model and the LoRA student on eval sets; results per set in runs/<run>/eval.json.

    Args:
        run: Run name; reads runs/<run>/student/ and (for the valid set) runs/<run>/valid.jsonl.
        sets: Built-in eval sets, comma-separated: valid (the run's split), general (shipped with sift).
            Default: valid, unless --eval-file is given.
        eval_file: A held-out file of your own, run as one more set named after its stem: Self-Instruct
            tasks, Alpaca records or chat records. Other sets' results in eval.json stay.
        base: Model to compare against (default: the student's own base before fine-tuning, as its
            train_config.json or PEFT's adapter_config.json names it).
        limit: Evaluate at most this many examples per set (a seeded subset); 0 for all.
        max_new_tokens: Longest greedy answer; an answer that reaches it counts as not stopped.
        batch_size: Examples per forward pass on the plain engine; judge requests per progress report.
        dtype: auto (bf16 where the CPU has it natively), bfloat16, float16 or float32.
        engine: fast (student merged, the fast decode engine, length-sorted NLL) or plain (model.generate).
        judge: Also let the teacher judge base against student pairwise, each pair in both orders.
        teacher: Judge model: the embedded alias, a folder or .gguf (transformers), or a server's model name.
        backend: Judge backend: transformers or openai (any OpenAI-compatible server).
        base_url: Server URL for the openai backend, e.g. http://localhost:8000/v1.
        seed: Seed for the example subset and the bootstrap.
    """
    if limit < 0 or max_new_tokens < 1 or batch_size < 1:
        raise SiftError("limit >= 0, max_new_tokens >= 1 and batch_size >= 1 required")
    if backend not in ("transformers", "openai"):
        raise SiftError(f"use transformers or openai, got {backend!r}", field="backend")
    if engine not in ("fast", "plain"):
        raise SiftError(f"use fast or plain, got {engine!r}", field="engine")
    if judge and backend == "openai" and not base_url:
        raise SiftError("the openai backend needs --base-url", field="base_url")
    directory = run_dir(run)
    student_dir = directory / "student"
    if not (student_dir / "adapter_config.json").is_file():
        raise SiftError(
            "no trained student here (adapter_config.json missing); run `sift train` first", path=student_dir
        )
    from train.eval_sets import merge_sets, resolve_sets

    with locked(directory):
        chosen = {name: (path, pick(load_heldout(path), limit, seed))
                  for name, path in resolve_sets(directory, sets, eval_file)}
        rows = [r for _, set_rows in chosen.values() for r in set_rows]
        from transformers import AutoTokenizer

        from pipeline.io.models import load_tokenizer, resolve_model
        from train.lora import trained_base

        config_path = student_dir / "train_config.json"
        train_config = read_json(config_path) if config_path.exists() else {}
        student_base = str(trained_base(train_config) or student_base_of(student_dir, base))
        base = base or student_base
        student_tok = AutoTokenizer.from_pretrained(str(student_dir))
        if resolve_model(base).path_or_id == resolve_model(student_base).path_or_id:
            base_tok = student_tok  # same model: same prompts, so the numbers compare
        else:
            base_tok = load_tokenizer(base)
            setup_tokenizer(base_tok, str(train_config.get("template", "auto")))
        kw = {"dtype": dtype, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "engine": engine}
        b_nll, b_ans, b_sec = run_side("base", base, base_tok, rows, adapter=None, **kw)
        s_nll, s_ans, s_sec = run_side("student", student_base, student_tok, rows, adapter=student_dir, **kw)
        base_name = resolve_model(base).name
        student_name = f"{resolve_model(student_base).name} + LoRA ({student_dir})"
        entries, start = {}, 0
        for name, (_, set_rows) in chosen.items():
            cut = slice(start, start + len(set_rows))
            start += len(set_rows)
            entries[name] = set_entry(set_rows, (b_nll[cut], b_ans[cut]), (s_nll[cut], s_ans[cut]), seed=seed)
        judge_name = None
        if judge:
            from train.judge_both import judge_both_orders

            if backend == "openai":
                from pipeline.teachers.openai_compat import OpenAITeacher

                judge_teacher: Any = OpenAITeacher(teacher, base_url=str(base_url))
            else:
                from pipeline.teachers.hf import TransformersTeacher

                judge_teacher = TransformersTeacher(teacher, batch_size=batch_size, dtype=dtype)
            judge_name = judge_teacher.name
            items = [s for e in entries.values() for s in e["samples"]]
            verdicts = judge_both_orders(judge_teacher, items, seed=seed)
            start = 0
            for entry in entries.values():
                n = entry["examples"]
                add_judge(entry, verdicts[start:start + n], judge_name, seed=seed)
                start += n
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for name, (path, _) in chosen.items():
            e = entries[name]
            e["samples"] = e["samples"][:SAMPLES_KEPT]
            e["base"]["model"], e["student"]["model"] = base_name, student_name
            e["base"]["seconds"], e["student"]["seconds"] = round(b_sec, 1), round(s_sec, 1)  # all sets together
            e["eval_file"] = str(path)
            e["evaluated_at"] = stamp
            e["settings"] = {"run": run, "set": name, "eval_file": str(path), "base": base,
                             "student_base": student_base, "limit": limit, "max_new_tokens": max_new_tokens,
                             "batch_size": batch_size, "dtype": dtype, "engine": engine, "judge": judge,
                             "teacher": teacher if judge else None, "backend": backend, "seed": seed}
        merged = merge_sets(directory / "eval.json", entries)
        record_stage(
            directory,
            "eval",
            {"run": run, "sets": list(entries), "eval_file": eval_file, "base": base, "limit": limit,
             "max_new_tokens": max_new_tokens, "dtype": dtype, "engine": engine, "judge": judge, "seed": seed},
            stats={f"{name}.{k}": v for name, e in entries.items() for k, v in e["delta"].items()},
            models={"base": base_name, "student": student_name, **({"judge": judge_name} if judge_name else {})},
        )
    print_table(merged)
    print(f"wrote {directory / 'eval.json'} (sets: {', '.join(merged)}; this run: {', '.join(entries)})")
