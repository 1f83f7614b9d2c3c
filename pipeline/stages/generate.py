"""Stage `generate`: bootstrap instructions from the seeds with a teacher, resumably.

    sift generate --run demo --generate.recipe self-instruct --generate.n 100   # or: make generate N=100

Reads runs/<run>/seeds.jsonl; writes instructions.jsonl, instructions.rejected.jsonl (every
dropped candidate with its reason and raw text) and generate.stats.json (the counts add up:
candidates = accepted + rejected). The loop runs in rounds of `generate.batch_size` requests; a round's
prompts depend only on (seed, round index, pool), and each finished round is one entry of
generate.journal. A killed run, rerun with the same command, replays the journal and goes on:
same records, none lost or repeated. Raising generate.n later extends the same run.

A request the teacher failed (an error past the backend's retries) does not count against the
request budget. A round in which every request failed means the teacher is down: it is not
journaled, the loop stops, the artifacts hold what was accepted so far, and the command exits
TEACHER_FAILED (3), so make stops; the same command, once the teacher is back, asks that round
again and goes on as if nothing had happened.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import content_id, read_jsonl, require, write_json, write_jsonl
from pipeline.io.journal import open_journal
from pipeline.io.progress import StageProgress, print_summary
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.io.stage_stats import stage_stats
from pipeline.recipes.bootstrap import Recipe, decide_round, get_recipe, heuristics_for
from pipeline.settings import FilterSettings, GenerateSettings, TeacherSettings, to_dict
from pipeline.teachers.base import Sampling, Teacher
from pipeline.teachers.pool import check_teachers, open_teachers
from pipeline.teachers.prompts import PromptTemplate, load
from pipeline.teachers.tally import add_usage, per_teacher

JOURNAL = "generate.journal"
TEACHER_FAILED = 3  # exit status: the target was not reached because the teacher failed (docs/faults.md)


@dataclass(frozen=True)
class BootstrapPlan:
    """One generate run as the loop sees it, built from the settings by `plan`: what shapes the output
    (all in the journal fingerprint) plus how far to go (n, max_requests). Checked where the settings are."""

    recipe: str  # "self-instruct" (bootstrap) or "alpaca" (one-shot)
    n: int  # stop once this many instructions are accepted
    max_requests: int | None  # request budget; None: 10 * n + 100, a guard against a stuck teacher
    batch_size: int  # requests per round (one journal entry each)
    seed: int  # run seed: prompts and per-request seeds derive from it
    sampling: Sampling | None  # None: the recipe's reference sampling
    prompt: str | None  # template name or path; None: the recipe's own
    rules: str | None  # heuristic preset; None: the recipe's
    threshold: float  # ROUGE-L F1 above which a candidate duplicates the pool

    @property
    def request_budget(self) -> int:
        """Requests the teacher may answer; failed ones are not counted."""
        return self.max_requests if self.max_requests is not None else 10 * self.n + 100


def plan(generate: GenerateSettings, filter: FilterSettings) -> BootstrapPlan:
    """The run's plan: the recipe's sampling with the settings' overrides, and the filter's rules and
    ROUGE-L threshold (its other fields serve `sift filter`)."""
    sampling = get_recipe(generate.recipe).default_sampling()
    overrides = {k: v for k, v in {"temperature": generate.temperature, "top_p": generate.top_p,
                                   "max_tokens": generate.max_tokens}.items() if v is not None}
    try:
        sampling = replace(sampling, **overrides)
    except ValueError as e:
        raise SiftError(str(e), field=f"generate.{next(iter(overrides))}" if overrides else None) from None
    return BootstrapPlan(recipe=generate.recipe, n=generate.n, max_requests=generate.max_requests,
                         batch_size=generate.batch_size, seed=generate.seed, sampling=sampling,
                         prompt=generate.prompt, rules=filter.rules, threshold=filter.threshold)


def teacher_errors(entry: dict) -> int:
    """The requests of a journaled round that the teacher failed (one teacher_error row each)."""
    return sum(r.get("reason") == "teacher_error" for r in entry["rejected"])


def load_seeds(path: Path) -> list[dict]:
    """Seed tasks as written by `sift seeds` (checked again: the file may have been edited)."""
    if not path.exists():
        raise SiftError("no seeds in this run; run `sift seeds` first", path=path)
    out = []
    for line, obj in enumerate(read_jsonl(path), start=1):
        require(obj, "id", (str, int), path=path, line=line)
        require(obj, "instruction", str, path=path, line=line)
        require(obj, "instances", list, path=path, line=line)
        out.append(obj)
    return out


def request_seed(run_seed: int, index: int) -> int:
    """Per-request seed: a hash of (run seed, request index), so any request can be redone alone."""
    return int(content_id([run_seed, index]), 16) & 0x7FFFFFFF


def round_requests(recipe: Recipe, template: PromptTemplate, sampling: Sampling, settings: BootstrapPlan,
                   seeds: list[dict], machine: list[dict], round_index: int, first_index: int, count: int
                   ) -> list[tuple]:
    """(request, fields, seed ids, machine ids, request index) for one round; pure."""
    rng = random.Random(request_seed(settings.seed, -1 - round_index))
    out = []
    for j in range(count):
        fields, seed_ids, machine_ids = recipe.build_prompt(rng, seeds, machine)
        index = first_index + j
        s = replace(sampling, seed=request_seed(settings.seed, index))
        out.append((template.request(s, **fields), fields, seed_ids, machine_ids, index))
    return out


def run_bootstrap(*, seeds: list[dict], teacher: Teacher, settings: BootstrapPlan,
                  journal_path: Path) -> tuple[list[dict], list[dict], dict]:
    """The bootstrap loop; returns (accepted, rejected, stats) over the whole journal."""
    from filters.rouge import RougeIndex

    started = time.monotonic()
    recipe = get_recipe(settings.recipe)
    template = load(settings.prompt or recipe.PROMPT)
    template.check({"examples", "next"}, required={"examples"})
    sampling = settings.sampling or recipe.default_sampling()
    rules = settings.rules or recipe.RULES
    check = heuristics_for(rules)
    identity = getattr(teacher, "identity", teacher.name)
    fingerprint = {"recipe": recipe.NAME, "seed": settings.seed, "batch_size": settings.batch_size,
                   "sampling": sampling.to_dict(), "prompt": template.provenance(), "rules": rules,
                   "threshold": settings.threshold, "teacher": identity,
                   "seeds": content_id([[s["id"], s["instruction"]] for s in seeds])}
    journal, rounds = open_journal(journal_path, fingerprint)
    index = RougeIndex(threshold=settings.threshold, top_k=10)
    for s in seeds:
        index.add(str(s["id"]), s["instruction"])
    accepted: list[dict] = []
    rejected: list[dict] = []
    totals = {"requests": 0, "tokens_in": 0, "tokens_out": 0, "cache_hits": 0, "seconds": 0.0,
              "truncated_responses": 0}
    errors = 0  # failed requests, outside the budget
    for entry in rounds:  # replay: rebuild the pool exactly as it stood after each round
        for rec in entry["accepted"]:
            index.add(rec["id"], rec["instruction"])
        accepted += entry["accepted"]
        rejected += entry["rejected"]
        errors += teacher_errors(entry)
        for k in totals:
            totals[k] += entry.get(k, 0)
    base = {"recipe": recipe.NAME, "stage": "generate", "prompt": template.provenance(),
            "teacher": {"name": teacher.name, "identity": identity, "backend": getattr(teacher, "backend", None)},
            "sampling": sampling.to_dict(), "run_seed": settings.seed}
    hits_before = getattr(teacher, "hits", 0)
    failure = None  # the teacher's error when a whole round failed
    with StageProgress("generate", settings.n, unit="instr", initial=len(accepted)) as bar:
        while len(accepted) < settings.n and totals["requests"] - errors < settings.request_budget:
            round_index = len(rounds)
            count = min(settings.batch_size, settings.request_budget - (totals["requests"] - errors))
            t0 = time.monotonic()
            planned = round_requests(recipe, template, sampling, settings, seeds, accepted, round_index,
                                     totals["requests"], count)
            completions = teacher.generate([p[0] for p in planned])
            if completions and all(c.finish_reason == "error" for c in completions):
                # stop before journaling, so the rerun asks this very round again
                if not accepted:  # nothing to keep: most likely a wrong key, URL or model name
                    raise SiftError(f"every request to the teacher failed; the first: {completions[0].error}")
                failure = completions[0].error or "every request failed"
                break
            hits_now = getattr(teacher, "hits", 0)
            new_acc, new_rej = decide_round(recipe, planned, completions, index, check, base,
                                            known_ids={r["id"] for r in accepted})
            entry = {"kind": "round", "round": round_index, "accepted": new_acc, "rejected": new_rej,
                     "requests": len(planned), "tokens_in": sum(c.prompt_tokens for c in completions),
                     "tokens_out": sum(c.completion_tokens for c in completions),
                     "cache_hits": hits_now - hits_before,
                     "truncated_responses": sum(c.finish_reason == "length" for c in completions),
                     "seconds": round(time.monotonic() - t0, 3)}
            if hasattr(teacher, "last_usage"):  # a TeacherPool: each teacher's own figures of this round
                entry["by_teacher"] = teacher.last_usage
            hits_before = hits_now
            journal.append([entry])
            rounds.append(entry)
            accepted += new_acc
            rejected += new_rej
            errors += teacher_errors(entry)
            for k in totals:
                totals[k] += entry[k]
            bar.update(done=len(new_acc), requests=len(planned), tokens_out=entry["tokens_out"],
                       rejected=len(rejected))
    over = [{**rec, "reason": "over_quota", "text": rec["instruction"]} for rec in accepted[settings.n:]]
    rejected = rejected + over
    accepted = accepted[:settings.n]
    by_reason: dict[str, int] = {}
    for rec in rejected:
        by_reason[rec["reason"]] = by_reason.get(rec["reason"], 0) + 1
    stats = {"recipe": recipe.NAME, "rounds": len(rounds), "requests": totals["requests"],
             "cache_hits": totals["cache_hits"], "tokens_in": totals["tokens_in"],
             "tokens_out": totals["tokens_out"], "truncated_responses": totals["truncated_responses"],
             "candidates": len(accepted) + len(rejected), "accepted": len(accepted),
             "rejected": len(rejected), "rejected_by_reason": dict(sorted(by_reason.items())),
             "target": settings.n, "reached_target": len(accepted) >= settings.n,
             "teacher_errors": errors, "teacher_failed": failure,
             "teacher_seconds": round(totals["seconds"], 3),
             "wall_time_s": round(time.monotonic() - started, 3)}
    if hasattr(teacher, "last_usage"):
        usage: dict[str, dict] = {}
        for entry in rounds:
            add_usage(usage, entry.get("by_teacher"))
        stats["by_teacher"] = per_teacher(accepted, rejected, usage=usage)
        stats["teachers_down"] = dict(getattr(teacher, "down", {}))
    return accepted, rejected, stats


def generate(*, run: str = "demo", teacher: TeacherSettings = TeacherSettings(),
             generate: GenerateSettings = GenerateSettings(), filter: FilterSettings = FilterSettings()) -> int | None:
    """Generate instructions from the run's seeds with a teacher (Self-Instruct or Alpaca recipe).

    Resumable: rerunning the same command after a crash continues from generate.journal, and
    raising generate.n extends a finished run. Teacher calls are cached in the run's cache/. Exit status 3:
    the teacher failed every request of a round before generate.n were accepted (an outage); what was
    accepted is written, and the same command goes on once the teacher is back.

    Args:
        run: run name; artifacts live in runs/<run>/ (or $SIFT_RUNS_DIR/<run>/).
        teacher: the teacher (or teacher.pool) that writes the instructions.
        generate: this stage's own settings: recipe, how many, sampling, prompt.
        filter: the heuristic rules (default: the recipe's) and the ROUGE-L threshold each candidate meets.
    """
    settings = plan(generate, filter)
    rec = get_recipe(settings.recipe)
    directory = run_dir(run)
    seeds = load_seeds(directory / "seeds.jsonl")
    # fail on a bad template or rule name before the model loads
    load(settings.prompt or rec.PROMPT).check({"examples", "next"}, required={"examples"})
    heuristics_for(settings.rules or rec.RULES)
    specs = check_teachers(teacher)
    options = {**to_dict(teacher=teacher, generate=generate, filter=filter), **({"teachers": specs} if specs else {})}
    with locked(directory):
        cached = open_teachers(directory, teacher, batch_size=generate.batch_size)
        stats = generate_in(directory, cached, settings, seeds=seeds, options=options)
    print_summary("generate", stats)
    print(f"wrote {directory / 'instructions.jsonl'} ({stats['accepted']} records)")
    if stats["teacher_failed"] and not stats["reached_target"]:
        print(f"sift: generate: the teacher failed every request of a round ({stats['teacher_failed']}); "
              f"{stats['accepted']} of {stats['target']} instructions accepted. Run the same command again "
              "once the teacher is back: it asks that round again and goes on", file=sys.stderr)
        return TEACHER_FAILED
    return None


def generate_in(directory: Path, teacher: Teacher, settings: BootstrapPlan, *, seeds: list[dict] | None = None,
                options: dict | None = None) -> dict:
    """Run the loop for a run directory (the caller holds its lock) and write the artifacts."""
    seeds = seeds if seeds is not None else load_seeds(directory / "seeds.jsonl")
    accepted, rejected, stats = run_bootstrap(seeds=seeds, teacher=teacher, settings=settings,
                                              journal_path=directory / JOURNAL)
    write_jsonl(directory / "instructions.rejected.jsonl", rejected)
    doc = stage_stats("generate", "instructions", read=stats["candidates"], kept=stats["accepted"],
                      rejected_by_reason=stats["rejected_by_reason"], extras=stats)
    write_json(directory / "generate.stats.json", doc)
    write_jsonl(directory / "instructions.jsonl", accepted)  # last: make's target, written when all is done
    recipe = get_recipe(settings.recipe)
    sampling = settings.sampling or recipe.default_sampling()
    # the settings as given, then what they resolved to: the recipe's sampling and rules where left unset
    resolved = {**(options or {}), "sampling": sampling.to_dict(), "rules": settings.rules or recipe.RULES}
    identity = getattr(teacher, "identity", teacher.name)
    record_stage(directory, "generate", resolved, models={"teacher": identity}, stats=doc)
    return stats
