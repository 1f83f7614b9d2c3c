"""`sift score`: stand-alone and as a stage, its ledger and funnel, the cache, kill and resume, bad input.

    .venv/bin/python -m pytest tests/pipeline/test_score_stage.py -q
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal, read_json, read_jsonl, write_json, write_jsonl
from pipeline.settings import FilterSettings, ScoreSettings, StudentSettings, TeacherSettings
from pipeline.stages.score import score
from tests.pipeline.kill_harness import sift, sift_killed
from tests.train.conftest import save_tiny

WORDS = ["give three tips for staying healthy", "what is the capital of france", "name a primary color",
         "translate hello to spanish", "summarize the text below", "the capital of france is paris", "hola",
         "red is a primary color", "eat vegetables sleep well and walk every day", "a short story about a cat"]


def dataset(n: int) -> list[dict]:
    return [{"instruction": WORDS[i % 5] + f" {i}", "input": "" if i % 3 else WORDS[4],
             "output": " ".join(WORDS[5 + (i * 7 + k) % 5] for k in range(1 + i % 4))} for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("score") / "tiny")


def on(model: Path) -> StudentSettings:
    """The ifd model, on the CPU in float32 (scores comparable across runs)."""
    return StudentSettings(model=str(model), device="cpu", dtype="float32")


def test_standalone_scores_every_record_and_keeps_a_ledger(tmp_path: Path, tiny: Path) -> None:
    src = tmp_path / "data.json"
    rows = dataset(12) + [{"instruction": "name a primary color", "output": "   "}]
    write_json(src, rows)
    out = tmp_path / "out.jsonl"
    score(str(src), output=str(out), student=on(tiny), score=ScoreSettings(scorers="ifd,length",
                                                                           keep="ifd<1,top=0.5:length"))
    kept = read_jsonl(out)
    rejected = read_jsonl(tmp_path / "out.rejected.jsonl", allow_empty=True)
    funnel = read_json(tmp_path / "out.funnel.json")
    assert len(kept) + len(rejected) == len(rows)
    for rec in kept:
        assert rec["scores"]["ifd"] < 1
        assert rec["scores"]["ifd"] == pytest.approx(
            rec["scores"]["ifd_loss_given_prompt"] / rec["scores"]["ifd_loss_alone"], rel=1e-9)
        assert rec["scores"]["length"] == len(rec["output"].split())
    by_id = {r["id"]: r for r in rejected}
    empty = next(r for r in rejected if not r["record"]["output"].strip())
    assert empty["reason"] == "no_ifd" and empty["score"] is None
    assert empty["record"]["score_details"]["ifd"]["reason"] == "empty_answer"
    for r in by_id.values():
        assert r["reason"] in {"ifd_at_least_1", "low_length", "no_ifd"}
        if r["reason"] == "ifd_at_least_1":
            assert r["score"] >= 1 and r["score_name"] == "ifd"
    assert [row["rule"] for row in funnel["rules"]] == ["keep ifd<1", "keep top=0.5:length"]
    assert funnel["rules"][-1]["out"] == len(kept) and funnel["input"] == len(rows)


def test_a_rerun_reads_every_score_from_the_cache(tmp_path: Path, tiny: Path, capsys) -> None:
    src = tmp_path / "data.jsonl"
    write_jsonl(src, dataset(6))
    score(str(src), output=str(tmp_path / "a.jsonl"), student=on(tiny), score=ScoreSettings(scorers="ifd,length"))
    first = read_jsonl(tmp_path / "a.jsonl")
    capsys.readouterr()
    score(str(src), output=str(tmp_path / "a.jsonl"), student=on(tiny),
          score=ScoreSettings(scorers="ifd,length", keep="length>=2"))
    assert "0 scores computed, 12 cached" in capsys.readouterr().out
    again = {r["id"]: r["scores"] for r in read_jsonl(tmp_path / "a.jsonl")}
    assert all(again[r["id"]] == r["scores"] for r in first if r["id"] in again)


@pytest.mark.parametrize(("keep", "message"), [
    ("ifd=<1", "cannot read keep rule"),
    ("judge>=4", "no scorer computes 'judge'"),
    ("top=2:ifd", "fraction of top="),
    ("", "is empty; leave --keep out"),
    (",", "is empty; leave --keep out"),
    ("ifd<1e999", "1e999 is not a finite number"),
    ("ifd<inf", "inf is not a finite number"),
])
def test_bad_keep_fails_before_anything_loads(tmp_path: Path, keep: str, message: str) -> None:
    src = tmp_path / "data.jsonl"
    write_jsonl(src, dataset(2))
    with pytest.raises(SiftError, match=message) as e:  # the model does not exist: it was never loaded
        score(str(src), output=str(tmp_path / "o.jsonl"), student=StudentSettings(model=str(tmp_path / "no-such")),
              score=ScoreSettings(scorers="ifd,length", keep=keep))
    assert e.value.field == "score.keep"
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_records_name_file_line_and_field(tmp_path: Path) -> None:
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    with pytest.raises(SiftError) as e:
        score(str(src), output=str(tmp_path / "o.jsonl"), score=ScoreSettings(scorers="length"))
    assert (e.value.line, e.value.field) == (2, "output")
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(SiftError, match="unknown scorer 'quality'"):
        score(str(src), output=str(tmp_path / "o.jsonl"), score=ScoreSettings(scorers="quality"))
    with pytest.raises(SiftError, match="--score.reward_model"):
        score(str(src), output=str(tmp_path / "o.jsonl"), score=ScoreSettings(scorers="reward"))


def test_the_stage_writes_scored_and_its_own_funnel(tmp_path: Path, tiny: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """funnel.json is the filter's alone (#25.21: score rewrote it); score's --keep rows go to scored.funnel.json."""
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    d = tmp_path / "runs" / "r"
    d.mkdir(parents=True)
    write_jsonl(d / "filtered.jsonl", [{"id": f"ex_{i}", **r} for i, r in enumerate(dataset(8))])
    filter_funnel = {"input": 10, "kept": 8, "rules": [{"rule": "too_short", "in": 10, "out": 8, "dropped": 2}]}
    write_json(d / "funnel.json", filter_funnel)
    for keep in ("length>=3", "top=0.5:length"):  # a rerun replaces the keep rows, never stacks them
        score(run="r", student=on(tiny), score=ScoreSettings(scorers="length", keep=keep))
    assert read_json(d / "funnel.json") == filter_funnel
    funnel = read_json(d / "scored.funnel.json")
    assert [r["rule"] for r in funnel["rules"]] == ["keep top=0.5:length"] and funnel["input"] == 8
    kept, rejected = read_jsonl(d / "scored.jsonl"), read_jsonl(d / "scored.rejected.jsonl", allow_empty=True)
    assert funnel["kept"] == len(kept) == 4 and len(rejected) == 4
    stats = read_json(d / "score.stats.json")
    assert {k: stats[k] for k in ("stage", "unit", "read", "kept", "rejected", "rejected_by_reason")} == {
        "stage": "score", "unit": "examples", "read": 8, "kept": 4, "rejected": 4,
        "rejected_by_reason": {"low_length": 4}}
    assert all(r["reason"] == "low_length" for r in rejected)
    assert read_json(d / "manifest.json")["stages"]["score"]["settings"]["score"]["keep"] == "top=0.5:length"

    from pipeline.views.inspect import summarize
    from pipeline.views.report import build_page
    from pipeline.views.scores import scores_section

    section = scores_section(d)
    assert "data:image/png;base64," in section
    assert "length: the 5 highest" in section and "length: the 5 lowest" in section
    assert 'id="scores"' in build_page("r", d)
    rows = summarize(read_jsonl(d / "scored.jsonl"))["scores"]
    assert rows[0]["score"] == "length" and rows[0]["n"] == len(kept)
    ledger = summarize(read_jsonl(d / "scored.rejected.jsonl"))["scores"]  # the ledger's records carry scores too
    assert ledger[0]["n"] == len(rejected) and ledger[0]["p100"] <= rows[0]["p0"]


def test_kill_and_resume_loses_and_repeats_nothing(tmp_path: Path, tiny: Path) -> None:
    src = tmp_path / "data.jsonl"
    write_jsonl(src, dataset(40))  # journal appends of 32 and 8 records per scorer
    args = ["score", str(src), "--score.scorers", "ifd,length", "--student.model", str(tiny),
            "--student.dtype", "float32", "--student.device", "cpu"]
    code, _, err = sift([*args, "-o", str(tmp_path / "ref.jsonl")], runs=tmp_path / "runs")
    assert code == 0, err
    out = tmp_path / "out.jsonl"
    sift_killed([*args, "-o", str(out)], runs=tmp_path / "runs", kill_at="out.cache.jsonl:2:mid")
    assert not out.exists()
    code, stdout, err = sift([*args, "-o", str(out)], runs=tmp_path / "runs")
    assert code == 0, err
    computed, cached = map(int, re.search(r"(\d+) scores computed, (\d+) cached", stdout).groups())
    # ifd's first chunk of 32 survived, and the whole lines of the torn second one; the rest is redone
    assert computed + cached == 80 and 32 <= cached < 40
    keys = [e["key"] for e in Journal(tmp_path / "out.cache.jsonl").read()]
    assert len(keys) == len(set(keys)) == 80  # every score once, none repeated
    ref, got = read_jsonl(tmp_path / "ref.jsonl"), read_jsonl(out)
    assert [r["id"] for r in got] == [r["id"] for r in ref]
    for a, b in zip(ref, got, strict=True):
        assert a["scores"].keys() == b["scores"].keys()
        for k in a["scores"]:
            assert b["scores"][k] == pytest.approx(a["scores"][k], rel=1e-5)


def test_several_judges_rate_the_stage_and_say_who_rated_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`sift score --score.scorers judge --teacher.pool FILE`: two loopback judges, one with log-probabilities."""
    from tests.pipeline.openai_server import FakeOpenAI

    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    d = tmp_path / "runs" / "r"
    d.mkdir(parents=True)
    write_jsonl(d / "filtered.jsonl", [{"id": f"ex_{i}", **r} for i, r in enumerate(dataset(6))])
    with FakeOpenAI(logprobs=lambda body: {"5": 0.5, "4": 0.5}) as a, FakeOpenAI(reply=lambda body: ("3", "stop")) as b:
        spec = tmp_path / "judges.yaml"
        spec.write_text("teachers:\n" + "".join(
            f"  - name: {name}\n    model: {name}-model\n    backend: openai\n    base_url: {url}\n"
            f"    options: {{max_retries: 0}}\n" for name, url in (("alpha", a.url), ("beta", b.url))))
        judges = TeacherSettings(pool=str(spec))
        score(run="r", teacher=judges, score=ScoreSettings(scorers="judge"))
        asked = len(a.bodies) + len(b.bodies)
        score(run="r", teacher=judges, score=ScoreSettings(scorers="judge", keep="judge>=4"))  # all from the cache
        assert len(a.bodies) + len(b.bodies) == asked
    kept = read_jsonl(d / "scored.jsonl")
    rejected = read_jsonl(d / "scored.rejected.jsonl", allow_empty=True)
    by_teacher = {}
    for rec in kept + [r["record"] for r in rejected]:
        details = rec["score_details"]["judge"]
        by_teacher.setdefault(details["teacher"], set()).add((details["method"], rec["scores"]["judge"]))
    assert by_teacher == {"alpha": {("logprobs", 4.5)}, "beta": {("sampled", 3)}}
    assert len(kept) == 3 and len(rejected) == 3
    stats = read_json(d / "score.stats.json")
    assert stats["judge_by_teacher"] == {"alpha": {"logprobs": 3, "sampled": 0, "unrated": 0},
                                         "beta": {"logprobs": 0, "sampled": 3, "unrated": 0}}
    settings = read_json(d / "manifest.json")["stages"]["score"]["settings"]
    assert [t["name"] for t in settings["teachers"]] == ["alpha", "beta"]


def test_output_is_written_as_its_extension_says(tmp_path: Path) -> None:
    """#25.15: `sift score -o x.json` wrote JSON Lines into x.json, which sift's own reader refused. A .json
    output is one JSON list (score and filter alike), and an extension neither writes is refused before
    anything is read, for every command with -o."""
    from pipeline.io.artifacts import read_records
    from pipeline.stages.filter import filter_records

    src = tmp_path / "data.jsonl"
    write_jsonl(src, dataset(6))
    for ext in (".json", ".jsonl"):
        score(str(src), output=str(tmp_path / f"s{ext}"), score=ScoreSettings(scorers="length"))
        filter_records(str(src), output=str(tmp_path / f"f{ext}"), filter=FilterSettings(rules="rouge"))
    for name in ("s", "f"):
        assert (tmp_path / f"{name}.json").read_text().startswith("[")
        as_list = [r["instruction"] for _, r in read_records(tmp_path / f"{name}.json")]
        assert as_list == [r["instruction"] for r in read_jsonl(tmp_path / f"{name}.jsonl")]
    assert len(read_jsonl(tmp_path / "s.jsonl")) == 6

    for command in (lambda o: score(str(src), output=o, score=ScoreSettings(scorers="length")),
                    lambda o: filter_records(str(src), output=o, filter=FilterSettings(rules="rouge"))):
        with pytest.raises(SiftError, match=r"field 'output': '.*x.txt' must end in .jsonl .* or .json"):
            command(str(tmp_path / "x.txt"))
    from pipeline.views.report import report

    with pytest.raises(SiftError, match=r"field 'output': 'x.json' must end in .html"):
        report(run="no-such-run", output="x.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "data.jsonl", *(f"{s}{ext}" for s in ("s", "f") for ext in (".json", ".rejected.jsonl", ".funnel.json")),
        "s.cache.jsonl", "s.jsonl", "f.jsonl"])


def test_judge_errors_are_not_cached_and_a_rerun_retries_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys) -> None:
    """A judge server that fails, then recovers: the first run drops the records as no_judge, the
    next one asks again (nothing from the failed run is in the cache) and keeps them."""
    from tests.pipeline.openai_server import FakeOpenAI

    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path / "runs"))
    d = tmp_path / "runs" / "r"
    d.mkdir(parents=True)
    write_jsonl(d / "filtered.jsonl", [{"id": f"ex_{i}", **r} for i, r in enumerate(dataset(5))])
    down = {"now": True}
    with FakeOpenAI(faults=lambda key, attempt: "500" if down["now"] else None,
                    reply=lambda body: ("4", "stop")) as server:
        args = {"run": "r", "score": ScoreSettings(scorers="judge", keep="judge>=3"),
                "teacher": TeacherSettings(model="fake", backend="openai", base_url=server.url,
                                           options="max_retries=0")}
        score(**args)
        assert read_jsonl(d / "scored.jsonl", allow_empty=True) == []
        assert read_json(d / "score.stats.json")["rejected_by_reason"] == {"no_judge": 5}
        assert "5 scores failed" in capsys.readouterr().out
        down["now"] = False
        score(**args)
        assert "5 scores computed, 0 cached" in capsys.readouterr().out
        asked = sum(server.successes.values())
        score(**args)  # now every rating is in the cache
        assert "0 scores computed, 5 cached" in capsys.readouterr().out
        assert sum(server.successes.values()) == asked
    kept = read_jsonl(d / "scored.jsonl")
    assert [r["scores"]["judge"] for r in kept] == [4] * 5
    assert all("error" not in e["result"] for e in Journal(d / "cache" / "scores.jsonl").read())


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_streamed_windows_write_what_the_list_path_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         suffix: str) -> None:
    """The command scores WINDOW records at a time and never holds them all; its files are the bytes
    score_records' lists gave through write_jsonl / write_json, a top= rule included (it ranks across
    every window)."""
    import pipeline.stages.score as stage

    windows: list[int] = []
    window = stage.score_window
    monkeypatch.setattr(stage, "WINDOW", 7)
    monkeypatch.setattr(stage, "score_window", lambda recs, *a: (windows.append(len(recs)), window(recs, *a))[1])
    data = [{**r, "id": f"r{i}"} if i % 2 else r for i, r in enumerate(dataset(60))]
    write_jsonl(tmp_path / "data.jsonl", data)
    keep = "length>=2,top=0.5:length"
    score(str(tmp_path / "data.jsonl"), output=str(tmp_path / f"out{suffix}"),
          score=ScoreSettings(scorers="length", keep=keep))
    assert max(windows) == 7 and sum(windows) == 60

    settings = dict(student=StudentSettings(), teacher=TeacherSettings(), score=ScoreSettings(scorers="length"))
    kept, rejected, rows, _ = stage.score_records(stage.read_scorable(tmp_path / "data.jsonl"), ["length"], keep,
                                                  stage.Scorers(**settings), tmp_path / "ref.cache.jsonl")
    assert rejected and kept
    write_jsonl(tmp_path / "ref.rejected.jsonl", rejected)
    write_json(tmp_path / "ref.funnel.json", {"input": 60, "kept": len(kept), "rules": rows})
    if suffix == ".json":
        write_json(tmp_path / "ref.json", kept, indent=None)
    else:
        write_jsonl(tmp_path / "ref.jsonl", kept)
    for got, ref in ((f"out{suffix}", f"ref{suffix}"), ("out.rejected.jsonl", "ref.rejected.jsonl"),
                     ("out.funnel.json", "ref.funnel.json")):
        assert (tmp_path / got).read_bytes() == (tmp_path / ref).read_bytes(), got
