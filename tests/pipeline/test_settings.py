"""The settings tree: one default per setting, nested flags and config sections, errors before work.

Covers pipeline/settings.py and the parts of pipeline/cli.py that turn sections into flags and config
keys: precedence (defaults < config file < command line), did-you-mean for unknown or misplaced keys,
NaN and infinity refused everywhere, YAML aliases refused, `--print-config` round-tripping, every
config file in configs/ valid for every command, and the code-wide rules (no function over 12
parameters; the embedded model's name and the API-key variable written once).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import settings as S
from pipeline.cli import COMMANDS, check_config, load_command, main, sections_of

REPO = Path(__file__).resolve().parents[2]


def _config(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--print-config"]) == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_defaults_config_then_command_line(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: r1\nteacher:\n  model: m-config\n  backend: openai\nclassify:\n  batch_size: 7\n")
    got = _config(capsys, ["classify"])
    assert got["teacher"]["model"] == S.EMBEDDED and got["classify"]["batch_size"] == S.ClassifySettings().batch_size
    got = _config(capsys, ["classify", "--config", str(cfg)])
    assert (got["run"], got["teacher"]["model"], got["teacher"]["backend"], got["classify"]["batch_size"]) == \
        ("r1", "m-config", "openai", 7)
    got = _config(capsys, ["classify", "--config", str(cfg), "--teacher.model", "m-cli", "--classify.batch-size",
                           "9", "--run", "r2"])
    assert (got["run"], got["teacher"]["model"], got["teacher"]["backend"], got["classify"]["batch_size"]) == \
        ("r2", "m-cli", "openai", 9)


def test_print_config_round_trips(tmp_path: Path, capsys) -> None:
    first = _config(capsys, ["classify", "--teacher.model", "x", "--classify.max_tokens", "5"])
    cfg = tmp_path / "printed.yaml"
    cfg.write_text(yaml.safe_dump(first))
    assert _config(capsys, ["classify", "--config", str(cfg)]) == first


@pytest.mark.parametrize(("text", "needles"), [
    ("lr: 0.001\n", ["field 'lr'", "did you mean `train.lr`?"]),
    ("teacher:\n  modle: x\n", ["field 'teacher.modle'", "did you mean `teacher.model`?"]),
    ("teacher:\n  epochs: 2\n", ["field 'teacher.epochs'", "did you mean `train.epochs`?"]),
    ("teachr:\n  model: x\n", ["field 'teachr'", "did you mean `teacher`?"]),
    ("teacher: x\n", ["field 'teacher'", "must be a mapping"]),
])
def test_unknown_or_misplaced_keys_say_where_they_belong(tmp_path: Path, capsys, text: str,
                                                         needles: list[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    _fails(capsys, ["classify", "--config", str(cfg)], str(cfg), *needles)


def test_an_unknown_flag_suggests_the_nested_one(capsys) -> None:
    _fails(capsys, ["classify", "--max-tokens", "3"], "unknown option --max-tokens", "--classify.max-tokens")
    _fails(capsys, ["classify", "--teacher", "x"], "`--teacher` is a section", "--teacher.model")
    _fails(capsys, ["classify", "--classify.batch", "3"], "unknown option --classify.batch")


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_non_finite_floats_are_refused_on_the_command_line(capsys, value: str) -> None:
    _fails(capsys, ["loop", "--print-config", f"--loop.temperature={value}"], "loop.temperature", "finite")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
def test_non_finite_floats_are_refused_in_a_config_file(tmp_path: Path, capsys, value: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train:\n  lr: {value}\n")
    _fails(capsys, ["train", "--config", str(cfg), "--print-config"], str(cfg), "train.lr", "finite")


def test_non_finite_floats_are_refused_in_code() -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(S.SettingsError) as e:
            S.TrainSettings(lr=bad)
        assert e.value.field == "lr"


def test_a_range_error_names_the_dotted_field(capsys) -> None:
    _fails(capsys, ["classify", "--classify.batch_size", "0", "--print-config"], "classify.batch_size",
           "at least 1")


def test_model_and_pool_together_are_refused(capsys) -> None:
    _fails(capsys, ["classify", "--teacher.model", "a", "--teacher.pool", "b,c", "--print-config"],
           "teacher.pool", "not both")


ALIAS_BOMB = """classify:
  prompt: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
lol: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
"""


def test_yaml_aliases_are_refused(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(ALIAS_BOMB)
    _fails(capsys, ["classify", "--config", str(cfg)], f"{cfg}:3:", "aliases")


def test_a_billion_laughs_config_fails_fast_in_bounded_memory(tmp_path: Path) -> None:
    """The hostile case as reported: nine levels of nine aliases under a valid key, about 700 bytes
    that expand to a billion strings. Run in a child capped at 1 GiB of address space, so the old
    behaviour (gigabytes for an error message's repr) fails the test instead of the machine."""
    levels = ["&a0 [" + ",".join(['"lol"'] * 9) + "]"]
    levels += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("generate:\n  prompt: [" + ", ".join(levels) + "]\n")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
            "from pipeline.cli import main; sys.exit(main(['generate', '--run', 'x', '--config', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "aliases" in done.stderr and "internal error" not in done.stderr


def test_a_huge_value_never_reaches_a_message_whole(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("classify:\n  batch_size: [" + ",".join(["1"] * 100_000) + "]\n")
    err = _fails(capsys, ["classify", "--config", str(cfg)], "classify.batch_size", "expected an integer")
    assert len(err) < 500


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_in_the_repository_feeds_every_command(path: Path, capsys) -> None:
    check_config(yaml.safe_load(path.read_text()), path)
    for name in COMMANDS:
        if any(True for _ in sections_of(load_command(name))):
            argv = [*name.split(), *(["hello"] if name == "sample" else []), "--config", str(path),
                    "--print-config"]
            if name in {"filter", "score"}:
                argv.insert(1, "--run")
                argv.insert(2, "demo")
            assert main(argv) == 0, (name, capsys.readouterr().err)
            capsys.readouterr()


def test_sections_mean_one_thing() -> None:
    """A section name maps to one class in every command that takes it (`train:` is always TrainSettings)."""
    seen: dict[str, type] = {}
    for name in COMMANDS:
        for param, cls in sections_of(load_command(name)):
            assert seen.setdefault(param.name, cls) is cls, (name, param.name)


def test_every_field_is_documented() -> None:
    from pipeline.cli import parse_docstring

    for cls in (c for c in vars(S).values() if isinstance(c, type) and dataclasses.is_dataclass(c)):
        documented = parse_docstring(cls.__doc__).params
        for f in dataclasses.fields(cls):
            assert documented.get(f.name), f"{cls.__name__}.{f.name} has no help line"


CODE_DIRS = ("pipeline", "train", "filters")


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for top in CODE_DIRS:
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    found.append((f"{path.relative_to(REPO)}:{node.lineno} {node.name}", node))
    return found


def test_no_function_takes_more_than_12_parameters() -> None:
    def count(f: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
        a = f.args
        return len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)

    over = {where: count(f) for where, f in _functions() if count(f) > 12}
    assert not over, over


def _string_constants(value: str) -> list[str]:
    """Where `value` is written as a string literal in code (docstrings and comments do not count)."""
    hits = []
    for top in CODE_DIRS:
        for path in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(path.read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                          and n.body and isinstance(n.body[0], ast.Expr)
                          and isinstance(n.body[0].value, ast.Constant)}
            hits += [f"{path.relative_to(REPO)}:{n.lineno}" for n in ast.walk(tree)
                     if isinstance(n, ast.Constant) and n.value == value and id(n) not in docstrings]
    return hits


@pytest.mark.parametrize("value", [S.EMBEDDED, S.API_KEY_ENV])
def test_a_default_is_written_once(value: str) -> None:
    assert _string_constants(value) == ["pipeline/settings.py:" + str(_line_of(value))]


def _line_of(value: str) -> int:
    lines = (REPO / "pipeline" / "settings.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.split("=", 1)[-1].strip().startswith(json.dumps(value)))
