"""Stage `score`: score every record (IFD, length, judge, reward), then keep the best, with a ledger.

    sift score --run demo                                          # filtered.jsonl -> scored.jsonl (make score)
    sift score alpaca_data.json -o scored.jsonl --scorers ifd,judge --keep "ifd<1,top=0.25:judge"

Every kept record gets a `scores` object of numbers (`scores.ifd`, `scores.ifd_loss_given_prompt`,
`scores.ifd_loss_alone`, `scores.length`, `scores.judge`, `scores.reward`; None where a record has
no score) and `score_details` (how each was computed, e.g. the judge's method). `--keep` rules
(filters/selection.py) then drop records into scored.rejected.jsonl with the reason and the score;
their funnel rows go into funnel.json after the filter's rules. Scores are cached per (scorer,
model, settings, record) in an append-only journal (runs/<run>/cache/scores.jsonl, or OUT's
`.cache.jsonl` stand-alone), written after each batch: a killed run resumes where it stopped, and a
rerun with other `--keep` rules recomputes nothing. A score that failed (the judge's server answered
with an error) is never cached: that run drops the record as `no_judge`, and the next run asks again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filters.selection import parse_keep, score_of, select
from pipeline.errors import SiftError
from pipeline.io.artifacts import (
    Journal,
    all_or_none,
    content_id,
    read_json,
    read_records,
    require,
    write_json,
    write_jsonl,
)
from pipeline.io.progress import StageProgress
from pipeline.io.runs import locked, record_stage, run_dir

SCORERS = ("ifd", "length", "judge", "reward")
# the numbers each scorer puts in `scores` (the first is the scorer's own name)
SCORE_FIELDS = {"ifd": ("ifd", "ifd_loss_given_prompt", "ifd_loss_alone"), "length": ("length",),
                "judge": ("judge",), "reward": ("reward",)}
CACHE_FILE = Path("cache") / "scores.jsonl"
CHUNK = 32  # records per journal entry: a kill loses at most this much work per scorer

ScoreFn = Callable[[list[dict]], list[dict]]


def parse_scorers(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise SiftError("name at least one scorer", field="scorers")
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise SiftError(f"unknown scorer {unknown[0]!r}; scorers: {', '.join(SCORERS)}", field="scorers")
    return list(dict.fromkeys(names))


def read_scorable(path: Path) -> list[dict]:
    """Records with a string instruction and output (input optional), each with an id (given or
    from its content); a bad record is a SiftError naming file, line and field."""
    records, seen = [], {}
    for line, rec in read_records(path):
        require(rec, "instruction", str, path=path, line=line)
        require(rec, "output", str, path=path, line=line)
        require(rec, "input", str, path=path, line=line, optional=True)
        given = require(rec, "id", (str, int), path=path, line=line, optional=True)
        rid = str(given) if given is not None else content_id(
            [rec["instruction"], rec.get("input") or "", rec["output"], line], prefix="rec_")
        if rid in seen:
            raise SiftError(f"duplicate id {rid!r} (first on line {seen[rid]})", path=path, line=line, field="id")
        seen[rid] = line
        records.append({**rec, "id": rid})
    return records


# ---------------------------------------------------------------- scorers, built lazily


class Scorers:
    """Builds each scorer's model on first use, so a fully cached rerun loads nothing."""

    def __init__(self, *, model: str, dtype: str, batch_size: int, teacher: dict[str, Any],
                 reward_model: str | None, judge_prompt: str | None) -> None:
        self.model, self.dtype, self.batch_size = model, dtype, batch_size
        self.teacher_options, self.reward_model, self.judge_prompt = teacher, reward_model, judge_prompt
        self._built: dict[str, ScoreFn] = {}

    def identity(self, name: str) -> dict:
        """What the cache key holds besides the record: the model and every setting that changes the score."""
        if name == "ifd":
            return {"model": self.model, "dtype": self.dtype, "format": "chat-or-alpaca/v1"}
        if name == "judge":
            from train.rating import load_prompt

            t = self.teacher_options
            ident = {"teacher": t["teacher"], "backend": t["backend"], "base_url": t.get("base_url"),
                     "teacher_options": t.get("teacher_options"), "prompt": load_prompt(self.judge_prompt).sha}
            specs = judge_specs(t)
            if specs:  # several judges: each one's model, backend, server, options and share
                ident["teachers"] = [{k: v for k, v in spec.items() if k != "api_key_env"} for spec in specs]
            return ident
        if name == "reward":
            return {"model": self.reward_model}
        return {}

    def get(self, name: str, progress: Callable[[int], None]) -> ScoreFn:
        if name not in self._built:
            self._built[name] = getattr(self, f"_build_{name}")()
        fn = self._built[name]
        return lambda recs: fn(recs, progress)  # type: ignore[call-arg]

    def _build_length(self) -> Any:
        from train.scorers import length_scores

        return lambda recs, progress: (length_scores(recs), progress(len(recs)))[0]

    def _build_ifd(self) -> Any:
        from pipeline.io.models import load_model, load_tokenizer
        from train.scorers import ifd_scores, prepare_tokenizer

        model, tok = load_model(self.model, dtype=self.dtype), load_tokenizer(self.model)
        prepare_tokenizer(tok)
        return lambda recs, progress: ifd_scores(model, tok, recs, batch_size=self.batch_size, progress=progress)

    def _build_judge(self) -> Any:
        from pipeline.teachers.options import make_backend
        from train.rating import judge_scores, load_prompt

        template = load_prompt(self.judge_prompt)
        options = {k: v for k, v in self.teacher_options.items() if k != "teachers"}
        teacher = judge_pool(self.teacher_options, batch_size=self.batch_size) \
            if self.teacher_options.get("teachers") else make_backend(batch_size=self.batch_size, **options)

        def run(recs: list[dict], progress: Callable[[int], None]) -> list[dict]:
            out = judge_scores(teacher, recs, template=template)
            progress(len(recs))
            return out

        return run

    def _build_reward(self) -> Any:
        from train.scorers import reward_scores

        model, tok = load_reward_model(self.reward_model)
        return lambda recs, progress: reward_scores(model, tok, recs, batch_size=self.batch_size, progress=progress)


def judge_specs(settings: dict[str, Any]) -> list[dict] | None:
    """The resolved --teachers specs of the judge settings (None for a single judge)."""
    from pipeline.teachers.pool import check_teachers

    return check_teachers(settings.get("teachers"), backend=settings["backend"], base_url=settings.get("base_url"),
                          api_key_env=settings.get("api_key_env") or "OPENAI_API_KEY",
                          teacher_options=settings.get("teacher_options"))


def judge_pool(settings: dict[str, Any], *, batch_size: int) -> Any:
    """Several judges as one TeacherPool. Like the single judge, no teacher cache: the scores cache
    keeps every rating."""
    from pipeline.teachers.pool import open_pool
    from pipeline.teachers.specs import parse_teachers

    specs = parse_teachers(settings["teachers"], backend=settings["backend"], base_url=settings.get("base_url"),
                           api_key_env=settings.get("api_key_env") or "OPENAI_API_KEY",
                           teacher_options=settings.get("teacher_options"))
    return open_pool(None, specs, batch_size=batch_size)


def judge_tally(records: list[dict]) -> dict[str, dict[str, int]]:
    """{judge name: {"logprobs": n, "sampled": n, "unrated": n}} from the records' score_details.judge."""
    table: dict[str, dict[str, int]] = {}
    for rec in records:
        details = (rec.get("score_details") or {}).get("judge")
        if not isinstance(details, dict):
            continue
        row = table.setdefault(str(details.get("teacher")), {"logprobs": 0, "sampled": 0, "unrated": 0})
        method = details.get("method")
        if method in ("logprobs", "sampled"):
            row[method] += 1
        if rec.get("scores", {}).get("judge") is None:
            row["unrated"] += 1
    return dict(sorted(table.items()))


def load_reward_model(folder: str | None) -> tuple[Any, Any]:
    if not folder:
        raise SiftError("the reward scorer needs --reward-model: a folder with a sequence-classification "
                        "reward model (e.g. OpenAssistant/reward-model-deberta-v3-large-v2 saved locally)",
                        field="reward_model")
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise SiftError("no config.json: not a model folder", path=path, field="reward_model")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SiftError(f"cannot load a sequence-classification model: {e}", path=path,
                        field="reward_model") from None
    model.eval()
    return model, tok


# ---------------------------------------------------------------- the cached loop


def failed(result: object) -> bool:
    """A result the scorer could not compute because its backend failed (a judge's teacher error):
    it says nothing about the record, so it is never cached and the next run asks again."""
    return isinstance(result, dict) and bool(result.get("error"))


def score_all(records: list[dict], names: list[str], scorers: Scorers, cache_path: Path) -> dict[str, int]:
    """Put `scores` and `score_details` on every record, computing only what the cache lacks.
    Failed results (see `failed`) count under "errors" and are kept out of the cache, so a rerun
    retries them; a cache written before that rule has its failed entries ignored."""
    journal = Journal(cache_path)
    cache = {e["key"]: e["result"] for e in journal.read() if isinstance(e.get("key"), str) and not failed(e["result"])}
    counts = {"computed": 0, "cached": 0, "errors": 0}
    for rec in records:
        rec["scores"], rec["score_details"] = {}, {}
    for name in names:
        ident = scorers.identity(name)
        keys = [content_id({"scorer": name, **ident, "instruction": r["instruction"], "input": r.get("input") or "",
                            "output": r["output"]}, prefix="sc_") for r in records]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        counts["cached"] += len(records) - len(todo)
        if todo:
            with StageProgress(f"score {name}", len(records), initial=len(records) - len(todo)) as bar:
                fn = scorers.get(name, lambda n: bar.update(done=n))
                for lo in range(0, len(todo), CHUNK):
                    chunk = todo[lo:lo + CHUNK]
                    results = fn([records[i] for i in chunk])
                    entries = [{"key": keys[i], "result": r} for i, r in zip(chunk, results, strict=True)]
                    journal.append([e for e in entries if not failed(e["result"])])
                    cache.update((e["key"], e["result"]) for e in entries)  # this run still uses them
                    counts["errors"] += sum(failed(e["result"]) for e in entries)
                    counts["computed"] += len(chunk) - sum(failed(e["result"]) for e in entries)
        for rec, key in zip(records, keys, strict=True):
            result = cache[key]
            for field in SCORE_FIELDS[name]:
                source = "value" if field == name else field.removeprefix(f"{name}_")
                rec["scores"][field] = result.get(source)
            details = {k: v for k, v in result.items() if k != "value" and f"{name}_{k}" not in SCORE_FIELDS[name]}
            if details:
                rec["score_details"][name] = details
    return counts


def score_records(records: list[dict], names: list[str], keep: str | None, scorers: Scorers, cache_path: Path
                  ) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Score, then select: kept records, the rejected ledger, the funnel rows and stats."""
    known = [f for n in names for f in SCORE_FIELDS[n]]
    rules = parse_keep(keep, known)
    counts = score_all(records, names, scorers, cache_path)
    reasons, rows = select(records, rules)
    kept, rejected = [], []
    by_rule = {r.reason: r.score for r in rules} | {f"no_{r.score}": r.score for r in rules}
    for rec, reason in zip(records, reasons, strict=True):
        if reason is None:
            kept.append(rec)
        else:
            score = by_rule.get(reason, "")
            rejected.append({"id": rec["id"], "reason": reason, "score": score_of(rec, score), "score_name": score,
                             "record": rec})
    by_reason: dict[str, int] = {}
    for r in rejected:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    stats = {"input": len(records), "kept": len(kept), "rejected": len(rejected), "by_reason": by_reason,
             "scorers": names, "keep": [r.text for r in rules], **counts}
    if "judge" in names:  # which judge rated how many records, and how
        stats["judge_by_teacher"] = judge_tally(records)
    return kept, rejected, rows, stats


# ---------------------------------------------------------------- the command


def score(input: str | None = None, /, *, output: str | None = None, run: str = "demo",
          scorers: str = "ifd,length", keep: str | None = None, model: str = "smollm2-135m-instruct",
          dtype: str = "auto", teacher: str = "smollm2-135m-instruct", backend: str = "transformers",
          base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY", teacher_options: str | None = None,
          judge_prompt: str | None = None, reward_model: str | None = None, batch_size: int = 8,
          teachers: str | None = None) -> None:
    """Score every record (ifd, length, judge, reward) and keep the best, with a ledger of the dropped.

    With no INPUT, the stage: runs/<run>/filtered.jsonl -> scored.jsonl and scored.rejected.jsonl, and
    the --keep rows appended to funnel.json. With INPUT (JSONL or a JSON list of records with
    `instruction`, optional `input`, and `output`), writes OUT and OUT.rejected.jsonl, OUT.funnel.json.
    Every record gets `scores` (numbers) and `score_details`. Cached per (scorer, model, record) and
    resumable: a killed or repeated run recomputes nothing it finished.

    Args:
        input: a dataset to score stand-alone; omit to run the stage on runs/<run>/filtered.jsonl
        output: where kept records go (stand-alone; .jsonl); required with INPUT
        run: run name for the stage; artifacts live in runs/<run>/
        scorers: comma list of ifd (instruction-following difficulty, Cherry LLM), length (answer words),
            judge (the teacher's 1-5 rating, AlpaGasus / G-Eval), reward (a reward model folder)
        keep: selection rules in order, e.g. "ifd<1,judge>=4,top=0.25:judge" (SCORE<N, <=, >, >=, ==, or
            top=FRACTION:SCORE, the highest; for ifd the hardest, so put ifd<1 first); none: keep all
        model: the causal LM that computes ifd (default: the embedded student base model)
        dtype: the ifd model's dtype: auto (bfloat16 where the CPU has it), float32, bfloat16
        teacher: the judge's model (as for sift generate)
        backend: the judge's backend: transformers, vllm or openai
        base_url: server URL for the openai backend
        api_key_env: environment variable holding the API key (never logged)
        teacher_options: the judge backend's own settings as key=value pairs (see sift generate)
        judge_prompt: your own rating prompt file (placeholders {instruction}, {input}, {output})
        reward_model: a sequence-classification reward model folder (needed by the reward scorer)
        batch_size: records per forward pass
        teachers: several judges instead of --teacher: a teachers file (YAML/TOML: name, model, backend,
            options, share) or comma-separated models, each optionally =share; records are spread by share,
            and score_details.judge.teacher names the judge of each
    """
    started = time.time()
    names = parse_scorers(scorers)
    try:
        parse_keep(keep, [f for n in names for f in SCORE_FIELDS[n]])
    except ValueError as e:
        raise SiftError(str(e), field="keep") from None
    if batch_size < 1:
        raise SiftError(f"must be >= 1, got {batch_size}", field="batch_size")
    if "reward" in names and not reward_model:
        load_reward_model(reward_model)  # the clear message, before anything loads
    teacher_settings = {"teacher": teacher, "backend": backend, "base_url": base_url, "api_key_env": api_key_env,
                        "teacher_options": teacher_options}
    specs = None
    if "judge" in names:
        from train.rating import load_prompt

        load_prompt(judge_prompt)
        if teachers:
            specs = judge_specs({**teacher_settings, "teachers": teachers})  # a bad file fails before anything loads
            teacher_settings["teachers"] = teachers
    built = Scorers(model=model, dtype=dtype, batch_size=batch_size, teacher=teacher_settings,
                    reward_model=reward_model, judge_prompt=judge_prompt)
    settings = {"scorers": names, "keep": keep, "model": model, "dtype": dtype, **teacher_settings,
                "judge_prompt": judge_prompt, "reward_model": reward_model, "batch_size": batch_size}
    if specs:
        settings["teachers"] = specs
    if input is None:
        directory = run_dir(run)
        source = directory / "filtered.jsonl"
        if not source.exists():
            raise SiftError("not found; run `sift filter` (or `make filter`) first", path=source)
        with locked(directory):
            records = read_scorable(source)
            kept, rejected, rows, stats = score_records(records, names, keep, built, directory / CACHE_FILE)
            funnel_path = directory / "funnel.json"
            funnel = read_json(funnel_path) if funnel_path.is_file() else {"input": len(records), "rules": []}
            funnel["rules"] = [r for r in funnel.get("rules", []) if not str(r.get("rule", "")).startswith("keep ")]
            funnel["rules"] += rows
            funnel["kept"] = len(kept)
            target = directory / "scored.jsonl"
            with all_or_none(target, directory / "scored.rejected.jsonl", funnel_path):
                write_jsonl(directory / "scored.rejected.jsonl", rejected)
                write_json(funnel_path, funnel)
                write_jsonl(target, kept)
            stats["wall_seconds"] = round(time.time() - started, 2)
            write_json(directory / "score.stats.json", stats)
            record_stage(directory, "score", {"run": run, **settings}, stats=stats)
    else:
        if output is None:
            raise SiftError("-o/--output is required when scoring a file", field="output")
        out = Path(output)
        stem = out.with_suffix("") if out.suffix in (".jsonl", ".json") else out
        target = out
        records = read_scorable(Path(input))
        kept, rejected, rows, stats = score_records(records, names, keep, built, Path(f"{stem}.cache.jsonl"))
        with all_or_none(out, Path(f"{stem}.rejected.jsonl"), Path(f"{stem}.funnel.json")):
            write_jsonl(Path(f"{stem}.rejected.jsonl"), rejected)
            write_json(Path(f"{stem}.funnel.json"), {"input": len(records), "kept": len(kept), "rules": rows})
            write_jsonl(out, kept)
        stats["wall_seconds"] = round(time.time() - started, 2)
    reasons = ", ".join(f"{r} {c}" for r, c in sorted(stats["by_reason"].items(), key=lambda x: -x[1])) or "none"
    print(f"score: {stats['input']} in, {stats['kept']} kept, {stats['rejected']} rejected ({reasons}); "
          f"{stats['computed']} scores computed, {stats['cached']} cached, in {stats['wall_seconds']:.1f}s -> {target}")
    if stats["errors"]:
        print(f"score: {stats['errors']} scores failed (the judge's server answered with errors); they are not "
              "cached: run the same command again to retry them")
