"""`sift refine`: the selection table, the reply parser, the stage end to end on a loopback teacher
and a tiny student, rounds, kill and resume, bad input refused before any work.

    .venv/bin/python -m pytest tests/pipeline/test_refine_stage.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal, read_json, read_jsonl, write_jsonl
from pipeline.settings import FilterSettings, RefineSettings, SettingsError, StudentSettings, TeacherSettings
from pipeline.stages.refine import SELECT_RULES, decide, refine
from pipeline.teachers.parsers import parse_reflection
from tests.pipeline.kill_harness import sift, sift_killed, untimed
from tests.pipeline.openai_server import FakeOpenAI
from tests.train.conftest import save_tiny

TASKS = ["give three tips for staying healthy", "what is the capital of france", "name a primary color",
         "translate hello to spanish", "summarize the text below"]
ANSWERS = ["the capital of france is paris", "hola", "red is a primary color",
           "eat vegetables sleep well and walk every day", "a short story about a cat and a dog"]


def dataset(n: int) -> list[dict]:
    return [{"id": f"ex_{i}", "instruction": f"{TASKS[i % 5]} number {i}", "input": "",
             "output": f"{ANSWERS[(i * 3) % 5]} {i}"} for i in range(n)]


def scripted(body: dict) -> tuple[str, str]:
    """A teacher that critiques and rewrites, from the request alone (its reply continues the prompt's
    "[Critique]"): every few records a reply it cannot parse, an unchanged answer, or a rewrite the
    filters drop (a duplicate instruction, a restated one)."""
    prompt = body["prompt"]
    last = prompt.rsplit("[Instruction]\n", 1)[1]  # after the prompt's worked example
    instruction = last.split("\n\n[Input]", 1)[0]
    n = int(re.findall(r"\d+", instruction)[0])
    answer = last.split("[Answer]\n", 1)[1].split("\n\n[Critique]", 1)[0]
    if "[New Instruction]" in prompt:
        if n % 6 == 5:
            return " I am not sure what you mean.", "stop"  # no sections: no_rewrite
        if n % 6 == 4:  # the instruction of another task: a ROUGE-L duplicate
            return (f" Vague.\n[New Instruction] {TASKS[(n + 1) % 5]} number {n + 1}\n"
                    f"[New Input] <noinput>\n[New Answer] {ANSWERS[n % 5]}\n"), "stop"
        return (f" Too easy.\n[New Instruction] {TASKS[n % 5]} in detail for case {n}\n"
                f"[New Input] <noinput>\n[New Answer] {ANSWERS[(n + 2) % 5]} and {ANSWERS[(n + 4) % 5]} {n}\n"), "stop"
    if n % 7 == 3:
        return f" fine as it is.\n**Improved Answer:** {answer}", "stop"  # unchanged
    if n % 7 == 6:
        return f" Short.\n[Better Answer] {instruction}\n", "stop"  # restates the instruction
    return f" Too short.\n[Better Answer] {answer} so {ANSWERS[(n + 1) % 5]}\n\n[Instruction]\nmore", "stop"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("refine") / "tiny")


def student_on(model: Path) -> StudentSettings:
    return StudentSettings(model=str(model), device="cpu", dtype="float32")


def teacher_at(url: str) -> TeacherSettings:
    return TeacherSettings(model="scripted", backend="openai", base_url=url, options="max_retries=0")


def make_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int = 12, name: str = "scored.jsonl") -> Path:
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    d = tmp_path / "runs" / "r"
    d.mkdir(parents=True)
    write_jsonl(d / name, dataset(n))
    return d


# ---------------------------------------------------------------- the selection rule


@pytest.mark.parametrize(("rule", "target", "original", "rewrite", "expected"), [
    # the paper's rule: instructions by higher IFD, responses by lower r-IFD; a tie keeps the original
    ("student", "instruction", {"ifd": 0.6}, {"ifd": 0.8}, (True, "higher_ifd")),
    ("student", "instruction", {"ifd": 0.8}, {"ifd": 0.6}, (False, "ifd_not_higher")),
    ("student", "instruction", {"ifd": 0.7}, {"ifd": 0.7}, (False, "ifd_not_higher")),
    ("student", "response", {"rifd": 0.9, "ifd": 0.1}, {"rifd": 0.7, "ifd": 0.9}, (True, "lower_rifd")),
    ("student", "response", {"rifd": 0.7}, {"rifd": 0.9}, (False, "rifd_not_lower")),
    ("student", "response", {"rifd": None}, {"rifd": 0.5}, (False, "no_rifd")),
    ("teacher", "instruction", {"ifd": 0.9}, {"ifd": 0.1}, (True, "teacher_rule")),
    ("teacher", "response", {}, {}, (True, "teacher_rule")),
    ("judge", "response", {"judge": 3.0}, {"judge": 4.5}, (True, "higher_judge")),
    ("judge", "instruction", {"judge": 4.0}, {"judge": 4.0}, (False, "judge_not_higher")),
    ("judge", "response", {"rifd": 0.1}, {"rifd": 0.01}, (False, "no_judge")),
    ("student+judge", "response", {"rifd": 0.9, "judge": 4}, {"rifd": 0.5, "judge": 4},
     (True, "lower_rifd_and_judge_not_lower")),
    ("student+judge", "response", {"rifd": 0.9, "judge": 4}, {"rifd": 0.5, "judge": 3}, (False, "judge_lower")),
    ("original", "response", {"rifd": 0.9}, {"rifd": 0.1}, (False, "original_rule")),
])
def test_the_selection_rule_table(rule, target, original, rewrite, expected) -> None:
    assert decide(rule, target, original, rewrite) == expected


def test_every_select_choice_has_a_rule_for_both_targets() -> None:
    import typing

    choices = typing.get_args(typing.get_type_hints(RefineSettings)["select"])
    assert set(choices) == set(SELECT_RULES)
    assert all(set(v) == {"instruction", "response"} for v in SELECT_RULES.values())
    with pytest.raises(SettingsError) as e:
        RefineSettings(select="newest")
    assert e.value.field == "select"


# ---------------------------------------------------------------- the reply parser


@pytest.mark.parametrize(("text", "target", "truncated", "expected"), [
    ("[Critique] Vague.\n[Better Answer] Paris.\n[End] trailing chatter", "response", False,
     {"critique": "Vague.", "output": "Paris."}),
    ("**Feedback:** meh\n**Improved Answer:** 1. a\n2. b", "response", False,
     {"critique": "meh", "output": "1. a\n2. b"}),
    ("Critique: x\nNew Instruction: List 3 fruits.\nNew Input: <noinput>\nNew Answer: apple, pear\n[End]",
     "instruction", False, {"critique": "x", "instruction": "List 3 fruits.", "input": "", "output": "apple, pear"}),
    ("[Better Answer] no critique, still used", "response", False,
     {"critique": "", "output": "no critique, still used"}),
    # the model goes on to a next example of the prompt: its own [Instruction] closes the answer
    ("[Critique] ok.\n[Better Answer] Paris.\n\n[Instruction]\nWhat is x?\n\n[Answer]\ny", "response", False,
     {"critique": "ok.", "output": "Paris."}),
    ("[Critique] Long.\n[New Input]\n12\n\n[New Answer] 2\n\n[New Instruction] Count.\n\n[Input]\n12", "instruction",
     False, {"critique": "Long.", "instruction": "Count.", "input": "12", "output": "2"}),
    # a second answer under another name is not part of the first
    ("[Critique] c.\n[New Instruction] Root of 20?\n[New Answer] 4.47\n\n[New Output] 4.47", "instruction", False,
     {"critique": "c.", "instruction": "Root of 20?", "input": "", "output": "4.47"}),
])
def test_reflection_replies_are_read_in_the_forms_small_models_write(text, target, truncated, expected) -> None:
    parsed = parse_reflection(text, target=target, truncated=truncated)
    assert parsed.items == [expected] and not parsed.problems


@pytest.mark.parametrize(("text", "target", "truncated", "reason"), [
    ("", "response", False, "empty_response"),
    ("Sure! Here is a better answer: Paris.", "response", False, "no_rewrite"),
    ("[Critique] your critique\n[Better Answer] your answer\n[End]", "response", False, "no_rewrite"),
    ("[Critique] ok\n[New Answer] an answer but no instruction", "instruction", False, "no_rewrite"),
    ("[Critique] ok\n[Better Answer] cut in the mid", "response", True, "truncated"),
    (None, "response", False, "empty_response"),
])
def test_a_reply_that_cannot_be_read_is_a_problem_never_an_exception(text, target, truncated, reason) -> None:
    parsed = parse_reflection(text, target=target, truncated=truncated)
    assert not parsed.items and parsed.problems[0].reason == reason


def test_the_reply_continues_the_label_the_prompt_ends_with() -> None:
    from pipeline.teachers.parsers import reflection_lead
    from pipeline.teachers.prompts import load

    for name in ("refine_response", "refine_instruction"):
        assert reflection_lead(load(name).body) == "[Critique]"
    assert reflection_lead("[Critique] done.\nNo label at the end") == ""


# ---------------------------------------------------------------- the stage


def check_decisions(records: list[dict], ledger: list[dict], select: str) -> int:
    """Every record carries its refinement; each step's decision follows the rule from its own scores;
    the ledger holds exactly the steps not kept. Returns the number of steps."""
    steps = 0
    ledger_ids = {e["id"] for e in ledger}
    for rec in records:
        ref = rec["refinement"]
        assert set(ref) >= {"original", "changed", "decision", "reason", "steps"}
        assert ref["changed"] == any(rec[k] != ref["original"][k] for k in ("instruction", "input", "output"))
        for step in ref["steps"]:
            steps += 1
            if "scores" in step:
                keep, reason = decide(select, step["target"], step["scores"]["original"], step["scores"]["rewrite"])
                assert (step["decision"] == "rewrite", step["reason"]) == (keep, reason)
            else:
                assert step["decision"] == "original"
            in_ledger = f"{rec['id']}/r{step['round']}/{step['target']}" in ledger_ids
            assert in_ledger == (step["decision"] == "original")
    assert len(ledger) == sum(1 for r in records for s in r["refinement"]["steps"] if s["decision"] == "original")
    return steps


def test_the_stage_refines_and_records_every_decision(tmp_path: Path, tiny: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_run(tmp_path, monkeypatch, n=14)
    source = dataset(14)
    with FakeOpenAI(reply=scripted) as server:
        refine(run="r", student=student_on(tiny), teacher=teacher_at(server.url),
               refine=RefineSettings(batch_size=4))
        asked = dict(server.successes)
        records = read_jsonl(d / "refined.jsonl")
        ledger = read_jsonl(d / "refined.rejected.jsonl", allow_empty=True)
        assert [r["id"] for r in records] == [r["id"] for r in source]
        for rec, orig in zip(records, source, strict=True):
            assert rec["refinement"]["original"] == {k: orig[k] for k in ("instruction", "input", "output")}
            assert [s["target"] for s in rec["refinement"]["steps"]] == ["instruction", "response"]
        steps = check_decisions(records, ledger, "student")
        assert sum(asked.values()) == steps  # one request per step: none without its step, none twice
        reasons = {e["reason"] for e in ledger}
        # the scripted teacher's failures each land with their reason, and the original stays
        assert {"no_rewrite", "rouge_duplicate"} <= reasons
        assert reasons & {"unchanged", "restates_instruction"}
        stats = read_json(d / "refine.stats.json")
        assert (stats["stage"], stats["unit"], stats["read"], stats["kept"], stats["rejected"]) == (
            "refine", "examples", 14, 14, 0)  # no record is dropped: rewrites are
        assert stats["rewrites"]["rejected"] == len(ledger) == sum(stats["rewrites"]["rejected_by_reason"].values())
        assert stats["rewrites"]["proposed"] == steps == stats["rewrites"]["kept"] + len(ledger)
        assert stats["refined"] == sum(r["refinement"]["changed"] for r in records)
        assert stats["rounds"][0]["records"] == 14 and stats["source"] == "scored.jsonl"
        settings = read_json(d / "manifest.json")["stages"]["refine"]["settings"]
        assert settings["refine"]["select"] == "student" and settings["filter"]["threshold"] == 0.7

        # the teacher rule keeps every rewrite that passes the filters: as many as the student's rule, or more
        (d / "refine.journal").unlink()  # other settings: the journal of the student's rule does not apply
        refine(run="r", student=student_on(tiny), teacher=teacher_at(server.url),
               refine=RefineSettings(batch_size=4, select="teacher"))
        again = {k: v - asked.get(k, 0) for k, v in server.successes.items() if v > asked.get(k, 0)}
        # the instruction pass is the same request as before: from the teacher cache, never asked twice
        assert again and not any("[New Instruction]" in k for k in again)
        assert all(b["stop"] == ["[End]", "\n[Instruction]"] for b in server.bodies)
    teacher_kept = read_jsonl(d / "refined.jsonl")
    check_decisions(teacher_kept, read_jsonl(d / "refined.rejected.jsonl", allow_empty=True), "teacher")
    assert sum(r["refinement"]["changed"] for r in teacher_kept) >= stats["refined"]
    assert not {s["reason"] for r in teacher_kept for s in r["refinement"]["steps"]} & {
        "ifd_not_higher", "rifd_not_lower"}


def judged(body: dict) -> tuple[str, str]:
    """The scripted teacher, and as judge: 5 for an answer with "so" in it (the rewrites), else 3."""
    if "messages" in body:  # the judge's prompt is a chat prompt
        content = body["messages"][-1]["content"]
        return ("5" if " so " in content.split("### Answer", 1)[1] else "3"), "stop"
    return scripted(body)


def test_the_judge_rule_rates_both_versions_with_the_teacher(tmp_path: Path, tiny: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_run(tmp_path, monkeypatch, n=8)
    with FakeOpenAI(reply=judged) as server:
        refine(run="r", student=student_on(tiny), teacher=teacher_at(server.url),
               refine=RefineSettings(batch_size=4, target="response", select="judge"))
    records = read_jsonl(d / "refined.jsonl")
    check_decisions(records, read_jsonl(d / "refined.rejected.jsonl", allow_empty=True), "judge")
    decided = [s for r in records for s in r["refinement"]["steps"] if "scores" in s]
    assert all(s["scores"]["original"]["judge"] == 3 for s in decided)
    assert all(s["scores"]["rewrite"]["judge"] == (5 if " so " in s["rewrite"]["output"] else 3) for s in decided)
    assert {s["reason"] for s in decided} == {"higher_judge"}
    # the rewrites that restate their instruction never reach the judge: the filters drop them first
    assert "restates_instruction" in {s["reason"] for r in records for s in r["refinement"]["steps"]}
    assert all(s["scores"]["rewrite"]["rifd"] is not None for s in decided)  # the student's scores are kept too


def test_a_pool_of_teachers_shares_the_rewrites(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_run(tmp_path, monkeypatch, n=8)
    with FakeOpenAI(reply=scripted) as a, FakeOpenAI(reply=scripted) as b:
        spec = tmp_path / "teachers.yaml"
        spec.write_text("teachers:\n" + "".join(
            f"  - name: {name}\n    model: scripted\n    backend: openai\n    base_url: {url}\n"
            f"    options: {{max_retries: 0}}\n" for name, url in (("alpha", a.url), ("beta", b.url))))
        refine(run="r", student=student_on(tiny), teacher=TeacherSettings(pool=str(spec)),
               refine=RefineSettings(batch_size=4, target="response", select="teacher"))
        assert a.bodies and b.bodies and len(a.bodies) + len(b.bodies) == 8
    steps = [s for r in read_jsonl(d / "refined.jsonl") for s in r["refinement"]["steps"]]
    assert {s["teacher"]["name"] for s in steps} == {"alpha", "beta"}
    assert [t["name"] for t in read_json(d / "manifest.json")["stages"]["refine"]["settings"]["teachers"]] == [
        "alpha", "beta"]


def test_rounds_refine_again_only_what_the_last_round_refined(tmp_path: Path, tiny: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_run(tmp_path, monkeypatch, n=10, name="filtered.jsonl")
    with FakeOpenAI(reply=scripted) as server:
        teacher = teacher_at(server.url)
        refine(run="r", student=student_on(tiny), teacher=teacher,
               refine=RefineSettings(batch_size=4, target="response", select="teacher"))
        one = {r["id"]: r for r in read_jsonl(d / "refined.jsonl")}
        asked = sum(server.successes.values())
        refine(run="r", student=student_on(tiny), teacher=teacher,
               refine=RefineSettings(batch_size=4, target="response", select="teacher", rounds=2))
        second_round_requests = sum(server.successes.values()) - asked
    two = read_jsonl(d / "refined.jsonl")
    refined_first = {i for i, r in one.items() if r["refinement"]["changed"]}
    assert refined_first and len(refined_first) < len(one)
    again = {r["id"] for r in two if any(s["round"] == 2 for s in r["refinement"]["steps"])}
    assert again == refined_first
    assert second_round_requests == len(refined_first)  # round 1 came from the journal
    for rec in two:
        assert [s["round"] for s in rec["refinement"]["steps"]] == [1, 2][:1 + (rec["id"] in refined_first)]
        assert rec["refinement"]["original"]["output"] == one[rec["id"]]["refinement"]["original"]["output"]
    stats = read_json(d / "refine.stats.json")
    assert [r["records"] for r in stats["rounds"]] == [10, len(refined_first)] and stats["source"] == "filtered.jsonl"


def test_kill_and_resume_loses_and_repeats_nothing(tmp_path: Path, tiny: Path) -> None:
    args = ["refine", "--run", "r", "--student.model", str(tiny), "--student.device", "cpu",
            "--student.dtype", "float32", "--teacher.backend", "openai", "--teacher.model", "scripted",
            "--refine.batch_size", "3"]
    results = {}
    for name in ("ref", "killed"):
        runs = tmp_path / name
        (runs / "r").mkdir(parents=True)
        write_jsonl(runs / "r" / "scored.jsonl", dataset(10))
        with FakeOpenAI(reply=scripted) as server:
            full = [*args, "--teacher.base_url", server.url]
            if name == "killed":
                sift_killed(full, runs=runs, kill_at="refine.journal:3:mid")  # the header, batch 1, mid batch 2
                assert not (runs / "r" / "refined.jsonl").exists()
                sift_killed(full, runs=runs, kill_at="refine.journal:2:after")  # after batch 3, as resumed
            code, _, err = sift(full, runs=runs)
            assert code == 0, err
            results[name] = (runs / "r", dict(server.successes))
    (ref, ref_asked), (got, got_asked) = results["ref"], results["killed"]
    assert got_asked == ref_asked and set(got_asked.values()) == {1}  # each request answered once, none lost
    for name in ("refined.jsonl", "refined.rejected.jsonl"):
        assert (got / name).read_bytes() == (ref / name).read_bytes()
    assert untimed(read_json(got / "refine.stats.json")) | {"cache_hits": 0} == \
        untimed(read_json(ref / "refine.stats.json")) | {"cache_hits": 0}
    keys = [rec["id"] for e in Journal(got / "refine.journal").read()[1:] for rec in e["kept"] + e["rejected"]]
    assert len(keys) == len(set(keys)) == 10  # every record's work journaled once


# ---------------------------------------------------------------- bad input, refused before any work


def test_bad_input_is_refused_before_any_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    d = tmp_path / "runs" / "r"
    d.mkdir(parents=True)
    student = StudentSettings(model=str(tmp_path / "no-such-model"), device="cpu")
    with FakeOpenAI(reply=scripted) as server:
        teacher = teacher_at(server.url)
        with pytest.raises(SiftError, match="run `sift filter`") as e:
            refine(run="r", student=student, teacher=teacher)
        assert e.value.path.name == "filtered.jsonl"
        (d / "scored.jsonl").write_text(json.dumps(dataset(1)[0]) + "\n" + json.dumps({"id": "b", "instruction": "x",
                                                                                        "output": 3}) + "\n")
        with pytest.raises(SiftError) as e:
            refine(run="r", student=student, teacher=teacher)
        assert (e.value.path.name, e.value.line, e.value.field) == ("scored.jsonl", 2, "output")
        write_jsonl(d / "scored.jsonl", dataset(3))
        with pytest.raises(SiftError, match="unknown rule 'too_shrot'") as e:
            refine(run="r", student=student, teacher=teacher, filter=FilterSettings(rules="too_shrot"))
        assert e.value.field == "filter.rules"
        own = tmp_path / "mine.txt"
        own.write_text("Improve {instruction} given {answer}\n")
        with pytest.raises(SiftError, match=r"\{answer\}") as e:
            refine(run="r", student=student, teacher=teacher, refine=RefineSettings(prompt_response=str(own)))
        assert e.value.path == own
        write_jsonl(d / "filtered.jsonl", dataset(3))  # newer than scored.jsonl: scored is stale
        with pytest.raises(SiftError, match="older than filtered.jsonl"):
            refine(run="r", student=student, teacher=teacher)
        assert server.bodies == []
    assert not (d / "refined.jsonl").exists() and not (d / "refine.journal").exists()
    code, _, err = sift(["refine", "--run", "r", "--refine.select", "newest"], runs=tmp_path / "runs")
    assert code != 0 and "refine.select" in err


def test_export_reads_refined_then_scored_then_filtered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from pipeline.stages.export import export

    d = make_run(tmp_path, monkeypatch, n=4, name="filtered.jsonl")
    rows = {name: [{**r, "output": f"{name} {r['output']}"} for r in dataset(4)]
            for name in ("filtered", "scored", "refined")}
    for age, name in enumerate(("filtered", "scored", "refined")):  # each one newer than the one it was made from
        write_jsonl(d / f"{name}.jsonl", rows[name])
        os.utime(d / f"{name}.jsonl", ns=(10**18 + age * 10**9,) * 2)

    def exported() -> set[str]:
        export(run="r")
        return {json.loads(line)["messages"][1]["content"].split()[0]
                for line in (d / "train.jsonl").read_text().splitlines()}

    assert exported() == {"refined"}
    os.utime(d / "scored.jsonl", ns=(10**18 + 5 * 10**9,) * 2)  # score ran again after refine: refined is stale
    with pytest.raises(SiftError, match="older than scored.jsonl: rerun `sift refine`") as e:
        export(run="r")
    assert e.value.path.name == "refined.jsonl"
    (d / "refined.jsonl").unlink()
    assert exported() == {"scored"}
    (d / "scored.jsonl").unlink()
    assert exported() == {"filtered"}
