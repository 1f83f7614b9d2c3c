"""The generate stage: bootstrap control flow, ledger counts, the teacher cache, and resume after
SIGKILL (in a subprocess). A scripted teacher drives the control-flow tests; the real embedded
model runs in the slow end-to-end test of test_classify_instances.py."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal, read_json, read_jsonl, write_jsonl
from pipeline.settings import FilterSettings, GenerateSettings, SettingsError
from pipeline.stages.generate import generate_in, plan, request_seed
from pipeline.teachers.base import Completion, Request, Sampling
from pipeline.teachers.cache import CachedTeacher
from tests.conftest import REFERENCE_SEEDS

REPO = Path(__file__).resolve().parents[2]
VERBS = ["Write", "Explain", "Summarize", "Describe", "List", "Compare", "Translate", "Classify", "Rewrite",
         "Evaluate", "Suggest", "Outline"]
OBJECTS = ["a short poem", "the main idea", "three reasons", "a recipe", "the plot", "an email", "a headline",
           "the pros and cons", "a riddle", "a packing list", "the differences", "a slogan"]
TOPICS = ["rainy weather", "ancient Rome", "solar panels", "job interviews", "chess openings", "coral reefs",
          "tax returns", "jazz music", "city parks", "bread baking", "sleep habits", "electric cars",
          "volcanoes", "public speaking", "board games", "honey bees"]
AUDIENCES = ["children", "a busy manager", "new students", "my grandmother", "tourists", "engineers"]


class ScriptedTeacher:
    """Deterministic stand-in for a model, for control-flow tests only: the response depends on
    the request's prompt and seed alone. Some responses fail, some hit the length limit, some
    hold instructions the heuristics reject, and many are near-duplicates."""

    name = "scripted"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0

    def generate(self, requests: list[Request]) -> list[Completion]:
        out = []
        for r in requests:
            self.calls += 1
            time.sleep(self.delay)
            prompt = r.prompt if r.prompt is not None else r.messages[-1]["content"]
            out.append(self.respond(prompt, r.sampling))
        return out

    def respond(self, prompt: str, s: Sampling) -> Completion:
        rng = random.Random(f"{s.seed}|{prompt}")
        roll = rng.random()
        if "Is it classification?" in prompt:
            task = prompt.rsplit("Task: ", 1)[1]
            answer = " Yes" if task.startswith("Classify") else " No" if roll > 0.1 else " Perhaps"
            return Completion(answer, len(prompt) // 4, 2, "stop")
        if "Come up with examples for the following tasks" in prompt:
            return self._instances(rng, roll, prompt, output_first=False)
        if "Given the classification task definition" in prompt:
            return self._instances(rng, roll, prompt, output_first=True)
        if roll < 0.08:
            return Completion("", 0, 0, "error", error="scripted failure")
        lines = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.random()
            if kind < 0.08:
                lines.append(f"Draw a picture of {rng.choice(TOPICS)}.")
            elif kind < 0.14:
                lines.append("Do it.")
            else:
                lines.append(f"{rng.choice(VERBS)} {rng.choice(OBJECTS)} about {rng.choice(TOPICS)} "
                             f"for {rng.choice(AUDIENCES)}.")
        text = " " + "\n".join(f"{i}. {line}" if i > 9 else line for i, line in enumerate(lines, start=9))
        if roll > 0.9:
            text = text + "\n1"
            return Completion(text, len(prompt) // 4, s.max_tokens, "length")
        if roll > 0.86:
            text += "\n11."  # an empty numbered item: a parse problem
        return Completion(text, len(prompt) // 4, len(text) // 4, "stop")

    def _instances(self, rng: random.Random, roll: float, prompt: str, *, output_first: bool) -> Completion:
        if roll < 0.05:
            return Completion("", 0, 0, "error", error="scripted failure")
        if roll < 0.12:
            text = " None." if output_first else "\nExample 1\nInput: unfinished\nOutput:"
            return Completion(text, 10, 6, "stop")
        n = rng.randint(1, 4)
        if output_first:
            text = "\n".join(f"Class label: {lab}\nInput: case {i}" for i, lab in
                             enumerate(rng.sample(["Yes", "No", "Maybe", "Other"], n)))
        else:
            text = "\n".join(f"Example {i}\nInput: value {rng.randint(0, 99)}\nOutput: result {i}"
                             for i in range(1, n + 1))
        return Completion(text, len(prompt) // 4, len(text) // 4, "length" if roll > 0.95 else "stop")


def make_run(tmp_path: Path, name: str = "r", count: int = 30) -> Path:
    d = tmp_path / name
    d.mkdir(parents=True)
    write_jsonl(d / "seeds.jsonl", read_jsonl(REFERENCE_SEEDS)[:count])
    return d


def run_generate(d: Path, *, delay: float = 0.0, **kw: object) -> dict:
    teacher = CachedTeacher(ScriptedTeacher(delay), d / "cache" / "teacher.jsonl")
    settings = GenerateSettings(**{"n": 40, "batch_size": 4, **kw})  # type: ignore[arg-type]
    return generate_in(d, teacher, plan(settings, FilterSettings()))


def artifacts(d: Path) -> tuple[str, str]:
    return ((d / "instructions.jsonl").read_text(), (d / "instructions.rejected.jsonl").read_text())


# ---------------------------------------------------------------- the loop


def test_generate_records_provenance_and_counts_add_up(tmp_path: Path) -> None:
    d = make_run(tmp_path)
    stats = run_generate(d)
    accepted = read_jsonl(d / "instructions.jsonl")
    rejected = read_jsonl(d / "instructions.rejected.jsonl", allow_empty=True)
    assert len(accepted) == stats["accepted"] == 40
    assert stats["candidates"] == stats["accepted"] + stats["rejected"] == len(accepted) + len(rejected)
    assert sum(stats["rejected_by_reason"].values()) == len(rejected)
    assert {"rouge_duplicate", "truncated_response", "teacher_error"} <= set(stats["rejected_by_reason"])
    assert len({r["id"] for r in accepted}) == len(accepted)
    seed_ids = {s["id"] for s in read_jsonl(d / "seeds.jsonl")}
    for r in accepted:
        assert r["id"].startswith("ins_")
        p = r["provenance"]
        assert p["recipe"] == "self-instruct" and p["stage"] == "generate"
        assert p["prompt"]["name"] == "self_instruct_generate" and len(p["prompt"]["sha"]) == 16
        assert set(p["seed_ids"]) <= seed_ids and len(p["seed_ids"]) + len(p["machine_ids"]) == 8
        assert r["instruction"].rstrip(".") in p["raw_response"] or r["instruction"][1:] in p["raw_response"]
        assert p["request_seed"] == request_seed(0, p["request_index"])
        assert p["sampling"]["temperature"] == 0.7 and p["sampling"]["presence_penalty"] == 2.0
        assert p["teacher"]["name"] == "scripted" and p["finish_reason"] == "stop"
        assert 1 <= len(r["most_similar"]) <= 10
        assert r["max_similarity"] == r["most_similar"][0]["score"] <= 0.7
        assert r["nearest_id"] == r["most_similar"][0]["id"]
        assert 0 <= r["avg_similarity_score"] <= r["max_similarity"]
    later = [r for r in accepted if r["provenance"]["machine_ids"]]
    assert later, "machine examples must enter the prompts once the pool has some"
    for r in rejected:
        assert r["reason"] and "provenance" in r
        assert r["id"].startswith("ins_" if r["reason"] == "over_quota" else "rej_")
        if r["reason"] == "rouge_duplicate":
            assert r["score"] > 0.7 and r["nearest_id"] and r["nearest_text"]
        if r["reason"] == "truncated_response":
            assert r["raw"] == r["provenance"]["raw_response"] and r["provenance"]["finish_reason"] == "length"
    assert read_json(d / "manifest.json")["stages"]["generate"]["stats"]["kept"] == 40


def test_each_accepted_instruction_is_new_against_everything_before_it(tmp_path: Path) -> None:
    from filters.rouge import rouge_l

    d = make_run(tmp_path, count=10)
    run_generate(d, n=25)
    pool = [s["instruction"] for s in read_jsonl(d / "seeds.jsonl")]
    for r in read_jsonl(d / "instructions.jsonl"):
        assert max(rouge_l(r["instruction"], p) for p in pool) <= 0.7
        pool.append(r["instruction"])


def test_the_request_budget_stops_the_loop(tmp_path: Path) -> None:
    d = make_run(tmp_path)
    stats = run_generate(d, n=1000, max_requests=30)
    # the budget counts answered requests: the teacher's failures come on top
    assert stats["teacher_errors"] > 0 and stats["requests"] == 30 + stats["teacher_errors"]
    assert stats["rejected_by_reason"]["teacher_error"] == stats["teacher_errors"]
    assert stats["reached_target"] is False and stats["teacher_failed"] is None
    assert stats["accepted"] == len(read_jsonl(d / "instructions.jsonl"))


def test_raising_n_extends_the_run_exactly(tmp_path: Path) -> None:
    small, big = make_run(tmp_path, "small"), make_run(tmp_path, "big")
    run_generate(small, n=13)
    over = [r for r in read_jsonl(small / "instructions.rejected.jsonl") if r["reason"] == "over_quota"]
    rounds_before = len(Journal(small / "generate.journal").read())
    stats = run_generate(small, n=40)
    run_generate(big, n=40)
    assert artifacts(small) == artifacts(big)
    assert stats["cache_hits"] == 0  # the journal, not the cache, carried the finished rounds
    entries = Journal(small / "generate.journal").read()[:rounds_before]
    journaled = sum(len(e.get("accepted", [])) for e in entries)
    assert len(over) == journaled - 13  # a round's surplus beyond n went to the ledger as over_quota


def test_changed_settings_refuse_to_resume(tmp_path: Path) -> None:
    d = make_run(tmp_path)
    run_generate(d, n=5)
    with pytest.raises(SiftError, match="changed: seed"):
        run_generate(d, n=5, seed=1)


def test_bad_settings_name_their_field() -> None:
    with pytest.raises(SettingsError, match="at least 1") as e:
        GenerateSettings(n=0)
    assert e.value.field == "n"
    with pytest.raises(SettingsError, match=r"\[0, 1\]") as e:
        FilterSettings(threshold=1.5)
    assert e.value.field == "threshold"


def test_the_plan_takes_the_recipes_sampling_unless_overridden() -> None:
    assert plan(GenerateSettings(), FilterSettings()).sampling.temperature == 0.7  # type: ignore[union-attr]
    alpaca = plan(GenerateSettings(recipe="alpaca", top_p=0.9), FilterSettings(rules="rouge", threshold=0.5))
    assert (alpaca.sampling.temperature, alpaca.sampling.top_p, alpaca.sampling.max_tokens) == (1.0, 0.9, 3072)  # type: ignore[union-attr]
    assert (alpaca.rules, alpaca.threshold) == ("rouge", 0.5)


def test_alpaca_recipe_keeps_input_and_output(tmp_path: Path) -> None:
    class AlpacaScript(ScriptedTeacher):
        def respond(self, prompt: str, s: Sampling) -> Completion:
            rng = random.Random(f"{s.seed}|{prompt}")
            chunks = []
            for i in range(4, 4 + rng.randint(1, 5)):
                inp = rng.choice(["<noinput>", f"{rng.choice(TOPICS)} and {rng.choice(TOPICS)}"])
                chunks.append(f"{i}. Instruction: {rng.choice(VERBS)} {rng.choice(OBJECTS)} about "
                              f"{rng.choice(TOPICS)} for {rng.choice(AUDIENCES)}.\n{i}. Input:\n{inp}\n"
                              f"{i}. Output:\nAnswer {rng.randint(0, 999)}")
            text = "\n###\n".join(chunks)[len("4. Instruction:"):]
            return Completion(text, 100, 50, "length" if rng.random() < 0.3 else "stop")

    d = make_run(tmp_path)
    teacher = CachedTeacher(AlpacaScript(), d / "cache" / "teacher.jsonl")
    stats = generate_in(d, teacher, plan(GenerateSettings(recipe="alpaca", n=20, batch_size=5), FilterSettings()))
    accepted = read_jsonl(d / "instructions.jsonl")
    assert len(accepted) == 20 and stats["rejected_by_reason"].get("truncated_response", 0) > 0
    assert all(set(r) >= {"instruction", "input", "output"} for r in accepted)
    assert any(r["input"] == "" for r in accepted) and not any("<noinput>" in r["input"] for r in accepted)
    assert all(len(r["provenance"]["seed_ids"]) == 3 and not r["provenance"]["machine_ids"] for r in accepted)
    assert accepted[0]["provenance"]["sampling"]["temperature"] == 1.0


# ---------------------------------------------------------------- the cache


def test_cache_calls_the_teacher_only_for_misses_and_never_caches_errors(tmp_path: Path) -> None:
    class Counting(ScriptedTeacher):
        def respond(self, prompt: str, s: Sampling) -> Completion:
            if "fail" in prompt:
                return Completion("", 0, 0, "error", error="x")
            return Completion(prompt.upper(), 1, 1, "stop")

    inner = Counting()
    path = tmp_path / "cache" / "teacher.jsonl"
    reqs = [Request(prompt=p, sampling=Sampling(seed=i)) for i, p in enumerate(["a", "b", "fail"])]
    first = CachedTeacher(inner, path).generate(reqs)
    assert [c.text for c in first] == ["A", "B", ""] and inner.calls == 3
    again = CachedTeacher(inner, path)
    second = again.generate(reqs + [Request(prompt="a", sampling=Sampling(seed=0))])
    assert [c.text for c in second] == ["A", "B", "", "A"]
    assert (again.hits, again.misses, inner.calls) == (3, 1, 4)  # only the failed request again
    other_seed = again.generate([Request(prompt="a", sampling=Sampling(seed=99))])
    assert other_seed[0].text == "A" and inner.calls == 5  # the seed is part of the key
    with open(path, "a") as f:
        f.write('{"key": "torn')  # a kill mid-append
    assert len(CachedTeacher(inner, path)) == 3


# ---------------------------------------------------------------- resume after SIGKILL


CHILD = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from tests.pipeline.test_generate import run_generate
run_generate(Path({d!r}), delay={delay}, n={n})
"""


def run_child(d: Path, *, n: int, delay: float, kill_after_rounds: float | None = None) -> int:
    """Run generate in a child; with `kill_after_rounds`, SIGKILL it a random moment after the
    journal gains a round (so every kill lands mid-work, never before the first round)."""
    code = CHILD.format(repo=str(REPO), d=str(d), delay=delay, n=n)
    env = {**os.environ, "SIFT_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if kill_after_rounds is None:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        return 0
    before = journal_rounds(d)
    deadline = time.monotonic() + 60
    while journal_rounds(d) <= before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(kill_after_rounds)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode


def journal_rounds(d: Path) -> int:
    path = d / "generate.journal"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip().startswith('{"kind": "round"'))


def test_killed_runs_resume_to_the_same_records(tmp_path: Path) -> None:
    reference = make_run(tmp_path, "reference")
    run_generate(reference, n=40)
    d = make_run(tmp_path, "killed")
    rng = random.Random(7)
    kills = 0
    while kills < 3 and not (d / "instructions.jsonl").exists():
        before = journal_rounds(d)
        code = run_child(d, n=40, delay=0.05, kill_after_rounds=rng.uniform(0.0, 0.3))
        kills += code == -signal.SIGKILL
        assert journal_rounds(d) >= before
    assert kills >= 2, "the child finished before it could be killed twice; slow the scripted teacher"
    run_child(d, n=40, delay=0.0)
    assert artifacts(d) == artifacts(reference)
    ids = [r["id"] for r in read_jsonl(d / "instructions.jsonl")]
    assert len(ids) == len(set(ids)) == 40
    stats = json.loads((d / "generate.stats.json").read_text())
    assert stats["requests"] == json.loads((reference / "generate.stats.json").read_text())["requests"]


def test_command_errors_come_before_the_model_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stages.generate import generate

    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path))
    with pytest.raises(SiftError, match="run `sift seeds` first"):
        generate(run="empty")
    make_run(tmp_path, "ok")
    with pytest.raises(SiftError, match="unknown recipe 'evol'"):
        generate(run="ok", generate=GenerateSettings(recipe="evol"))  # type: ignore[arg-type]
    bad = tmp_path / "bad.txt"
    bad.write_text("{examples}\n{nxt}.", encoding="utf-8")
    with pytest.raises(SiftError, match=r"bad\.txt: prompt template uses \{nxt\}"):
        generate(run="ok", generate=GenerateSettings(prompt=str(bad)))
    bad.write_text("Tasks:\n{next}.", encoding="utf-8")
    with pytest.raises(SiftError, match=r"must use \{examples\}"):
        generate(run="ok", generate=GenerateSettings(prompt=str(bad)))
    with pytest.raises(SiftError, match="unknown rule|valid"):
        generate(run="ok", filter=FilterSettings(rules="no_such_rule"))


def test_a_teacher_outage_mid_run_exits_3_and_the_rerun_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """A loopback teacher that answers two rounds, then fails every request (an outage): the
    command keeps what it accepted, says so, exits 3; the same command once the server is back asks
    the failed round again and ends with the artifacts of a run that never saw the outage."""
    from pipeline.cli import main
    from tests.pipeline.kill_harness import scripted_reply
    from tests.pipeline.openai_server import FakeOpenAI

    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SIFT_PROGRESS", "0")
    outage = {"after": None}  # fail every request once the server has seen this many

    def faults(key: str, attempt: int) -> str | None:
        return "500" if outage["after"] is not None and len(server.bodies) > outage["after"] else None

    with FakeOpenAI(faults, reply=scripted_reply) as server:
        def generate(run: str) -> int:
            return main(["generate", "--run", run, "--teacher.backend", "openai", "--teacher.base_url", server.url,
                         "--teacher.model", "m", "--generate.n", "20", "--generate.batch_size", "4",
                         "--generate.max_requests", "24", "--teacher.options", "max_retries=0"])

        for run in ("ref", "r"):
            assert main(["seeds", str(REPO / "seeds" / "default.jsonl"), "--run", run]) == 0
        assert generate("ref") == 0
        outage["after"] = len(server.bodies) + 8
        capsys.readouterr()
        assert generate("r") == 3
        err = capsys.readouterr().err
        d = tmp_path / "runs" / "r"
        stats = read_json(d / "generate.stats.json")
        assert "the teacher failed every request of a round" in err and "Run the same command again" in err
        assert stats["reached_target"] is False and "500" in stats["teacher_failed"]
        assert stats["requests"] == 8 and stats["teacher_errors"] == 0  # the failed round was not journaled
        kept = read_jsonl(d / "instructions.jsonl")
        assert 0 < len(kept) == stats["kept"] < 20
        assert generate("r") == 3  # still down: nothing changes, nothing is used up
        assert read_json(d / "generate.stats.json")["requests"] == 8
        outage["after"] = None
        assert generate("r") == 0
    ref = tmp_path / "runs" / "ref"
    assert artifacts(d) == artifacts(ref)
    assert read_json(d / "generate.stats.json")["requests"] == read_json(ref / "generate.stats.json")["requests"]
