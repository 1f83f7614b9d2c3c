"""The classify and instances stages: control flow with a scripted teacher, resume after SIGKILL,
and (slow) the whole generate -> classify -> instances chain on the embedded model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.artifacts import read_json, read_jsonl, write_jsonl
from pipeline.settings import ClassifySettings, GenerateSettings, InstancesSettings
from pipeline.stages.classify import classify_in
from pipeline.stages.instances import instances_in, read_classified
from pipeline.teachers.base import Completion, Request
from pipeline.teachers.cache import CachedTeacher
from tests.pipeline.test_generate import REPO, ScriptedTeacher, make_run, run_generate


def generated_run(tmp_path: Path, name: str = "r", n: int = 40) -> Path:
    d = make_run(tmp_path, name)
    run_generate(d, n=n)
    return d


def cached(d: Path, delay: float = 0.0) -> CachedTeacher:
    return CachedTeacher(ScriptedTeacher(delay), d / "cache" / "teacher.jsonl")


def test_classify_marks_every_record_and_keeps_the_raw_answer(tmp_path: Path) -> None:
    d = generated_run(tmp_path)
    stats = classify_in(d, cached(d), settings=ClassifySettings(batch_size=7))
    source = read_jsonl(d / "instructions.jsonl")
    out = read_jsonl(d / "classified.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in source]  # input order, nothing lost
    assert stats["records_in"] == stats["accepted"] + stats["rejected"] == len(source)
    for r in out:
        c = r["provenance"]["classify"]
        assert r["is_classification"] is r["instruction"].startswith("Classify") or not c["parsed"]
        assert c["raw_response"] in (" Yes", " No", " Perhaps") and c["sampling"]["max_tokens"] == 3
        assert c["sampling"]["temperature"] == 0.0
        assert r["provenance"]["stage"] == "generate"  # the generate provenance is kept
        if not c["parsed"]:
            assert r["is_classification"] is False and c["problem"] == "not_yes_or_no"
    assert stats["unparsed"] == sum(not r["provenance"]["classify"]["parsed"] for r in out)
    assert stats["yes"] == sum(r["is_classification"] for r in out)


def test_classify_teacher_errors_go_to_the_ledger_and_are_retried(tmp_path: Path) -> None:
    class Flaky(ScriptedTeacher):
        failing = True

        def generate(self, requests: list[Request]) -> list[Completion]:
            done = super().generate(requests)
            if self.failing:
                done[0] = Completion("", 0, 0, "error", error="503")
            return done

    d = generated_run(tmp_path)
    flaky = Flaky()
    stats = classify_in(d, CachedTeacher(flaky, d / "cache" / "teacher.jsonl"),
                        settings=ClassifySettings(batch_size=10))
    rejected = read_jsonl(d / "classified.rejected.jsonl")
    assert stats["rejected_by_reason"] == {"teacher_error": 4} and len(rejected) == 4
    assert all(r["detail"] == "503" for r in rejected)
    flaky.failing = False
    calls = flaky.calls
    stats = classify_in(d, CachedTeacher(flaky, d / "cache" / "teacher.jsonl"),
                        settings=ClassifySettings(batch_size=10))
    assert stats["rejected"] == 0 and flaky.calls == calls + 4  # only the failed ones asked again
    assert len(read_jsonl(d / "classified.jsonl")) == 40


def test_instances_parse_both_formats_and_ledger_the_failures(tmp_path: Path) -> None:
    d = generated_run(tmp_path)
    classify_in(d, cached(d))
    stats = instances_in(d, cached(d), settings=InstancesSettings(batch_size=8, max_instances=3))
    out = read_jsonl(d / "instances.jsonl")
    rejected = read_jsonl(d / "instances.rejected.jsonl", allow_empty=True)
    assert stats["records_in"] == len(out) + len(rejected) == 40
    assert sum(stats["rejected_by_reason"].values()) == len(rejected)
    for r in out:
        p = r["provenance"]["instances"]
        assert 1 <= len(r["instances"]) <= 3 and p["raw_response"]
        assert p["mode"] == ("output_first" if r["is_classification"] else "input_first")
        assert p["sampling"]["presence_penalty"] == 1.5 and p["sampling"]["temperature"] == 0.0
        assert "classify" in r["provenance"] and r["provenance"]["recipe"] == "self-instruct"
        for inst in r["instances"]:
            assert set(inst) == {"input", "output"} and inst["output"]
            if r["is_classification"]:
                assert inst["output"] in ("Yes", "No", "Maybe", "Other") and inst["input"].startswith("Input: case")
            else:
                assert inst["input"].startswith("value ") and inst["output"].startswith("result ")
    for r in rejected:
        assert r["reason"] in ("parse_error", "teacher_error", "truncated_response")
        if r["reason"] == "parse_error":
            assert r["raw"] == r["provenance"]["instances"]["raw_response"]


def test_alpaca_records_pass_through_instances_without_a_teacher_call(tmp_path: Path) -> None:
    d = tmp_path / "a"
    recs = [{"id": f"ins_{i}", "instruction": f"Task {i}", "input": "" if i % 2 else "x", "output": f"y{i}",
             "is_classification": False, "provenance": {"recipe": "alpaca"}} for i in range(5)]
    write_jsonl(d / "classified.jsonl", recs)
    teacher = ScriptedTeacher()
    instances_in(d, CachedTeacher(teacher, d / "cache" / "teacher.jsonl"))
    out = read_jsonl(d / "instances.jsonl")
    assert teacher.calls == 0
    assert [r["instances"] for r in out] == [[{"input": r["input"], "output": r["output"]}] for r in recs]
    assert all("input" not in r and r["provenance"]["instances"]["passthrough"] for r in out)


def test_bad_classified_file_is_a_sift_error_with_line(tmp_path: Path) -> None:
    path = tmp_path / "classified.jsonl"
    write_jsonl(path, [{"id": "a", "instruction": "x", "is_classification": True},
                       {"id": "b", "instruction": "y", "is_classification": "yes"}])
    with pytest.raises(SiftError, match=r"classified\.jsonl:2: field 'is_classification'"):
        read_classified(path)
    write_jsonl(path, [{"id": "a", "instruction": "x", "is_classification": True}] * 2)
    with pytest.raises(SiftError, match="duplicate id"):
        read_classified(path)


CHILD = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from pipeline.settings import InstancesSettings
from pipeline.stages.instances import instances_in
from tests.pipeline.test_classify_instances import cached
d = Path({d!r})
instances_in(d, cached(d, {delay}), settings=InstancesSettings(batch_size=3))
"""


def test_killed_instances_stage_resumes_to_the_same_records(tmp_path: Path) -> None:
    ref = generated_run(tmp_path, "ref")
    classify_in(ref, cached(ref))
    instances_in(ref, cached(ref), settings=InstancesSettings(batch_size=3))
    d = tmp_path / "killed"
    d.mkdir()
    (d / "classified.jsonl").write_bytes((ref / "classified.jsonl").read_bytes())
    journal = d / "instances.journal"
    kills = 0
    for pause in (0.05, 0.2, 0.1):
        proc = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), d=str(d), delay=0.05)],
                                cwd=REPO, env={**os.environ, "SIFT_PROGRESS": "0"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        size = journal.stat().st_size if journal.exists() else 0
        deadline = time.monotonic() + 60
        while (not journal.exists() or journal.stat().st_size <= size + 300) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(pause)
        proc.send_signal(signal.SIGKILL)
        kills += proc.wait() == -signal.SIGKILL
    assert kills >= 2 and not (d / "instances.jsonl").exists()
    instances_in(d, cached(d), settings=InstancesSettings(batch_size=3))
    for name in ("instances.jsonl", "instances.rejected.jsonl"):
        assert (d / name).read_text() == (ref / name).read_text()


@pytest.mark.slow
def test_embedded_model_generate_classify_instances(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """N=5 on the real embedded teacher, through the command functions the CLI calls."""
    from pipeline.io.models import embedded_dir
    from pipeline.stages.classify import classify
    from pipeline.stages.generate import generate
    from pipeline.stages.instances import instances

    if not embedded_dir().exists():
        pytest.fail("the embedded model is missing: run `sift model fetch` (make setup)")
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path))
    d = make_run(tmp_path, "e2e", count=40)
    small = GenerateSettings(n=5, batch_size=8, max_tokens=160, max_requests=48)
    generate(run="e2e", generate=small)
    accepted = read_jsonl(d / "instructions.jsonl")
    stats = read_json(d / "generate.stats.json")
    assert len(accepted) == stats["kept"] == 5
    assert stats["read"] == stats["kept"] + sum(stats["rejected_by_reason"].values())
    assert all(r["provenance"]["teacher"]["name"] == "smollm2-135m-instruct" for r in accepted)
    classify(run="e2e", classify=ClassifySettings(batch_size=8))
    instances(run="e2e", instances=InstancesSettings(batch_size=8, max_tokens=120))
    out = read_jsonl(d / "instances.jsonl", allow_empty=True)
    rejected = read_jsonl(d / "instances.rejected.jsonl", allow_empty=True)
    assert len(out) + len(rejected) == 5
    assert all(r["instances"] and r["provenance"]["instances"]["raw_response"] for r in out)
    manifest = read_json(d / "manifest.json")
    assert {"generate", "classify", "instances"} <= set(manifest["stages"])
    again = read_json(d / "generate.stats.json")
    generate(run="e2e", generate=small)  # finished: nothing to redo
    assert read_json(d / "generate.stats.json")["requests"] == again["requests"]


def test_every_stage_writes_its_stats_in_one_schema_and_the_report_labels_units(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    """#25.21: stats files mixed `rejected_by_reason` and `by_reason` (and input / records_in / candidates,
    accepted / kept); funnel.json had two writers; the report charted instances (tasks) 87 then filtered
    (examples) 91 under one axis. Now: one schema, documented in docs/artifacts.md, and every bar names its unit."""
    from pipeline.io.stage_stats import COMMON
    from pipeline.stages.filter import filter_records
    from pipeline.views.report import funnel_section, stage_counts

    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path))
    d = generated_run(tmp_path)
    classify_in(d, cached(d))
    instances_in(d, cached(d), settings=InstancesSettings(max_instances=3))
    filter_records(run="r")
    units = {"generate": "instructions", "classify": "instructions", "instances": "tasks", "filter": "examples"}
    for stage, unit in units.items():
        doc = read_json(d / f"{stage}.stats.json")
        assert list(doc)[:len(COMMON)] == list(COMMON), stage
        assert doc["stage"] == stage and doc["unit"] == unit
        assert doc["read"] == doc["kept"] + doc["rejected"]
        assert doc["rejected"] == sum(doc["rejected_by_reason"].values())
        assert not {"by_reason", "input", "records_in", "candidates", "accepted"} & set(doc), stage
        assert read_json(d / "manifest.json")["stages"][stage]["stats"] == doc
    tasks = read_jsonl(d / "instances.jsonl")
    examples = sum(len(t["instances"]) for t in tasks)
    assert examples > len(tasks)  # the case the chart got wrong: more examples than tasks
    assert read_json(d / "filter.stats.json")["read"] == examples
    data = {name: read_jsonl(d / name, allow_empty=True) for name in ("instructions.jsonl", "classified.jsonl",
                                                                       "instances.jsonl", "filtered.jsonl")}
    counts = dict(stage_counts(data))
    assert counts["instances (tasks)"] == len(tasks) and counts["instances (examples)"] == examples
    assert counts["filtered (examples)"] == len(data["filtered.jsonl"]) <= examples
    assert "filter rules, in order (funnel.json; examples)" in funnel_section(d, data)
