"""Kill anywhere: SIGKILL every stage at many points, rerun the same command, get the same run.

    .venv/bin/python -m pytest tests/pipeline/test_kill_anywhere.py -m slow

An uninterrupted run goes through seeds, generate, classify, instances, filter, export and train
on the real command line, keeping a copy of the run folder after each stage. Then each stage is
run again from the copy before it, killed with SIGKILL at chosen points (each rerun of the same
command is killed at the next point, so the damage accumulates), and finally rerun until it
succeeds. The result must equal the uninterrupted run: artifacts byte for byte, and the files
that carry timings record for record without them (kill_harness.TIMING_KEYS says which and why);
every JSONL file must parse line by line with unique ids, and the manifest's hashes must match
the files. Kill points come from the seam in pipeline/io/artifacts.py (deterministic: the N-th
durable write to a file, before it, in the middle of it, or after it), and, for the trainer's
own checkpoint writes, from outside as soon as a path appears.

Teachers: a loopback OpenAI-compatible server with scripted, deterministic answers (and a few
transient faults on every other attempt, which retries absorb) for most points; the real
embedded model for two. Student: a tiny random Llama (tests/train/conftest.py), a checkpoint
after every step.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.io.artifacts import read_json, read_jsonl, write_jsonl
from tests.pipeline.kill_harness import (
    check_run,
    same_artifacts,
    scripted_reply,
    sift,
    sift_killed,
    sift_killed_when,
    sift_ok,
)
from tests.pipeline.openai_server import FakeOpenAI
from tests.train.conftest import save_tiny

RUN = "r"
STAGES = ("seeds", "generate", "classify", "instances", "filter", "export", "train")
JOURNALS = frozenset({"generate.journal", "classify.journal", "instances.journal", "teacher.jsonl", "metrics.jsonl"})
TRAIN_STEPS = 6


def _digest(key: str) -> int:
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16)


def transient(key: str, attempt: int) -> str | None:
    """Some requests fail on every other attempt (so in the killed runs too) and succeed when retried."""
    h = _digest(key) % 12
    if attempt % 2 or h > 2:
        return None
    return ("429", "drop", "truncated")[h]


def stage_args(stage: str, *, url: str = "", tiny: Path | None = None) -> list[str]:
    """The command line of each stage: small counts, the loopback teacher at `url`, the tiny student."""
    teacher = ["--teacher.backend", "openai", "--teacher.model", "scripted", "--teacher.base_url", url]
    return {
        "seeds": ["seeds", "seeds/default.jsonl", "--run", RUN],
        "generate": ["generate", "--run", RUN, "--generate.n", "40", "--generate.batch_size", "4", *teacher],
        "classify": ["classify", "--run", RUN, "--classify.batch_size", "8", *teacher],
        "instances": ["instances", "--run", RUN, "--instances.batch_size", "8", *teacher],
        "filter": ["filter", "--run", RUN],
        "export": ["export", "--run", RUN],
        "train": ["train", "--run", RUN, "--student.model", str(tiny), "--train.max_steps", str(TRAIN_STEPS),
                  "--train.save_steps", "1", "--train.logging_steps", "1", "--train.eval_steps", "3",
                  "--train.batch_size", "2", "--train.grad_accum", "1", "--train.max_length", "64", "--train.resume"],
    }[stage]


@dataclass
class Chain:
    """The uninterrupted run: the run folder as it stood after each stage."""

    root: Path
    url: str
    tiny: Path

    def args(self, stage: str) -> list[str]:
        return stage_args(stage, url=self.url, tiny=self.tiny)

    def after(self, stage: str) -> Path:
        return self.root / stage / RUN

    def before(self, stage: str) -> Path | None:
        i = STAGES.index(stage)
        return self.after(STAGES[i - 1]) if i else None


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(transient, reply=scripted_reply) as s:
        yield s


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, server: FakeOpenAI) -> Chain:
    root = tmp_path_factory.mktemp("uninterrupted")
    c = Chain(root, server.url, save_tiny(root / "tiny-llama"))
    runs = root / "runs"
    for stage in STAGES:
        sift_ok(c.args(stage), runs=runs)
        shutil.copytree(runs / RUN, c.after(stage))
    return c


def left_mid_write(d: Path, kill_at: str) -> bool:
    """Whether a "mid" kill left what it should: a torn last journal line or an unrenamed temporary file."""
    name = kill_at.rsplit(":", 2)[0]
    if name in JOURNALS:
        return any(not p.read_bytes().endswith(b"\n") for p in d.rglob(name))
    return any(d.rglob(f".{name}.*.tmp"))


Kill = str | Callable[[list[str], Path], None]


def resume_after_kills(chain: Chain, stage: str, kills: list[Kill], tmp_path: Path) -> Path:
    """Run `stage` from the uninterrupted run's state before it, killing each try at the next point,
    then the same command once more; check the run and compare it with the uninterrupted one."""
    runs = tmp_path / "runs"
    before = chain.before(stage)
    if before is not None:
        shutil.copytree(before, runs / RUN)
    args = chain.args(stage)
    for kill in kills:
        if isinstance(kill, str):
            sift_killed(args, runs=runs, kill_at=kill)
            if kill.endswith(":mid"):
                assert left_mid_write(runs / RUN, kill), f"the kill at {kill} did not land mid-write"
        else:
            kill(args, runs)
    sift_ok(args, runs=runs)
    d = runs / RUN
    check_run(d)
    same_artifacts(chain.after(stage), d, ref_runs=chain.root / "runs")
    return d


# ---------------------------------------------------------------- the data stages


@pytest.mark.slow
def test_reference_run_has_work_for_every_ledger(chain: Chain) -> None:
    """The scripted teacher must exercise rejections at every stage, or the comparisons prove little."""
    d = chain.after("train")
    check_run(d)
    gen = read_json(d / "generate.stats.json")
    assert gen["kept"] == 40 and {"rouge_duplicate", "blacklist", "over_quota"} <= set(gen["rejected_by_reason"])
    assert 0 < read_json(d / "classify.stats.json")["yes"] < 40
    assert read_jsonl(d / "instances.rejected.jsonl")
    assert read_json(d / "filter.stats.json")["rejected_by_reason"]
    assert len(read_jsonl(d / "train.jsonl")) > 40
    assert read_json(d / "manifest.json")["stages"]["train"]["stats"]["step"] == TRAIN_STEPS


@pytest.mark.slow
def test_kill_seeds(chain: Chain, tmp_path: Path) -> None:
    resume_after_kills(chain, "seeds", ["seeds.jsonl:1:mid", "manifest.json:1:mid"], tmp_path)


@pytest.mark.slow
def test_kill_generate(chain: Chain, tmp_path: Path) -> None:
    resume_after_kills(chain, "generate", [
        "generate.journal:1:mid",  # the journal's header torn
        "teacher.jsonl:2:before",  # a round answered, then lost before the cache had it
        "teacher.jsonl:2:mid",  # a round's cache entries half written
        "generate.journal:2:mid",  # a round torn in the journal (its answers are in the cache)
        "generate.journal:3:after",  # between rounds
        "instructions.rejected.jsonl:1:mid",  # the ledger written but not renamed into place
        "instructions.jsonl:1:after",  # every artifact written, the manifest not yet updated
        "manifest.json:1:mid",
    ], tmp_path)


@pytest.mark.slow
def test_kill_classify(chain: Chain, tmp_path: Path) -> None:
    resume_after_kills(chain, "classify", [
        "classify.journal:2:after",  # the first batch done
        "teacher.jsonl:1:mid",
        "classify.journal:2:mid",
        "classified.jsonl:1:mid",
        "classify.stats.json:1:after",
    ], tmp_path)


@pytest.mark.slow
def test_kill_instances(chain: Chain, tmp_path: Path) -> None:
    resume_after_kills(chain, "instances", [
        "instances.journal:3:mid",
        "teacher.jsonl:1:before",
        "instances.rejected.jsonl:1:after",
        "manifest.json:1:mid",
    ], tmp_path)


@pytest.mark.slow
def test_kill_filter(chain: Chain, tmp_path: Path) -> None:
    resume_after_kills(chain, "filter", [
        "filtered.rejected.jsonl:1:mid",
        "funnel.json:1:after",  # two of the three outputs new, filtered.jsonl not yet written
        "filter.stats.json:1:mid",
    ], tmp_path)


@pytest.mark.slow
def test_kill_export(chain: Chain, tmp_path: Path) -> None:
    resume_after_kills(chain, "export", ["train.jsonl:1:after", "alpaca.json:1:mid", "manifest.json:1:mid"],
                       tmp_path)


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_kill_train_between_and_during_checkpoints(chain: Chain, tmp_path: Path) -> None:
    checkpoints = tmp_path / "runs" / RUN / "student" / "checkpoints"
    torn: list[bool] = []

    def during_checkpoint(step: int) -> Kill:
        """Kill as the trainer starts writing checkpoint-N (a partial folder, if the kill is quick
        enough); if it was not, strip the folder to what a kill after the weights leaves."""
        def kill(args: list[str], runs: Path) -> None:
            folder = checkpoints / f"checkpoint-{step}"
            sift_killed_when(args, runs=runs, appears=folder.exists)
            torn.append(not (folder / "trainer_state.json").exists())
            for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
                (folder / name).unlink(missing_ok=True)
        return kill

    def during_final_save(args: list[str], runs: Path) -> None:
        sift_killed_when(args, runs=runs, appears=lambda: any((checkpoints.parent).glob(".save-*")))

    d = resume_after_kills(chain, "train", [
        "metrics.jsonl:4:after",  # step 3 logged, its checkpoint not yet saved
        "metrics.jsonl:2:mid",  # a torn metrics line
        during_checkpoint(5),
        during_final_save,  # the adapter being moved into place
        "train_config.json:1:mid",  # trained and saved, settings and manifest not yet written
    ], tmp_path)
    summary = read_jsonl(d / "student" / "metrics.jsonl")[-1]
    assert summary["kind"] == "summary" and summary["step"] == TRAIN_STEPS
    print(f"checkpoint kill caught the folder partly written: {torn}")


# ---------------------------------------------------------------- the embedded model


@pytest.mark.slow
def test_kill_generate_on_the_embedded_teacher(chain: Chain, tmp_path: Path) -> None:
    """The default backend: rounds the model answered and the kill lost are answered again, identically."""
    from pipeline.io.models import embedded_dir

    if not embedded_dir().exists():
        pytest.fail("the embedded model is missing: run `sift model fetch` (make setup)")
    # two rounds of two requests (the budget ends the run, not generate.n)
    args = ["generate", "--run", RUN, "--generate.n", "50", "--generate.batch_size", "2",
            "--generate.max_requests", "4", "--generate.max_tokens", "24"]
    ref_runs, runs = tmp_path / "uninterrupted", tmp_path / "killed"
    for r in (ref_runs, runs):
        shutil.copytree(chain.after("seeds"), r / RUN)
    sift_ok(args, runs=ref_runs)
    for kill in ("teacher.jsonl:2:before", "teacher.jsonl:1:before"):  # round 2 lost, then lost again
        sift_killed(args, runs=runs, kill_at=kill)
    sift_ok(args, runs=runs)
    check_run(runs / RUN)
    same_artifacts(ref_runs / RUN, runs / RUN)


# ---------------------------------------------------------------- a misbehaving server, stage by stage


ALWAYS = "429"  # with a short Retry-After, so a request failing every attempt costs little waiting
SCHEDULES = [[], ["429", "500"], ["drop"], ["truncated"], ["schema"], ["reset", "slow"], ["short_body"], ["503"],
             ["500", "truncated", "drop"], []]


def misbehaving(key: str, attempt: int) -> str | None:
    """1 in 15 prompts fails every attempt; the others meet up to three faults before an answer."""
    h = _digest(key)
    if h % 15 == 0:
        return ALWAYS
    plan = SCHEDULES[h % len(SCHEDULES)]
    return plan[attempt] if attempt < len(plan) else None


@pytest.mark.slow
def test_openai_stages_through_a_misbehaving_server(tmp_path: Path) -> None:
    """`sift generate`, `classify` and `instances` with --teacher.backend openai against a server that
    answers 429 with Retry-After, 500/503, drops and resets connections, answers slowly, cuts its
    JSON short and sends the wrong schema: each stage completes, what failed past the last retry
    is in the ledger as teacher_error, no record is asked for or written twice, and the whole
    run stays within a bounded time."""
    runs = tmp_path / "runs"
    with FakeOpenAI(misbehaving, reply=scripted_reply, slow_seconds=0.3, retry_after="0.05") as server:
        sift_ok(stage_args("seeds"), runs=runs)
        seconds = {}
        for stage in ("generate", "classify", "instances"):
            t0 = time.monotonic()
            code, _, err = sift(stage_args(stage, url=server.url), runs=runs)
            seconds[stage] = time.monotonic() - t0
            assert code == 0, err
        d = runs / RUN
        check_run(d)
        always = {key for key in server.attempts if _digest(key) % 15 == 0}
        assert always, "no prompt met the always-failing schedule; the test proves nothing"
        for key, attempts in server.attempts.items():
            if key in always:
                assert attempts == 7 and server.successes[key] == 0  # the first try and 6 retries
                continue
            plan = SCHEDULES[_digest(key) % len(SCHEDULES)]
            answered = next((i for i, fault in enumerate(plan) if fault == "slow"), len(plan))  # slow is an answer
            assert attempts == answered + 1, f"{attempts} attempts for {plan}: {key[-80:]!r}"  # none after it
        ledgers = {name: [r for r in read_jsonl(d / name, allow_empty=True) if r["reason"] == "teacher_error"]
                   for name in ("instructions.rejected.jsonl", "classified.rejected.jsonl",
                                "instances.rejected.jsonl")}
        for name, errors in ledgers.items():
            for rec in errors:
                assert "HTTP 429" in rec["detail"] and "(7 attempt(s))" in rec["detail"], (name, rec["detail"])
        failed_prompts = sum(len(v) for v in ledgers.values())
        # generate: one failed request, one ledger row; classify: a failed record stops there;
        # instances: the classified records whose instance request failed
        assert failed_prompts == len(always), (failed_prompts, len(always))
        stats = {s: read_json(d / f"{s}.stats.json") for s in ("generate", "classify", "instances")}
        assert stats["generate"]["kept"] == 40
        classify_errors = stats["classify"]["rejected_by_reason"].get("teacher_error", 0)
        assert classify_errors == len(ledgers["classified.rejected.jsonl"])
        for s in ("classify", "instances"):
            assert stats[s]["read"] == stats[s]["kept"] + stats[s]["rejected"]
        assert sum(seconds.values()) < 120, seconds
        print(f"stage seconds: {json.dumps({k: round(v, 1) for k, v in seconds.items()})}; "
              f"{len(always)} prompts failed every attempt; {sum(server.attempts.values())} attempts for "
              f"{len(server.attempts)} prompts")


def test_classify_through_replies_slower_than_the_timeout(tmp_path: Path) -> None:
    """The timeout at stage level (the command line keeps the backend's 60 s, so the stage function
    runs here with a 0.3 s one): a reply slower than the timeout is retried and the retry's answer
    kept once; a prompt slow at every attempt ends in the ledger; the stage ends in bounded time."""
    from pipeline.settings import ClassifySettings
    from pipeline.stages.classify import classify_in
    from pipeline.teachers.cache import CachedTeacher
    from pipeline.teachers.openai_compat import OpenAITeacher

    records = [{"id": f"i{i}", "instruction": f"Classify the tone of message number {i} for a reader."}
               for i in range(16)]
    write_jsonl(tmp_path / "instructions.jsonl", records)

    def slow(key: str, attempt: int) -> str | None:
        h = _digest(key)
        return "slow" if h % 5 == 0 or (h % 3 == 0 and attempt == 0) else None

    with FakeOpenAI(slow, reply=scripted_reply, slow_seconds=1.0) as server:
        teacher = OpenAITeacher("scripted", base_url=server.url, timeout=0.3, max_retries=2, backoff_base=0.01)
        t0 = time.monotonic()
        stats = classify_in(tmp_path, CachedTeacher(teacher, tmp_path / "cache" / "teacher.jsonl"),
                            settings=ClassifySettings(batch_size=8))
        seconds = time.monotonic() - t0
        always = {k for k in server.attempts if _digest(k) % 5 == 0}
        once = {k for k in server.attempts if k not in always and _digest(k) % 3 == 0}
        assert always and once, "the digests gave no slow prompts; the test proves nothing"
        assert all(server.attempts[k] == 3 and server.successes[k] == 0 for k in always)
        assert all(server.attempts[k] == 2 and server.successes[k] == 1 for k in once)
    rejected = read_jsonl(tmp_path / "classified.rejected.jsonl", allow_empty=True)
    assert len(rejected) == len(always) == stats["rejected"]
    for r in rejected:
        assert r["reason"] == "teacher_error" and "no answer within 0.3s (3 attempt(s))" in r["detail"], r["detail"]
    assert len(read_jsonl(tmp_path / "classified.jsonl")) == 16 - len(always)
    assert seconds < 10, seconds  # two batches, each at most 3 attempts of 0.3 s plus backoff
