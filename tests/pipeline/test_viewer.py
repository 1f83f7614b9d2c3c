"""sift view: the artifact index (search, filters, sort, paging, rebuilds), and the web app served by a
real uvicorn on loopback: paths outside the run refused, the token off loopback, text never HTML,
the review API, and the command itself started and stopped with Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.review import REVIEW_FILE, read_review
from pipeline.views.viewer.app import create_app
from pipeline.views.viewer.catalog import Catalog
from pipeline.views.viewer.command import bind, check_access
from pipeline.views.viewer.index import ArtifactIndex, Query, build_index
from pipeline.views.viewer.indexes import Indexes
from tests.conftest import REPO

SCRIPT = "<script>alert('x')</script>"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int) -> list[dict]:
    out = []
    for k in range(n):
        r = {"id": f"r{k}", "instruction": f"Write item number {k} about {'cats' if k % 3 == 0 else 'dogs'}",
             "input": "", "output": "x" * (k % 7), "is_classification": k % 2 == 0,
             "provenance": {"teacher": {"name": f"t{k % 2}"}, "recipe": "self-instruct",
                            "raw_response": "cats dogs everywhere"}}
        if k % 5:
            r["scores"] = {"ifd": k / 100}
        out.append(r)
    return out


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder: kept records, a ledger with a rouge_duplicate, seeds, and a record with HTML in it."""
    d = tmp_path / "runs" / "r"
    rows = _rows(30)
    rows[4]["instruction"] = f"Explain {SCRIPT} tags"
    _jsonl(d / "filtered.jsonl", rows)
    _jsonl(d / "filtered.rejected.jsonl", [
        {"id": "d1", "line": 3, "reason": "rouge_duplicate", "score": 0.81, "nearest_id": "r1",
         "nearest_text": rows[1]["instruction"],
         "record": {"id": "d1", "instruction": "Write item number one about dogs", "input": "", "output": "o"}},
        {"id": "e1", "line": 5, "reason": "output_empty", "score": None,
         "record": {"id": "e1", "instruction": "Say nothing", "input": "", "output": ""}},
    ])
    _jsonl(d / "seeds.jsonl", [{"id": "seed_1", "instruction": "A seed", "instances": [{"input": "", "output": "y"}]}])
    (d / "filter.stats.json").write_text(json.dumps({"input": 32, "kept": 30, "rejected": 2,
                                                      "by_reason": {"rouge_duplicate": 1, "output_empty": 1}}))
    return d


# ---------------------------------------------------------------- the index


def test_index_searches_filters_sorts_and_pages(tmp_path: Path) -> None:
    art = _jsonl(tmp_path / "a.jsonl", _rows(30))
    build_index(art, tmp_path / "a.sqlite")
    with ArtifactIndex(art, tmp_path / "a.sqlite") as idx:
        assert idx.count == 30
        total, rows = idx.query(Query(per=7, page=2))
        assert total == 30 and [idx.read(r)["id"] for r in rows] == [f"r{k}" for k in range(7, 14)]
        assert idx.query(Query(q="cats"))[0] == 10  # full text, not the provenance's "cats dogs everywhere"
        assert idx.query(Query(q="cats item 3"))[0] == 1  # every word required
        assert idx.query(Query(where=(("teacher", "t1"),)))[0] == 15
        assert idx.query(Query(where=(("is_classification", "true"), ("teacher", "t0"))))[0] == 15
        assert idx.query(Query(where=(("scores.ifd", "(none)"),)))[0] == 6  # the field is absent
        total, rows = idx.query(Query(ranges=(("scores.ifd", 0.1, 0.2),), sort="scores.ifd", desc=True))
        got = [idx.read(r)["scores"]["ifd"] for r in rows]
        assert got == sorted(got, reverse=True) and min(got) >= 0.1 and max(got) <= 0.2 and total == len(got) == 8
        _, rows = idx.query(Query(sort="scores.ifd", per=30))
        assert [idx.read(r).get("scores") for r in rows][-6:] == [None] * 6  # absent values sort last
        _, rows = idx.query(Query(sort="len.output", desc=True, per=3))
        assert [len(idx.read(r)["output"]) for r in rows] == [6, 6, 6]
        assert idx.ids(Query(q="cats", where=(("teacher", "t0"),))) == ["r0", "r6", "r12", "r18", "r24"]
        assert idx.find("r29") is not None and idx.find("nope") is None
        with pytest.raises(SiftError, match="no field 'nope'"):
            idx.query(Query(sort="nope"))
        for hostile in ('"', "AND OR NOT", "NEAR(a b", "col:x*", "'); DROP TABLE records; --"):
            idx.query(Query(q=hostile))  # user words never reach SQL or FTS syntax


def test_index_is_rebuilt_only_when_the_artifact_changes(tmp_path: Path) -> None:
    art = _jsonl(tmp_path / "a.jsonl", _rows(5))
    target = tmp_path / ".view" / "a.sqlite"
    ArtifactIndex.open(art, target).close()
    first = target.stat().st_ino
    ArtifactIndex.open(art, target).close()
    os.utime(art, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same bytes: same hash, kept
    ArtifactIndex.open(art, target).close()
    assert target.stat().st_ino == first
    _jsonl(art, _rows(6))
    with ArtifactIndex.open(art, target) as idx:
        assert idx.count == 6
    assert target.stat().st_ino != first
    assert [p.name for p in target.parent.iterdir()] == ["a.sqlite"]  # no temporary left behind


def test_a_broken_line_is_named(tmp_path: Path) -> None:
    art = tmp_path / "a.jsonl"
    art.write_text('{"id": "a"}\n{"id": \n')
    with pytest.raises(SiftError, match=r"a.jsonl:2: invalid JSON"):
        ArtifactIndex.open(art, tmp_path / "a.sqlite")
    assert not (tmp_path / "a.sqlite").exists()


def test_a_large_artifact_is_indexed_in_the_background(run: Path) -> None:
    indexes = Indexes(Catalog.for_run(run), sync_bytes=0)
    assert indexes.open("filtered.jsonl") is None  # building: the caller shows the file's first records
    indexes.wait("filtered.jsonl")
    idx = indexes.open("filtered.jsonl")
    assert idx is not None and idx.count == 30
    idx.close()


# ---------------------------------------------------------------- the app on a real server


@contextlib.contextmanager
def serving(app: object) -> Iterator[str]:
    """`app` (or `app(port)` when it is a function of the port) on a real uvicorn, on loopback."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    if callable(app) and not hasattr(app, "state"):
        app = app(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def get(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, str, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def post(base: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    h = {"Content-Type": "application/json", "X-Sift-Viewer": "1", **(headers or {})}
    status, text, _ = get(base + "/api/review", h, json.dumps(body).encode())
    return status, json.loads(text) if text.startswith("{") else {"text": text}


def test_pages_show_records_as_text_never_html(run: Path) -> None:
    with serving(create_app(Catalog.for_run(run))) as base:
        status, page, headers = get(base + "/t?a=filtered.jsonl&q=tags")
        assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
        assert SCRIPT not in page and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
        status, page, _ = get(base + "/r?a=filtered.jsonl&n=5")
        assert status == 200 and SCRIPT not in page and "&lt;script&gt;" in page
        status, page, _ = get(base + "/")
        assert status == 200 and 'href="/t?a=filtered.rejected.jsonl&amp;w.reason=rouge_duplicate"' in page


def test_a_duplicate_shows_the_kept_record_beside_it(run: Path) -> None:
    with serving(create_app(Catalog.for_run(run))) as base:
        status, page, _ = get(base + "/r?a=filtered.rejected.jsonl&n=1")
    assert status == 200 and 'id="duplicate"' in page and "ROUGE-L 0.81" in page
    kept = page.split('class="kept"')[1]
    assert "Write item number 1 about dogs" in kept and 'href="/r?a=filtered.jsonl&amp;n=2"' in page


@pytest.mark.parametrize("path", [
    "/t?a=../../etc/passwd", "/t?a=/etc/passwd", "/r?a=..%2F..%2Fetc%2Fpasswd&n=1", "/t?a=filter.stats.json",
    "/t?a=outside.jsonl", "/t?a=.view/x.jsonl", "/api/status?a=../r/filtered.jsonl",
])
def test_paths_outside_the_run_are_refused(run: Path, path: str) -> None:
    outside = _jsonl(run.parent / "secret.jsonl", [{"id": "secret", "instruction": "TOP SECRET"}])
    (run / "outside.jsonl").symlink_to(outside)  # a link out of the run folder: refused too
    with serving(create_app(Catalog.for_run(run))) as base:
        status, page, _ = get(base + path)
    assert status in (403, 404) and "TOP SECRET" not in page


def test_static_files_are_only_the_viewers_own(run: Path) -> None:
    with serving(create_app(Catalog.for_run(run))) as base:
        assert get(base + "/static/viewer.js")[0] == 200
        assert get(base + "/static/..%2Fapp.py")[0] == 404
        assert get(base + "/static/app.py")[0] == 404


def test_a_single_file_viewer_serves_only_that_file(run: Path) -> None:
    with serving(create_app(Catalog.for_file(run / "filtered.rejected.jsonl"))) as base:
        status, page, _ = get(base + "/")
        assert status == 200 and "output_empty" in page  # redirected to the file's table
        assert get(base + "/t?a=filtered.jsonl")[0] == 403


def test_a_token_guards_every_page_and_call(run: Path) -> None:
    token = "s3cret-token-0123456789"
    with serving(create_app(Catalog.for_run(run), token=token)) as base:
        assert get(base + "/")[0] == 401
        assert get(base + "/t?a=filtered.jsonl")[0] == 401
        assert get(base + "/static/viewer.js")[0] == 401
        assert post(base, {"a": "filtered.jsonl", "id": "r0", "decision": "reject"})[0] == 401
        assert get(base + "/?token=wrong-token-0123456789")[0] == 401
        status, _, headers = get(base + f"/?token={token}")
        assert status == 200 and headers["set-cookie"].startswith(f"sift_view_token={token}; HttpOnly")
        assert get(base + "/t?a=filtered.jsonl", {"Cookie": f"sift_view_token={token}"})[0] == 200
        assert post(base, {"a": "filtered.jsonl", "id": "r0", "decision": "reject"},
                    {"Authorization": f"Bearer {token}"})[0] == 200
    assert [x["id"] for x in read_review(run / REVIEW_FILE)] == ["r0"]


def test_off_loopback_needs_a_token() -> None:
    check_access("127.0.0.1", None)
    check_access("::1", None)
    check_access("localhost", None)
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        with pytest.raises(SiftError, match="give --token"):
            check_access(host, None)
    with pytest.raises(SiftError, match="at least 16"):
        check_access("0.0.0.0", "short")
    check_access("0.0.0.0", "a-long-enough-token")


def test_on_loopback_another_host_name_is_refused(run: Path) -> None:
    """DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 gets nothing."""
    catalog = Catalog.for_run(run)
    with serving(lambda port: create_app(catalog, loopback_port=port)) as base:
        port = base.rsplit(":", 1)[1]
        assert get(base + "/")[0] == 200
        assert get(base + "/", {"Host": f"localhost:{port}"})[0] == 200
        assert get(base + "/", {"Host": f"evil.example:{port}"})[0] == 403


def test_review_api_writes_the_ledger_one_line_per_decision(run: Path) -> None:
    with serving(create_app(Catalog.for_run(run))) as base:
        # a plain form post (what another site could send) is refused
        status, _, _ = get(base + "/api/review", {"Content-Type": "application/x-www-form-urlencoded"},
                           b"a=filtered.jsonl&id=r0&decision=reject")
        assert status == 403
        assert post(base, {"a": "filtered.jsonl", "id": "r0", "decision": "reject", "note": "off topic"})[0] == 200
        assert post(base, {"a": "filtered.jsonl", "id": "r1", "decision": "edit", "output": "better"})[0] == 200
        assert post(base, {"a": "filtered.jsonl", "id": "r1", "decision": "edit", "output": " "})[0] == 400
        assert post(base, {"a": "../x.jsonl", "id": "r1", "decision": "accept"})[0] == 403
        # in bulk: every record matching the table's query, over all pages
        status, reply = post(base, {"a": "filtered.jsonl", "query": "q=cats&w.teacher=t0&per=2", "decision": "accept"})
        assert status == 200 and reply["written"] == 5
        status, page, _ = get(base + "/t?a=filtered.jsonl&review=accept")
        assert '<span id="total">5</span> records match' in page
        assert post(base, {"a": "filtered.jsonl", "id": "r0", "decision": "undo"})[0] == 200
        status, page, _ = get(base + "/r?a=filtered.jsonl&n=1")
        assert 'id="decision">none<' in page  # r0: rejected, accepted in bulk, then undone: no decision stands
        assert "3 decisions so far" in page
    lines = read_review(run / REVIEW_FILE)
    assert [(x["id"], x["decision"]) for x in lines][:2] == [("r0", "reject"), ("r1", "edit")]
    from pipeline.io.artifacts import file_sha256

    assert {x["sha256"] for x in lines} == {file_sha256(run / "filtered.jsonl")}
    assert lines[0]["note"] == "off topic" and lines[1]["output"] == "better"


def test_the_first_page_shows_while_a_large_artifact_is_indexed(run: Path) -> None:
    with serving(create_app(Catalog.for_run(run), sync_bytes=0)) as base:
        status, page, _ = get(base + "/t?a=filtered.jsonl")
        assert status == 200 and "Indexing filtered.jsonl" in page and "Write item number 0" in page


def test_the_command_serves_and_stops_on_ctrl_c(run: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SIFT_RUNS_DIR": str(run.parent), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "view", "--run", "r"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "sift view:" in line and "http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ", 1)[1].split()[0]
        assert get(url)[0] == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


def test_the_command_refuses_an_open_host_without_a_token(run: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import main

    monkeypatch.setenv("SIFT_RUNS_DIR", str(run.parent))
    assert main(["view", "--run", "r", "--host", "0.0.0.0"]) == 2
    assert "give --token" in capsys.readouterr().err


def test_eval_sets_side_by_side_and_where_the_student_got_worse(run: Path) -> None:
    samples = [{"id": "r0", "instruction": "i", "reference": "the cat sat", "base": "the cat sat", "student": "a dog"},
               {"id": "r1", "instruction": "j", "reference": "red", "base": "blue", "student": "red"},
               {"id": "r2", "instruction": "k <i>x</i>", "reference": "x", "base": "x", "student": "x"}]
    (run / "eval.json").write_text(json.dumps({"valid": {
        "examples": 3, "base": {"rouge_l": 0.5}, "student": {"rouge_l": 0.4}, "delta": {"rouge_l": -0.1},
        "samples": samples,
        "judge": {"win_rate": 0.5, "verdicts": [{"id": "r2", "score": 0.0}, {"id": "r1", "score": 1.0}]},
    }}))
    _jsonl(run / "valid.jsonl", [{"id": "r0", "messages": [{"role": "user", "content": "i"},
                                                           {"role": "assistant", "content": "x"}]}])
    with serving(create_app(Catalog.for_run(run))) as base:
        _, every, _ = get(base + "/eval")
        _, worse, _ = get(base + "/eval?worse=1")
        _, record_page, _ = get(base + "/r?a=filtered.jsonl&n=1")
    assert all(f'href="/id/{i}"' in every for i in ("r0", "r1", "r2")) and "judge: student better" in every
    # r0: no verdict, further from the reference; r2: the judge preferred the base; r1: the student won
    assert 'href="/id/r0"' in worse and 'href="/id/r2"' in worse and 'href="/id/r1"' not in worse
    assert "2 of 3 kept samples worse" in worse and "k &lt;i&gt;x&lt;/i&gt;" in worse
    assert 'id="student"' in record_page and "In the valid split" in record_page and "a dog" in record_page


@pytest.mark.parametrize(("args", "message"), [
    (["view", "--run", "nope"], "no such run folder"),
    (["view", "missing.jsonl"], "no such file"),
    (["view", "filter.stats.json"], "reads JSON Lines"),
    (["view", "--run", "r", "--port", "70000"], "field 'port'"),
])
def test_the_command_refuses_bad_targets_before_serving(run: Path, args: list[str], message: str,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import main

    monkeypatch.setenv("SIFT_RUNS_DIR", str(run.parent))
    monkeypatch.chdir(run)
    assert main(args) == 2
    assert message in capsys.readouterr().err
