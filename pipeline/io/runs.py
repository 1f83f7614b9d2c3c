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
from pipeline.io.artifacts import file_sha256, read_json, require, write_json
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


RUN_MARKER = ".sift-run"  # written into every run folder sift creates: `sift clean` deletes only marked folders
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_run_name(run: str) -> str:
    """A run name is a plain folder name: ASCII letters, digits, - _ . (no space, %, newline or
    slash), and not `.` or `..`, so it never reaches outside the runs folder and is safe in make."""
    if not isinstance(run, str) or not RUN_NAME.fullmatch(run) or run in {".", ".."}:
        raise SiftError(f"run name {run!r} must be a plain name (letters, digits, - _ .)", field="run")
    return run


def runs_root(runs_dir: str | Path | None = None) -> Path:
    """The runs folder: `runs_dir`, else $SIFT_RUNS_DIR, else runs/. A set but empty $SIFT_RUNS_DIR
    is refused: it would make the current folder the runs folder, and its subfolders runs."""
    if runs_dir is not None and str(runs_dir).strip():
        return Path(runs_dir)
    env = os.environ.get(RUNS_DIR_ENV)
    if env is None:
        return Path("runs")
    if not env.strip():
        raise SiftError(f"${RUNS_DIR_ENV} is set but empty; unset it (runs go to runs/) or name a folder",
                        field=RUNS_DIR_ENV)
    return Path(env)


def run_dir(run: str, runs_dir: str | Path | None = None) -> Path:
    """runs/<run>/ (or $SIFT_RUNS_DIR/<run>/); `run` must be a plain name, never a path out."""
    return runs_root(runs_dir) / check_run_name(run)


def is_run_folder(directory: Path) -> bool:
    """Whether sift made `directory` a run: it holds the marker sift writes on creating a run folder,
    or the manifest every stage writes."""
    return (directory / RUN_MARKER).is_file() or (directory / MANIFEST).is_file()


_ARTIFACT_FIELDS = {"sha256": str, "bytes": int, "mtime_ns": int}
_STAGE_FIELDS = {"settings": dict, "models": dict, "stats": dict, "finished_at": str}
_TOP_FIELDS = {"stages": dict, "artifacts": dict, "versions": dict, "command": str}


def _check_fields(obj: dict, kinds: dict[str, type], path: Path, prefix: str) -> None:
    for key, kind in kinds.items():
        if key in obj:
            try:
                require(obj, key, kind, path=path, line=None)
            except SiftError as e:
                raise SiftError(e.reason, path=path, field=f"{prefix}{key}") from None


def read_manifest(directory: Path) -> dict:
    """manifest.json of a run ({} when there is none), its shape checked: a stage that reads it
    refuses a damaged one before writing anything, instead of failing half-way."""
    path = directory / MANIFEST
    if not path.exists():
        return {}
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise SiftError(f"expected a JSON object (the run's manifest), got {type(manifest).__name__}; "
                        "restore it or delete it (the next stage writes a new one)", path=path)
    _check_fields(manifest, _TOP_FIELDS, path, "")
    for group, kinds in (("stages", _STAGE_FIELDS), ("artifacts", _ARTIFACT_FIELDS)):
        for name, entry in manifest.get(group, {}).items():
            if not isinstance(entry, dict):
                raise SiftError("expected an object", path=path, field=f"{group}.{name}")
            _check_fields(entry, kinds, path, f"{group}.{name}.")
    return manifest


def _missing_dirs(directory: Path) -> list[Path]:
    """`directory` and those of its parents that do not exist yet, deepest first."""
    out = []
    for d in (directory, *directory.parents):
        if d.exists() or d.is_symlink():
            break
        out.append(d)
    return out


def _remove_if_unused(created: list[Path]) -> None:
    """Remove the run folder this command created (and the parents it created for it) when nothing
    but sift's own bookkeeping is in it: a command that failed before writing leaves no trace."""
    if not created:
        return
    directory = created[0]
    with contextlib.suppress(OSError):
        if {p.name for p in directory.iterdir()} <= {".lock", RUN_MARKER}:
            for name in (".lock", RUN_MARKER):
                with contextlib.suppress(FileNotFoundError):
                    (directory / name).unlink()
            for d in created:
                d.rmdir()  # stops at the first folder that is not empty


@contextlib.contextmanager
def locked(directory: Path, *, check_manifest: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on a run directory for the life of a command.

    A folder it creates gets the run marker (RUN_MARKER), and is removed again if the command
    leaves nothing in it. With `check_manifest`, a damaged manifest.json is refused before the
    command does anything (every stage updates it at the end; see read_manifest).
    """
    created = _missing_dirs(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if created:
            (directory / RUN_MARKER).write_text("a sift run folder: sift clean may delete it\n")
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        _remove_if_unused(created)
        raise SiftError(f"cannot use run directory: {e.strerror or e}", path=directory) from None
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise SiftError(f"another sift process (pid {holder}) is using this run directory; "
                            "wait for it or stop it", path=directory) from None
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        remove_leftovers(directory)
        if check_manifest:
            read_manifest(directory)
        yield
    finally:
        if held:
            _remove_if_unused(created)  # still under the lock
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


def _artifact_entry(path: Path, previous: Any) -> dict:
    """{sha256, bytes, mtime_ns} of an artifact. The hash is reused from the previous manifest when
    size and modification time (in ns) are unchanged: every write sift makes replaces the file, so
    a new mtime, and re-reading every artifact (adapters, caches) after every stage would cost more
    than the stage itself."""
    st = path.stat()
    if (isinstance(previous, dict) and previous.get("bytes") == st.st_size
            and previous.get("mtime_ns") == st.st_mtime_ns and isinstance(previous.get("sha256"), str)):
        return {"sha256": previous["sha256"], "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"sha256": file_sha256(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_artifact(directory: Path, path: Path) -> bool:
    """Files the manifest lists: not itself, journals, temporaries, .lock and the run marker, nor the
    trainer's own checkpoint folders (their model card varies)."""
    parts = path.relative_to(directory).parts
    return (path.is_file() and path.name != MANIFEST and path.suffix != ".journal"
            and not any(p.startswith(".") or p == "checkpoints" or p.startswith("checkpoint-") for p in parts))


def record_stage(directory: Path, stage: str, settings: dict, *, models: dict | None = None,
                 stats: dict | None = None) -> None:
    """Update manifest.json after a stage: its settings, models, stats, and every artifact's hash
    (hashing only the files that changed since the manifest was last written)."""
    manifest = read_manifest(directory)
    manifest.setdefault("stages", {})[stage] = {
        "settings": scrub(settings),
        "models": models or {},
        "stats": stats or {},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest["versions"] = library_versions()
    manifest["command"] = " ".join(["sift", *sys.argv[1:]]) if sys.argv else "sift"
    previous = manifest.get("artifacts") or {}
    manifest["artifacts"] = {
        name: _artifact_entry(p, previous.get(name))
        for p in sorted(directory.rglob("*")) if _is_artifact(directory, p)
        for name in [p.relative_to(directory).as_posix()]
    }
    write_json(directory / MANIFEST, scrub(manifest))
