"""Stage `score`: score every record (IFD, length, judge, reward), then keep the best, with a ledger.

    sift score --run demo                                          # filtered.jsonl -> scored.jsonl (make score)
    sift score alpaca_data.json -o scored.jsonl --score.scorers ifd,judge --score.keep "ifd<1,top=0.25:judge"

Every kept record gets a `scores` object of numbers (`scores.ifd`, `scores.ifd_loss_given_prompt`,
`scores.ifd_loss_alone`, `scores.length`, `scores.judge`, `scores.reward`; None where a record has
no score) and `score_details` (how each was computed, e.g. the judge's method). `score.keep` rules
(filters/selection.py) then drop records into scored.rejected.jsonl with the reason and the score;
their funnel rows go into scored.funnel.json (funnel.json is the filter's). Scores are cached per (scorer,
model, settings, record) in an append-only journal (runs/<run>/cache/scores.jsonl, or OUT's
`.cache.jsonl` stand-alone), written after each batch: a killed run resumes where it stopped, and a
rerun with other `score.keep` rules recomputes nothing. The ifd and reward models run on
`student.device` (auto: CUDA when torch sees a GPU); the judge is the `teacher:` section, built as
every stage builds its teacher (options, key variable, vLLM, pools). A score that failed (the judge's server answered
with an error) is never cached: that run drops the record as `no_judge`, and the next run asks again.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from filters.selection import parse_keep, score_of, select
from pipeline.errors import SiftError
from pipeline.io.artifacts import (
    RECORD_SUFFIXES,
    AtomicFile,
    Journal,
    JsonListWriter,
    all_or_none,
    check_output_suffix,
    content_id,
    iter_records,
    json_line,
    require,
    write_json,
)
from pipeline.io.progress import StageProgress
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.io.stage_stats import stage_stats
from pipeline.settings import ScoreSettings, StudentSettings, TeacherSettings, to_dict
from pipeline.teachers.pool import check_teachers, open_teachers

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
        raise SiftError("name at least one scorer", field="score.scorers")
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise SiftError(f"unknown scorer {unknown[0]!r}; scorers: {', '.join(SCORERS)}", field="score.scorers")
    return list(dict.fromkeys(names))


def read_scorable(path: Path) -> list[dict]:
    """Records with a string instruction and output (input optional), each with an id (given or
    from its content); a bad record is a SiftError naming file, line and field."""
    return list(iter_scorable(path))


def iter_scorable(path: Path) -> Iterator[dict]:
    """`read_scorable` a record at a time (only the ids seen so far are kept, to refuse a repeat)."""
    seen: dict[str, int] = {}
    for line, rec in iter_records(path):
        require(rec, "instruction", str, path=path, line=line)
        require(rec, "output", str, path=path, line=line)
        require(rec, "input", str, path=path, line=line, optional=True)
        given = require(rec, "id", (str, int), path=path, line=line, optional=True)
        rid = str(given) if given is not None else content_id(
            [rec["instruction"], rec.get("input") or "", rec["output"], line], prefix="rec_")
        if rid in seen:
            raise SiftError(f"duplicate id {rid!r} (first on line {seen[rid]})", path=path, line=line, field="id")
        seen[rid] = line
        yield {**rec, "id": rid}


# ---------------------------------------------------------------- scorers, built lazily


class Scorers:
    """Builds each scorer's model on first use, so a fully cached rerun loads nothing."""

    def __init__(self, *, student: StudentSettings, teacher: TeacherSettings, score: ScoreSettings) -> None:
        self.student, self.teacher, self.score = student, teacher, score
        self._built: dict[str, ScoreFn] = {}

    def identity(self, name: str) -> dict:
        """What the cache key holds besides the record: the model and every setting that changes the score."""
        if name == "ifd":
            return {"model": self.student.model, "dtype": self.student.dtype, "format": "chat-or-alpaca/v1"}
        if name == "judge":
            from train.rating import load_prompt

            t = self.teacher
            ident = {"teacher": t.model, "backend": t.backend, "base_url": t.base_url,
                     "teacher_options": t.options, "prompt": load_prompt(self.score.judge_prompt).sha}
            specs = check_teachers(t)
            if specs:  # several judges: each one's model, backend, server, options and share
                ident["teachers"] = [{k: v for k, v in spec.items() if k != "api_key_env"} for spec in specs]
            return ident
        if name == "reward":
            return {"model": self.score.reward_model}
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

        s = self.student
        model, tok = load_model(s.model, dtype=s.dtype, device=s.device), load_tokenizer(s.model)
        prepare_tokenizer(tok)
        size = self.score.batch_size
        return lambda recs, progress: ifd_scores(model, tok, recs, batch_size=size, progress=progress)

    def _build_judge(self) -> Any:
        from train.rating import judge_scores, load_prompt

        template = load_prompt(self.score.judge_prompt)
        # no teacher cache (directory None): the scores cache keeps every rating
        teacher = open_teachers(None, self.teacher, batch_size=self.score.batch_size)

        def run(recs: list[dict], progress: Callable[[int], None]) -> list[dict]:
            out = judge_scores(teacher, recs, template=template)
            progress(len(recs))
            return out

        return run

    def _build_reward(self) -> Any:
        from train.scorers import reward_scores

        model, tok = load_reward_model(self.score.reward_model, device=self.student.device)
        size = self.score.batch_size
        return lambda recs, progress: reward_scores(model, tok, recs, batch_size=size, progress=progress)


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


def check_reward_model(folder: str | None) -> Path:
    """The reward model's folder, or the clear message (before anything loads)."""
    if not folder:
        raise SiftError("the reward scorer needs --score.reward_model: a folder with a sequence-classification "
                        "reward model (e.g. OpenAssistant/reward-model-deberta-v3-large-v2 saved locally)",
                        field="score.reward_model")
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise SiftError("no config.json: not a model folder", path=path, field="score.reward_model")
    return path


def load_reward_model(folder: str | None, *, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a sequence-classification reward model, in eval mode on `device`
    (a setting: auto is resolved here)."""
    path = check_reward_model(folder)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.io.models import resolve_device

    where = resolve_device(device)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SiftError(f"cannot load a sequence-classification model: {e}", path=path,
                        field="score.reward_model") from None
    return model.to(where).eval(), tok


# ---------------------------------------------------------------- the cached loop


def failed(result: object) -> bool:
    """A result the scorer could not compute because its backend failed (a judge's teacher error):
    it says nothing about the record, so it is never cached and the next run asks again."""
    return isinstance(result, dict) and bool(result.get("error"))


class ScoreCache:
    """The scores journal and what it holds, plus the counts of one run (computed, cached, errors)."""

    def __init__(self, cache_path: Path) -> None:
        self.journal = Journal(cache_path)
        self.results = {e["key"]: e["result"] for e in self.journal.read()
                        if isinstance(e.get("key"), str) and not failed(e["result"])}
        self.counts = {"computed": 0, "cached": 0, "errors": 0}


def score_all(records: list[dict], names: list[str], scorers: Scorers, cache_path: Path) -> dict[str, int]:
    """Put `scores` and `score_details` on every record, computing only what the cache lacks.
    Failed results (see `failed`) count under "errors" and are kept out of the cache, so a rerun
    retries them; a cache written before that rule has its failed entries ignored."""
    cache = ScoreCache(cache_path)
    score_window(records, names, scorers, cache)
    return cache.counts


def score_window(records: list[dict], names: list[str], scorers: Scorers, cache: ScoreCache) -> None:
    """`score_all` on some of the records, with one cache for all of them (the stage streams its
    records through this a window at a time)."""
    journal, counts = cache.journal, cache.counts
    for rec in records:
        rec["scores"], rec["score_details"] = {}, {}
    for name in names:
        ident = scorers.identity(name)
        keys = [content_id({"scorer": name, **ident, "instruction": r["instruction"], "input": r.get("input") or "",
                            "output": r["output"]}, prefix="sc_") for r in records]
        todo = [i for i, k in enumerate(keys) if k not in cache.results]
        counts["cached"] += len(records) - len(todo)
        if todo:
            with StageProgress(f"score {name}", len(records), initial=len(records) - len(todo)) as bar:
                fn = scorers.get(name, lambda n: bar.update(done=n))
                for lo in range(0, len(todo), CHUNK):
                    chunk = todo[lo:lo + CHUNK]
                    results = fn([records[i] for i in chunk])
                    entries = [{"key": keys[i], "result": r} for i, r in zip(chunk, results, strict=True)]
                    journal.append([e for e in entries if not failed(e["result"])])
                    cache.results.update((e["key"], e["result"]) for e in entries)  # this run still uses them
                    counts["errors"] += sum(failed(e["result"]) for e in entries)
                    counts["computed"] += len(chunk) - sum(failed(e["result"]) for e in entries)
        for rec, key in zip(records, keys, strict=True):
            result = cache.results[key]
            for field in SCORE_FIELDS[name]:
                source = "value" if field == name else field.removeprefix(f"{name}_")
                rec["scores"][field] = result.get(source)
            details = {k: v for k, v in result.items() if k != "value" and f"{name}_{k}" not in SCORE_FIELDS[name]}
            if details:
                rec["score_details"][name] = details


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


WINDOW = 4096  # records scored, then spooled, at a time by the stage: its memory does not grow with the input


class ScoreColumns(Sequence):
    """The scores the keep rules look at, one float array per score (NaN: none), read by `select` as
    records: a million records cost 8 bytes a score each instead of a dict each."""

    def __init__(self, names: Iterable[str]) -> None:
        self.columns = {name: array("d") for name in names}
        self.n = 0

    def add(self, record: dict) -> None:
        for name, column in self.columns.items():
            value = score_of(record, name)
            column.append(math.nan if value is None else value)
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        return {"scores": {name: column[i] for name, column in self.columns.items()}}


def _add_tally(total: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> None:
    for name, row in more.items():
        mine = total.setdefault(name, {"logprobs": 0, "sampled": 0, "unrated": 0})
        for k, v in row.items():
            mine[k] += v


def score_file(source: Path, targets: tuple[Path, Path, Path], names: list[str], keep: str | None,
               scorers: Scorers, cache_path: Path) -> dict:
    """`score_records` from a file to (kept, rejected, funnel) files, in bounded memory: every record is
    checked first; then scored WINDOW records at a time and spooled to an unnamed temporary file, with
    only the scores the keep rules need kept in memory; then the spool is split into kept and rejected
    files (temporary names until all is done). The bytes are score_records' written by write_jsonl."""
    known = [f for n in names for f in SCORE_FIELDS[n]]
    rules = parse_keep(keep, known)
    total = sum(1 for _ in iter_scorable(source))  # a bad record fails here, before any scoring
    cache = ScoreCache(cache_path)
    columns = ScoreColumns(dict.fromkeys(r.score for r in rules))
    judges: dict[str, dict[str, int]] = {}
    kept_path, rejected_path, funnel_path = targets
    kept_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+", encoding="utf-8", dir=kept_path.parent) as spool:
        records = iter_scorable(source)
        while window := list(itertools.islice(records, WINDOW)):
            score_window(window, names, scorers, cache)
            for rec in window:
                columns.add(rec)
                spool.write(json_line(rec))
            if "judge" in names:
                _add_tally(judges, judge_tally(window))
        reasons, rows = select(columns, rules)
        spool.seek(0)
        by_rule = {r.reason: r.score for r in rules} | {f"no_{r.score}": r.score for r in rules}
        by_reason: dict[str, int] = {}
        with all_or_none(*targets):
            files = [AtomicFile(rejected_path)]
            try:
                files.append(AtomicFile(kept_path))
                rejected_out, kept_out = files
                as_list = JsonListWriter(kept_out) if kept_path.suffix.lower() == ".json" else None
                for line, reason in zip(spool, reasons, strict=True):
                    if reason is None:
                        if as_list is not None:
                            as_list.add(json.loads(line))
                        else:
                            kept_out.write(line)
                        continue
                    rec, score = json.loads(line), by_rule.get(reason, "")
                    rejected_out.write(json_line({"id": rec["id"], "reason": reason, "score": score_of(rec, score),
                                                  "score_name": score, "record": rec}))
                    by_reason[reason] = by_reason.get(reason, 0) + 1
                if as_list is not None:
                    as_list.close()
                kept = total - sum(by_reason.values())
                rejected_out.commit()
                write_json(funnel_path, {"input": total, "kept": kept, "rules": rows})
                kept_out.commit()
            except BaseException:
                for f in files:
                    f.abort()
                raise
    stats = {"input": total, "kept": kept, "rejected": total - kept, "by_reason": by_reason,
             "scorers": names, "keep": [r.text for r in rules], **cache.counts}
    if "judge" in names:
        stats["judge_by_teacher"] = dict(sorted(judges.items()))
    return stats


# ---------------------------------------------------------------- the command


def score(input: str | None = None, /, *, output: str | None = None, run: str = "demo",
          student: StudentSettings = StudentSettings(), teacher: TeacherSettings = TeacherSettings(),
          score: ScoreSettings = ScoreSettings()) -> None:
    """Score every record (ifd, length, judge, reward) and keep the best, with a ledger of the dropped.

    With no INPUT, the stage: runs/<run>/filtered.jsonl -> scored.jsonl, scored.rejected.jsonl and the
    --keep rows in scored.funnel.json. With INPUT (JSONL or a JSON list of records with
    `instruction`, optional `input`, and `output`), writes OUT and OUT.rejected.jsonl, OUT.funnel.json.
    Every record gets `scores` (numbers) and `score_details`. Cached per (scorer, model, record) and
    resumable: a killed or repeated run recomputes nothing it finished.

    Args:
        input: a dataset to score stand-alone; omit to run the stage on runs/<run>/filtered.jsonl
        output: where kept records go (stand-alone; .jsonl, or .json for one JSON list); required with INPUT
        run: run name for the stage; artifacts live in runs/<run>/
        student: the model that computes ifd (student.model), and where ifd and reward run (device, dtype).
        teacher: the judge (or teacher.pool, several judges; score_details.judge.teacher names each one's).
        score: this stage's own settings: scorers, keep rules, judge prompt, reward model, batch size.
    """
    started = time.time()
    names = parse_scorers(score.scorers)
    keep = score.keep
    try:
        parse_keep(keep, [f for n in names for f in SCORE_FIELDS[n]])
    except ValueError as e:
        raise SiftError(str(e), field="score.keep") from None
    if "reward" in names:
        check_reward_model(score.reward_model)  # the clear message, before anything loads
    if {"ifd", "reward"} & set(names):
        from pipeline.io.models import resolve_device

        resolve_device(student.device)  # a device torch does not have fails here, before any work
    specs = None
    if "judge" in names:
        from train.rating import load_prompt

        load_prompt(score.judge_prompt)
        specs = check_teachers(teacher)  # a bad teachers file fails before anything loads
    built = Scorers(student=student, teacher=teacher, score=score)
    settings = to_dict(student=student, teacher=teacher, score=score)
    if specs:
        settings["teachers"] = specs
    if input is None:
        directory = run_dir(run)
        source = directory / "filtered.jsonl"
        if not source.exists():
            raise SiftError("not found; run `sift filter` (or `make filter`) first", path=source)
        with locked(directory):
            target = directory / "scored.jsonl"
            stats = score_file(source, (target, directory / "scored.rejected.jsonl",
                                        directory / "scored.funnel.json"),  # score's own: funnel.json is the filter's
                               names, keep, built, directory / CACHE_FILE)
            stats["wall_seconds"] = round(time.time() - started, 2)
            doc = stage_stats("score", "examples", read=stats["input"], kept=stats["kept"],
                              rejected_by_reason=stats["by_reason"], extras=stats)
            write_json(directory / "score.stats.json", doc)
            record_stage(directory, "score", {"run": run, **settings}, stats=doc)
    else:
        if output is None:
            raise SiftError("-o/--output is required when scoring a file", field="output")
        out = check_output_suffix(output, RECORD_SUFFIXES)
        stem = out.with_suffix("")
        target = out
        stats = score_file(Path(input), (out, Path(f"{stem}.rejected.jsonl"), Path(f"{stem}.funnel.json")),
                           names, keep, built, Path(f"{stem}.cache.jsonl"))
        stats["wall_seconds"] = round(time.time() - started, 2)
    reasons = ", ".join(f"{r} {c}" for r, c in sorted(stats["by_reason"].items(), key=lambda x: -x[1])) or "none"
    print(f"score: {stats['input']} in, {stats['kept']} kept, {stats['rejected']} rejected ({reasons}); "
          f"{stats['computed']} scores computed, {stats['cached']} cached, in {stats['wall_seconds']:.1f}s -> {target}")
    if stats["errors"]:
        print(f"score: {stats['errors']} scores failed (the judge's server answered with errors); they are not "
              "cached: run the same command again to retry them")
