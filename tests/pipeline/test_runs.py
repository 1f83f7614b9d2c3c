"""Run folders' manifest: secrets are redacted, tokenizer and sampling settings are not.

    .venv/bin/python -m pytest -q tests/pipeline/test_runs.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.io.runs import is_secret, record_stage, scrub

SECRETS = ["api_key", "OPENAI_API_KEY", "apiKey", "key", "openai_key", "password", "db_password", "secret",
           "client_secret", "access_token", "auth_token", "bearer_token", "hf_token", "HF_TOKEN", "token",
           "refresh_token", "Authorization", "private_key", "x-api-key", "credentials", "github_token"]
PLAIN = ["pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "mask_token", "max_tokens",
         "max_new_tokens", "augment_max_tokens", "tokens_out", "tokens_per_s", "pad_token_id", "tokenizer",
         "api_key_env", "cache_key", "sort_key", "monkey", "turkey_count", "keywords", "hf_token_env"]


@pytest.mark.parametrize("key", SECRETS)
def test_secret_settings_are_redacted(key: str) -> None:
    assert is_secret(key)
    assert scrub({"teacher": {key: "sk-live-123"}}) == {"teacher": {key: "<redacted>"}}


@pytest.mark.parametrize("key", PLAIN)
def test_tokenizer_and_sampling_settings_are_kept(key: str) -> None:
    assert not is_secret(key)
    assert scrub({key: "<|im_end|>"}) == {key: "<|im_end|>"}


def test_the_manifest_keeps_pad_and_eos_and_hides_the_key(tmp_path: Path) -> None:
    record_stage(tmp_path, "train", {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "max_tokens": 256,
                                     "api_key": "sk-secret", "headers": [{"Authorization": "Bearer abc"}]})
    text = (tmp_path / "manifest.json").read_text()
    settings = json.loads(text)["stages"]["train"]["settings"]
    assert settings["pad_token"] == "<|endoftext|>" and settings["eos_token"] == "<|im_end|>"
    assert settings["max_tokens"] == 256 and settings["api_key"] == "<redacted>"
    assert "sk-secret" not in text and "Bearer abc" not in text


# ---------------------------------------------------------------- run names and run folders (#25.12, .13, .20)


@pytest.mark.parametrize("name", ["a b", "x%00", "a\nb", "tab\there", "semi;colon", "star*", "é"])
def test_run_names_the_message_forbids_are_refused(in_tmp: Path, name: str, capsys) -> None:
    """The message says "letters, digits, - _ ."; `a b`, `x%00` and a name with a newline were accepted
    (the last created runs/a\\nb)."""
    from pipeline.cli import main

    src = in_tmp / "seeds.jsonl"
    src.write_text(_seed_line('"Say yes."'))
    assert main(["seeds", str(src), "--run", name]) == 2
    assert "field 'run'" in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize("name", ["demo", "run-2.v1", "A_b"])
def test_plain_run_names_are_accepted(name: str) -> None:
    from pipeline.io.runs import run_dir

    assert run_dir(name, "runs") == Path("runs") / name


def _seed_line(instruction_json: str) -> str:
    return ('{"id": "s1", "name": "n", "instruction": ' + instruction_json + ', "is_classification": false, '
            '"instances": [{"input": "", "output": "yes"}]}\n')


@pytest.mark.parametrize(("line", "field"), [
    (_seed_line('"\\ud800 lone surrogate"'), "instruction"),
    ('{"id": "s1", "name": "n", "instruction": "x", "instances": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     "instances"),
])
def test_a_bad_seed_file_names_file_line_field_and_leaves_no_run_folder(in_tmp: Path, line: str, field: str,
                                                                         capsys) -> None:
    """#25.12: a lone surrogate escape ended in UnicodeEncodeError with a run folder holding only .lock; a
    100,000-deep line in RecursionError. Both are "internal error" (exit 1) before the fix."""
    from pipeline.cli import main

    src = in_tmp / "seeds.jsonl"
    src.write_text(_seed_line('"fine"').replace('"s1"', '"s0"') + line)
    assert main(["seeds", str(src), "--run", "r"]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2: field '{field}'" in err and "internal error" not in err
    assert not (in_tmp / "runs").exists()


def test_a_run_folder_the_command_created_and_left_empty_is_removed(tmp_path: Path) -> None:
    from pipeline.io.runs import locked

    d = tmp_path / "runs" / "r"
    with pytest.raises(RuntimeError), locked(d):
        raise RuntimeError("a stage failed before writing anything")
    assert not (tmp_path / "runs").exists()
    d.mkdir(parents=True)
    (d / "mine.txt").write_text("x")
    with pytest.raises(RuntimeError), locked(d):
        raise RuntimeError("a folder that existed stays, with what it held")
    assert (d / "mine.txt").exists()


BAD_MANIFESTS = [("[1, 2]", "expected a JSON object"), ('{"stages": [1]}', "field 'stages'"),
                 ('{"stages": {"seeds": 3}}', "field 'stages.seeds'"),
                 ('{"artifacts": {"a.jsonl": {"sha256": 5}}}', "field 'artifacts.a.jsonl.sha256'"),
                 ('{"stages": {"seeds": {"settings": "x"}}}', "field 'stages.seeds.settings'")]


@pytest.mark.parametrize(("text", "message"), BAD_MANIFESTS)
def test_a_wrong_shaped_manifest_stops_export_before_it_writes(in_tmp: Path, text: str, message: str,
                                                                capsys) -> None:
    """#25.20: `[1,2]` crashed `sift export` with AttributeError after train.jsonl was written."""
    from pipeline.cli import main
    from pipeline.io.artifacts import write_jsonl


    d = in_tmp / "runs" / "r"
    d.mkdir(parents=True)
    write_jsonl(d / "filtered.jsonl", [{"id": f"ex_{i}", "instruction": f"Name a colour number {i}.", "input": "",
                                        "output": "Blue."} for i in range(4)])
    (d / "manifest.json").write_text(text)
    assert main(["export", "--run", "r"]) == 2
    err = capsys.readouterr().err
    assert "runs/r/manifest.json: " in err and message in err
    assert sorted(p.name for p in d.iterdir()) == [".lock", "filtered.jsonl", "manifest.json"]


def test_every_stage_that_updates_the_manifest_checks_it_first(in_tmp: Path, capsys) -> None:
    from pipeline.cli import main

    d = in_tmp / "runs" / "r"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("[1, 2]")
    src = in_tmp / "seeds.jsonl"
    src.write_text(_seed_line('"Say yes."'))
    assert main(["seeds", str(src), "--run", "r"]) == 2
    assert "expected a JSON object" in capsys.readouterr().err
    assert not (d / "seeds.jsonl").exists()


# ---------------------------------------------------------------- the manifest hashes only what changed (#25.23)


def test_record_stage_hashes_only_the_artifacts_that_changed(tmp_path: Path, monkeypatch) -> None:
    import os

    import pipeline.io.runs as runs
    from pipeline.io.artifacts import file_sha256

    big, small = tmp_path / "student" / "adapter.bin", tmp_path / "data.jsonl"
    big.parent.mkdir()
    big.write_bytes(os.urandom(1 << 20))
    small.write_text('{"a": 1}\n')
    runs.record_stage(tmp_path, "train", {})
    hashed: list[str] = []

    def spy(path: str | Path) -> str:
        hashed.append(Path(path).name)
        return file_sha256(path)

    monkeypatch.setattr(runs, "file_sha256", spy)
    small.write_text('{"a": 2}\n')  # same size, new content: a write gives a new mtime
    runs.record_stage(tmp_path, "eval", {})
    assert hashed == ["data.jsonl"]
    artifacts = json.loads((tmp_path / "manifest.json").read_text())["artifacts"]
    assert artifacts["data.jsonl"]["sha256"] == file_sha256(small)
    assert artifacts["student/adapter.bin"] == {"sha256": file_sha256(big), "bytes": 1 << 20,
                                                "mtime_ns": big.stat().st_mtime_ns}
    hashed.clear()
    st = big.stat()
    big.write_bytes(os.urandom(1 << 20))  # a rewrite that keeps size and mtime is the one case not seen
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    runs.record_stage(tmp_path, "eval", {})
    assert hashed == ["adapter.bin"]
    assert json.loads((tmp_path / "manifest.json").read_text())["artifacts"]["student/adapter.bin"]["sha256"] \
        == file_sha256(big)
