"""Run directories: where a run's artifacts live, the lock that keeps two processes apart,
and `manifest.json` (settings of each stage, library and model versions, artifact hashes)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import file_sha256, read_json, write_json
from pipeline.redact import redact_urls

RUNS_DIR_ENV = "SIFT_RUNS_DIR"
MANIFEST = "manifest.json"
LIBRARIES = ("sift-instruct", "torch", "transformers", "peft", "trl", "accelerate", "datasets",
             "rapidfuzz", "rouge-score", "gguf", "vllm", "openai")
# settings whose value is a secret. A key is split into lower-case words ("hfToken" -> hf, token) and is
# a secret when a word says so, when it ends in "key" (api_key, openai_key; not cache_key), or when it
# ends in "token" after a credential word (access_token, hf_token; not pad_token, eos_token, max_tokens)
SECRET_WORDS = frozenset({"password", "passwd", "passphrase", "secret", "secrets", "credential", "credentials",
                          "apikey", "bearer", "authorization", "auth", "cookie", "privatekey"})
PLAIN_KEY_WORDS = frozenset({"cache", "sort", "group", "primary", "foreign", "row", "lookup", "partition", "dict",
                             "hash", "seed", "content", "sampling", "random", "sample"})
TOKEN_CREDENTIAL_WORDS = frozenset({"access", "api", "hf", "huggingface", "refresh", "id", "session", "github",
                                    "gh", "oauth", "security", "personal", "csrf", "private", "user", "openai"})


def run_dir(run: str, runs_dir: str | Path | None = None) -> Path:
    """runs/<run>/ (or $SIFT_RUNS_DIR/<run>/); `run` must be a plain name, never a path out."""
    if not run or run in {".", ".."} or "/" in run or "\\" in run or "\x00" in run:
        raise SiftError(f"run name {run!r} must be a plain name (letters, digits, - _ .)", field="run")
    base = Path(runs_dir or os.environ.get(RUNS_DIR_ENV, "runs"))
    return base / run


def inside(base: Path, name: str) -> Path:
    """base/name, refusing names that would escape base (absolute paths, '..')."""
    target = (base / name).resolve()
    if not target.is_relative_to(base.resolve()):
        raise SiftError(f"path {name!r} would write outside {base}", field="output")
    return target


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run directory for the life of a command."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SiftError(f"cannot use run directory: {e.strerror or e}", path=directory) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise SiftError(f"another sift process (pid {holder}) is using this run directory; "
                            "wait for it or stop it", path=directory) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        remove_leftovers(directory)
        yield
    finally:
        os.close(fd)


def remove_leftovers(directory: Path) -> None:
    """Delete what a killed command left half-written: atomic writes' temporary files
    (.NAME.XXXX.tmp) and train's unfinished adapter folder (student/.save-XXXX). Only called
    under the run's lock, when no other sift process can be writing them."""
    for stale in [*directory.glob(".*.tmp"), *directory.glob("*/.*.tmp"), *directory.glob("*/.save-*")]:
        with contextlib.suppress(OSError):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def is_secret(key: str) -> bool:
    """Whether a setting named `key` holds a secret (api keys, passwords, bearer/auth/access tokens),
    as opposed to a tokenizer or sampling setting (pad_token, eos_token, max_tokens). `*_env` names an
    environment variable, not its value."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower())
    if not words or words[-1] == "env":
        return False
    if SECRET_WORDS.intersection(words):
        return True
    if words[-1] in ("key", "keys"):
        return len(words) == 1 or words[-2] not in PLAIN_KEY_WORDS
    if words[-1] == "token":
        return len(words) == 1 or words[-2] in TOKEN_CREDENTIAL_WORDS
    return False


def scrub(obj: Any) -> Any:
    """Redact the values of secret settings (see is_secret), and credentials in any URL inside any
    string (user-info, ?api_key=...: see redact_urls), so no API key reaches a manifest or a report."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if isinstance(k, str) and is_secret(k) and isinstance(v, str) and v else scrub(v))
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub(v) for v in obj]
    if isinstance(obj, str):
        return redact_urls(obj)
    return obj


def record_stage(directory: Path, stage: str, settings: dict, *, models: dict | None = None,
                 stats: dict | None = None) -> None:
    """Update manifest.json after a stage: its settings, models, stats, and every artifact's hash."""
    path = directory / MANIFEST
    manifest = read_json(path) if path.exists() else {}
    manifest.setdefault("stages", {})[stage] = {
        "settings": scrub(settings),
        "models": models or {},
        "stats": stats or {},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest["versions"] = library_versions()
    manifest["command"] = " ".join(["sift", *sys.argv[1:]]) if sys.argv else "sift"
    manifest["artifacts"] = {
        p.relative_to(directory).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.suffix != ".journal" and not any(
            part.startswith(".") or part == "checkpoints" or part.startswith("checkpoint-")  # temporaries, .lock,
            for part in p.relative_to(directory).parts)  # the trainer's own folder (its model card varies)
    }
    write_json(path, scrub(manifest))
