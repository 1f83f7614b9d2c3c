"""A corpus of bad inputs: each gives one clear message, a non-zero exit, no traceback, no artifact.

    .venv/bin/pytest tests/pipeline/test_bad_inputs.py

The small bad files live in tests/data/bad/; big ones (a 10 MB line) are made here in tmp_path.
Each case runs the real CLI: in-process through `main()` where it can, in a subprocess where the
case needs another user (unreadable input, unwritable folder), a file-size limit or a full disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import REPO

BAD = REPO / "tests" / "data" / "bad"
GOOD_SEED = {"id": "t1", "name": "t", "instruction": "Add the two numbers.",
             "instances": [{"input": "1, 2", "output": "3"}], "is_classification": False}

# (case id, argv with {f} for the bad file and {out} for an output folder, bad file, substrings of stderr).
# `export` cases copy the bad file to runs/r/filtered.jsonl first; `{f}` is then unused.
CASES: list[tuple[str, list[str], str | None, list[str]]] = [
    # sift seeds: the Self-Instruct seed format
    ("seeds-malformed-json", ["seeds", "{f}", "--run", "r"], "seeds_malformed.jsonl",
     ["seeds_malformed.jsonl:2:", "invalid JSON"]),
    ("seeds-instances-wrong-type", ["seeds", "{f}", "--run", "r"], "seeds_instances_not_list.jsonl",
     [":1:", "field 'instances'", "expected a list, got string"]),
    ("seeds-missing-field", ["seeds", "{f}", "--run", "r"], "seeds_missing_instruction.jsonl",
     ["seeds_missing_instruction.jsonl:2:", "field 'instruction'", "missing"]),
    ("seeds-extra-field", ["seeds", "{f}", "--run", "r"], "seeds_unknown_field.jsonl",
     [":1:", "field 'instance'", "unknown field"]),
    ("seeds-empty-file", ["seeds", "{f}", "--run", "r"], "seeds_empty.jsonl",
     ["seeds_empty.jsonl", "is empty"]),
    ("seeds-only-blank-lines", ["seeds", "{f}", "--run", "r"], "seeds_blank_lines.jsonl",
     ["seeds_blank_lines.jsonl", "is empty"]),
    ("seeds-byte-order-mark", ["seeds", "{f}", "--run", "r"], "seeds_bom.jsonl",
     ["seeds_bom.jsonl:1:", "byte-order mark"]),
    ("seeds-invalid-utf8", ["seeds", "{f}", "--run", "r"], "seeds_invalid_utf8.jsonl",
     ["seeds_invalid_utf8.jsonl:2:", "invalid UTF-8"]),
    ("seeds-nul-byte", ["seeds", "{f}", "--run", "r"], "seeds_nul.jsonl",
     ["seeds_nul.jsonl:2:", "NUL byte"]),
    ("seeds-duplicate-id", ["seeds", "{f}", "--run", "r"], "seeds_duplicate_id.jsonl",
     ["seeds_duplicate_id.jsonl:2:", "field 'id'", "duplicate id 't1'", ":1)"]),
    ("seeds-json-list-in-jsonl", ["seeds", "{f}", "--run", "r"], "seeds_json_list.jsonl",
     ["seeds_json_list.jsonl:1:", "JSON list", "JSON Lines"]),
    ("seeds-output-not-string", ["seeds", "{f}", "--run", "r"], "seeds_output_not_string.jsonl",
     [":1:", "field 'instances[0].output'", "expected a string"]),
    ("seeds-bool-as-string", ["seeds", "{f}", "--run", "r"], "seeds_is_classification_string.jsonl",
     [":1:", "field 'is_classification'", "expected true or false, got string"]),
    ("seeds-line-not-object", ["seeds", "{f}", "--run", "r"], "seeds_line_not_object.jsonl",
     ["seeds_line_not_object.jsonl:2:", "expected a JSON object, got int"]),
    ("seeds-empty-instruction", ["seeds", "{f}", "--run", "r"], "seeds_empty_instruction.jsonl",
     [":1:", "field 'instruction'", "must not be empty"]),
    ("seeds-instance-extra-field", ["seeds", "{f}", "--run", "r"], "seeds_instance_unknown_field.jsonl",
     [":1:", "field 'instances[0].label'", "unknown field"]),
    ("seeds-no-instances", ["seeds", "{f}", "--run", "r"], "seeds_no_instances.jsonl",
     [":1:", "field 'instances'", "at least one"]),
    ("seeds-id-null", ["seeds", "{f}", "--run", "r"], "seeds_id_null.jsonl",
     [":1:", "field 'id'", "got null"]),
    ("seeds-no-such-file", ["seeds", "{f}", "--run", "r"], "no_such_file.jsonl",
     ["no_such_file.jsonl", "no such file"]),
    # sift filter, stand-alone, on JSON lists (Alpaca's shape) and JSONL
    ("filter-jsonl-in-json", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_jsonl_in_json.json",
     ["filter_jsonl_in_json.json:1:", "looks like JSON Lines"]),
    ("filter-list-malformed", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_list_malformed.json",
     ["filter_list_malformed.json:3:", "invalid JSON"]),
    ("filter-list-item-not-object", ["filter", "{f}", "-o", "{out}/kept.jsonl"],
     "filter_list_item_not_object.json", ["filter_list_item_not_object.json", "item 2", "expected a JSON object"]),
    ("filter-list-missing-field", ["filter", "{f}", "-o", "{out}/kept.jsonl"],
     "filter_list_missing_instruction.json", ["filter_list_missing_instruction.json:2:", "field 'instruction'"]),
    ("filter-list-wrong-type", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_list_output_not_string.json",
     ["filter_list_output_not_string.json:1:", "field 'output'", "expected a string, got list"]),
    ("filter-list-duplicate-id", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_list_duplicate_id.json",
     ["filter_list_duplicate_id.json:2:", "field 'id'", "duplicate id"]),
    ("filter-list-empty", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_list_empty.json",
     ["filter_list_empty.json", "is empty"]),
    ("filter-object-not-list", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_object_not_list.json",
     ["filter_object_not_list.json:1:", "expected a JSON list"]),
    ("filter-list-bom", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_list_bom.json",
     ["filter_list_bom.json:1:", "byte-order mark"]),
    ("filter-list-invalid-utf8", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_list_invalid_utf8.json",
     ["filter_list_invalid_utf8.json", "invalid UTF-8"]),
    ("filter-instances-wrong-type", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_instances_not_list.jsonl",
     ["filter_instances_not_list.jsonl:1:", "field 'instances'", "expected a list, got object"]),
    ("filter-jsonl-wrong-type", ["filter", "{f}", "-o", "{out}/kept.jsonl"], "filter_instruction_number.jsonl",
     ["filter_instruction_number.jsonl:2:", "field 'instruction'", "expected a string, got integer"]),
    ("filter-input-is-directory", ["filter", "{out}", "-o", "{out}/kept.jsonl"], None,
     ["is a directory"]),
    ("filter-unknown-rule", ["filter", "{f}", "-o", "{out}/kept.jsonl", "--filter.rules", "rouge,nope"],
     "filter_list_empty.json", ["field 'filter.rules'", "unknown rule 'nope'"]),
    ("filter-stage-without-instances", ["filter", "--run", "r"], None,
     ["instances.jsonl", "not found", "sift instances"]),
    # sift export: a bad runs/r/filtered.jsonl
    ("export-missing-field", ["export", "--run", "r"], "export_missing_output.jsonl",
     ["filtered.jsonl:1:", "field 'output'", "missing"]),
    ("export-empty-field", ["export", "--run", "r"], "export_empty_instruction.jsonl",
     ["filtered.jsonl:1:", "field 'instruction'", "is empty"]),
    ("export-duplicate-id", ["export", "--run", "r"], "export_duplicate_id.jsonl",
     ["filtered.jsonl:2:", "field 'id'", "duplicate id 'a'"]),
    ("export-malformed-json", ["export", "--run", "r"], "export_malformed.jsonl",
     ["filtered.jsonl:2:", "invalid JSON"]),
    ("export-null-field", ["export", "--run", "r"], "export_input_null.jsonl",
     ["filtered.jsonl:1:", "field 'input'", "got null"]),
    ("export-no-filtered-file", ["export", "--run", "r"], None, ["filtered.jsonl", "no such file"]),
    ("export-bad-fraction", ["export", "--run", "r", "--export.valid-fraction", "1.5"], None,
     ["field 'export.valid_fraction'", "[0, 1)"]),
    # sift inspect
    ("inspect-malformed", ["inspect", "{f}"], "seeds_malformed.jsonl", ["seeds_malformed.jsonl:2:", "invalid JSON"]),
    ("inspect-bom", ["inspect", "{f}"], "filter_list_bom.json", ["filter_list_bom.json:1:", "byte-order mark"]),
    ("inspect-nul", ["inspect", "{f}"], "seeds_nul.jsonl", ["seeds_nul.jsonl:2:", "NUL byte"]),
    ("inspect-bad-regex", ["inspect", "{f}", "--grep", "("], "export_duplicate_id.jsonl",
     ["field 'grep'", "invalid regular expression"]),
    ("inspect-no-such-file", ["inspect", "{f}"], "no_such_file.jsonl", ["no_such_file.jsonl", "no such file"]),
    # --config files
    ("config-bad-yaml", ["seeds", "{seeds}", "--config", "{f}"], "config_bad_yaml.yaml",
     ["config_bad_yaml.yaml:", "invalid settings file"]),
    ("config-bad-toml", ["seeds", "{seeds}", "--config", "{f}"], "config_bad_toml.toml",
     ["config_bad_toml.toml:", "invalid settings file"]),
    ("config-unknown-key", ["seeds", "{seeds}", "--config", "{f}"], "config_unknown_key.yaml",
     ["config_unknown_key.yaml", "field 'seeds.runn'", "unknown setting"]),
    ("config-wrong-type", ["export", "--run", "r", "--config", "{f}"], "config_wrong_type.yaml",
     ["config_wrong_type.yaml", "field 'export.seed'", "twelve"]),
    ("config-bool-for-float", ["export", "--run", "r", "--config", "{f}"], "config_bool_type.toml",
     ["config_bool_type.toml", "field 'export.valid_fraction'", "expected a number"]),
    ("config-not-a-mapping", ["seeds", "{seeds}", "--config", "{f}"], "config_not_mapping.yaml",
     ["config_not_mapping.yaml", "expected a mapping"]),
    ("config-invalid-utf8", ["seeds", "{seeds}", "--config", "{f}"], "config_invalid_utf8.yaml",
     ["config_invalid_utf8.yaml", "invalid UTF-8"]),
    ("config-run-escapes", ["seeds", "{seeds}", "--config", "{f}"], "config_run_escape.yaml",
     ["field 'run'", "plain name"]),
    ("config-no-such-file", ["seeds", "{seeds}", "--config", "{f}"], "no_such_config.yaml",
     ["no_such_config.yaml", "no such file"]),
    # model specs: all fail before anything heavy loads
    ("model-no-such-folder", ["model", "info", "/no/such/folder"], None, ["/no/such/folder", "no such model folder"]),
    ("model-folder-without-config", ["model", "info", "{out}"], None, ["not a model folder: no config.json"]),
    ("model-file-not-folder", ["model", "info", "{f}"], "seeds_empty.jsonl",
     ["seeds_empty.jsonl", "not a model folder"]),
    ("model-no-such-gguf", ["model", "info", "{out}/missing.gguf"], None, ["missing.gguf", "no such GGUF file"]),
    ("model-relative-missing", ["model", "info", "./no-such-model"], None, ["no-such-model", "no such model folder"]),
]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _check_clean(before: set[str], root: Path) -> None:
    """No artifact and no temporary file appeared; a run directory's lock file is allowed."""
    new = {f for f in _files(root) - before if not f.endswith("/.lock")}
    assert not new, f"partial artifacts left behind: {sorted(new)}"


def _seed_file(tmp: Path) -> Path:
    path = tmp / "good_seeds.jsonl"
    path.write_text(json.dumps(GOOD_SEED) + "\n")
    return path


@pytest.mark.parametrize("argv, bad, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_message(argv: list[str], bad: str | None, expected: list[str], in_tmp: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = in_tmp / "out"
    out.mkdir()
    seeds = _seed_file(in_tmp)
    if argv[0] == "export" and bad and not bad.startswith("config"):
        (in_tmp / "runs" / "r").mkdir(parents=True)
        shutil.copy(BAD / bad, in_tmp / "runs" / "r" / "filtered.jsonl")
    elif argv[0] == "export" and bad:
        (in_tmp / "runs" / "r").mkdir(parents=True)
        shutil.copy(BAD / "export_duplicate_id.jsonl", in_tmp / "runs" / "r" / "filtered.jsonl")
    before = _files(in_tmp)
    args = [a.format(f=BAD / bad if bad else "", out=out, seeds=seeds) for a in argv]
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("sift: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for s in expected:
        assert s in err, f"{s!r} not in {err!r}"
    _check_clean(before, in_tmp)


def test_debug_shows_the_traceback(in_tmp: Path) -> None:
    from pipeline.errors import SiftError

    with pytest.raises(SiftError, match="invalid JSON"):
        main(["seeds", str(BAD / "seeds_malformed.jsonl"), "--run", "r", "--debug"])


def test_a_10_mb_line_is_refused(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = in_tmp / "big.jsonl"
    big.write_text(json.dumps(GOOD_SEED) + "\n" + json.dumps({**GOOD_SEED, "id": "t2", "name": "x" * 10_000_000})
                   + "\n")
    before = _files(in_tmp)
    assert main(["seeds", str(big), "--run", "r"]) == 2
    err = capsys.readouterr().err
    assert "big.jsonl:2:" in err and "longer than 4 MiB" in err
    assert main(["filter", str(big), "-o", str(in_tmp / "kept.jsonl")]) == 2
    assert "big.jsonl:2:" in capsys.readouterr().err
    _check_clean(before, in_tmp)


def test_output_under_a_regular_file(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = in_tmp / "blocker"
    blocker.write_text("a file, not a folder\n")
    data = _alpaca(in_tmp, 3)
    code = main(["filter", str(data), "-o", str(blocker / "kept.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "blocker" in err and "cannot write" in err and "Traceback" not in err
    assert _files(in_tmp) == {"blocker", "alpaca.json"}


def test_runs_dir_under_a_regular_file(in_tmp: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (in_tmp / "blocker").write_text("x\n")
    monkeypatch.setenv("SIFT_RUNS_DIR", str(in_tmp / "blocker"))
    seeds = _seed_file(in_tmp)
    before = _files(in_tmp)
    assert main(["seeds", str(seeds), "--run", "r"]) == 2
    err = capsys.readouterr().err
    assert "cannot use run directory" in err and "blocker/r" in err
    _check_clean(before, in_tmp)


# ---------------------------------------------------------------- subprocess cases


def _alpaca(directory: Path, n: int, words: int = 4) -> Path:
    """An Alpaca-shaped JSON list of n distinct records with ~`words`-word outputs."""
    rows = [{"instruction": f"Describe item number {i} of the catalogue in detail.", "input": "",
             "output": " ".join(f"w{i}x{j}" for j in range(words))} for i in range(n)]
    path = directory / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


def _sift(argv: list[str], *, cwd: Path, user: str | None = None, fsize: int | None = None,
          env: dict | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline.cli", *argv]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *cmd]

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    full_env = {k: v for k, v in os.environ.items() if k != "SIFT_RUNS_DIR"}
    full_env.update({"PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=full_env,
                          preexec_fn=limit if fsize is not None else None)


def _can_switch_user() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


def _assert_refused(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for s in expected:
        assert s in proc.stderr, f"{s!r} not in {proc.stderr!r}"


@pytest.fixture
def world_tmp(tmp_path: Path) -> Path:
    """tmp_path, reachable by user nobody (pytest makes its base 0700)."""
    for p in [tmp_path, *tmp_path.parents]:
        if p == Path("/"):
            break
        with contextlib.suppress(OSError):
            if p.stat().st_uid == os.geteuid():
                p.chmod(p.stat().st_mode | 0o011)
    (tmp_path).chmod(0o777)
    return tmp_path


@pytest.mark.skipif(not _can_switch_user(), reason="needs root and setpriv to run as user nobody")
def test_unreadable_input_as_another_user(world_tmp: Path) -> None:
    secret = world_tmp / "private.jsonl"
    secret.write_text(json.dumps(GOOD_SEED) + "\n")
    secret.chmod(0o600)
    work = world_tmp / "work"
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    proc = _sift(["seeds", str(secret), "--run", "r"], cwd=work, user="nobody")
    _assert_refused(proc, "private.jsonl", "cannot read", "Permission denied")
    assert _files(work) == set()


@pytest.mark.skipif(not _can_switch_user(), reason="needs root and setpriv to run as user nobody")
def test_output_folder_owned_by_another_user(world_tmp: Path) -> None:
    data = _alpaca(world_tmp, 3)
    data.chmod(0o644)
    locked_dir = world_tmp / "rootonly"
    locked_dir.mkdir(mode=0o755)
    locked_dir.chmod(0o755)
    proc = _sift(["filter", str(data), "-o", str(locked_dir / "kept.jsonl")], cwd=world_tmp, user="nobody")
    _assert_refused(proc, "rootonly", "cannot write", "Permission denied")
    assert _files(locked_dir) == set()
    work = world_tmp / "work"
    work.mkdir(mode=0o755)  # runs/ would be created here, but nobody cannot write it
    seeds = _seed_file(world_tmp)
    seeds.chmod(0o644)
    proc = _sift(["seeds", str(seeds), "--run", "r"], cwd=work, user="nobody")
    _assert_refused(proc, "cannot use run directory", "Permission denied")


def test_file_size_limit_gives_efbig_and_no_partial_file(tmp_path: Path) -> None:
    data = _alpaca(tmp_path, 400, words=20)  # kept.jsonl alone is well above 16 KiB
    out = tmp_path / "out"
    out.mkdir()
    proc = _sift(["filter", str(data), "-o", str(out / "kept.jsonl"), "--filter.rules", "empty_output"],
                 cwd=tmp_path, fsize=16 * 1024)
    _assert_refused(proc, "kept", "cannot write", "File too large")
    assert _files(out) == set(), sorted(_files(out))


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 64 KiB tmpfs: a disk that fills up. Skips when mounting is not permitted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_filter_leaves_no_partial_artifact(tmp_path: Path, tiny_tmpfs: Path) -> None:
    data = _alpaca(tmp_path, 400, words=20)
    proc = _sift(["filter", str(data), "-o", str(tiny_tmpfs / "kept.jsonl"), "--filter.rules", "empty_output"],
                 cwd=tmp_path)
    _assert_refused(proc, "cannot write", "No space left on device")
    assert _files(tiny_tmpfs) == set(), sorted(_files(tiny_tmpfs))


def test_full_disk_export_leaves_no_partial_artifact(tmp_path: Path, tiny_tmpfs: Path) -> None:
    """The disk fills on the dataset card, the last file export writes, after the four data files (written
    side by side, a record at a time) are renamed into place: those must go too."""
    rows = [{"id": f"r{i}", "instruction": f"Describe item {i}.", "input": "", "output": "word " * 30}
            for i in range(60)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    for base in (tmp_path / "ref", tiny_tmpfs):
        (base / "r").mkdir(parents=True)
        (base / "r" / "filtered.jsonl").write_text(text)
    ref = _sift(["export", "--run", "r"], cwd=tmp_path, env={"SIFT_RUNS_DIR": str(tmp_path / "ref")})
    assert ref.returncode == 0, ref.stderr
    names = ("train.jsonl", "valid.jsonl", "alpaca.json", "export.rejected.jsonl")
    size = {n: (tmp_path / "ref" / "r" / n).stat().st_size for n in (*names, "README.md")}
    page = 4096
    pages = sum(-(-size[n] // page) for n in names) + 1  # room for the data files and the run marker, not the card
    assert size["README.md"] > 0
    st = os.statvfs(tiny_tmpfs)
    (tiny_tmpfs / "filler").write_bytes(b"x" * (st.f_bavail * st.f_frsize - pages * page))
    before = _files(tiny_tmpfs)
    proc = _sift(["export", "--run", "r"], cwd=tmp_path, env={"SIFT_RUNS_DIR": str(tiny_tmpfs)})
    _assert_refused(proc, "README.md", "cannot write", "No space left on device")
    _check_clean(before, tiny_tmpfs)


# ---------------------------------------------------------------- two processes, one run directory


def test_two_processes_on_one_run_directory(in_tmp: Path) -> None:
    """While one `sift` holds runs/r, a second real `sift` process is refused with a clear message."""
    seeds = _seed_file(in_tmp)
    # A helper process takes the lock exactly as a running stage does, and holds it until told to stop.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from pipeline.io.runs import locked\n"
         "with locked(Path('runs/r')):\n    print('held', flush=True); sys.stdin.readline()"],
        cwd=in_tmp, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        results: list[subprocess.CompletedProcess[str]] = []
        threads = [threading.Thread(target=lambda: results.append(_sift(["seeds", str(seeds), "--run", "r"],
                                                                         cwd=in_tmp))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for proc in results:
            _assert_refused(proc, "another sift process", f"pid {holder.pid}", "runs/r")
        assert not (in_tmp / "runs" / "r" / "seeds.jsonl").exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    proc = _sift(["seeds", str(seeds), "--run", "r"], cwd=in_tmp)
    assert proc.returncode == 0, proc.stderr
    assert (in_tmp / "runs" / "r" / "seeds.jsonl").exists()


def test_unknown_model_alias_names_the_way_out(tmp_path: Path) -> None:
    """A name that is neither the alias, a folder nor a .gguf is a Hub id; offline it fails with the options."""
    proc = _sift(["model", "info", "smollm-nope"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    _assert_refused(proc, "field 'model'", "'smollm-nope'", "Hugging Face Hub", "local folder", ".gguf")
    assert proc.stderr.count("\n") == 1, proc.stderr
