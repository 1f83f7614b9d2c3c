"""`--teacher.options`: a backend's own settings from one key=value string, typed, checked, and
reaching the backend (a loopback server for openai, a tiny model for transformers)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import SiftError
from pipeline.io.artifacts import read_jsonl, write_jsonl
from pipeline.teachers.options import make_backend, parse_teacher_options
from tests.pipeline.openai_server import FakeOpenAI
from tests.pipeline.test_teacher_hf import make_tiny


def test_values_take_the_type_of_the_backends_option() -> None:
    parsed = parse_teacher_options(" timeout=300, max_retries=10 ,concurrency=4,chat=false,total_timeout=none",
                                   "openai")
    assert parsed == {"timeout": 300.0, "max_retries": 10, "concurrency": 4, "chat": False, "total_timeout": None}
    assert isinstance(parsed["timeout"], float) and isinstance(parsed["max_retries"], int)
    assert parse_teacher_options("engine=hf,lanes=2,max-rows=64,dtype=float32", "transformers") == {
        "engine": "hf", "lanes": 2, "max_rows": 64, "dtype": "float32"}
    assert parse_teacher_options("", "openai") == {} and parse_teacher_options(None, "vllm") == {}
    assert parse_teacher_options("attempt_timeout=5,max_reply_bytes=4096", "openai") == {
        "attempt_timeout": 5.0, "max_reply_bytes": 4096}
    assert parse_teacher_options("gpu_memory_utilization=0.8,tensor_parallel_size=2", "vllm") == {
        "gpu_memory_utilization": 0.8, "tensor_parallel_size": 2}


@pytest.mark.parametrize(("text", "backend", "says"), [
    ("timeuot=3", "openai", "no option 'timeuot'; it takes: chat (bool), concurrency (int), timeout (float)"),
    ("max_retries=many", "openai", "max_retries: expected an integer, got 'many'"),
    ("chat=perhaps", "openai", "chat: expected true or false"),
    ("concurrency=2.5", "openai", "expected an integer"),
    ("timeout", "openai", "expected key=value"),
    ("base_url=http://x/v1", "openai", "--teacher.base_url"),
    ("batch_size=4", "transformers", "--generate.batch_size"),
    ("on_batch=print", "transformers", "no option 'on_batch'"),
    ("timeout=1,timeout=2", "openai", "given twice"),
    ("engine=hf", "openai", "no option 'engine'"),
    ("timeout=nan", "openai", "timeout: expected a finite number, got 'nan'"),
    ("total_timeout=inf", "openai", "total_timeout: expected a finite number, got 'inf'"),
    ("backoff_max=-Infinity", "openai", "backoff_max: expected a finite number"),
    ("attempt_timeout=1e999", "openai", "attempt_timeout: expected a finite number, got '1e999'"),
    ("gpu_memory_utilization=NaN", "vllm", "gpu_memory_utilization: expected a finite number"),
])
def test_a_bad_option_is_one_error_naming_it(text: str, backend: str, says: str) -> None:
    with pytest.raises(SiftError) as e:
        parse_teacher_options(text, backend)
    assert e.value.field == "teacher.options" and says in str(e.value)


def test_a_short_timeout_reaches_the_openai_client_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """The server takes 2 s a reply: with timeout=0.3 and no retries every request is a teacher
    error after one attempt that waited 0.3 s (the ledger says so), instead of 60 s or more."""
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path))
    run = tmp_path / "r"
    run.mkdir()
    write_jsonl(run / "instructions.jsonl", [{"id": f"i{k}", "instruction": f"Name {k} colours."} for k in range(3)])
    with FakeOpenAI(delay=2.0) as server:
        rc = main(["classify", "--run", "r", "--teacher.backend", "openai", "--teacher.model", "m",
                   "--teacher.base_url", server.url, "--teacher.options", "timeout=0.3,max_retries=0"])
    assert rc == 0
    rejected = read_jsonl(run / "classified.rejected.jsonl")
    assert len(rejected) == 3 and {r["reason"] for r in rejected} == {"teacher_error"}
    assert all(re.search(r"within 0\.[36]s", str(r)) and "1 attempt(s)" in str(r) for r in rejected), rejected
    assert sum(server.attempts.values()) == 3  # one attempt each: max_retries=0 got through


def test_bad_options_fail_the_command_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("SIFT_RUNS_DIR", str(tmp_path))
    (tmp_path / "r").mkdir()
    write_jsonl(tmp_path / "r" / "instructions.jsonl", [{"id": "i0", "instruction": "Name a colour."}])
    rc = main(["classify", "--run", "r", "--teacher.backend", "openai", "--teacher.model", "m",
               "--teacher.base_url", "http://127.0.0.1:9/v1", "--teacher.options", "retries=3"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "field 'teacher.options'" in err and "retries" in err and "max_retries (int)" in err
    assert not (tmp_path / "r" / "classified.jsonl").exists()


def test_a_teachers_file_with_nan_or_inf_options_names_the_option(tmp_path: Path) -> None:
    from pipeline.teachers.specs import parse_teachers

    for value, shown in ((".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")):
        p = tmp_path / "teachers.yaml"
        p.write_text(f"teachers:\n  - model: m\n    backend: openai\n    base_url: http://h/v1\n"
                     f"    options: {{timeout: {value}}}\n")
        with pytest.raises(SiftError, match=f"timeout: expected a finite number, got {shown}") as e:
            parse_teachers(str(p))
        assert e.value.path == p and e.value.line == 2 and e.value.field == "teachers[0].options"
        p.write_text(f"teachers:\n  - model: m\n    backend: openai\n    base_url: http://h/v1\n"
                     f"    options: {{max_retries: {value}}}\n")
        with pytest.raises(SiftError, match="max_retries: expected an integer") as e:
            parse_teachers(str(p))


def test_transformers_options_choose_the_engine_and_check_its_values(tmp_path: Path) -> None:
    tiny = make_tiny(tmp_path / "tiny")
    assert make_backend(teacher=str(tiny), backend="transformers", batch_size=2).engine == "fast"
    teacher = make_backend(teacher=str(tiny), backend="transformers", batch_size=2,
                           teacher_options="engine=hf,dtype=float32")
    assert teacher.engine == "hf" and teacher.dtype == "float32"
    with pytest.raises(SiftError, match="engine must be") as e:
        make_backend(teacher=str(tiny), backend="transformers", batch_size=2, teacher_options="engine=turbo")
    assert e.value.field == "teacher.options"
