"""Evaluate the base model and the student side by side on a held-out set; writes runs/<run>/eval.json.

    sift eval --run demo                                                  # or: make eval
    sift eval --run demo --eval-file ../shared/data/user_oriented_instructions.jsonl --judge

For each side: mean NLL and perplexity of the reference answers (answer tokens only, EOS
included, prompts rendered exactly as training rendered them), ROUGE-L F1 of greedy answers
against the references, stop rate (EOS before the token limit), mean answer length in tokens and
distinct-2 (unique word bigrams over all answers / all bigrams). With --judge the teacher also
compares the two answers pairwise (train/judge.py). The held-out set is the run's valid.jsonl by
default, or any file of Self-Instruct tasks ({instruction, instances}), Alpaca records
({instruction, input, output}) or chat records ({messages}).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import read_json, read_records, write_json
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
) -> tuple[dict, list[dict]]:
    t0 = time.perf_counter()
    model = _load_side(spec, tokenizer, dtype, adapter)
    nll = answer_nll(model, tokenizer, rows, batch_size=batch_size)
    answers = greedy_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    metrics = side_metrics(nll, answers, [r["messages"][-1]["content"] for r in rows])
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: evaluated {len(rows)} examples in {metrics['seconds']:.0f} s")
    del model
    return metrics, answers


# ---------------------------------------------------------------- output


def print_table(result: dict) -> None:
    """Base and student side by side, with the change and whether it is for the better."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval: {result['examples']} examples from {result['eval_file']}")
    for col in ("metric", f"base ({result['base']['model']})", "student", "delta"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, label, higher_better in METRICS:
        b, s = result["base"][key], result["student"][key]
        d = s - b
        style = (
            ""
            if higher_better is None or abs(d) < 1e-12
            else ("green" if (d > 0) == higher_better else "red")
        )
        table.add_row(label, f"{b:.4g}", f"{s:.4g}", f"[{style}]{d:+.4g}[/]" if style else f"{d:+.4g}")
    j = result.get("judge")
    if j and j.get("win_rate") is not None:
        ci = j["ci95"]
        table.add_row("judge win rate", "", f"{j['win_rate']:.3f}", f"95% CI {ci[0]:.2f}-{ci[1]:.2f}")
        table.add_row("  length-controlled", "", f"{j['length_controlled_win_rate']:.3f}", "")
    Console().print(table)


def evaluate(
    *,
    run: str = "demo",
    eval_file: str | None = None,
    base: str = "smollm2-135m-instruct",
    limit: int = 50,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    dtype: str = "auto",
    judge: bool = False,
    teacher: str = "smollm2-135m-instruct",
    backend: str = "transformers",
    base_url: str | None = None,
    seed: int = 0,
) -> None:
    """Compare the base model and the LoRA student on held-out data; writes runs/<run>/eval.json.

    Args:
        run: Run name; reads runs/<run>/student/ and (by default) runs/<run>/valid.jsonl.
        eval_file: Held-out file instead of valid.jsonl: Self-Instruct tasks, Alpaca records or chat records.
        base: Model to compare against (default: the student's own base before fine-tuning).
        limit: Evaluate this many examples at most (a seeded subset); 0 for all.
        max_new_tokens: Longest greedy answer; an answer that reaches it counts as not stopped.
        batch_size: Examples per forward pass.
        dtype: auto (bf16 where the CPU has it natively), bfloat16, float16 or float32.
        judge: Also let the teacher judge base against student pairwise (order randomised per row).
        teacher: Judge model: the embedded alias, a folder or .gguf (transformers), or a server's model name.
        backend: Judge backend: transformers or openai (any OpenAI-compatible server).
        base_url: Server URL for the openai backend, e.g. http://localhost:8000/v1.
        seed: Seed for the example subset, the judge's answer order and the bootstrap.
    """
    if limit < 0 or max_new_tokens < 1 or batch_size < 1:
        raise SiftError("limit >= 0, max_new_tokens >= 1 and batch_size >= 1 required")
    if backend not in ("transformers", "openai"):
        raise SiftError(f"use transformers or openai, got {backend!r}", field="backend")
    directory = run_dir(run)
    student_dir = directory / "student"
    if not (student_dir / "adapter_config.json").is_file():
        raise SiftError(
            "no trained student here (adapter_config.json missing); run `sift train` first", path=student_dir
        )
    source = Path(eval_file) if eval_file else directory / "valid.jsonl"
    if not eval_file and not source.exists():
        raise SiftError("no validation split; run `sift export` first or pass --eval-file", path=source)
    with locked(directory):
        rows = pick(load_heldout(source), limit, seed)
        from transformers import AutoTokenizer

        from pipeline.io.models import load_tokenizer, resolve_model

        config_path = student_dir / "train_config.json"
        train_config = read_json(config_path) if config_path.exists() else {}
        student_base = str(train_config.get("student", base))
        student_tok = AutoTokenizer.from_pretrained(str(student_dir))
        if resolve_model(base).path_or_id == resolve_model(student_base).path_or_id:
            base_tok = student_tok  # same model: same prompts, so the numbers compare
        else:
            base_tok = load_tokenizer(base)
            setup_tokenizer(base_tok, str(train_config.get("template", "auto")))
        kw = {"dtype": dtype, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
        base_m, base_a = run_side("base", base, base_tok, rows, adapter=None, **kw)
        student_m, student_a = run_side("student", student_base, student_tok, rows, adapter=student_dir, **kw)
        base_m["model"] = resolve_model(base).name
        student_m["model"] = f"{resolve_model(student_base).name} + LoRA ({student_dir})"
        samples = [
            {
                "id": r["id"],
                "instruction": r["messages"][-2]["content"],
                "reference": r["messages"][-1]["content"],
                "base": a["text"],
                "student": b["text"],
            }
            for r, a, b in zip(rows, base_a, student_a, strict=True)
        ]
        judged = None
        if judge:
            from train.judge import judge_pairs, summarize

            if backend == "openai":
                from pipeline.teachers.openai_compat import OpenAITeacher

                if not base_url:
                    raise SiftError("the openai backend needs --base-url", field="base_url")
                judge_teacher: Any = OpenAITeacher(teacher, base_url=base_url)
            else:
                from pipeline.teachers.hf import TransformersTeacher

                judge_teacher = TransformersTeacher(teacher, batch_size=batch_size, dtype=dtype)
            verdicts = judge_pairs(judge_teacher, samples, seed=seed)
            judged = summarize(verdicts, seed=seed) | {"teacher": judge_teacher.name, "verdicts": verdicts}
        result = {
            "eval_file": str(source),
            "examples": len(rows),
            "base": base_m,
            "student": student_m,
            "delta": {k: student_m[k] - base_m[k] for k, _, _ in METRICS},
            "judge": judged,
            "samples": samples[:SAMPLES_KEPT],
        }
        settings = {
            "run": run,
            "eval_file": str(source),
            "base": base,
            "student_base": student_base,
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "dtype": dtype,
            "judge": judge,
            "teacher": teacher if judge else None,
            "backend": backend,
            "seed": seed,
        }
        result["settings"] = settings
        write_json(directory / "eval.json", result)
        record_stage(
            directory,
            "eval",
            settings,
            stats=dict(result["delta"]),
            models={"base": base_m["model"], "student": student_m["model"]},
        )
    print_table(result)
    print(f"wrote {directory / 'eval.json'}")
