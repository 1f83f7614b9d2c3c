"""Stage `loop`: student-in-the-loop rounds (LLM2LLM, Lee et al. 2024) on a run's filtered data.

    sift loop --run demo --rounds 2          # or: make loop ROUNDS=2

The data starts as the run's filtered.jsonl plus the seed examples (round 0). Each round then:
1. trains a fresh LoRA student on the data so far (the same trainer as `sift train`);
2. has it answer the original training examples, greedily, and scores each answer: ROUGE-L F1
   against the reference, or the teacher's yes/no verdict (`--metric judge`);
3. takes the examples scoring below `--threshold`, worst first (at most `--max-failures`);
4. asks the teacher for `--per-failure` new examples like each one (prompts/llm2llm_augment.txt);
5. passes them through the rules of `sift filter` and the ROUGE-L dedup against every instruction so far;
6. appends the survivors, each with `loop`: {round, parent_id, parent_score, parent_instruction}.
Only round-0 examples are scored and augmented (LLM2LLM: augmenting augmentations drifts), and the
validation split is fixed at round 0, so eval loss compares across rounds.

Artifacts in runs/<run>/: loop.json (settings and one entry per round: data size, score, failures,
new records, eval loss), loop/data.jsonl (every record, lineage included) and, per round,
loop/round-<r>/: train.jsonl, valid.jsonl, student/, scores.jsonl, added.jsonl,
added.rejected.jsonl (the ledger: filter reasons, parse problems, teacher errors), round.json.
Scoring and teacher calls are journaled in batches and training checkpoints, so a killed loop
rerun with the same command carries on; a finished round (round.json) is never redone, and a
larger --rounds extends the loop.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filters.engine import apply_rules
from filters.rouge import RougeIndex
from filters.rules import parse_rules
from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal, file_sha256, iter_jsonl, read_json, read_jsonl, write_json, write_jsonl
from pipeline.io.batched import run_batches
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.stages import llm2llm
from pipeline.stages import teacher_policy as policies
from pipeline.stages.export import read_filtered, split_ids, write_splits
from pipeline.stages.filter import flatten_tasks
from pipeline.teachers.base import Sampling, Teacher
from pipeline.teachers.prompts import PromptTemplate, load
from train.format import to_messages

LOOP_DIR = "loop"
# settings that change what a round produces; a rerun must keep them (--rounds may grow)
SHAPING = ("student", "teacher", "backend", "metric", "threshold", "max_failures", "per_failure", "eval_limit",
           "max_new_tokens", "augment_max_tokens", "temperature", "top_p", "rules", "rouge_threshold",
           "train_on_seeds", "valid_fraction", "epochs", "max_steps", "lr", "batch_size", "max_length", "seed",
           "prompt", "grade_prompt", "distill", "distill_teacher", "distill_temperature", "distill_alpha",
           "distill_top_k", "teachers", "teacher_policy")


# ---------------------------------------------------------------- data


def original_records(directory: Path, *, train_on_seeds: bool) -> list[dict]:
    """Round 0: the run's filtered.jsonl, then (optionally) every seed example with an output."""
    source = directory / "filtered.jsonl"
    if not source.exists():
        raise SiftError("not found; run `sift filter` (or `make filter`) first", path=source)
    records = read_filtered(source)
    seeds_path = directory / "seeds.jsonl"
    if train_on_seeds and seeds_path.exists():
        for ex in flatten_tasks(list(iter_jsonl(seeds_path)), seeds_path):
            if ex["output"].strip():
                records.append({"id": ex["id"], "instruction": ex["instruction"], "input": ex["input"],
                                "output": ex["output"], "metadata": {"source": "seed", "task_id": ex["task_id"]}})
    seen: set[str] = set()
    out = []
    for rec in records:
        if rec["id"] not in seen:
            seen.add(rec["id"])
            out.append({**rec, "metadata": {**rec["metadata"], "loop": {"round": 0}}})
    return out


def as_data(record: dict) -> dict:
    """An added record in the shape the exporter takes: lineage in its metadata."""
    return {"id": record["id"], "instruction": record["instruction"], "input": record["input"],
            "output": record["output"], "metadata": {"source": "loop", "loop": record["loop"]}}


def pool_instructions(records: list[dict], seeds_path: Path) -> list[tuple[str, str]]:
    """(id, instruction) of every distinct instruction so far, the run's seeds included."""
    pairs = [(r["id"], r["instruction"]) for r in records]
    if seeds_path.exists():
        pairs += [(str(obj.get("id", f"seed_{line}")), str(obj.get("instruction", "")))
                  for line, obj in iter_jsonl(seeds_path)]
    seen: set[str] = set()
    out = []
    for rid, text in pairs:
        if text not in seen:
            seen.add(text)
            out.append((rid, text))
    return out


def filter_new(candidates: list[dict], pool: list[tuple[str, str]], known_ids: set[str], *, rules: list[str],
               rouge_threshold: float) -> tuple[list[dict], list[dict]]:
    """Kept candidates and the ledger of the others: the rules of `sift filter`, in order, with the
    ROUGE-L pool holding every instruction so far (and each candidate kept before)."""
    index = RougeIndex(threshold=rouge_threshold, top_k=0)
    for rid, text in pool:
        index.add(rid, text)
    fresh, rejected = [], []
    seen = set(known_ids)
    for rec in candidates:
        if rec["id"] in seen:  # the very same example again
            rejected.append({"id": rec["id"], "reason": "duplicate_example", "score": None, "record": rec})
        else:
            seen.add(rec["id"])
            fresh.append(rec)
    kept = []
    for rec, reason, details in apply_rules(fresh, rules, rouge_index=index):
        if reason is None:
            kept.append(rec)
            continue
        entry: dict[str, Any] = {"id": rec["id"], "reason": reason, "score": details.get("score")}
        if reason == "rouge_duplicate":
            entry.update(nearest_id=details.get("nearest_id"), nearest_text=details.get("nearest_text"))
        rejected.append({**entry, "record": rec})
    return kept, rejected


# ---------------------------------------------------------------- one round's steps


def train_student(round_dir: Path, label: str, options: dict, eval_before: dict | None = None) -> dict:
    """Train the round's student unless a finished one is there; returns the training summary."""
    from train.lora import train, train_in

    student = round_dir / "student"
    if not (student / "train_config.json").is_file():
        defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()}
        train_in(round_dir, **{**defaults, **options, "run": label, "resume": True}, eval_before=eval_before)
    summaries = [e for e in Journal(student / "metrics.jsonl").read() if e.get("kind") == "summary"]
    return summaries[-1] if summaries else {}


def untrained_eval(round_dir: Path) -> dict | None:
    """A finished round's measurement of the untrained student on the validation split (step 0).
    Every round starts from the same base model and holds out the same split, so later rounds reuse it."""
    entries = Journal(round_dir / "student" / "metrics.jsonl").read()
    first = next((e for e in entries if e.get("kind") == "eval"), None)
    return first if first is not None and first.get("step") == 0 else None


def eval_rows(records: list[dict], valid_ids: set[str], limit: int, seed: int) -> list[dict]:
    """The original training examples the student is scored on (a seeded subset with --eval-limit)."""
    from train.evaluate import pick

    rows = [{**r, "messages": to_messages(r["instruction"], r["input"], r["output"])}
            for r in records if r["id"] not in valid_ids]
    return pick(rows, limit, seed)


def score_examples(round_dir: Path, rows: list[dict], *, metric: str, max_new_tokens: int, batch_size: int,
                   teacher: Callable[[], Teacher], grade_template: PromptTemplate) -> list[dict]:
    """{id, score, answer, stopped, tokens} for every row: the round's student answers greedily, the
    answer is scored; journaled per batch."""
    from train.evaluate import _load_side, greedy_answers, rouge_l
    from transformers import AutoTokenizer

    student = round_dir / "student"
    config = read_json(student / "train_config.json")
    loaded: dict[str, Any] = {}

    def work(batch: list[dict]) -> tuple[list[dict], list[dict], dict]:
        if not loaded:
            loaded["tok"] = AutoTokenizer.from_pretrained(str(student))
            loaded["model"] = _load_side(config["student"], loaded["tok"], "auto", student)
        answers = greedy_answers(loaded["model"], loaded["tok"], batch, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)
        if metric == "rouge":
            scores: list[float | None] = [rouge_l(a["text"], r["output"]) for r, a in zip(batch, answers, strict=True)]
            grades = [None] * len(batch)
        else:
            sampling = Sampling(temperature=0.0, max_tokens=4)
            completions = teacher().generate([llm2llm.grade_request(grade_template, sampling, r, a["text"])
                                              for r, a in zip(batch, answers, strict=True)])
            grades = [c.text[:40] for c in completions]
            scores = [llm2llm.grade_score(c.text) if c.finish_reason != "error" else None for c in completions]
        kept = [{"id": r["id"], "score": s, "answer": a["text"], "stopped": a["stopped"], "tokens": a["tokens"],
                 **({"grade": g} if g is not None else {})}
                for r, a, s, g in zip(batch, answers, scores, grades, strict=True)]
        return kept, [], {"answers": len(batch), "tokens_out": sum(a["tokens"] for a in answers)}

    fingerprint = {"adapter": file_sha256(student / "adapter_model.safetensors"), "metric": metric,
                   "max_new_tokens": max_new_tokens, "grade_prompt": grade_template.provenance()}
    scored, _, _ = run_batches(rows, work, stage="score", journal_path=round_dir / "score.journal",
                               fingerprint=fingerprint, batch_size=batch_size)
    loaded.clear()
    return scored


def augment(round_dir: Path, failures: list[dict], answers: dict[str, str], *, round_index: int,
            template: PromptTemplate, teacher: Callable[[], Teacher], teacher_name: str, per_failure: int,
            temperature: float, top_p: float, max_tokens: int, seed: int, batch_size: int,
            assignment: dict[str, str] | None = None) -> tuple[list[dict], list[dict], dict]:
    """New candidate records from the teacher, one request per failure, journaled per batch; the
    ledger holds parse problems and failures the teacher could not serve. With several teachers,
    `assignment` names the teacher of each failure id (a TeacherPool), and every added record's
    lineage names the teacher that actually wrote it."""

    def sampling_for(failure: dict) -> Sampling:
        return llm2llm.augment_sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                        count=per_failure,
                                        seed=llm2llm.request_seed(seed, round_index, failure["id"]))

    def work(batch: list[dict]) -> tuple[list[dict], list[dict], dict]:
        requests = [llm2llm.augment_request(template, sampling_for(f), f, answer=answers.get(f["id"], ""),
                                            count=per_failure) for f in batch]
        t = teacher()
        completions = (t.generate_for(requests, [assignment[f["id"]] for f in batch])  # type: ignore[attr-defined]
                       if assignment is not None else t.generate(requests))
        kept, rejected = [], []
        for f, c in zip(batch, completions, strict=True):
            who = {"teacher": c.teacher["name"]} if c.teacher else {}
            if c.finish_reason == "error":
                rejected.append({"id": f["id"], "reason": "teacher_error", "detail": c.error, **who})
                continue
            records, problems = llm2llm.parse_augmentation(c.text, f, round_index=round_index, count=per_failure,
                                                           truncated=c.finish_reason == "length")
            if who:
                records = [{**r, "loop": {**r["loop"], **who}} for r in records]
            kept.append({"id": f["id"], "records": records, "raw": c.text, "finish_reason": c.finish_reason,
                         "problems": [{"reason": p.reason, "raw": p.raw} for p in problems], **who})
        counters: dict[str, Any] = {"requests": len(batch),
                                    "tokens_out": sum(c.completion_tokens for c in completions)}
        if assignment is not None:
            counters["by_teacher"] = t.last_usage  # type: ignore[attr-defined]
        return kept, rejected, counters

    probe = sampling_for({"id": ""}).to_dict()
    probe.pop("seed")
    fingerprint = {"prompt": template.provenance(), "sampling": probe, "per_failure": per_failure,
                   "teacher": teacher_name}
    done, errors, counters = run_batches(failures, work, stage="augment", journal_path=round_dir / "augment.journal",
                                         fingerprint=fingerprint, batch_size=batch_size)
    candidates = [rec for d in done for rec in d["records"]]
    ledger = [{"id": d["id"], "reason": p["reason"], "score": None, "raw": p["raw"], "parent_id": d["id"]}
              for d in done for p in d["problems"]]
    ledger += [{**e, "score": None, "parent_id": e["id"]} for e in errors]
    if assignment is not None:  # who answered each failure (a down teacher's went to another)
        counters["served"] = {d["id"]: d.get("teacher", assignment[d["id"]]) for d in [*done, *errors]}
    return candidates, ledger, counters


# ---------------------------------------------------------------- the command


def loop(*, run: str = "demo", rounds: int = 2, student: str = "smollm2-135m-instruct",
         teacher: str = "smollm2-135m-instruct", backend: str = "transformers", base_url: str | None = None,
         api_key_env: str = "OPENAI_API_KEY", teacher_options: str | None = None, metric: str = "rouge",
         threshold: float = 0.5,
         max_failures: int = 0, per_failure: int = 2, eval_limit: int = 0, max_new_tokens: int = 128,
         augment_max_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9,
         rules: str = "self-instruct", rouge_threshold: float = 0.7, train_on_seeds: bool = True,
         valid_fraction: float = 0.1, epochs: float = 2.0, max_steps: int = -1, lr: float = 2e-4,
         batch_size: int = 8, max_length: int = 512, seed: int = 0, teacher_batch_size: int = 16,
         prompt: str | None = None, grade_prompt: str | None = None, distill: bool = False,
         distill_teacher: str | None = None, distill_temperature: float = 2.0, distill_alpha: float = 0.5,
         distill_top_k: int = 0, teachers: str | None = None, teacher_policy: str = "fixed") -> None:
    """Student-in-the-loop rounds (LLM2LLM): train, find the examples the student fails, augment them.

    Reads runs/<run>/filtered.jsonl and seeds.jsonl; writes loop.json, loop/data.jsonl and
    loop/round-<r>/. Resumable: rerun the same command after a crash; a larger --rounds extends.

    Args:
        run: Run name; artifacts live in runs/<run>/.
        rounds: Rounds of train, score, augment (each trains a fresh student on all data so far).
        student: Student base model: the embedded alias, a local folder, a .gguf file or a Hub id.
        teacher: Teacher that writes the new examples (and grades, with --metric judge).
        backend: Teacher backend: transformers (in-process), vllm (GPU) or openai (any compatible server).
        base_url: Server URL for the openai backend, e.g. http://localhost:8000/v1.
        api_key_env: Environment variable holding the API key (never logged).
        teacher_options: The teacher backend's own settings as comma-separated key=value pairs, e.g.
            "timeout=300,max_retries=10" (openai), "engine=hf" or "device=cuda" (transformers).
        metric: How an answer is scored: rouge (ROUGE-L F1 against the reference) or judge (teacher says yes/no).
        threshold: An example whose score is below this is a failure.
        max_failures: Augment at most this many failures per round, the worst first (0: all).
        per_failure: New examples the teacher writes for each failure.
        eval_limit: Score at most this many original training examples per round, a seeded subset (0: all).
        max_new_tokens: Longest greedy student answer when scoring.
        augment_max_tokens: Longest teacher response per failure.
        temperature: Teacher sampling temperature for new examples.
        top_p: Teacher nucleus sampling mass for new examples.
        rules: Filter rules for new examples, as `sift filter --rules` (a preset or a comma list).
        rouge_threshold: ROUGE-L F1 above which a new instruction duplicates one already in the data.
        train_on_seeds: Include the seed examples in round 0's data (and score them).
        valid_fraction: Share of round-0 records held out for eval loss (fixed across rounds).
        epochs: Training passes per round.
        max_steps: Stop each round's training after this many optimizer steps (-1: all epochs).
        lr: Peak learning rate of each round's training.
        batch_size: Examples per forward pass when training and when scoring.
        max_length: Longest training example in tokens.
        seed: Seed for the split, the scored subset, training and teacher sampling.
        teacher_batch_size: Requests per teacher batch (and per journal entry).
        prompt: Your own augmentation template (placeholders instruction, input, output, student_answer, count).
        grade_prompt: Your own grading template for --metric judge (instruction, input, reference, answer).
        distill: Train each round's student with the distillation loss of `sift train --distill`.
        distill_teacher: Model whose token distributions the student learns, sharing its tokenizer
            (default: --teacher, with the transformers backend).
        distill_temperature: Softmax temperature of the distillation KL.
        distill_alpha: Weight of the KL term; 1 - alpha weighs the cross-entropy.
        distill_top_k: Cache the distillation teacher's top-k log-probabilities per round (0: on the fly).
        teachers: Several teachers instead of --teacher: a teachers file (YAML/TOML: name, model, backend,
            options, share) or comma-separated models, each optionally =share; failures are spread by share,
            and --metric judge grades with the first.
        teacher_policy: fixed (the shares as given) or learned (after each round, Thompson sampling on
            whether the failures each teacher's additions targeted improved; docs/teachers.md).
    """
    started = time.monotonic()
    if distill and distill_teacher is None and backend == "transformers":
        distill_teacher = teacher
    recorded = ("run", "rounds", "base_url", "teacher_options")  # kept in loop.json, free to change on a rerun
    settings = {k: v for k, v in locals().items() if k in SHAPING or k in recorded}
    _check(rounds=rounds, metric=metric, threshold=threshold, max_failures=max_failures, per_failure=per_failure,
           eval_limit=eval_limit, valid_fraction=valid_fraction, teacher_batch_size=teacher_batch_size,
           temperature=temperature, top_p=top_p, augment_max_tokens=augment_max_tokens,
           max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length, lr=lr,
           rouge_threshold=rouge_threshold)
    try:
        rule_names = parse_rules(rules)
    except ValueError as e:
        raise SiftError(str(e), field="rules") from None
    if teacher_policy not in policies.POLICIES:
        raise SiftError(f"use one of {', '.join(policies.POLICIES)}, got {teacher_policy!r}",
                        field="teacher_policy")
    from pipeline.teachers.pool import check_teachers

    specs = check_teachers(teachers, backend=backend, base_url=base_url, api_key_env=api_key_env,
                           teacher_options=teacher_options)
    settings["teachers"] = specs  # the resolved teachers, not the file name: an edited file is a change
    if teacher_policy == "learned" and not (specs and len(specs) > 1):
        raise SiftError("the learned policy needs several teachers (--teachers FILE or a,b)", field="teacher_policy")
    if distill:
        _check_distill(student, distill_teacher, temperature=distill_temperature, alpha=distill_alpha,
                       top_k=distill_top_k)
    template = load(prompt or llm2llm.AUGMENT_PROMPT)
    template.check(llm2llm.AUGMENT_FIELDS, required={"instruction", "output"})
    grade_template = load(grade_prompt or llm2llm.GRADE_PROMPT)
    grade_template.check(llm2llm.GRADE_FIELDS, required={"answer"})
    settings["prompt"], settings["grade_prompt"] = template.provenance(), grade_template.provenance()
    directory = run_dir(run)
    loop_dir = directory / LOOP_DIR
    with locked(directory):
        originals = original_records(directory, train_on_seeds=train_on_seeds)
        _check_settings(loop_dir / "settings.json", settings)
        valid_ids = split_ids([r["id"] for r in originals], valid_fraction, seed)
        rows = eval_rows(originals, valid_ids, eval_limit, seed)
        teacher_cache: dict[str, Teacher] = {}

        def get_teacher() -> Teacher:
            if not teacher_cache:
                from pipeline.teachers.pool import open_teachers

                teacher_cache["t"] = open_teachers(directory, teachers=teachers, teacher=teacher, backend=backend,
                                                   batch_size=teacher_batch_size, base_url=base_url,
                                                   api_key_env=api_key_env, teacher_options=teacher_options)
            return teacher_cache["t"]

        def get_grader() -> Teacher:  # with several teachers, the first grades (one judge for every round)
            t = get_teacher()
            members = getattr(t, "members", None)
            return next(iter(members.values())).teacher if members else t

        added: list[dict] = []
        summaries: list[dict] = []
        for r in range(1, rounds + 1):
            round_dir = loop_dir / f"round-{r}"
            if (round_dir / "round.json").exists():
                summaries.append(read_json(round_dir / "round.json"))
                added += read_jsonl(round_dir / "added.jsonl", allow_empty=True)  # a round may add nothing
                continue
            t0 = time.monotonic()
            round_dir.mkdir(parents=True, exist_ok=True)
            data = originals + [as_data(a) for a in added]
            train_part = [d for d in data if d["id"] not in valid_ids]
            write_splits(round_dir, train_part, [d for d in data if d["id"] in valid_ids])
            summary = train_student(round_dir, f"{run}/loop/round-{r}", {
                "student": student, "epochs": epochs, "max_steps": max_steps, "lr": lr, "batch_size": batch_size,
                "max_length": max_length, "seed": seed, "distill": distill, "teacher": distill_teacher,
                "distill_temperature": distill_temperature, "distill_alpha": distill_alpha,
                "distill_top_k": distill_top_k}, eval_before=untrained_eval(loop_dir / "round-1") if r > 1 else None)
            scored = score_examples(round_dir, rows, metric=metric, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, teacher=get_grader, grade_template=grade_template)
            by_id = {r_["id"]: r_ for r_ in rows}
            graded = [s for s in scored if s["score"] is not None]
            failed_all = llm2llm.select_failures(graded, threshold=threshold)
            failures = [{**by_id[f["id"]], "score": f["score"]} for f in failed_all[:max_failures or None]]
            answers = {s["id"]: s["answer"] for s in scored}
            plan = plan_teachers(loop_dir, r, specs, teacher_policy, summaries, scored, failures,
                                 eval_loss=summary.get("eval_loss_after"), seed=seed) if specs else None
            round_teacher: Callable[[], Teacher] = get_teacher
            teacher_name = f"{backend}:{teacher}"
            if plan is not None:  # the round's shares over the teachers loaded once
                round_pool = get_teacher().with_shares(plan["shares"])  # type: ignore[attr-defined]
                round_teacher, teacher_name = _constant(round_pool), round_pool.identity
            candidates, ledger, counters = augment(
                round_dir, failures, answers, round_index=r, template=template, teacher=round_teacher,
                teacher_name=teacher_name,
                per_failure=per_failure, temperature=temperature, top_p=top_p, max_tokens=augment_max_tokens,
                seed=seed, batch_size=teacher_batch_size, assignment=plan["assignment"] if plan else None)
            kept, rejected = filter_new(candidates, pool_instructions(data, directory / "seeds.jsonl"),
                                        {d["id"] for d in data}, rules=rule_names, rouge_threshold=rouge_threshold)
            reasons = Counter(e["reason"] for e in [*ledger, *rejected])
            info = {
                "round": r,
                "data": {"records": len(data), "train": len(train_part), "valid": len(data) - len(train_part),
                         "added_before": len(added)},
                "train": {k: summary.get(k) for k in ("step", "train_seconds", "train_loss", "eval_loss_before",
                                                       "eval_loss_after", "tokens_per_s")},
                "eval": {"metric": metric, "examples": len(scored), "graded": len(graded),
                         "mean_score": _mean([s["score"] for s in graded]),
                         "pass_rate": _mean([float(s["score"] >= threshold) for s in graded]),
                         "stop_rate": _mean([float(s["stopped"]) for s in scored]),
                         "failures": len(failed_all)},
                "augment": {"failures_used": len(failures), "requests": counters.get("requests", 0),
                            "candidates": len(candidates), "new_records": len(kept),
                            "rejected": sum(reasons.values()), "rejected_by_reason": dict(sorted(reasons.items()))},
                "seconds": round(time.monotonic() - t0, 1),
            }
            if plan is not None:
                info["teachers"] = teacher_figures(plan, counters, kept, get_teacher())
            write_jsonl(round_dir / "scores.jsonl", scored)
            write_jsonl(round_dir / "added.rejected.jsonl", [*ledger, *rejected])
            write_jsonl(round_dir / "added.jsonl", kept)
            write_json(round_dir / "round.json", info)  # last: its presence means the round is done
            added += kept
            summaries.append(info)
            write_json(directory / "loop.json", {"settings": settings, "rounds": summaries})
            print(round_line(info))
        final = originals + [as_data(a) for a in added]
        write_jsonl(loop_dir / "data.jsonl", ({k: v for k, v in d.items()} for d in final))
        result = {"settings": settings, "rounds": summaries, "data": {"records": len(final), "original":
                  len(originals), "added": len(added)}, "seconds": round(time.monotonic() - started, 1)}
        write_json(directory / "loop.json", result)
        teacher_models = ",".join(f"{t['name']}={t['model']}" for t in specs) if specs else teacher
        record_stage(directory, "loop", settings, models={"student": student, "teacher": teacher_models},
                     stats=result["data"])
    print_table(summaries)
    print(f"loop: {len(originals)} original + {len(added)} added records in {loop_dir / 'data.jsonl'}; "
          f"figures in {directory / 'loop.json'}")


# ---------------------------------------------------------------- several teachers


def _constant(teacher: Teacher) -> Callable[[], Teacher]:
    return lambda: teacher


def plan_teachers(loop_dir: Path, r: int, specs: list[dict], policy: str, summaries: list[dict],
                  scored: list[dict], failures: list[dict], *, eval_loss: float | None, seed: int) -> dict:
    """Round r's shares and which teacher each failure goes to, with the evidence behind the shares:
    how the failures of round r-1 that each teacher's additions targeted scored now (teacher_policy)."""
    from pipeline.teachers.pool import apportion

    names = [s["name"] for s in specs]
    given = {s["name"]: float(s["share"]) for s in specs}
    ev: dict[str, dict] = {}
    previous = summaries[-1] if summaries else None
    if previous is not None and previous.get("teachers"):
        prev_dir = loop_dir / f"round-{r - 1}"
        before = {s["id"]: s["score"] for s in read_jsonl(prev_dir / "scores.jsonl", allow_empty=True)}
        after = {s["id"]: s["score"] for s in scored}
        targeted: dict[str, set[str]] = {}
        added: Counter[str] = Counter()
        for a in read_jsonl(prev_dir / "added.jsonl", allow_empty=True):
            name = a["loop"].get("teacher")
            targeted.setdefault(name, set()).add(a["loop"]["parent_id"])
            added[name] += 1
        prev_loss = previous["train"].get("eval_loss_after")
        delta = None if prev_loss is None or eval_loss is None else round(eval_loss - prev_loss, 6)
        ev = policies.evidence(previous["teachers"]["served"], before, after, targeted, added, names=names,
                               valid_loss_delta=delta, assigned=previous["teachers"].get("assignment"))
    history = [s["teachers"]["evidence"] for s in summaries if s.get("teachers")] + [ev]
    post = policies.posterior(history, names)
    if policy == "learned" and ev:
        shares = policies.thompson_shares(post, seed=seed, round_index=r)
    else:
        shares = given
    live = [n for n in names if shares[n] > 0]
    order = apportion(len(failures), [shares[n] for n in live]) if live else []
    assignment = {f["id"]: live[i] for f, i in zip(failures, order, strict=True)}
    return {"policy": policy, "shares": shares, "evidence": ev, "posterior": post, "assignment": assignment}


def teacher_figures(plan: dict, counters: dict, kept: list[dict], pool: Teacher) -> dict:
    """What loop.json shows per round for several teachers: shares, evidence, who did what."""
    served = counters.get("served", {})
    return {"policy": plan["policy"], "shares": plan["shares"], "evidence": plan["evidence"],
            "posterior": plan["posterior"], "sent": dict(sorted(Counter(plan["assignment"].values()).items())),
            "assignment": plan["assignment"],
            "served": served, "new_records": dict(sorted(Counter(str(a["loop"].get("teacher")) for a in kept).items())),
            "usage": counters.get("by_teacher", {}), "down": dict(getattr(pool, "down", {}))}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _check(**v: Any) -> None:
    if v["rounds"] < 1:
        raise SiftError(f"must be >= 1, got {v['rounds']}", field="rounds")
    if v["metric"] not in llm2llm.METRICS:
        raise SiftError(f"use one of {', '.join(llm2llm.METRICS)}, got {v['metric']!r}", field="metric")
    for name in ("max_failures", "eval_limit"):
        if v[name] < 0:
            raise SiftError(f"must be >= 0, got {v[name]}", field=name)
    for name in ("per_failure", "teacher_batch_size"):
        if v[name] < 1:
            raise SiftError(f"must be >= 1, got {v[name]}", field=name)
    if not 0 <= v["valid_fraction"] < 1:
        raise SiftError(f"must be in [0, 1), got {v['valid_fraction']}", field="valid_fraction")
    # the teacher's and the trainer's own settings, checked here rather than after a round of training
    for name in ("augment_max_tokens", "max_new_tokens", "batch_size", "max_length"):
        if v[name] < 1:
            raise SiftError(f"must be >= 1, got {v[name]}", field=name)
    if not v["lr"] > 0:
        raise SiftError(f"must be > 0, got {v['lr']}", field="lr")
    if not v["temperature"] >= 0:
        raise SiftError(f"must be >= 0, got {v['temperature']}", field="temperature")
    if not 0 < v["top_p"] <= 1:
        raise SiftError(f"must be in (0, 1], got {v['top_p']}", field="top_p")
    if not 0 <= v["rouge_threshold"] <= 1:
        raise SiftError(f"must be in [0, 1], got {v['rouge_threshold']}", field="rouge_threshold")


def _check_distill(student: str, teacher: str | None, **settings: Any) -> None:
    """Distillation needs the teacher's weights here and the student's tokenizer: say so before round 1."""
    from pipeline.io.models import load_tokenizer
    from train.distill import check_settings
    from train.lora import check_teacher_tokenizer

    if not teacher:
        raise SiftError("--distill needs the teacher's weights: --distill-teacher SPEC (a model sharing the "
                        "student's tokenizer), since the --backend teacher runs elsewhere", field="distill_teacher")
    for name, problem in check_settings(**settings):
        raise SiftError(problem, field=name)
    check_teacher_tokenizer(load_tokenizer(student), student, teacher, field="distill_teacher")


def _check_settings(path: Path, settings: dict) -> None:
    """Refuse to continue a loop with settings that change what its rounds produce."""
    shaping = {k: settings[k] for k in SHAPING}
    if path.exists():
        old = read_json(path)
        # a setting added in a later version is absent from older loops: they ran with its default
        defaults = {name: p.default for name, p in inspect.signature(loop).parameters.items()}
        changed = sorted(k for k in SHAPING if old.get(k, defaults.get(k)) != shaping.get(k))
        if changed:
            raise SiftError(f"this loop was started with other settings (changed: {', '.join(changed)}); rerun "
                            "with the same options (only --rounds may change), or use another --run", path=path)
        return
    write_json(path, shaping)


def round_line(info: dict) -> str:
    e, a, t = info["eval"], info["augment"], info["train"]
    loss = f", eval loss {t['eval_loss_after']:.3f}" if t.get("eval_loss_after") is not None else ""
    return (f"round {info['round']}: {info['data']['train']} train records{loss}; {e['metric']} "
            f"{_fmt(e['mean_score'])} on {e['examples']}, {e['failures']} failures; {a['failures_used']} augmented "
            f"-> {a['candidates']} candidates, {a['new_records']} new ({info['seconds']:.0f} s)"
            + ("; shares " + ", ".join(f"{n} {v:g}" for n, v in info["teachers"]["shares"].items())
               if info.get("teachers") else ""))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_table(summaries: list[dict]) -> None:
    print(f"{'round':>5} {'train':>6} {'eval loss':>9} {'score':>6} {'pass':>5} {'failures':>8} {'augmented':>9} "
          f"{'new':>4}")
    for s in summaries:
        print(f"{s['round']:>5} {s['data']['train']:>6} {_fmt(s['train'].get('eval_loss_after')):>9} "
              f"{_fmt(s['eval']['mean_score']):>6} {_fmt(s['eval']['pass_rate']):>5} {s['eval']['failures']:>8} "
              f"{s['augment']['failures_used']:>9} {s['augment']['new_records']:>4}")
