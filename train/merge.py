"""Merge the LoRA adapter into its base and save a full-precision model folder.

    sift merge --run demo                      # -> runs/demo/merged/
    sift merge --run demo --output out/dir --dtype bfloat16

The base is always loaded in full precision (float32, or bf16/fp16 if asked), never 4-bit:
merging into a quantised base degrades the model even when training used QLoRA. The folder is
written beside the target and renamed into place, so a failed merge leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.runs import run_dir
from train.sample import load_student

DTYPES = ("float32", "bfloat16", "float16")


def merge(*, run: str = "demo", output: str | None = None, dtype: str = "float32") -> None:
    """Merge the trained adapter into the base model and save it as an ordinary model folder.

    Args:
        run: Run name; the adapter is runs/<run>/student/.
        output: Folder to write (default runs/<run>/merged/); replaced if it exists.
        dtype: Precision of the merged weights: float32, bfloat16 or float16 (never 4-bit).
    """
    if dtype not in DTYPES:
        raise SiftError(f"use one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    target = Path(output) if output else run_dir(run) / "merged"
    model, tokenizer, _ = load_student(run, adapter=True, dtype=dtype)
    merged = model.merge_and_unload()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise SiftError(f"cannot write: {e.strerror or e}", path=target) from None
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model ({dtype}) in {target}/")
