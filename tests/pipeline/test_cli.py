"""The CLI: every command has help for every option; config file < command line; one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import __version__, cli, typed
from pipeline.cli import COMMANDS, _params, load_command, main, parse_docstring
from pipeline.errors import SiftError
from pipeline.io.runs import locked, run_dir

GOOD_SEED = {"id": "t1", "name": "t", "instruction": "Add the numbers.",
             "instances": [{"input": "1, 2", "output": "3"}], "is_classification": False}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_documents_every_option(name: str) -> None:
    func = load_command(name)
    doc = parse_docstring(func.__doc__)
    assert doc.summary, f"{name} has no summary line"
    for param, _ in _params(func):
        assert doc.params.get(param.name), f"`sift {name}`: option {param.name!r} has no help in Args:"


def test_help_lists_every_stage() -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for stage in ["seeds", "generate", "classify", "instances", "filter", "export", "train", "eval", "report",
                  "inspect", "model"]:
        assert f"    {stage}" in out


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_docstring_parser() -> None:
    doc = parse_docstring("""Summary.

    More text.

    Args:
        alpha: the first
            continued here
        beta (int): the second
    """)
    assert doc.summary == "Summary."
    assert doc.description == "More text."
    assert doc.params == {"alpha": "the first continued here", "beta": "the second"}


def _seed(tmp: Path) -> Path:
    p = tmp / "s.jsonl"
    p.write_text(json.dumps(GOOD_SEED) + "\n")
    return p


def test_config_file_then_command_line(in_tmp: Path) -> None:
    seeds = _seed(in_tmp)
    (in_tmp / "run.yaml").write_text("run: from-top\nseeds:\n  run: from-section\n")
    assert main(["seeds", str(seeds), "--config", "run.yaml"]) == 0
    assert (in_tmp / "runs" / "from-section" / "seeds.jsonl").exists()
    assert main(["seeds", str(seeds), "--config", "run.yaml", "--run", "from-cli"]) == 0
    assert (in_tmp / "runs" / "from-cli" / "seeds.jsonl").exists()
    (in_tmp / "run.toml").write_text('run = "toml-run"\n')
    assert main(["seeds", str(seeds), "--config", "run.toml"]) == 0
    assert (in_tmp / "runs" / "toml-run" / "seeds.jsonl").exists()


def test_bad_config_is_one_clear_line(in_tmp: Path, capsys) -> None:
    seeds = _seed(in_tmp)
    (in_tmp / "bad.yaml").write_text("seeds:\n  rn: x\n")
    assert main(["seeds", str(seeds), "--config", "bad.yaml"]) == 2
    assert "field 'seeds.rn': unknown setting" in capsys.readouterr().err
    (in_tmp / "broken.yaml").write_text("run: [unclosed\n")
    assert main(["seeds", str(seeds), "--config", "broken.yaml"]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "invalid settings file" in err


def test_converter_checks_config_types() -> None:
    conv = typed.converter(int, "n")
    assert conv("3") == 3
    with pytest.raises(ValueError):
        conv(2.5)
    with pytest.raises(ValueError):
        typed.converter(bool, "b")("maybe")
    assert typed.converter(int | None, "n")(None) is None


def test_run_names_cannot_escape(in_tmp: Path) -> None:
    for bad in ["../x", "/etc", "a/b", "..", ""]:
        with pytest.raises(SiftError):
            run_dir(bad)


def test_second_process_on_a_run_is_refused(in_tmp: Path) -> None:
    directory = run_dir("locked")
    with locked(directory):
        seeds = _seed(in_tmp)
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "seeds", str(seeds), "--run", "locked"],
                              capture_output=True, text=True, cwd=in_tmp,
                              env={"PYTHONPATH": str(Path(cli.__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "another sift process" in proc.stderr
    assert not (directory / "seeds.jsonl").exists()


def test_generate_composes_the_teacher_generate_and_filter_sections(in_tmp: Path, capsys) -> None:
    (in_tmp / "run.yaml").write_text("run: demo-x\nfilter:\n  rules: alpaca\n  threshold: 0.6\n"
                                     "generate:\n  n: 9\n")
    assert main(["generate", "--config", "run.yaml", "--print-config", "--generate.n", "7",
                 "--teacher.pool", "a,b=2"]) == 0
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run"] == "demo-x" and printed["generate"]["n"] == 7  # the command line wins
    assert (printed["filter"]["rules"], printed["filter"]["threshold"]) == ("alpaca", 0.6)
    assert printed["teacher"]["pool"] == "a,b=2" and printed["generate"]["temperature"] is None
    assert not (in_tmp / "runs").exists()  # printed, not run
