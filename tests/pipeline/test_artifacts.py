"""Artifact I/O: strict reads that name file and line, atomic writes, the journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io.artifacts import (
    Journal,
    content_id,
    iter_jsonl,
    read_jsonl,
    read_records,
    require,
    write_json,
    write_jsonl,
)
from tests.conftest import REPO


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def test_content_id_is_stable_and_order_free() -> None:
    assert content_id({"a": 1, "b": "x"}) == content_id({"b": "x", "a": 1})
    assert content_id({"a": 1}) != content_id({"a": 2})
    assert content_id("hello", prefix="ins_").startswith("ins_")
    assert len(content_id("x")) == 16


def test_reads_jsonl_skipping_blank_lines(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_jsonl(p)) == [(1, {"a": 1}), (3, {"a": 2})]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"a": 1}\n{"a": 2}\n{"a": \n', ":3: invalid JSON"),
        (b'{"a": 1}\n[1, 2]\n', ":2: is a JSON list"),
        (b'[{"a": 1}, {"a": 2}]\n', ":1: is a JSON list"),
        (b'[{"a": 1},\n {"a": 2}]\n', ":1: looks like a JSON list"),
        (b'{"a": 1}\n"text"\n', ":2: expected a JSON object, got str"),
        (b'\xef\xbb\xbf{"a": 1}\n', ":1: starts with a UTF-8 byte-order mark"),
        (b'{"a": 1}\n{"a": "\xff"}\n', ":2: invalid UTF-8"),
        (b'{"a": 1}\n{"a": "\x00"}\n', ":2: contains a NUL byte"),
        (b"", "is empty"),
        (b"\n\n  \n", "is empty"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: bytes, needle: str) -> None:
    p = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(SiftError) as err:
        read_jsonl(p)
    assert str(p) in str(err.value)
    assert needle in str(err.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(SiftError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(SiftError, match="is a directory"):
        read_jsonl(tmp_path)


def test_read_records_accepts_a_json_list(tmp_path: Path) -> None:
    p = _write(tmp_path / "alpaca.json", json.dumps([{"instruction": "a"}, {"instruction": "b"}]))
    assert read_records(p) == [(1, {"instruction": "a"}), (2, {"instruction": "b"})]
    q = _write(tmp_path / "x.jsonl", '{"instruction": "a"}\n')
    assert read_records(q) == [(1, {"instruction": "a"})]
    bad = _write(tmp_path / "bad.json", '[{"instruction": "a"}, 3]')
    with pytest.raises(SiftError, match="item 2"):
        read_records(bad)


def test_require_names_field_and_type() -> None:
    with pytest.raises(SiftError, match=r"f.jsonl:7: field 'n': expected an integer, got string"):
        require({"n": "3"}, "n", int, path="f.jsonl", line=7)
    with pytest.raises(SiftError, match="field 'n': expected an integer, got boolean"):
        require({"n": True}, "n", int, path="f.jsonl", line=7)
    with pytest.raises(SiftError, match="field 'm': missing"):
        require({}, "m", str, path="f.jsonl", line=1)
    assert require({}, "m", str, path=None, line=None, optional=True, default="d") == "d"


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"i": i} for i in range(3)])
    assert read_jsonl(p) == [{"i": 0}, {"i": 1}, {"i": 2}]
    write_json(tmp_path / "o.json", {"x": 1})
    assert json.loads((tmp_path / "o.json").read_text()) == {"x": 1}
    assert [x.name for x in tmp_path.iterdir() if x.name.startswith(".")] == []


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"old": True}])

    def boom():
        yield {"new": 1}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(p, boom())
    assert read_jsonl(p) == [{"old": True}]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.jsonl"]


def test_writer_killed_mid_way_leaves_previous_file(tmp_path: Path) -> None:
    """SIGKILL a process in the middle of a large atomic write: the old artifact survives whole."""
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"old": i} for i in range(5)])
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.io.artifacts import write_jsonl
        def slow():
            for i in range(10**6):
                if i == 1000:
                    print("started", flush=True)
                    time.sleep(60)
                yield {{"new": i, "pad": "x" * 100}}
        write_jsonl({str(p)!r}, slow())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_jsonl(p) == [{"old": i} for i in range(5)]


def test_unwritable_output_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SiftError, match="cannot write"):
        write_jsonl(blocker / "sub" / "out.jsonl", [{"a": 1}])


def test_journal_round_trip_and_torn_last_line(tmp_path: Path) -> None:
    j = Journal(tmp_path / "stage.journal")
    assert j.read() == []
    j.append([{"batch": 0}, {"batch": 1}])
    with open(j.path, "a") as f:
        f.write('{"batch": 2, "records": [1, 2')  # killed mid-write
    assert j.read() == [{"batch": 0}, {"batch": 1}]
    j2 = Journal(j.path)
    j2.append([{"batch": 2}])
    assert j2.read() == [{"batch": 0}, {"batch": 1}, {"batch": 2}]
    assert j.path.read_text().count("\n") == 3


def test_journal_torn_line_ending_in_newline_is_dropped(tmp_path: Path) -> None:
    j = Journal(tmp_path / "s.journal")
    j.append([{"a": 1}])
    with open(j.path, "a") as f:
        f.write('{"a": \n')
    assert j.read() == [{"a": 1}]


def test_journal_corruption_in_the_middle_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "s.journal"
    p.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(SiftError, match=":2: corrupt journal entry"):
        Journal(p).read()


def test_json_file_must_hold_a_list(tmp_path: Path) -> None:
    p = _write(tmp_path / "data.json", '{"instruction": "a"}\n{"instruction": "b"}\n')
    with pytest.raises(SiftError, match="looks like JSON Lines"):
        read_records(p)
    with pytest.raises(SiftError, match="is empty"):
        read_records(_write(tmp_path / "e.json", "  \n"))


def test_overlong_line_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path / "big.jsonl", '{"a": 1}\n{"a": "' + "x" * (5 * 1024 * 1024) + '"}\n')
    with pytest.raises(SiftError, match=r"big.jsonl:2: line longer than 4 MiB"):
        read_jsonl(p)


# ---------------------------------------------------------------- what json.loads accepts but sift cannot use (#25.12)


@pytest.mark.parametrize(("text", "field"), [
    ('{"instruction": "ok", "instances": [{"input": "", "output": "\\udc80"}]}', "instances[0].output"),
    ('{"a": {"\\ud800": 1}}', "a"),  # a key: named by where it sits
    ('{"instruction": "\\ud83d"}', "instruction"),  # the first half of a pair, alone
])
def test_a_lone_surrogate_escape_is_refused_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "fine"}\n' + text + "\n")
    with pytest.raises(SiftError, match="lone surrogate") as e:
        read_jsonl(path)
    assert (e.value.line, e.value.field) == (2, field)


def test_a_surrogate_pair_and_an_escaped_backslash_are_text(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "\\ud83d\\ude00 and \\\\ud800"}\n')
    assert read_jsonl(path) == [{"instruction": "\U0001F600 and \\ud800"}]
    write_jsonl(tmp_path / "b.jsonl", read_jsonl(path))  # and it writes back


def test_nesting_is_refused_past_64_levels_in_every_reader(tmp_path: Path) -> None:
    from pipeline.io.artifacts import MAX_DEPTH, read_json

    ok = '{"a": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    deep = '{"a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"
    (tmp_path / "ok.jsonl").write_text(ok + "\n")
    assert read_jsonl(tmp_path / "ok.jsonl")
    for name, text in (("deep.jsonl", deep + "\n"), ("deep.json", f'[{{"b": 1}}, {deep}]'), ("doc.json", deep)):
        (tmp_path / name).write_text(text)
    with pytest.raises(SiftError, match="deep.jsonl:1: field 'a': nested deeper than 64 levels"):
        read_jsonl(tmp_path / "deep.jsonl")
    with pytest.raises(SiftError, match=r"deep.json: field '\[1\]': nested deeper"):
        read_records(tmp_path / "deep.json")
    with pytest.raises(SiftError, match="doc.json: field 'a': nested deeper"):
        read_json(tmp_path / "doc.json")
    (tmp_path / "huge.json").write_text('{"x": 1, "a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(SiftError, match="huge.json: field 'a': nested deeper"):
        read_json(tmp_path / "huge.json")  # too deep for json.loads itself: found by scanning
