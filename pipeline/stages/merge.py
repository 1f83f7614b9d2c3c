"""Merge the LoRA adapter into its base and save a full-precision model folder.

    sift merge --run demo                      # -> runs/demo/merged/
    sift merge --run demo --output out/dir --dtype bfloat16
    sift merge --run demo --student.device cuda   # merge on the GPU (the saved folder is the same)

The base is always loaded in full precision (float32, or bf16/fp16 if asked), never 4-bit:
merging into a quantised base degrades the model even when training used QLoRA. The folder is
written beside the target and renamed into place, so a failed merge leaves nothing half-written.
Every merged folder carries MARKER; an existing --output is replaced only when it has it (a
previous merge), is an empty folder, or with --force: `--output ~/models` or `--output .` never
deletes someone's files. The run's lock is held throughout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.runs import locked, run_dir
from pipeline.settings import StudentSettings
from pipeline.stages.sample import load_student

DTYPES = ("float32", "bfloat16", "float16")
MARKER = ".sift-merge.json"  # written into every merged folder: what sift may replace


def check_target(target: Path, *, student: Path, force: bool) -> None:
    """Refuse to replace anything but a previous merge output or an empty folder (unless `force`),
    and never, even with `force`, a folder that holds the adapter being merged."""
    if target == student or target in student.parents:
        raise SiftError("the output folder holds the adapter being merged; choose another --output", path=target)
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_dir() and not target.is_symlink():
        if (target / MARKER).is_file() or not any(target.iterdir()):
            return
        what = "a folder that is not a previous `sift merge` output (no " + MARKER + ")"
    else:
        what = "a file, not a folder"
    if not force:
        raise SiftError(f"already exists and is {what}; nothing was changed. Choose another --output, "
                        "or pass --force to replace it", path=target)


def merge(*, run: str = "demo", output: str | None = None, dtype: str = "float32", force: bool = False,
          student: StudentSettings = StudentSettings()) -> None:
    """Merge the trained adapter into the base model and save it as an ordinary model folder.

    Args:
        run: Run name; the adapter is runs/<run>/student/.
        output: Folder to write (default runs/<run>/merged/). An existing one is replaced only if it is
            a previous merge output (it has .sift-merge.json) or empty, unless --force.
        dtype: Precision of the merged weights: float32, bfloat16 or float16 (never 4-bit).
        force: Replace an existing --output even if it is not a previous merge output.
        student: where the merge runs (device); the precision is dtype above, the base the one trained.
    """
    if dtype not in DTYPES:
        raise SiftError(f"use one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    from pipeline.io.models import resolve_device

    resolve_device(student.device)  # a device torch does not have fails here, before any work
    directory = run_dir(run)
    target = (Path(output) if output else directory / "merged").expanduser().absolute()
    target = target.parent.resolve() / target.name if target.name not in ("", ".", "..") else target.resolve()
    check_target(target, student=(directory / "student").resolve(), force=force)
    with locked(directory):
        check_target(target, student=(directory / "student").resolve(), force=force)
        model, tokenizer, _ = load_student(run, student=dataclasses.replace(student, dtype=dtype), adapter=True)
        merged = model.merge_and_unload()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        except OSError as e:
            raise SiftError(f"cannot write: {e.strerror or e}", path=target) from None
        try:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / MARKER).write_text(json.dumps({"run": run, "adapter": str(directory / "student"), "dtype": dtype,
                                                  "merged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model ({dtype}) in {target}/")
