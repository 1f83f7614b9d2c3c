"""Model specs: the embedded alias, local folders, .gguf files, Hub ids, and the clear errors.

    .venv/bin/python -m pytest tests/pipeline/test_models.py            # fast
    .venv/bin/python -m pytest tests/pipeline/test_models.py -m slow    # the real embedded model
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.errors import SiftError
from pipeline.io import models
from pipeline.io.models import EMBEDDED_ALIAS, MARKER, ModelRef, folder_problem, resolve_model
from tests.pipeline.test_teacher_hf import make_tiny

USER_GGUF = models.embedded_gguf()  # the machine's own cache, before any test redirects SIFT_CACHE


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SIFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_embedded(tiny: Path, cache: Path) -> Path:
    """A converted-looking embedded folder: the tiny model plus the marker conversion writes."""
    dest = cache / "models" / EMBEDDED_ALIAS
    shutil.copytree(tiny, dest)
    (dest / MARKER).write_text(json.dumps({"source": "test", "gguf_sha256": "0" * 64}))
    return dest


def test_alias_not_fetched_says_how_to_fetch(cache: Path) -> None:
    with pytest.raises(SiftError, match=r"run `sift model fetch` \(or `make setup`\)"):
        resolve_model(EMBEDDED_ALIAS)


def test_alias_resolves_to_the_cache_folder(tiny: Path, cache: Path) -> None:
    dest = fake_embedded(tiny, cache)
    assert resolve_model(EMBEDDED_ALIAS) == ModelRef(str(dest), EMBEDDED_ALIAS, "embedded")
    assert models.fetch_embedded() == dest  # checks out: returned untouched, no download


def test_half_converted_alias_is_not_ready(tiny: Path, cache: Path) -> None:
    dest = fake_embedded(tiny, cache)
    (dest / MARKER).unlink()  # a conversion that died before writing its marker
    with pytest.raises(SiftError, match=f"no {MARKER}.*sift model fetch"):
        resolve_model(EMBEDDED_ALIAS)
    (dest / MARKER).write_text("{}")
    (dest / "chat_template.jinja").unlink()
    assert folder_problem(dest, converted=True) == "the tokenizer has no chat template"


def test_folder_resolves_and_loads(tiny: Path) -> None:
    ref = resolve_model(str(tiny))
    assert ref == ModelRef(str(tiny.resolve()), "tiny-llama", "folder")
    model = models.load_model(str(tiny), dtype="float32", device="cpu")
    tok = models.load_tokenizer(ref)
    assert not model.training and str(model.dtype) == "torch.float32"
    assert model.config.vocab_size == len(tok) and tok.chat_template


def test_broken_folder_gives_a_clear_message(tmp_path: Path) -> None:
    broken = tmp_path / "half-copied"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(SiftError) as e:
        resolve_model(str(broken))
    assert str(e.value) == f"{broken}: not a model folder: no config.json"
    with pytest.raises(SiftError, match="no such model folder"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(SiftError, match="not a model folder"):
        resolve_model(str(broken / "model.safetensors"))


def test_unloadable_folder_is_a_sift_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SiftError, match=r"bad: cannot load model"):
        models.load_model(str(bad), device="cpu")


def test_gguf_path_errors(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(SiftError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "nope.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(SiftError, match="junk.gguf: cannot read GGUF"):
        resolve_model(str(junk))
    leftovers = list((cache / "models").iterdir())
    assert leftovers == []  # nothing half-converted is left in the cache


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1, also for the already-imported huggingface_hub (it reads the env at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def test_hub_id_passes_through_and_fails_clearly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    offline(monkeypatch)
    ref = resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert ref == ModelRef("HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "hub")
    with pytest.raises(SiftError, match="from the Hugging Face Hub.*local folder, a .gguf file"):
        models.load_model(ref, device="cpu")
    with pytest.raises(SiftError, match="Hub"):
        models.load_tokenizer("HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(SiftError, match="empty model spec"):
        resolve_model(" ")


def test_an_unreachable_hub_fails_at_once_from_the_local_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as closed:  # a loopback port nobody listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert not models.hub_reachable(timeout=1.0)
    ref = resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert models._hub_options(ref) == {"local_files_only": True}
    assert models._hub_options(resolve_model(str(models.embedded_dir()))) == {}  # folders never probe
    with pytest.raises(SiftError, match="from the Hugging Face Hub"):
        models.load_tokenizer(ref)
    with socket.socket() as server:  # and one that listens counts as reachable
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert models.hub_reachable(timeout=1.0)


def test_every_dtype_name_maps_to_its_torch_dtype() -> None:
    import torch

    expected = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}
    for name, dtype in expected.items():
        for device in ("cpu", "cuda"):  # a name given is a name kept, whatever the device
            assert models.resolve_dtype(name, device) is dtype
    for bad in ("float8", "Float32", "", "int8"):
        with pytest.raises(SiftError, match="field 'dtype': unknown dtype"):
            models.resolve_dtype(bad)


# (torch's CPU capability, /proc/cpuinfo flags) of real CPUs -> native bf16 math or not
CPUS = [
    ("AVX2", "fpu sse4_2 avx avx2 fma", False),  # a laptop: bf16 only emulated
    ("AVX512", "avx512f avx512bw avx512vl avx512_vnni", False),  # Cascade Lake: AVX-512 but no BF16
    ("AVX512", "avx512f avx512bw avx512_bf16", True),  # Cooper Lake, Zen 4
    ("AVX512", "avx512f avx512_bf16 amx_bf16 amx_tile", True),  # Sapphire Rapids
    ("DEFAULT", "amx_bf16", True),  # torch built without the capability string still counts the flag
    ("AMX", "", True),  # torch names AMX itself, where /proc/cpuinfo cannot be read
    ("AVX2", "", False),
    ("AVX2", "avx512_bf16_disabled xavx512_bf16", False),  # whole flags only, no substrings
]


@pytest.mark.parametrize(("capability", "flags", "native"), CPUS)
def test_native_bf16_is_read_from_the_cpu_flags(capability: str, flags: str, native: bool) -> None:
    assert models.native_bf16(capability, flags.split()) is native


def test_auto_dtype_is_bf16_only_where_the_cpu_does_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for native, cpu in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(models, "cpu_supports_bf16", lambda native=native: native)
        assert models.resolve_dtype("auto", "cpu") is cpu
        assert models.resolve_dtype("auto", "mps") is torch.float32  # another device never gets the CPU's answer
    if not torch.cuda.is_available():  # no GPU here: half precision for a CUDA device all the same
        assert models.resolve_dtype("auto", "cuda") is torch.float16


def test_model_info_prints_the_facts(tiny: Path, capsys: pytest.CaptureFixture) -> None:
    models.model_info(str(tiny))
    out = capsys.readouterr().out
    assert f"path:          {tiny.resolve()}" in out and "kind:          folder" in out
    assert "chat template: yes" in out and "[same as EOS]" in out
    assert "'<|im_end|>'" in out


@pytest.mark.slow
def test_embedded_model_loads_and_generates_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    folder = models.fetch_embedded()  # a no-op when the cache checks out (it downloads otherwise)
    offline(monkeypatch)
    ref = resolve_model(EMBEDDED_ALIAS)
    assert Path(ref.path_or_id) == folder and ref.kind == "embedded"
    model, tok = models.load_model(EMBEDDED_ALIAS, dtype="float32", device="cpu"), models.load_tokenizer(EMBEDDED_ALIAS)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"  # recorded in the marker too
    assert json.loads((folder / MARKER).read_text())["pad_token"] == "<|im_end|>"
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_gguf_file_converts_once_into_the_cache(cache: Path) -> None:
    source = USER_GGUF
    if not source.is_file():
        models._download_gguf(cache / "gguf" / source.name)
        source = cache / "gguf" / source.name
    ref = resolve_model(str(source))
    assert ref.kind == "gguf" and ref.name.startswith("SmolLM2-135M-Instruct.Q4_1@sha256:")
    folder = Path(ref.path_or_id)
    assert folder.parent == cache / "models" and folder_problem(folder, converted=True) is None
    stamp = (folder / MARKER).stat().st_mtime_ns
    assert resolve_model(str(source)) == ref and (folder / MARKER).stat().st_mtime_ns == stamp  # once
