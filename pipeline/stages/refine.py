"""Stage `refine`: the teacher critiques and rewrites each record, the student keeps what suits it.

    sift refine --run demo                                     # scored.jsonl (else filtered.jsonl) -> refined.jsonl
    sift refine --run demo --refine.select teacher --refine.target response

Reflection-Tuning (Li et al., 2023): for each record the teacher writes a short critique, then a
rewrite: of the instruction (a new instruction with its answer, prompts/refine_instruction.txt), of
the response (prompts/refine_response.txt), or both (the instruction first, then the response of
the version kept). Selective Reflection-Tuning (Li et al., ACL Findings 2024): the student's base
model scores the original and the rewrite with IFD and r-IFD (train/scorers.py), plus the teacher's
1-5 judge rating with `refine.judge`, and `refine.select` (SELECT_RULES, a table; `decide` is pure)
picks the version the record keeps. The paper's rule, the default: for instructions the version with
the higher IFD (more to learn), for responses the one with the lower r-IFD (the instruction can be
recovered from it: it fits).

A rewrite that fails the filters is dropped and the original stays: the rules of `filter.rules` that
look at one record (the instruction rules for a new instruction, the instance rules, such as
empty_output and restates_instruction, for every rewrite), and, for a new instruction, ROUGE-L above
`filter.threshold` against the instructions of every other task of the round's input. A reply that
cannot be parsed keeps the original too (reason no_rewrite, truncated, empty_response). Every record
of refined.jsonl carries `refinement`: the original, whether the record changed, and one step per
teacher pass with the critique, the rewrite, the decision, its reason and both versions' scores.
refined.rejected.jsonl is the ledger of every rewrite not kept, with its reason.

`refine.rounds N` refines again the records whose rewrite was kept in the round before. Resumable:
each batch of a round is one entry of refine.journal, keyed by the record's content, the round and
the pool it was checked against, so a kill loses at most the batch in flight and a rerun with more
rounds continues; the teacher's replies are also in the teacher cache. A teacher error leaves the
record as it was (reason teacher_error in the ledger) and a rerun retries it.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from filters.engine import apply_rules, task_key
from filters.rouge import RougeIndex
from filters.rules import INSTANCE_RULES, INSTRUCTION_RULES, RECORD_RULES, parse_rules
from pipeline.errors import SiftError
from pipeline.io.artifacts import all_or_none, content_id, write_json, write_jsonl
from pipeline.io.batched import run_batches
from pipeline.io.progress import print_summary
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.io.stage_stats import stage_stats
from pipeline.settings import FilterSettings, RefineSettings, StudentSettings, TeacherSettings, to_dict
from pipeline.stages.score import read_scorable
from pipeline.teachers.base import Sampling, Teacher
from pipeline.teachers.parsers import NOINPUT, parse_reflection, reflection_lead
from pipeline.teachers.pool import check_teachers, open_teachers, teacher_of
from pipeline.teachers.prompts import PromptTemplate, load

PROMPTS = {"instruction": "refine_instruction", "response": "refine_response"}
PHASES = {"instruction": ("instruction",), "response": ("response",), "both": ("instruction", "response")}
JOURNAL = "refine.journal"
TEXT = ("instruction", "input", "output")
RAW_KEPT = 2000  # characters of an unparsed reply kept in the ledger
# a reply ends at [End], or where the teacher starts a next example of the prompt's own
STOP = ("[End]", "\n[Instruction]")


# ---------------------------------------------------------------- the selection rule (pure, table-driven)


class Criterion(NamedTuple):
    """The rewrite must have `score` higher, lower, or not lower than the original's."""

    score: str  # ifd, rifd or judge
    want: str  # higher, lower or not_lower


# rule -> what is rewritten -> the criteria a rewrite must meet: () keeps every rewrite, None none
SELECT_RULES: dict[str, dict[str, tuple[Criterion, ...] | None]] = {
    "student": {"instruction": (Criterion("ifd", "higher"),), "response": (Criterion("rifd", "lower"),)},
    "teacher": {"instruction": (), "response": ()},
    "judge": {"instruction": (Criterion("judge", "higher"),), "response": (Criterion("judge", "higher"),)},
    "student+judge": {"instruction": (Criterion("ifd", "higher"), Criterion("judge", "not_lower")),
                      "response": (Criterion("rifd", "lower"), Criterion("judge", "not_lower"))},
    "original": {"instruction": None, "response": None},
}
_PASSED = {"higher": "higher_{}", "lower": "lower_{}", "not_lower": "{}_not_lower"}
_FAILED = {"higher": "{}_not_higher", "lower": "{}_not_lower", "not_lower": "{}_lower"}


def decide(rule: str, target: str, original: Mapping[str, Any], rewrite: Mapping[str, Any]) -> tuple[bool, str]:
    """(keep the rewrite?, why) for one record: `original` and `rewrite` map score names to numbers
    (None: not computed). A tie keeps the original: a rewrite must earn its place."""
    criteria = SELECT_RULES[rule][target]
    if criteria is None:
        return False, "original_rule"
    if not criteria:
        return True, "teacher_rule"
    for c in criteria:
        a, b = original.get(c.score), rewrite.get(c.score)
        if a is None or b is None:
            return False, f"no_{c.score}"
        met = b > a if c.want == "higher" else b < a if c.want == "lower" else b >= a
        if not met:
            return False, _FAILED[c.want].format(c.score)
    return True, "_and_".join(_PASSED[c.want].format(c.score) for c in criteria)


def needs_judge(rule: str) -> bool:
    return any(c.score == "judge" for criteria in SELECT_RULES[rule].values() for c in criteria or ())


# ---------------------------------------------------------------- the filters a rewrite must pass


def rewrite_rules(spec: str | None) -> dict[str, list[str]]:
    """The one-record rules of a `filter.rules` string, per phase: a new instruction meets the
    instruction rules too; a new response only the instance and record rules. ValueError on a bad name."""
    names = parse_rules(spec or "self-instruct")
    answer = [n for n in names if n in INSTANCE_RULES or n in RECORD_RULES]
    return {"instruction": [n for n in names if n in INSTRUCTION_RULES] + answer, "response": answer,
            "rouge": ["rouge"] if "rouge" in names else []}


def build_pool(records: Sequence[dict], settings: FilterSettings) -> RougeIndex:
    """Every task's instruction once (a task's instances share it), to check new instructions against;
    top_k=2 so the nearest task other than the record's own is always known exactly."""
    index = RougeIndex(threshold=settings.threshold, use_stemmer=settings.use_stemmer, top_k=2,
                       workers=settings.workers)
    seen: set[Hashable] = set()
    for rec in records:
        key = task_key(rec)
        if key not in seen:
            seen.add(key)
            index.add(str(key), rec["instruction"])
    return index


def check_rewrite(rewrite: dict, *, task: str, phase: str, rules: Mapping[str, list[str]],
                  pool: RougeIndex | None) -> tuple[str | None, dict]:
    """(reason the rewrite is dropped or None, details): the one-record rules, then for a new
    instruction ROUGE-L against every other task of the pool."""
    _, reason, _ = next(apply_rules([{"id": task, **rewrite}], rules[phase]))
    if reason is not None:
        return reason, {}
    if phase == "instruction" and pool is not None:
        match = pool.check(rewrite["instruction"])
        nearest = next((n for n in match.most_similar if n.id != task), None)
        if nearest is not None and nearest.score > pool.threshold:
            return "rouge_duplicate", {"score": nearest.score, "nearest_id": nearest.id, "nearest_text": nearest.text}
    return None, {}


# ---------------------------------------------------------------- the student's (and the judge's) scores


class VersionScores:
    """IFD and r-IFD of records on the student's base model, and the judge's rating when asked; the
    model loads on first use, so a fully journaled rerun loads nothing."""

    def __init__(self, student: StudentSettings, *, batch_size: int, judge: Teacher | None,
                 judge_template: PromptTemplate | None) -> None:
        self.student, self.batch_size = student, batch_size
        self.judge, self.judge_template = judge, judge_template
        self._model: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from pipeline.io.models import load_model, load_tokenizer
            from train.scorers import prepare_tokenizer

            s = self.student
            model, tok = load_model(s.model, dtype=s.dtype, device=s.device), load_tokenizer(s.model)
            prepare_tokenizer(tok)
            self._model = (model, tok)
        return self._model

    def __call__(self, records: list[dict]) -> list[dict]:
        if not records:
            return []
        from train.scorers import ifd_scores, rifd_scores

        model, tok = self._load()
        ifd = ifd_scores(model, tok, records, batch_size=self.batch_size)
        rifd = rifd_scores(model, tok, records, batch_size=self.batch_size)
        out = [{"ifd": a["value"], "ifd_loss_given_prompt": a.get("loss_given_prompt"),
                "ifd_loss_alone": a.get("loss_alone"), "rifd": b["value"],
                "rifd_loss_given_answer": b.get("loss_given_answer"), "rifd_loss_alone": b.get("loss_alone")}
               for a, b in zip(ifd, rifd, strict=True)]
        if self.judge is not None:
            from train.rating import judge_scores

            for row, rating in zip(out, judge_scores(self.judge, records, template=self.judge_template), strict=True):
                row["judge"] = rating["value"]
                row["judge_method"] = rating.get("method")
        return out


# ---------------------------------------------------------------- one batch of one round


@dataclass
class Refiner:
    """What a round's batches share: the teacher and its prompts, the checks, the scores, the rule."""

    teacher: Teacher
    templates: dict[str, PromptTemplate]
    sampling: Sampling
    settings: RefineSettings
    rules: dict[str, list[str]]
    scores: VersionScores
    pool: RougeIndex | None = None
    round: int = 1
    usage: dict[str, int] = field(default_factory=dict)

    def batch(self, wrappers: list[dict]) -> tuple[list[dict], list[dict], dict]:
        """Refine one batch; kept: {id, record_id, current, steps, usage} per record; rejected: those a
        teacher error interrupted (reason teacher_error: the next run retries them)."""
        states = [{**w, "current": dict(w["current"]), "steps": [], "error": None,
                   "usage": {"requests": 0, "tokens_in": 0, "tokens_out": 0}} for w in wrappers]
        for phase in PHASES[self.settings.target]:
            self._phase(phase, [s for s in states if s["error"] is None])
        kept = [{k: s[k] for k in ("id", "record_id", "current", "steps", "usage")}
                for s in states if s["error"] is None]
        rejected = [{"id": s["id"], "record_id": s["record_id"], "reason": "teacher_error", "detail": s["error"],
                     "usage": s["usage"]} for s in states if s["error"] is not None]
        counters = {k: sum(s["usage"][k] for s in states) for k in ("requests", "tokens_in", "tokens_out")}
        return kept, rejected, counters

    def _phase(self, phase: str, states: list[dict]) -> None:
        template = self.templates[phase]
        requests = [template.request(self.sampling, **prompt_fields(s["current"])) for s in states]
        completions = self.teacher.generate(requests) if requests else []
        contenders: list[tuple[dict, dict]] = []
        for s, comp in zip(states, completions, strict=True):
            s["usage"]["requests"] += 1
            s["usage"]["tokens_in"] += comp.prompt_tokens
            s["usage"]["tokens_out"] += comp.completion_tokens
            if comp.finish_reason == "error":
                s["error"] = comp.error or "error"
                continue
            step = self._step(phase, s, comp)
            s["steps"].append(step)
            if step["reason"] is None:
                contenders.append((s, step))
        scored = self.scores([s["current"] for s, _ in contenders] + [step["rewrite"] for _, step in contenders])
        n = len(contenders)
        for (s, step), before, after in zip(contenders, scored[:n], scored[n:], strict=True):
            keep, reason = decide(self.settings.select, phase, before, after)
            step.update(decision="rewrite" if keep else "original", reason=reason,
                        scores={"original": before, "rewrite": after})
            if keep:
                s["current"] = dict(step["rewrite"])

    def _step(self, phase: str, state: dict, comp: Any) -> dict:
        """The step of one reply before the student's decision: parsed, compared, filtered (reason None:
        it goes on to be scored)."""
        current = state["current"]
        step: dict[str, Any] = {"round": self.round, "target": phase, "teacher": teacher_of(comp, self.teacher),
                                "critique": "", "rewrite": None, "decision": "original", "reason": None}
        lead = reflection_lead(self.templates[phase].body)  # the prompt ends in "[Critique]": the reply goes on
        parsed = parse_reflection(f"{lead} {comp.text}" if lead else comp.text, target=phase,
                                  truncated=comp.finish_reason == "length")
        if parsed.problems:
            step.update(reason=parsed.problems[0].reason, raw_response=comp.text[:RAW_KEPT])
            return step
        item = parsed.items[0]
        rewrite = {**current, **{k: item[k] for k in TEXT if k in item}}
        step.update(critique=item["critique"], rewrite=rewrite)
        if all(rewrite[k].strip() == (current.get(k) or "").strip() for k in TEXT):
            step["reason"] = "unchanged"
            return step
        reason, details = check_rewrite(rewrite, task=state["task"], phase=phase, rules=self.rules, pool=self.pool)
        if reason is not None:
            step.update(reason=reason, **({"filter": details} if details else {}))
        return step


def prompt_fields(current: dict) -> dict:
    """A record's text as the prompts take it: an empty input is shown as <noinput>, as Alpaca's are."""
    return {**current, "input": current.get("input") or NOINPUT}


# ---------------------------------------------------------------- rounds and artifacts


def round_wrappers(records: dict[str, dict], ids: list[str], round_no: int, pool_digest: str) -> list[dict]:
    """The round's work items, keyed by what decides their outcome: the record's text, the round and the
    pool, so a journal entry is reused only for the same work (a changed input is recomputed)."""
    out = []
    for rid in ids:
        rec = records[rid]
        current = {k: rec.get(k) or "" for k in TEXT}
        out.append({"id": content_id([round_no, rid, current, pool_digest], prefix="rf_"), "record_id": rid,
                    "task": str(task_key(rec)), "current": current})
    return out


def ledger_entries(record: dict, steps: list[dict]) -> list[dict]:
    """One ledger line per rewrite the record did not keep."""
    out = []
    for step in steps:
        if step["decision"] == "rewrite":
            continue
        entry = {"id": f"{record['id']}/r{step['round']}/{step['target']}", "record_id": record["id"],
                 "round": step["round"], "target": step["target"], "reason": step["reason"],
                 "rewrite": step.get("rewrite"), "record": {k: record.get(k) for k in ("id", *TEXT)}}
        for k in ("filter", "raw_response", "detail", "scores"):
            if k in step:
                entry[k] = step[k]
        out.append(entry)
    return out


def refine_rounds(records: list[dict], refiner: Refiner, *, journal: Path, fingerprint: dict,
                  filter_settings: FilterSettings) -> tuple[list[dict], list[dict], dict]:
    """Every round over the records (input order kept); (refined records, ledger, stats)."""
    current = {r["id"]: {k: v for k, v in r.items()} for r in records}
    steps: dict[str, list[dict]] = {r["id"]: [] for r in records}
    settings = refiner.settings
    eligible = [r["id"] for r in records]
    rounds: list[dict] = []
    usage = {"requests": 0, "tokens_in": 0, "tokens_out": 0}
    for round_no in range(1, settings.rounds + 1):
        if not eligible:
            break
        state = list(current.values())
        refiner.round = round_no
        refiner.pool = build_pool(state, filter_settings) if refiner.rules["rouge"] else None
        digest = content_id(sorted(str(task_key(r)) + "\t" + r["instruction"] for r in state)) if refiner.pool else ""
        wrappers = round_wrappers(current, eligible, round_no, digest)
        done, errored, _ = run_batches(wrappers, refiner.batch, stage=f"refine round {round_no}",
                                       journal_path=journal, fingerprint=fingerprint, batch_size=settings.batch_size)
        refined_now = []
        for w in done:
            rec = current[w["record_id"]]
            rec.update(w["current"])
            steps[w["record_id"]] += w["steps"]
            if any(s["decision"] == "rewrite" for s in w["steps"]):
                refined_now.append(w["record_id"])
        for w in errored:
            steps[w["record_id"]].append({"round": round_no, "target": settings.target, "decision": "original",
                                          "reason": "teacher_error", "detail": w.get("detail")})
        for w in done + errored:
            for k in usage:
                usage[k] += w["usage"][k]
        rounds.append(round_stats(round_no, [w["steps"] for w in done], len(wrappers), len(errored), refined_now))
        eligible = refined_now
    out, ledger = [], []
    for original in records:
        rec = current[original["id"]]
        changed = any(rec.get(k, "") != original.get(k, "") for k in TEXT)
        rec["refinement"] = {"original": {k: original.get(k) or "" for k in TEXT}, "changed": changed,
                             "decision": "rewrite" if changed else "original",
                             "reason": last_reason(steps[original["id"]]), "steps": steps[original["id"]]}
        if changed and "scores" in rec:  # the score stage's numbers describe the original text
            rec["refinement"]["original"]["scores"] = rec.pop("scores")
            rec["refinement"]["original"]["score_details"] = rec.pop("score_details", {})
        out.append(rec)
        ledger += ledger_entries(original, steps[original["id"]])
    return out, ledger, {"rounds": rounds, **usage}


def last_reason(steps: list[dict]) -> str:
    """Why the record reads as it does: the reason of its last kept rewrite, else of its last step."""
    kept = [s for s in steps if s["decision"] == "rewrite"]
    return (kept or steps)[-1]["reason"] if (kept or steps) else "not_refined"


def round_stats(round_no: int, steps: list[list[dict]], records: int, errors: int, refined: list[str]) -> dict:
    kept: dict[str, int] = {}
    dropped: dict[str, int] = {}
    for record_steps in steps:
        for s in record_steps:
            table = kept if s["decision"] == "rewrite" else dropped
            table[f"{s['target']}:{s['reason']}"] = table.get(f"{s['target']}:{s['reason']}", 0) + 1
    return {"round": round_no, "records": records, "refined": len(refined), "teacher_errors": errors,
            "kept_by_reason": dict(sorted(kept.items())), "rejected_by_reason": dict(sorted(dropped.items()))}


def refine_stats(records: list[dict], ledger: list[dict], extra: dict, started: float) -> dict:
    """The stage's figures in the shared schema (pipeline/io/stage_stats.py): no record is dropped, so
    read = kept; the rewrites' own counts, kept and not, are under `rewrites`."""
    steps = [s for r in records for s in r["refinement"]["steps"]]
    by_reason: dict[str, dict[str, int]] = {"kept": {}, "rejected": {}}
    for s in steps:
        table = by_reason["kept" if s["decision"] == "rewrite" else "rejected"]
        table[s["reason"]] = table.get(s["reason"], 0) + 1
    rewrites = {"proposed": len(steps), "kept": len(steps) - len(ledger), "rejected": len(ledger),
                "kept_by_reason": dict(sorted(by_reason["kept"].items())),
                "rejected_by_reason": dict(sorted(by_reason["rejected"].items()))}
    return stage_stats("refine", "examples", read=len(records), kept=len(records), rejected_by_reason={},
                       extras={"refined": sum(r["refinement"]["changed"] for r in records), "rewrites": rewrites,
                               **extra, "wall_time_s": round(time.monotonic() - started, 3)})


def refine_source(directory: Path) -> Path:
    """scored.jsonl when the run has it, else filtered.jsonl; a scored.jsonl older than filtered.jsonl
    is stale, and an error (as for export)."""
    scored, filtered = directory / "scored.jsonl", directory / "filtered.jsonl"
    if not scored.is_file():
        if not filtered.is_file():
            raise SiftError("not found (nor scored.jsonl); run `sift filter` (or `make filter`) first", path=filtered)
        return filtered
    if filtered.is_file() and filtered.stat().st_mtime_ns > scored.stat().st_mtime_ns:
        raise SiftError("older than filtered.jsonl: rerun `sift score` (make score), or delete it to refine "
                        "the filtered records", path=scored)
    return scored


def load_templates(settings: RefineSettings) -> dict[str, PromptTemplate]:
    """The prompts of the phases this target runs, each checked before any work."""
    own = {"instruction": settings.prompt_instruction, "response": settings.prompt_response}
    out = {}
    for phase in PHASES[settings.target]:
        template = load(own[phase] or PROMPTS[phase])
        template.check(set(TEXT), required={"instruction", "output"})
        out[phase] = template
    return out


def refine(*, run: str = "demo", student: StudentSettings = StudentSettings(),
           teacher: TeacherSettings = TeacherSettings(), filter: FilterSettings = FilterSettings(),
           refine: RefineSettings = RefineSettings()) -> None:
    """Let the teacher critique and rewrite each record, and the student keep the version that suits it.

    Reads runs/<run>/scored.jsonl (else filtered.jsonl); writes refined.jsonl (every record, each with
    its `refinement`), refined.rejected.jsonl (every rewrite not kept, with the reason) and
    refine.stats.json. Resumable: finished batches go to refine.journal; rerunning skips them.

    Args:
        run: run name; artifacts live in runs/<run>/.
        student: the model whose IFD and r-IFD decide (student.model), and where it runs (device, dtype).
        teacher: the teacher (or teacher.pool) that critiques and rewrites, and judges with refine.judge.
        filter: the rules every rewrite must pass (its one-record rules) and the ROUGE-L threshold.
        refine: this stage's own settings: target, select rule, rounds, judge, prompts, batch size.
    """
    started = time.monotonic()
    directory = run_dir(run)
    templates = load_templates(refine)
    try:
        rules = rewrite_rules(filter.rules)
    except ValueError as e:
        raise SiftError(str(e), field="filter.rules") from None
    from pipeline.io.models import resolve_device

    resolve_device(student.device)  # a device torch does not have fails here, before any work
    judging = refine.judge or needs_judge(refine.select)
    judge_template = None
    if judging:
        from train.rating import load_prompt

        judge_template = load_prompt(refine.judge_prompt)
    specs = check_teachers(teacher)
    source = refine_source(directory)
    records = read_scorable(source)
    with locked(directory):
        cached = open_teachers(directory, teacher, batch_size=refine.batch_size)
        identity = getattr(cached, "identity", cached.name)
        sampling = Sampling(temperature=refine.temperature, max_tokens=refine.max_tokens, stop=STOP,
                            seed=refine.seed)
        scores = VersionScores(student, batch_size=refine.batch_size, judge=cached if judging else None,
                               judge_template=judge_template)
        refiner = Refiner(cached, templates, sampling, refine, rules, scores)
        fingerprint = {"prompts": {k: t.provenance() for k, t in templates.items()}, "sampling": sampling.to_dict(),
                       "teacher": identity, "student": {"model": student.model, "dtype": student.dtype},
                       "judge": judge_template.provenance() if judge_template else None, "select": refine.select,
                       "target": refine.target, "rules": rules, "threshold": filter.threshold,
                       "use_stemmer": filter.use_stemmer}
        out, ledger, extra = refine_rounds(records, refiner, journal=directory / JOURNAL, fingerprint=fingerprint,
                                           filter_settings=filter)
        stats = refine_stats(out, ledger, {"source": source.name, "select": refine.select, "target": refine.target,
                                           **extra, "cache_hits": getattr(cached, "hits", 0)}, started)
        target = directory / "refined.jsonl"
        with all_or_none(target, directory / "refined.rejected.jsonl", directory / "refine.stats.json"):
            write_jsonl(directory / "refined.rejected.jsonl", ledger)
            write_json(directory / "refine.stats.json", stats)
            write_jsonl(target, out)  # last: the make target is fresh only when all three are written
        settings = {**to_dict(run=run, student=student, teacher=teacher, filter=filter, refine=refine),
                    **({"teachers": specs} if specs else {}), "source": source.name,
                    "prompts": {k: t.provenance() for k, t in templates.items()}, "sampling": sampling.to_dict()}
        record_stage(directory, "refine", settings, models={"teacher": identity, "student": student.model},
                     stats=stats)
    # the summary counts rewrites: accepted are the rewrites kept
    print_summary("refine", {**stats, "accepted": stats["rewrites"]["kept"],
                             "rejected_by_reason": stats["rewrites"]["rejected_by_reason"]})
    print(f"wrote {target} ({stats['kept']} records, {stats['refined']} refined; "
          f"{stats['rewrites']['kept']} of {stats['rewrites']['proposed']} rewrites kept)")
