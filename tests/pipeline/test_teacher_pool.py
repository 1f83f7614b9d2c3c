"""Several teachers in one run (--teacher.pool): shares per round, provenance, per-teacher figures, a
teacher that fails everything, teachers files, and kill-and-resume, with two loopback
OpenAI-compatible servers (tests/pipeline/openai_server.py) as the two teachers."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal, read_json, read_jsonl
from pipeline.settings import ClassifySettings, GenerateSettings, InstancesSettings, TeacherSettings
from pipeline.stages.classify import classify
from pipeline.stages.filter import filter_records
from pipeline.stages.generate import generate
from pipeline.stages.instances import instances
from pipeline.stages.seeds import seeds
from pipeline.teachers.base import Request
from pipeline.teachers.pool import apportion, cool_down, open_pool
from pipeline.teachers.specs import parse_teachers
from pipeline.views.inspect import group_by, inspect_artifact
from pipeline.views.report import teachers_section
from tests.pipeline.kill_harness import check_run, same_artifacts, scripted_reply, sift_killed, sift_ok
from tests.pipeline.openai_server import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SIFT_PROGRESS", "0")
    return tmp_path / "runs"


def teachers_yaml(path: Path, rows: list[tuple[str, str, float]]) -> Path:
    """A teachers file: (name, base_url, share) per teacher, all on the openai backend."""
    lines = ["teachers:"]
    for name, url, share in rows:
        lines += [f"  - name: {name}", f"    model: {name}-model", "    backend: openai", f"    base_url: {url}",
                  f"    share: {share}", "    options: {max_retries: 0}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def pool(spec: Path) -> TeacherSettings:
    return TeacherSettings(backend="openai", pool=str(spec))


# ---------------------------------------------------------------- apportioning


def test_every_prefix_gives_each_teacher_its_share_within_one_request() -> None:
    rng = random.Random(0)
    for _ in range(300):
        shares = [rng.choice([0, 0.5, 1, 2, 3, 7.5]) for _ in range(rng.randint(1, 5))]
        if not sum(shares):
            continue
        order = apportion(60, shares)
        counts = [0] * len(shares)
        for k, i in enumerate(order, start=1):
            counts[i] += 1
            for j, s in enumerate(shares):
                assert abs(counts[j] - k * s / sum(shares)) < 1, (shares, k, counts)
        assert all(counts[j] == 0 for j, s in enumerate(shares) if s == 0)
    assert apportion(5, [2, 1]) == apportion(5, [2, 1])  # a pure function of (count, shares)
    with pytest.raises(ValueError):
        apportion(3, [0, 0])


# ---------------------------------------------------------------- stages


def test_generate_spreads_each_round_by_share_and_every_record_names_its_teacher(
        runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    seeds("seeds/default.jsonl", run="r")
    with FakeOpenAI(reply=scripted_reply) as a, FakeOpenAI(reply=scripted_reply) as b:
        spec = teachers_yaml(tmp_path / "teachers.yaml", [("alpha", a.url, 2), ("beta", b.url, 1)])
        generate(run="r", teacher=pool(spec), generate=GenerateSettings(n=30, batch_size=7))
        served = {"alpha": len(a.bodies), "beta": len(b.bodies)}
    d = runs / "r"
    entries = [e for e in Journal(d / "generate.journal").read() if e.get("kind") == "round"]
    assert len(entries) >= 2
    for e in entries:  # each round of 7 requests: 14/3 and 7/3 -> 5 and 2 (within one of 4.67 and 2.33)
        per = {n: e["by_teacher"].get(n, {}).get("requests", 0) for n in ("alpha", "beta")}
        assert sum(per.values()) == e["requests"]
        for name, share in (("alpha", 2 / 3), ("beta", 1 / 3)):
            assert abs(per[name] - e["requests"] * share) < 1, (e["round"], per)
    stats = read_json(d / "generate.stats.json")
    assert {n: stats["by_teacher"][n]["requests"] for n in served} == served  # the servers agree
    records = read_jsonl(d / "instructions.jsonl") + read_jsonl(d / "instructions.rejected.jsonl")
    by_request: dict[int, set[str]] = {}
    for r in records:
        assert r["provenance"]["teacher"]["model"] in ("alpha-model", "beta-model")
        by_request.setdefault(r["provenance"]["request_index"], set()).add(r["provenance"]["teacher"]["name"])
    assert all(len(names) == 1 for names in by_request.values())  # a request has one teacher
    accepted = Counter(r["provenance"]["teacher"]["name"] for r in read_jsonl(d / "instructions.jsonl"))
    for name in served:
        row = stats["by_teacher"][name]
        assert row["kept"] == accepted[name] and row["tokens_out"] > 0 and "teacher_seconds" in row
        assert row["rejected"] == sum(row["rejected_by_reason"].values())
    assert sum(r["kept"] for r in stats["by_teacher"].values()) == stats["kept"]
    assert sum(r["rejected"] for r in stats["by_teacher"].values()) == stats["rejected"]
    assert (d / "cache" / "teachers" / "alpha.jsonl").stat().st_size > 0  # each teacher its own cache
    assert (d / "cache" / "teachers" / "beta.jsonl").stat().st_size > 0
    manifest = read_json(d / "manifest.json")
    assert [t["name"] for t in manifest["stages"]["generate"]["settings"]["teachers"]] == ["alpha", "beta"]

    # classify and instances spread their batches the same way and name the teacher per record
    with FakeOpenAI(reply=scripted_reply) as a, FakeOpenAI(reply=scripted_reply) as b:
        spec = teachers_yaml(tmp_path / "teachers2.yaml", [("alpha", a.url, 1), ("beta", b.url, 1)])
        classify(run="r", teacher=pool(spec), classify=ClassifySettings(batch_size=8))
        instances(run="r", teacher=pool(spec), instances=InstancesSettings(batch_size=8))
    for stage, file in (("classify", "classified.jsonl"), ("instances", "instances.jsonl")):
        names = Counter(r["provenance"][stage]["teacher"]["name"] for r in read_jsonl(d / file))
        st = read_json(d / f"{stage}.stats.json")
        assert abs(names["alpha"] - names["beta"]) <= 4  # within one per batch of 8 (30 records: 4 batches)
        assert {n: st["by_teacher"][n]["kept"] for n in names} == dict(names)
        assert st["by_teacher"]["alpha"]["requests"] + st["by_teacher"]["beta"]["requests"] == st["requests"]

    # the filter's funnel, `sift inspect --by teacher` and the report split the figures per teacher
    filter_records(run="r")
    funnel = read_json(d / "funnel.json")
    table = funnel["by_teacher"]
    assert set(table) == {"alpha", "beta"} and sum(r["kept"] for r in table.values()) == funnel["kept"]
    assert sum(r["kept"] + r["rejected"] for r in table.values()) == funnel["input"]
    ledger = read_jsonl(d / "filtered.rejected.jsonl")
    groups = group_by(ledger, "teacher")
    assert {n: g["records"] for n, g in groups.items()} == {n: r["rejected"] for n, r in table.items() if r["rejected"]}
    assert {n: g["rejected_by_reason"] for n, g in groups.items()} == {
        n: r["rejected_by_reason"] for n, r in table.items() if r["rejected"]}
    inspect_artifact(str(d / "instructions.rejected.jsonl"), by="teacher")
    out = capsys.readouterr().out
    assert "records by teacher" in out and "alpha" in out and "beta" in out
    html = teachers_section(d)
    for text in ("generate.stats.json", "classify.stats.json", "instances.stats.json", "funnel.json", "alpha", "beta"):
        assert text in html


def test_a_teacher_that_fails_every_request_is_reported_and_its_share_goes_to_the_others(
        runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    seeds("seeds/default.jsonl", run="r")
    with FakeOpenAI(reply=scripted_reply) as good, FakeOpenAI(lambda key, attempt: "400") as bad:
        spec = teachers_yaml(tmp_path / "teachers.yaml", [("good", good.url, 1), ("bad", bad.url, 3)])
        generate(run="r", teacher=pool(spec), generate=GenerateSettings(n=20, batch_size=8))
        asked_bad = len(bad.bodies)
    d = runs / "r"
    stats = read_json(d / "generate.stats.json")
    assert stats["kept"] == 20 and "teacher_error" not in stats["rejected_by_reason"]
    assert "400" in stats["teachers_down"]["bad"]
    assert stats["by_teacher"]["bad"]["errors"] == stats["by_teacher"]["bad"]["requests"] == asked_bad == 6
    assert stats["by_teacher"]["bad"]["kept"] == 0  # its share of the first round, then nothing
    for r in read_jsonl(d / "instructions.jsonl") + read_jsonl(d / "instructions.rejected.jsonl"):
        assert r["provenance"]["teacher"]["name"] == "good"
    assert "teacher bad failed every request" in capsys.readouterr().err
    # every teacher failing is still the clear error of a single failing teacher
    with FakeOpenAI(lambda key, attempt: "400") as bad1, FakeOpenAI(lambda key, attempt: "401") as bad2:
        spec = teachers_yaml(tmp_path / "bad.yaml", [("b1", bad1.url, 1), ("b2", bad2.url, 1)])
        seeds("seeds/default.jsonl", run="r2")
        with pytest.raises(SiftError, match="every request to the teacher failed"):
            generate(run="r2", teacher=pool(spec), generate=GenerateSettings(n=5, batch_size=4))


def test_a_teacher_that_goes_down_is_tried_again_with_backoff_and_comes_back(tmp_path: Path) -> None:
    """Server `flaky` goes down (connections refused) after one call and comes back later: the pool
    sends its share to `steady` while it is down, tries it again after 1, then 2, then 4 calls
    (backoff counted in calls, not seconds), and gives it its share again once it serves."""
    with FakeOpenAI() as steady, FakeOpenAI() as flaky:
        spec = teachers_yaml(tmp_path / "teachers.yaml", [("steady", steady.url, 1), ("flaky", flaky.url, 1)])
        pool = open_pool(None, parse_teachers(str(spec)), batch_size=4)
        tried = []

        def call(k: int) -> None:
            out = pool.generate([Request(prompt=f"call {k} request {i}") for i in range(4)])
            assert [c.finish_reason for c in out] == ["stop"] * 4  # steady serves what flaky cannot
            tried.append(pool.last_usage.get("flaky", {}).get("requests", 0))

        call(1)
        flaky.stop()
        for k in range(2, 8):
            call(k)
        assert "connection problem" in pool.down["flaky"]
        flaky.restart()
        for k in range(8, 14):
            call(k)
        # up; down: tried, rests 1; tried, rests 2; tried, rests 4; (up again) tried and serves; its share
        assert tried == [2, 2, 0, 2, 0, 0, 2, 0, 0, 0, 0, 2, 2]
        assert pool.down == {} and pool.recovered == {"flaky": 1}
        assert flaky.successes and all(c["model"] == "flaky-model" for c in flaky.bodies)
    assert [cool_down(k) for k in range(1, 8)] == [1, 2, 4, 8, 16, 16, 16]


def test_every_teacher_resting_means_all_are_tried(tmp_path: Path) -> None:
    """With both servers down, each call still asks both (there is no one else to ask)."""
    with FakeOpenAI() as a, FakeOpenAI() as b:
        spec = teachers_yaml(tmp_path / "teachers.yaml", [("a", a.url, 1), ("b", b.url, 1)])
        pool = open_pool(None, parse_teachers(str(spec)), batch_size=2)
        a.stop()
        b.stop()
        for _ in range(3):
            out = pool.generate([Request(prompt="x"), Request(prompt="y")])
            assert all(c.finish_reason == "error" for c in out)
            assert pool.last_usage["a"]["requests"] >= 1 and pool.last_usage["b"]["requests"] >= 1
        a.restart()
        out = pool.generate([Request(prompt="x"), Request(prompt="y")])
        assert [c.finish_reason for c in out] == ["stop", "stop"] and list(pool.down) == ["b"]


# ---------------------------------------------------------------- specs


def test_teachers_files_and_inline_lists(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("teachers:\n  - model: smollm2-135m-instruct\n    share: 2\n    options: {engine: hf}\n"
                 "  - name: gemma\n    model: /models/gemma-3-270m.gguf\n")
    specs = parse_teachers(str(p))
    assert [(s.name, s.share, s.options) for s in specs] == [("smollm2-135m-instruct", 2.0, {"engine": "hf"}),
                                                            ("gemma", 1.0, {})]
    toml = tmp_path / "t.toml"
    toml.write_text('[[teachers]]\nname = "a"\nmodel = "m"\nbackend = "openai"\nbase_url = "http://x/v1"\n'
                    '[[teachers]]\nname = "b"\nmodel = "m"\nbackend = "openai"\nbase_url = "http://y/v1"\nshare = 0\n')
    assert [(s.name, s.base_url, s.share) for s in parse_teachers(str(toml))] == [("a", "http://x/v1", 1.0),
                                                                                  ("b", "http://y/v1", 0.0)]
    inline = parse_teachers("smollm2-135m-instruct=3, /x/gemma-3-270m.gguf", backend="transformers",
                            teacher_options="engine=hf")
    assert [(s.name, s.share, s.options) for s in inline] == [("smollm2-135m-instruct", 3.0, {"engine": "hf"}),
                                                              ("gemma-3-270m", 1.0, {"engine": "hf"})]


def test_a_teachers_file_entry_takes_the_stages_backend_server_and_options(runs: Path, tmp_path: Path) -> None:
    """An entry without `backend` is on the stage's --backend; on that backend it also takes the stage's
    --base-url, --api-key-env and --teacher-options where it gives none (its own values win)."""
    p = tmp_path / "teachers.yaml"
    p.write_text("teachers:\n  - name: a\n    model: m\n"
                 "  - name: b\n    model: m\n    base_url: http://b/v1\n    api_key_env: B_KEY\n"
                 "    options: {timeout: 9}\n"
                 "  - name: c\n    model: smollm2-135m-instruct\n    backend: transformers\n")
    a, b, c = parse_teachers(str(p), backend="openai", base_url="http://stage/v1", api_key_env="STAGE_KEY",
                             teacher_options="timeout=5,max_retries=1")
    assert (a.backend, a.base_url, a.api_key_env, a.options) == (
        "openai", "http://stage/v1", "STAGE_KEY", {"timeout": 5.0, "max_retries": 1})
    assert (b.backend, b.base_url, b.api_key_env, b.options) == (
        "openai", "http://b/v1", "B_KEY", {"timeout": 9.0, "max_retries": 1})
    assert (c.backend, c.base_url, c.api_key_env, c.options) == ("transformers", None, "OPENAI_API_KEY", {})
    with pytest.raises(SiftError, match="needs base_url") as e:  # openai without a URL anywhere
        parse_teachers(str(p), backend="openai")
    assert e.value.field == "teachers[0].base_url" and e.value.line == 2
    # the stage runs with it: `sift generate --teacher.backend openai --teacher.base_url URL --teacher.pool FILE`
    seeds("seeds/default.jsonl", run="r")
    plain = tmp_path / "plain.yaml"
    plain.write_text("teachers:\n  - name: one\n    model: one-model\n  - name: two\n    model: two-model\n")
    assert [s.backend for s in parse_teachers(str(plain))] == ["transformers", "transformers"]  # no stage given
    with FakeOpenAI(reply=scripted_reply) as server:
        generate(run="r", teacher=TeacherSettings(backend="openai", base_url=server.url, pool=str(plain)),
                 generate=GenerateSettings(n=5, batch_size=4))
        assert {b["model"] for b in server.bodies} == {"one-model", "two-model"}
    assert len(read_jsonl(runs / "r" / "instructions.jsonl")) == 5


@pytest.mark.parametrize(("text", "line", "field", "message"), [
    ("teachers:\n  - model: a\n  - model: b\n    share: lots\n", 3, "teachers[1].share", "expected a number"),
    ("teachers:\n  - model: a\n    sharee: 2\n", 2, "teachers[0].sharee", "unknown key"),
    ("teachers:\n  - model: a\n  - model: a\n", 3, "teachers[1].name", "two teachers are named"),
    ("teachers:\n  - name: x\n", 2, "teachers[0].model", "missing"),
    ("teachers:\n  - model: a\n    backend: openai\n", 2, "teachers[0].base_url", "needs base_url"),
    ("teachers:\n  - model: a\n    options: {batch_size: 4}\n", 2, "teachers[0].options", "its own option"),
    ("teachers:\n  - model: a\n    options: {timeout: 3}\n", 2, "teachers[0].options", "no option 'timeout'"),
    ("teachers:\n  - model: a\n    share: 0\n", None, "teachers", "every share is 0"),
    ("teachers: [\n", 2, None, "invalid YAML"),
])
def test_a_bad_teachers_file_names_file_line_and_field(tmp_path: Path, text: str, line: int | None,
                                                       field: str | None, message: str) -> None:
    p = tmp_path / "teachers.yaml"
    p.write_text(text)
    with pytest.raises(SiftError, match=message) as e:
        parse_teachers(str(p))
    assert e.value.path == p and e.value.line == line and e.value.field == field


def test_a_bad_teachers_file_fails_before_anything_runs(tmp_path: Path) -> None:
    p = tmp_path / "teachers.yaml"
    p.write_text("teachers:\n  - model: a\n    share: -1\n")
    runs = tmp_path / "runs"
    sift_ok(["seeds", "seeds/default.jsonl", "--run", "r"], runs=runs)
    from tests.pipeline.kill_harness import sift

    code, _, err = sift(["generate", "--run", "r", "--teacher.pool", str(p)], runs=runs)
    assert code == 2 and f"{p}:2: field 'teachers[0].share'" in err and "Traceback" not in err
    assert not (runs / "r" / "instructions.jsonl").exists() and not (runs / "r" / "generate.journal").exists()


# ---------------------------------------------------------------- kill and resume


@pytest.mark.slow
def test_generate_and_classify_with_two_teachers_killed_and_rerun_give_the_same_run(tmp_path: Path) -> None:
    with FakeOpenAI(reply=scripted_reply) as a, FakeOpenAI(reply=scripted_reply) as b:
        spec = teachers_yaml(tmp_path / "teachers.yaml", [("alpha", a.url, 2), ("beta", b.url, 1)])
        gen = ["generate", "--run", "r", "--generate.n", "24", "--generate.batch_size", "5",
               "--teacher.pool", str(spec)]
        cls = ["classify", "--run", "r", "--classify.batch_size", "6", "--teacher.pool", str(spec)]
        ref, killed = tmp_path / "ref", tmp_path / "killed"
        for runs in (ref, killed):
            sift_ok(["seeds", "seeds/default.jsonl", "--run", "r"], runs=runs)
        sift_ok(gen, runs=ref)
        sift_ok(cls, runs=ref)
        for point in ("generate.journal:3:mid", "alpha.jsonl:2:before", "beta.jsonl:1:mid",
                      "instructions.jsonl:1:mid"):
            sift_killed(gen, runs=killed, kill_at=point)
        sift_ok(gen, runs=killed)
        for point in ("classify.journal:2:after", "beta.jsonl:3:mid"):
            sift_killed(cls, runs=killed, kill_at=point)
        sift_ok(cls, runs=killed)
    check_run(killed / "r")
    same_artifacts(ref / "r", killed / "r", ref_runs=ref)


def test_a_pool_is_teacher_pool_and_cannot_come_with_teacher_model(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import build_parser, main, resolve_settings

    parser = build_parser()
    for command in ("generate", "classify", "instances"):
        ns = parser.parse_args([command, "--teacher.pool", "a,b.gguf=2"])
        _, kwargs = resolve_settings(ns._func, ns._name, ns)
        assert (kwargs["teacher"].model, kwargs["teacher"].pool) == ("smollm2-135m-instruct", "a,b.gguf=2")
    # both on the command line, or both in a config file: one error naming teacher.pool, nothing run
    assert main(["generate", "--run", "r", "--teacher.model", "a", "--teacher.pool", "b,c"]) == 2
    err = capsys.readouterr().err
    assert "field 'teacher.pool'" in err and "give teacher.model or teacher.pool, not both" in err
    config = tmp_path / "run.yaml"
    config.write_text("teacher:\n  model: a\n  pool: b,c\n")
    assert main(["instances", "--run", "r", "--config", str(config)]) == 2
    assert f"{config}: field 'teacher.pool'" in capsys.readouterr().err
    # the repeated flag of before is no option at all now; the error points at the section
    assert main(["classify", "--teacher", "a", "--teacher", "b"]) == 2
    assert "`--teacher` is a section" in capsys.readouterr().err


def test_the_repository_teachers_file_loads() -> None:
    specs = parse_teachers(str(REPO / "teachers.yaml"))
    assert [(s.name, s.model, s.backend) for s in specs] == [("smollm2", "smollm2-135m-instruct", "transformers"),
                                                             ("gemma", "gemma-3-270m", "transformers")]
