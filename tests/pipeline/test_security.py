"""Security: API keys never reach an artifact, model output is never executed, config paths stay inside.

    .venv/bin/pytest tests/pipeline/test_security.py
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import SiftError
from pipeline.settings import GenerateSettings, TeacherSettings
from pipeline.stages.generate import generate
from pipeline.teachers.base import Request
from tests.conftest import REPO
from tests.pipeline.openai_server import FakeOpenAI

KEY = "sk-test-PLANTED-0123456789abcdef"
KEY_ENV = "SIFT_TEST_API_KEY"


def _every_file(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_a_planted_api_key_reaches_the_server_and_nothing_else(in_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    assert main(["seeds", str(REPO / "seeds" / "default.jsonl"), "--run", "r"]) == 0
    with FakeOpenAI() as server:
        assert main(["generate", "--run", "r", "--teacher.backend", "openai", "--teacher.base_url", server.url,
                     "--teacher.model", "fake-model", "--teacher.api_key_env", KEY_ENV, "--generate.n", "3",
                     "--generate.max_requests", "4", "--generate.batch_size", "2", "--generate.max_tokens", "64"]) == 0
    out, err = capsys.readouterr()
    assert server.auth_headers and all(h == f"Bearer {KEY}" for h in server.auth_headers)
    run = in_tmp / "runs" / "r"
    files = _every_file(run)
    assert {"instructions.jsonl", "manifest.json"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert KEY.encode() not in data, f"the API key leaked into {path}"
        assert b"PLANTED" not in data, f"part of the API key leaked into {path}"
    assert KEY not in out and KEY not in err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["settings"]["teacher"]["api_key_env"] == KEY_ENV  # the name, not the value


def test_a_refused_key_is_not_echoed_anywhere(in_tmp: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every request answered 401 (a wrong key): the error is recorded without the key."""
    monkeypatch.setenv(KEY_ENV, KEY)
    assert main(["seeds", str(REPO / "seeds" / "default.jsonl"), "--run", "r"]) == 0
    message = ""
    with FakeOpenAI(faults=lambda key, attempt: "401") as server:
        try:
            generate(run="r", teacher=TeacherSettings(model="fake-model", backend="openai", base_url=server.url,
                                                      api_key_env=KEY_ENV),
                     generate=GenerateSettings(n=3, max_requests=2, batch_size=2, max_tokens=64))
        except SiftError as e:
            message = str(e)
    out, err = capsys.readouterr()
    assert server.auth_headers, "the server was never called"
    assert KEY not in message and KEY not in out and KEY not in err
    files = _every_file(in_tmp / "runs" / "r")
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_secret_looking_settings_are_redacted_in_the_manifest(in_tmp: Path) -> None:
    from pipeline.io.runs import record_stage

    run = in_tmp / "runs" / "r"
    run.mkdir(parents=True)
    record_stage(run, "x", {"api_key": KEY, "nested": {"hf_token": KEY, "password": KEY}, "api_key_env": KEY_ENV})
    text = (run / "manifest.json").read_text()
    assert KEY not in text and KEY_ENV in text


def test_credentials_in_a_base_url_are_never_written_or_shown(tmp_path: Path) -> None:
    """User-info and ?api_key= in a base URL (--base-url, a teachers file, a bad URL, a server error
    quoting one) reach no file of the run (manifest settings and `command`, report, ledgers, stats) and
    no output; the rest of the URL is kept."""
    from pipeline.redact import redact_urls
    from tests.pipeline.kill_harness import scripted_reply, sift, sift_ok

    runs = tmp_path / "runs"
    outputs = []
    with FakeOpenAI(reply=scripted_reply) as server, FakeOpenAI(lambda key, attempt: "400") as echo:
        host = server.url.split("//", 1)[1]
        teachers = tmp_path / "teachers.yaml"
        teachers.write_text(f"teachers:\n  - name: a\n    model: m\n    backend: openai\n"
                            f"    base_url: http://user:SECRET2@{host}\n")
        outputs.append(sift_ok(["seeds", "seeds/default.jsonl", "--run", "r"], runs=runs))
        outputs.append(sift_ok(["seeds", "seeds/default.jsonl", "--run", "r2"], runs=runs))
        single = ["--teacher.backend", "openai", "--teacher.model", "m", "--teacher.base_url",
                  server.url + "?api_key=SECRET1"]
        for args in (["--run", "r", *single], ["--run", "r2", "--teacher.pool", str(teachers)]):
            code, out, err = sift(["generate", *args, "--generate.n", "3", "--generate.batch_size", "2"], runs=runs)
            assert code == 0, err
            outputs += [out, err]
        commands = {run: json.loads((runs / run / "manifest.json").read_text())["command"] for run in ("r", "r2")}
        for run in ("r", "r2"):
            outputs.append(sift_ok(["report", "--run", run], runs=runs))
        code, out, err = sift(["generate", "--run", "r", "--teacher.backend", "openai", "--teacher.model", "m",
                               "--teacher.base_url", "ftp://u:SECRET3@example.org/v1"], runs=runs)
        assert code == 2 and "ftp://***@example.org/v1" in err
        outputs += [out, err]
        # a server error that quotes a URL with credentials (the fake echoes the prompt) is redacted too
        from pipeline.teachers.openai_compat import OpenAITeacher

        bad = OpenAITeacher("m", base_url=echo.url, max_retries=0).generate(
            [Request(prompt="see http://u:SECRET4@example.org/?token=SECRET5")])
        assert bad[0].finish_reason == "error" and "http://***@example.org/?token=***" in bad[0].error
        outputs.append(bad[0].error + repr(OpenAITeacher("m", base_url=server.url + "?key=SECRET6")))
    for path in _every_file(runs):
        assert b"SECRET" not in path.read_bytes(), f"a URL's credentials leaked into {path}"
    assert not any("SECRET" in text for text in outputs)
    manifest = json.loads((runs / "r" / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["settings"]["teacher"]["base_url"] == server.url + "?api_key=***"
    assert f"--teacher.base_url {server.url}?api_key=*** " in commands["r"] and "SECRET" not in str(commands)
    manifest2 = json.loads((runs / "r2" / "manifest.json").read_text())
    assert manifest2["stages"]["generate"]["settings"]["teachers"][0]["base_url"] == f"http://***@{host}"
    assert redact_urls("http://h/v1?api-version=1&apikey=a&sig=b") == "http://h/v1?api-version=1&apikey=***&sig=***"


# ---------------------------------------------------------------- model output is data, never code

DANGEROUS_CALLS = {"eval", "exec", "compile", "__import__"}
DANGEROUS_ATTRS = {("pickle", "load"), ("pickle", "loads"), ("marshal", "load"), ("marshal", "loads"),
                   ("yaml", "load"), ("yaml", "unsafe_load"), ("dill", "load"), ("dill", "loads")}


def _dangerous(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that would run or unpickle text: eval(...), exec(...), pickle.load(...), shell=True.

    A method named eval (`model.eval()`) is an attribute call on an object and is not flagged.
    """
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in DANGEROUS_CALLS:
            found.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in DANGEROUS_ATTRS:
            found.append((node.lineno, f"{f.value.id}.{f.attr}"))
        elif isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                and f.value.id == "torch" and not any(k.arg == "weights_only" for k in node.keywords):
            found.append((node.lineno, "torch.load without weights_only"))
        for k in node.keywords:
            if k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value is True:
                found.append((node.lineno, "shell=True"))
    return found


def test_the_scanner_finds_what_it_looks_for() -> None:
    code = ("eval(text)\nexec(x)\nimport pickle\npickle.loads(b)\nmodel.eval()\nself.model.eval()\n"
            "subprocess.run(c, shell=True)\ntorch.load(p)\ntorch.load(p, weights_only=True)\n")
    assert [w for _, w in _dangerous(ast.parse(code))] == ["eval", "exec", "pickle.loads", "shell=True",
                                                           "torch.load without weights_only"]


def test_no_source_file_executes_or_unpickles_text() -> None:
    sources = [p for pkg in ("pipeline", "filters", "train") for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(sources) > 20
    problems = [f"{p.relative_to(REPO)}:{line}: {what}" for p in sources
                for line, what in _dangerous(ast.parse(p.read_text(), filename=str(p)))]
    assert not problems, problems


# ---------------------------------------------------------------- paths from config stay in the run folder


@pytest.mark.parametrize("run", ["../../etc", "/etc", "..", "a/../../b", "x\\..\\y"])
def test_run_names_from_a_config_file_cannot_leave_runs(run: str, in_tmp: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = in_tmp / "run.yaml"
    config.write_text(json.dumps({"run": run}))  # JSON is YAML
    seeds = str(REPO / "seeds" / "default.jsonl")
    for argv in (["seeds", seeds, "--config", str(config)], ["export", "--config", str(config)],
                 ["filter", "--config", str(config)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "field 'run'" in err and "plain name" in err and "Traceback" not in err
    assert sorted(p.name for p in in_tmp.iterdir()) == ["run.yaml"]


def test_a_section_cannot_smuggle_a_path_either(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = in_tmp / "run.toml"
    config.write_text('[seeds]\nrun = "../outside"\n')
    assert main(["seeds", str(REPO / "seeds" / "default.jsonl"), "--config", str(config)]) == 2
    assert "field 'run'" in capsys.readouterr().err
    assert not (in_tmp.parent / "outside").exists()
