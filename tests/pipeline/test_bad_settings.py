"""Bad settings end in one clear error naming the field, before any work and with nothing written.

    .venv/bin/python -m pytest -q tests/pipeline/test_bad_settings.py

Out-of-range settings (generate, classify, instances, filter, loop), `filter.prefilter` (unknown, or
minhash without datasketch), and
`--config` files with unknown keys, misspelt sections, or that are not regular files at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import MAX_CONFIG_BYTES, main


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(".lock")}


def _no_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was built before the settings were checked")


def _fails(argv: list[str], root: Path, capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    """The command fails with one line naming what is expected, writes nothing, and builds no model
    (every torch module is built through nn.Module.__init__, which trips here): checked first."""
    import torch

    before = _files(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "__init__", _no_model)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sift: error: ") and err.count("\n") == 1 and "internal error" not in err, err
    for s in expected:
        assert s in err, f"{s!r} not in {err!r}"
    assert _files(root) == before  # nothing written
    return err


def _run_with(root: Path, name: str, records: list[dict]) -> None:
    d = root / "runs" / "r"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text("".join(json.dumps(r) + "\n" for r in records))


INSTRUCTION = {"id": "i1", "instruction": "Name three primary colors.", "input": "", "output": "red, blue, yellow"}


@pytest.mark.parametrize(("argv", "field"), [
    (["classify", "--run", "r", "--classify.max_tokens", "0"], "classify.max_tokens"),
    (["classify", "--run", "r", "--classify.batch_size", "0"], "classify.batch_size"),
    (["generate", "--run", "r", "--generate.n", "0"], "generate.n"),
    (["generate", "--run", "r", "--generate.top_p", "0"], "generate.top_p"),
    (["generate", "--run", "r", "--generate.max_requests", "0"], "generate.max_requests"),
    (["generate", "--run", "r", "--filter.threshold", "1.5"], "filter.threshold"),
    (["instances", "--run", "r", "--instances.max_instances", "0"], "instances.max_instances"),
    (["instances", "--run", "r", "--teacher.model", " "], "teacher.model"),
    (["filter", "--run", "r", "--filter.workers", "0"], "filter.workers"),
    (["filter", "--run", "r", "--filter.top_k", "-1"], "filter.top_k"),
    (["loop", "--run", "r", "--loop.top_p", "0"], "loop.top_p"),
    (["loop", "--run", "r", "--loop.top_p", "1.5"], "loop.top_p"),
    (["loop", "--run", "r", "--loop.temperature", "-1"], "loop.temperature"),
    (["loop", "--run", "r", "--loop.augment_max_tokens", "0"], "loop.augment_max_tokens"),
    (["loop", "--run", "r", "--loop.max_new_tokens", "0"], "loop.max_new_tokens"),
    (["loop", "--run", "r", "--filter.threshold", "2"], "filter.threshold"),
    (["loop", "--run", "r", "--loop.fail_below", "1.5"], "loop.fail_below"),
    (["train", "--run", "r", "--train.warmup_ratio", "1"], "train.warmup_ratio"),
    (["train", "--run", "r", "--lora.r", "0"], "lora.r"),
    (["train", "--run", "r", "--distill.top_k", "-1"], "distill.top_k"),
])
def test_out_of_range_sampling_is_refused_first(in_tmp: Path, capsys, argv: list[str], field: str) -> None:
    _run_with(in_tmp, "instructions.jsonl", [INSTRUCTION])
    _run_with(in_tmp, "filtered.jsonl", [INSTRUCTION])
    _fails(argv, in_tmp, capsys, f"field '{field}'")


def test_an_unknown_prefilter_is_reported_under_prefilter(in_tmp: Path, capsys) -> None:
    (in_tmp / "in.jsonl").write_text(json.dumps(INSTRUCTION) + "\n")
    (in_tmp / "run.yaml").write_text("filter:\n  prefilter: simhash\n")
    _fails(["filter", "in.jsonl", "-o", "out.jsonl", "--config", "run.yaml"], in_tmp, capsys,
           "run.yaml: field 'filter.prefilter'", "minhash", "simhash")


def test_minhash_without_datasketch_says_how_to_install_it(in_tmp: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasketch", None)  # as on an install without the [minhash] extra
    (in_tmp / "in.jsonl").write_text(json.dumps(INSTRUCTION) + "\n")
    _fails(["filter", "in.jsonl", "-o", "out.jsonl", "--filter.prefilter", "minhash"], in_tmp, capsys,
           "field 'filter.prefilter'", "datasketch", "pip install 'sift-instruct[minhash]'")


@pytest.mark.parametrize(("text", "expected"), [
    ("rnu: demo\n", ["field 'rnu'", "unknown setting", "did you mean `run`?"]),
    ("max_token: 5\n", ["field 'max_token'", "did you mean `classify.max_tokens`, `generate.max_tokens` or"]),
    ("max_tokens: 5\n", ["field 'max_tokens'", "unknown setting", "`instances.max_tokens`?"]),
    ("export:\n  sed: 3\n", ["field 'export.sed'", "did you mean `export.seed`?"]),
    ("export:\n  lr: 3\n", ["field 'export.lr'", "did you mean `train.lr`?"]),
    ("generat:\n  n: 5\n", ["field 'generat'", "unknown section", "did you mean `generate`?"]),
    ("clasify:\n  max_tokens: 3\n", ["field 'clasify'", "unknown section", "`classify`"]),
    ("export: 5\n", ["field 'export'", "must be a mapping"]),
])
def test_unknown_keys_and_misspelt_sections_are_named(in_tmp: Path, capsys, text: str, expected: list[str]) -> None:
    _run_with(in_tmp, "filtered.jsonl", [INSTRUCTION])
    (in_tmp / "run.yaml").write_text(text)
    _fails(["export", "--run", "r", "--config", "run.yaml"], in_tmp, capsys, "run.yaml", *expected)


def test_a_shared_config_with_other_commands_settings_is_fine(in_tmp: Path, capsys) -> None:
    _run_with(in_tmp, "filtered.jsonl", [INSTRUCTION])
    # sections of other commands, and filter's own plain option in its section
    (in_tmp / "run.yaml").write_text("run: r\nfilter:\n  seeds: seeds/default.jsonl\n  threshold: 0.6\n"
                                     "generate:\n  n: 10\nteacher:\n  backend: openai\nexport:\n  seed: 3\n")
    assert main(["export", "--config", "run.yaml"]) == 0, capsys.readouterr().err
    assert (in_tmp / "runs" / "r" / "train.jsonl").exists()


def test_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "settings.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    env = {k: v for k, v in os.environ.items() if k != "SIFT_RUNS_DIR"}
    for path, expected in ((fifo, "is not a regular file"), (Path("/dev/zero"), "is not a regular file"),
                           (big, "is larger than 1024 KiB")):
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", "--run", "r", "--config", str(path)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 2 and expected in r.stderr and str(path) in r.stderr, r.stderr
        assert "internal error" not in r.stderr
    assert not (tmp_path / "runs").exists()
