"""Stage `loop`: student-in-the-loop rounds (LLM2LLM, Lee et al. 2024) on a run's filtered data.

    sift loop --run demo --loop.rounds 2          # or: make loop ROUNDS=2

The data starts as the run's filtered.jsonl plus the seed examples (round 0). Each round then:
1. trains a fresh LoRA student on the data so far (the same trainer as `sift train`);
2. has it answer the original training examples, greedily (merged, through the fast engine of
   `sift eval` where it runs the model), and scores each answer: ROUGE-L F1 against the reference,
   or the teacher's yes/no verdict (`--loop.metric judge`);
3. takes the examples scoring below `--loop.fail_below`, worst first (at most `--loop.max_failures`);
4. asks the teacher for `--loop.per_failure` new examples like each one (prompts/llm2llm_augment.txt);
5. passes them through `filter.rules` and the ROUGE-L dedup (`filter.threshold`) against every instruction so far;
6. appends the survivors, each with `loop`: {round, parent_id, parent_score, parent_instruction}.
Only round-0 examples are scored and augmented (LLM2LLM: augmenting augmentations drifts), and the
validation split is fixed at round 0, so eval loss compares across rounds.

Artifacts in runs/<run>/: loop.json (settings and one entry per round: data size, score, failures,
new records, eval loss), loop/data.jsonl (every record, lineage included) and, per round,
loop/round-<r>/: train.jsonl, valid.jsonl, student/, scores.jsonl, added.jsonl,
added.rejected.jsonl (the ledger: filter reasons, parse problems, teacher errors), round.json.
Scoring and teacher calls are journaled in batches and training checkpoints, so a killed loop
rerun with the same command carries on; a finished round (round.json) is never redone, and a
larger --loop.rounds extends the loop. loop/settings.json holds the settings a rerun must keep.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from filters.engine import apply_rules
from filters.rouge import RougeIndex
from filters.rules import parse_rules
from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal, file_sha256, iter_jsonl, read_json, read_jsonl, write_json, write_jsonl
from pipeline.io.batched import run_batches
from pipeline.io.runs import locked, record_stage, run_dir, scrub
from pipeline.llm2llm import augment as llm2llm
from pipeline.llm2llm import policy as policies
from pipeline.settings import (
    DistillSettings,
    ExportSettings,
    FilterSettings,
    LoopSettings,
    LoraSettings,
    StudentSettings,
    TeacherSettings,
    TrainSettings,
    to_dict,
)
from pipeline.stages.export import read_filtered, split_ids, write_splits
from pipeline.stages.filter import flatten_tasks
from pipeline.teachers.base import Sampling, Teacher
from pipeline.teachers.prompts import PromptTemplate, load
from train.format import to_messages

LOOP_DIR = "loop"
# the sections a loop records; every field of them shapes what a round produces, so a rerun must keep
# them, except those in FREE: how many rounds, where the models run and how to reach them, and the
# fields of shared sections the loop does not use (its split and dedup are its own)
SECTIONS: dict[str, type] = {"teacher": TeacherSettings, "student": StudentSettings, "lora": LoraSettings,
                             "train": TrainSettings, "distill": DistillSettings, "filter": FilterSettings,
                             "export": ExportSettings, "loop": LoopSettings}
FREE = frozenset({"loop.rounds", "teacher.base_url", "teacher.api_key_env", "teacher.options", "student.device",
                  "train.resume", "filter.use_stemmer", "filter.top_k", "filter.prefilter", "filter.workers",
                  "export.seed", "export.decontaminate_general"})


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


def train_student(round_dir: Path, label: str, *, student: StudentSettings, lora: LoraSettings,
                  train: TrainSettings, distill: DistillSettings, eval_before: dict | None = None) -> dict:
    """Train the round's student unless a finished one is there (resuming a killed one); returns the
    training summary."""
    from pipeline.stages.train import train_in

    folder = round_dir / "student"
    if not (folder / "train_config.json").is_file():
        train_in(round_dir, label=label, student=student, lora=lora, train=replace(train, resume=True),
                 distill=distill, eval_before=eval_before)
    summaries = [e for e in Journal(folder / "metrics.jsonl").read() if e.get("kind") == "summary"]
    return summaries[-1] if summaries else {}


def untrained_eval(round_dir: Path) -> dict | None:
    """A finished round's measurement of the untrained student on the validation split (step 0).
    Every round starts from the same base model and holds out the same split, so later rounds reuse it."""
    entries = Journal(round_dir / "student" / "metrics.jsonl").read()
    first = next((e for e in entries if e.get("kind") == "eval"), None)
    return first if first is not None and first.get("step") == 0 else None


def eval_rows(records: list[dict], valid_ids: set[str], limit: int, seed: int) -> list[dict]:
    """The original training examples the student is scored on (a seeded subset with --loop.eval_limit)."""
    from train.eval_sets import pick

    rows = [{**r, "messages": to_messages(r["instruction"], r["input"], r["output"])}
            for r in records if r["id"] not in valid_ids]
    return pick(rows, limit, seed)


def score_examples(round_dir: Path, rows: list[dict], *, student: StudentSettings, metric: str, max_new_tokens: int,
                   batch_size: int, teacher: Callable[[], Teacher], grade_template: PromptTemplate) -> list[dict]:
    """{id, score, answer, stopped, tokens} for every row: the round's student (on `student.device`)
    answers greedily, the answer is scored; journaled per batch. The student is merged and answers
    through the fast engine of `sift eval` where it runs the model, else through `model.generate`
    (train/eval_passes.py student_answers)."""
    from transformers import AutoTokenizer

    from train.eval_passes import load_side, student_answers
    from train.eval_stats import rouge_l

    folder = round_dir / "student"
    loaded: dict[str, Any] = {}

    def work(batch: list[dict]) -> tuple[list[dict], list[dict], dict]:
        if not loaded:
            loaded["tok"] = AutoTokenizer.from_pretrained(str(folder))
            loaded["model"] = load_side(student.model, loaded["tok"], folder, student=student)
        answers = student_answers(loaded["model"], loaded["tok"], batch, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, label="loop answers")
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

    fingerprint = {"adapter": file_sha256(folder / "adapter_model.safetensors"), "metric": metric,
                   "max_new_tokens": max_new_tokens, "grade_prompt": grade_template.provenance(),
                   "answers": "merged"}  # answers of the merged student; the unmerged PEFT model's differ in bf16
    scored, _, _ = run_batches(rows, work, stage="score", journal_path=round_dir / "score.journal",
                               fingerprint=fingerprint, batch_size=batch_size)
    loaded.clear()
    return scored


def augment(round_dir: Path, failures: list[dict], answers: dict[str, str], *, round_index: int,
            template: PromptTemplate, teacher: Callable[[], Teacher], teacher_name: str, settings: LoopSettings,
            assignment: dict[str, str] | None = None) -> tuple[list[dict], list[dict], dict]:
    """New candidate records from the teacher, one request per failure, journaled per batch; the
    ledger holds parse problems and failures the teacher could not serve. With several teachers,
    `assignment` names the teacher of each failure id (a TeacherPool), and every added record's
    lineage names the teacher that actually wrote it."""
    per_failure, seed, batch_size = settings.per_failure, settings.seed, settings.teacher_batch_size

    def sampling_for(failure: dict) -> Sampling:
        return llm2llm.augment_sampling(temperature=settings.temperature, top_p=settings.top_p,
                                        max_tokens=settings.augment_max_tokens, count=per_failure,
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


def loop(*, run: str = "demo", teacher: TeacherSettings = TeacherSettings(),
         student: StudentSettings = StudentSettings(), lora: LoraSettings = LoraSettings(),
         train: TrainSettings = TrainSettings(), distill: DistillSettings = DistillSettings(),
         filter: FilterSettings = FilterSettings(), export: ExportSettings = ExportSettings(),
         loop: LoopSettings = LoopSettings()) -> None:
    """Student-in-the-loop rounds (LLM2LLM): train, find the examples the student fails, augment them.

    Reads runs/<run>/filtered.jsonl and seeds.jsonl; writes loop.json, loop/data.jsonl and
    loop/round-<r>/. Resumable: rerun the same command after a crash; a larger --loop.rounds extends.

    Args:
        run: Run name; artifacts live in runs/<run>/.
        teacher: the teacher (or teacher.pool) that writes the new examples, and grades with loop.metric judge.
        student: the student trained each round, and where it trains and answers.
        lora: each round's adapter.
        train: each round's training (a round always resumes its own checkpoints).
        distill: each round's optional distillation (distill.teacher defaults to teacher.model on the
            transformers backend).
        filter: the rules and ROUGE-L threshold new examples must pass (rules default: self-instruct).
        export: the share of round-0 records held out for eval loss (valid_fraction; fixed across rounds).
        loop: the rounds, scoring, failures and augmentation.
    """
    started = time.monotonic()
    sections = {"teacher": teacher, "student": student, "lora": lora, "train": train,
                "distill": effective_distill(distill, teacher), "filter": filter, "export": export, "loop": loop}
    rule_names, specs = check_loop(sections)
    distill = sections["distill"]
    template = load(loop.prompt or llm2llm.AUGMENT_PROMPT)
    template.check(llm2llm.AUGMENT_FIELDS, required={"instruction", "output"})
    grade_template = load(loop.grade_prompt or llm2llm.GRADE_PROMPT)
    grade_template.check(llm2llm.GRADE_FIELDS, required={"answer"})
    settings = {"run": run, **to_dict(**sections), "teachers": specs,
                "prompts": {"augment": template.provenance(), "grade": grade_template.provenance()}}
    directory = run_dir(run)
    loop_dir = directory / LOOP_DIR
    with locked(directory):
        originals = original_records(directory, train_on_seeds=loop.train_on_seeds)
        _check_settings(loop_dir / "settings.json", settings)
        valid_ids = split_ids([r["id"] for r in originals], export.valid_fraction, loop.seed)
        rows = eval_rows(originals, valid_ids, loop.eval_limit, loop.seed)
        teacher_cache: dict[str, Teacher] = {}

        def get_teacher() -> Teacher:
            if not teacher_cache:
                from pipeline.teachers.pool import open_teachers

                teacher_cache["t"] = open_teachers(directory, teacher, batch_size=loop.teacher_batch_size)
            return teacher_cache["t"]

        def get_grader() -> Teacher:  # with several teachers, the first grades (one judge for every round)
            t = get_teacher()
            members = getattr(t, "members", None)
            return next(iter(members.values())).teacher if members else t

        added: list[dict] = []
        summaries: list[dict] = []
        for r in range(1, loop.rounds + 1):
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
            summary = train_student(round_dir, f"{run}/loop/round-{r}", student=student, lora=lora, train=train,
                                    distill=distill,
                                    eval_before=untrained_eval(loop_dir / "round-1") if r > 1 else None)
            scored = score_examples(round_dir, rows, student=student, metric=loop.metric,
                                    max_new_tokens=loop.max_new_tokens, batch_size=train.batch_size,
                                    teacher=get_grader, grade_template=grade_template)
            by_id = {r_["id"]: r_ for r_ in rows}
            graded = [s for s in scored if s["score"] is not None]
            failed_all = llm2llm.select_failures(graded, threshold=loop.fail_below)
            failures = [{**by_id[f["id"]], "score": f["score"]} for f in failed_all[:loop.max_failures or None]]
            answers = {s["id"]: s["answer"] for s in scored}
            plan = plan_teachers(loop_dir, r, specs, loop.policy, summaries, scored, failures,
                                 eval_loss=summary.get("eval_loss_after"), seed=loop.seed) if specs else None
            round_teacher: Callable[[], Teacher] = get_teacher
            teacher_name = f"{teacher.backend}:{teacher.model}"
            if plan is not None:  # the round's shares over the teachers loaded once
                round_pool = get_teacher().with_shares(plan["shares"])  # type: ignore[attr-defined]
                round_teacher, teacher_name = _constant(round_pool), round_pool.identity
            candidates, ledger, counters = augment(
                round_dir, failures, answers, round_index=r, template=template, teacher=round_teacher,
                teacher_name=teacher_name, settings=loop, assignment=plan["assignment"] if plan else None)
            kept, rejected = filter_new(candidates, pool_instructions(data, directory / "seeds.jsonl"),
                                        {d["id"] for d in data}, rules=rule_names, rouge_threshold=filter.threshold)
            reasons = Counter(e["reason"] for e in [*ledger, *rejected])
            info = {
                "round": r,
                "data": {"records": len(data), "train": len(train_part), "valid": len(data) - len(train_part),
                         "added_before": len(added)},
                "train": {k: summary.get(k) for k in ("step", "train_seconds", "train_loss", "eval_loss_before",
                                                       "eval_loss_after", "tokens_per_s")},
                "eval": {"metric": loop.metric, "examples": len(scored), "graded": len(graded),
                         "mean_score": _mean([s["score"] for s in graded]),
                         "pass_rate": _mean([float(s["score"] >= loop.fail_below) for s in graded]),
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
            write_json(directory / "loop.json", {"settings": scrub(settings), "rounds": summaries})
            print(round_line(info))
        final = originals + [as_data(a) for a in added]
        write_jsonl(loop_dir / "data.jsonl", ({k: v for k, v in d.items()} for d in final))
        result = {"settings": scrub(settings), "rounds": summaries, "data": {"records": len(final), "original":
                  len(originals), "added": len(added)}, "seconds": round(time.monotonic() - started, 1)}
        write_json(directory / "loop.json", result)
        teacher_models = ",".join(f"{t['name']}={t['model']}" for t in specs) if specs else teacher.model
        record_stage(directory, "loop", settings, models={"student": student.model, "teacher": teacher_models},
                     stats=result["data"])
    print_table(summaries)
    print(f"loop: {len(originals)} original + {len(added)} added records in {loop_dir / 'data.jsonl'}; "
          f"figures in {directory / 'loop.json'}")


def effective_distill(distill: DistillSettings, teacher: TeacherSettings) -> DistillSettings:
    """distill.teacher defaults to the loop's teacher when that one runs here (its weights are local)."""
    if distill.enabled and distill.teacher is None and teacher.backend == "transformers":
        return replace(distill, teacher=teacher.model)
    return distill


def check_loop(sections: dict[str, Any]) -> tuple[list[str], list[dict] | None]:
    """What the sections cannot check alone, before any model loads: the filter rules, the teachers
    and the policy, and distillation's teacher. Returns the rule names and the pool's resolved specs."""
    from pipeline.teachers.pool import check_teachers

    try:
        rule_names = parse_rules(sections["filter"].rules or "self-instruct")
    except ValueError as e:
        raise SiftError(str(e), field="filter.rules") from None
    specs = check_teachers(sections["teacher"])
    if sections["loop"].policy == "learned" and not (specs and len(specs) > 1):
        raise SiftError("the learned policy needs several teachers (--teacher.pool FILE or a,b)", field="loop.policy")
    if sections["distill"].enabled:
        _check_distill(sections["student"], sections["distill"])
    return rule_names, specs


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


def _check_distill(student: StudentSettings, distill: DistillSettings) -> None:
    """Distillation needs the teacher's weights here and the student's tokenizer: say so before round 1."""
    from pipeline.io.models import load_tokenizer
    from train.lora import check_teacher_tokenizer

    if not distill.teacher:
        raise SiftError("--distill.enabled needs the teacher's weights: --distill.teacher SPEC (a model sharing the "
                        "student's tokenizer), since the teacher.backend teacher runs elsewhere",
                        field="distill.teacher")
    check_teacher_tokenizer(load_tokenizer(student.model), student.model, distill.teacher, field="distill.teacher")


def shaping(settings: dict) -> dict[str, Any]:
    """The settings that change what a round produces, by dotted name (`loop.fail_below`): every field
    of every section but the FREE ones, and the resolved teachers and prompts."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if key in SECTIONS:
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        elif key != "run":
            flat[key] = value
    return {k: v for k, v in flat.items() if k not in FREE}


def _check_settings(path: Path, settings: dict) -> None:
    """Refuse to continue a loop with settings that change what its rounds produce."""
    current = scrub(shaping(settings))  # a teacher's base URL is kept without credentials
    if path.exists():
        old = scrub(read_json(path))
        if old and not any("." in k for k in old):
            raise SiftError("this loop was started by an earlier sift, before settings had sections; finish it "
                            "with that version, or start afresh (another --run, or remove loop/)", path=path)
        # a setting added in a later version is absent from older loops: they ran with its default
        defaults = shaping(to_dict(**{name: cls() for name, cls in SECTIONS.items()}))
        changed = sorted(k for k in current if old.get(k, defaults.get(k)) != current[k])
        if changed:
            raise SiftError(f"this loop was started with other settings (changed: {', '.join(changed)}); rerun "
                            "with the same options (only --loop.rounds may change), or use another --run", path=path)
        return
    write_json(path, current)


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
