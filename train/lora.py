"""The LoRA trainer's parts, used by `sift train` (pipeline/stages/train.py), `sift loop` and the
federated clients: reading an exported split, precision and batch shape, loading the student's base
(full precision, or 4-bit NF4 for QLoRA), the metrics and no-final-eval callbacks, finding the last
complete checkpoint and cutting metrics.jsonl back to it, the whole run's loss after a resume,
saving the adapter, and the distillation setup (train/distill.py).

Loss is on the answers only, and every answer ends with EOS in its labels (train/format.py).
Examples are packed without attending to each other (train/packing.py), or batched by similar length.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal, iter_jsonl, require
from pipeline.settings import DistillSettings
from train.format import DataError, check_messages

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MAX_EFFECTIVE_BATCH = 32  # examples per optimizer step; current LoRA practice stays at or below it


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Under a multi-process launch, the main process runs the block first (it fills a cache the others
    then read); a single process just runs it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def read_split(path: Path, *, allow_empty: bool = False) -> list[tuple[str, list[dict]]]:
    """(id, messages) pairs of an exported split; a bad record ends with file, line and field."""
    out = []
    for line, obj in iter_jsonl(path, allow_empty=allow_empty):
        rec_id = require(obj, "id", str, path=path, line=line)
        try:
            out.append((rec_id, check_messages(require(obj, "messages", list, path=path, line=line))))
        except DataError as e:
            raise SiftError(str(e), path=path, line=line, field=e.field) from None
    return out


def trained_base(config: dict) -> str | None:
    """The base model a train_config.json names: `student.model` (the settings section), or the plain
    string that adapters trained before the settings sections recorded as `student`."""
    student = config.get("student")
    return student.get("model") if isinstance(student, dict) else student


def pick_precision(precision: str, cuda: bool) -> str:
    """bf16 where the hardware does it natively (CPU autocast here), fp16 on older GPUs, else fp32."""
    if precision not in PRECISIONS:
        raise SiftError(f"use one of {', '.join(PRECISIONS)}, got {precision!r}", field="precision")
    if precision != "auto":
        return precision
    if cuda:
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    from pipeline.io.models import cpu_supports_bf16

    return "bf16" if cpu_supports_bf16() else "fp32"


def packed_batch(n_examples: int, n_rows: int, batch_size: int, grad_accum: int) -> tuple[int, int]:
    """Rows per device batch and accumulation steps for packed rows: a forward pass holds about the
    tokens of `batch_size` examples (same memory as unpacked), a step about batch_size * grad_accum
    examples (same effective batch)."""
    rows_per_example = n_rows / max(n_examples, 1)
    per_device = max(1, round(batch_size * rows_per_example))
    rows_per_step = max(1, round(batch_size * grad_accum * rows_per_example))
    return per_device, max(1, round(rows_per_step / per_device))


def load_student_base(student: str, qlora: bool, cuda: bool, device: str) -> Any:
    """The base model in full precision (LoRA's master weights), or 4-bit NF4 for QLoRA."""
    import torch

    from pipeline.io.models import load_model, resolve_model

    if not qlora:
        return load_model(student, dtype="float32", device=device).train()
    if not cuda:
        raise SiftError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); train without --lora.qlora on CPU",
                        field="lora.qlora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SiftError("QLoRA needs bitsandbytes: pip install bitsandbytes", field="lora.qlora") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported()
                               else torch.float16)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return AutoModelForCausalLM.from_pretrained(resolve_model(student).path_or_id, quantization_config=quant,
                                                device_map={"": local_rank})


def metrics_callback(journal: Journal, tokens_per_epoch: int, loss_state: Any = None) -> Any:
    """A TrainerCallback that appends every log (train and eval) to metrics.jsonl with tokens/s.
    After a resume, the trainer's closing train_loss covers this process's steps only: with the
    checkpoint's saved loss (`loss_state`, see `loss_state_callback`) it is logged for the whole run."""
    from transformers import TrainerCallback

    class Metrics(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0, self.epoch0 = time.perf_counter(), state.epoch or 0.0

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            kind = "eval" if any(k.startswith("eval_") for k in logs) else "train" if "loss" in logs else "end"
            entry = {"kind": kind, "step": state.global_step, "epoch": state.epoch}
            entry |= {k: v for k, v in logs.items() if k not in ("num_tokens", "eval_num_tokens")}
            restored = getattr(loss_state, "restored", None)
            if kind == "end" and restored is not None and isinstance(entry.get("train_loss"), float):
                entry["train_loss"] = whole_run_loss([], loss_state.resumed_at, state.global_step,
                                                     entry["train_loss"], restored)
            if entry["kind"] == "train" and hasattr(self, "t0"):
                seen = ((state.epoch or 0.0) - self.epoch0) * tokens_per_epoch
                entry["tokens_per_s"] = round(seen / max(time.perf_counter() - self.t0, 1e-9), 1)
            journal.append([entry])

    return Metrics()


LOSS_STATE = "SiftLossState"  # its entry in a checkpoint's trainer_state.json (stateful_callbacks)


def saved_loss(trainer_state: dict) -> dict | None:
    """The running loss a checkpoint holds (see `loss_state_callback`), None for a checkpoint without it."""
    entry = (trainer_state.get("stateful_callbacks") or {}).get(LOSS_STATE)
    saved = (entry or {}).get("attributes", {}).get("loss") if isinstance(entry, dict) else None
    return saved if isinstance(saved, dict) and {"total", "window", "last_logged"} <= set(saved) else None


def loss_state_callback() -> Any:
    """A TrainerCallback that carries the trainer's running loss across a resume.

    The trainer logs the mean train loss over each logging window and sums it for the final
    train_loss, but keeps the window's partial sum in memory only: a run resumed from a checkpoint
    that falls inside a window logged its first loss over the steps after the checkpoint alone,
    and its train_loss covered those steps only. Saved in every checkpoint's trainer_state.json
    (written last, so it is there exactly when the checkpoint is complete): the loss summed over
    every window logged so far in the whole run, the open window's sum and the step it began at,
    and TRL's per-batch figures of that window (token accuracy, entropy). Restored when the resumed
    training begins, the logs and the summary equal an uninterrupted run's. Under several processes
    each restores the main process's sums (the logged loss is their mean). Reads the trainer's
    private loss fields (`_tr_loss`, `_total_loss_scalar`, `_globalstep_last_logged`: transformers 5,
    pinned in pyproject)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class SiftLossState(TrainerCallback, ExportableState):
        def __init__(self) -> None:
            self.trainer: Any = None  # set once the trainer exists
            self.restored: dict | None = None  # what the checkpoint resumed from held
            self.resumed_at = 0
            self.base_total = 0.0  # loss summed by the processes before this one

        def state(self) -> dict:
            t = self.trainer
            if t is None or not hasattr(t, "_tr_loss"):  # asked before training starts: nothing yet
                return {"args": {}, "attributes": {}}
            window = {k: list(v) for k, v in getattr(t, "_metrics", {}).get("train", {}).items() if k != "num_tokens"}
            return {"args": {}, "attributes": {"loss": {
                "total": self.base_total + t._total_loss_scalar, "window": float(t._tr_loss.item()),
                "last_logged": t._globalstep_last_logged, "window_metrics": window}}}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            restored = saved_loss({"stateful_callbacks": state.stateful_callbacks}) if state.global_step else None
            state.stateful_callbacks.setdefault(LOSS_STATE, {})  # a checkpoint from before this callback lacks it
            self.restored, self.resumed_at = restored, state.global_step
            if restored is None or self.trainer is None:
                return
            t = self.trainer
            self.base_total = float(restored["total"])
            t._tr_loss += float(restored["window"])
            t._globalstep_last_logged = int(restored["last_logged"])
            for key, values in (restored.get("window_metrics") or {}).items():
                if hasattr(t, "_metrics"):
                    t._metrics["train"][key].extend(values)

    return SiftLossState()


def restored_loss(trainer: Any) -> dict | None:
    """The running loss the trainer's loss-state callback restored from a checkpoint (None: a fresh run)."""
    state = next((c for c in trainer.callback_handler.callbacks if type(c).__name__ == LOSS_STATE), None)
    return getattr(state, "restored", None)


def no_final_eval_callback() -> Any:
    """A TrainerCallback that cancels the evaluation transformers adds at the last step: `train_in`
    evaluates once after training anyway, and the duplicate sat inside the timed training loop."""
    from transformers import TrainerCallback

    class NoFinalEval(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.global_step >= state.max_steps:
                control.should_evaluate = False
            return control

    return NoFinalEval()


# what a resume reads from a checkpoint besides trainer_state.json; transformers skips a missing
# optimizer or scheduler file without a word, and would go on with fresh ones
CHECKPOINT_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt")
# how a full disk (or quota, or file-size limit) shows in errors that are not an OSError: safetensors'
# SafetensorError quotes the OS message, torch.save's writer says only that the write failed
DISK_FULL = tuple(os.strerror(e) for e in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) + ("file write failed",)


def checkpoint_complete(folder: Path) -> bool:
    """Every file a resume needs is there and not empty, and trainer_state.json (written last) parses."""
    try:
        if not all((folder / name).stat().st_size > 0 for name in CHECKPOINT_FILES):
            return False
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def last_checkpoint(ckpt_dir: Path, *, remove_partial: bool) -> str | None:
    """The newest checkpoint whose save finished. The trainer writes trainer_state.json last, so a
    folder without a readable one, or without a file it needs, is what a kill or a full disk in
    the middle of a save left; resuming from it fails ("Can't find a valid checkpoint") or, with
    the optimizer missing, silently restarts the optimizer, so it is removed."""
    steps = {int(m[1]): p for p in ckpt_dir.glob("checkpoint-*") if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
    for step in sorted(steps, reverse=True):
        if checkpoint_complete(steps[step]):
            return str(steps[step])
        if remove_partial:
            shutil.rmtree(steps[step], ignore_errors=True)
    return None


def disk_error(e: BaseException) -> str | None:
    """The reason when `e` says the disk (or quota, or file-size limit) is full, else None."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return e.strerror or os.strerror(e.errno)
    text = str(e)
    return next((reason for reason in DISK_FULL if reason in text), None)


@contextlib.contextmanager
def disk_errors(path: Path, *, on_error: Any = None) -> Iterator[None]:
    """A full disk while the trainer or PEFT writes (checkpoints, the adapter) as the one-line
    "cannot write" every other stage gives, instead of an internal SafetensorError; `on_error` runs
    first (the partial checkpoint is removed, which also gives the space back)."""
    try:
        yield
    except Exception as e:
        reason = disk_error(e)
        if reason is None:
            raise
        if on_error is not None:
            on_error()
        raise SiftError(f"cannot write: {reason}", path=path) from None


def resumed_metrics(entries: list[dict], step: int, *, finished: bool) -> list[dict]:
    """metrics.jsonl as it stood when checkpoint `step` was saved (and, if that was the last step,
    training ended): what the resumed run logs again is cut, so no entry is there twice."""
    kept = []
    for e in entries:
        if e.get("kind") == "summary" or e.get("step", 0) > step:
            break
        if e.get("kind") == "end":
            kept += [e] if finished else []
            break
        kept.append(e)
    return kept


def planned_steps(trainer: Any, epochs: float, max_steps: int) -> int:
    """The optimizer steps the trainer will run in all, computed as transformers does."""
    if max_steps > 0:
        return max_steps
    a = trainer.args
    batches = math.ceil(len(trainer.train_dataset) / (a.per_device_train_batch_size * a.world_size))
    return math.ceil(epochs * max(math.ceil(batches / a.gradient_accumulation_steps), 1))


def whole_run_loss(kept: list[dict], resumed_at: int, steps_done: int, last_call_loss: float,
                   saved: dict | None = None) -> float:
    """The mean train loss over all steps after a resume: the trainer's own figure covers only the
    steps of its last process. With the checkpoint's `saved` loss (`saved_loss`), exact: the loss
    summed before the checkpoint plus this process's. Without it (a checkpoint written before sift
    saved it), the earlier steps come from the logged losses, weighted by the steps each covers
    (exact only when checkpoints fall on logged steps)."""
    if saved is not None and steps_done:
        # this process's sum began with the restored open window, so the window is not added twice
        before = float(saved["total"]) + (float(saved["window"]) if steps_done == resumed_at else 0.0)
        return (before + last_call_loss * (steps_done - resumed_at)) / steps_done
    total, last = 0.0, 0
    for e in kept:
        if e.get("kind") == "train" and isinstance(e.get("loss"), int | float):
            total += e["loss"] * (e["step"] - last)
            last = e["step"]
    new = steps_done - resumed_at
    return (total + last_call_loss * new) / (last + new) if last + new else last_call_loss


def save_final(trainer: Any, tokenizer: Any, out: Path) -> None:
    """Adapter and tokenizer into out/, written to a temporary folder first, then moved in."""
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    try:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sort_target_modules(tmp / "adapter_config.json")
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sort_target_modules(config_path: Path) -> None:
    """PEFT writes `target_modules` in set order, which changes from process to process; sorted, two
    identical trainings write identical adapter folders."""
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_teacher_tokenizer(tokenizer: Any, student: str, teacher: str | None, field: str = "distill.teacher") -> None:
    """One clear error, before any weights load, when the teacher cannot read the student's token ids."""
    from pipeline.io.models import load_tokenizer
    from train.distill import tokenizer_differences

    diffs = tokenizer_differences(tokenizer, load_tokenizer(str(teacher)))
    if diffs:
        raise SiftError(f"teacher {teacher!r} and student {student!r} do not share a tokenizer, so the teacher "
                        f"cannot read the student's tokens: {'; '.join(diffs)}. Distil from a model of the "
                        "student's family (the same tokenizer)", field=field)


def distill_setup(base: type, rows: list[dict], collator: Any, args: Any, *, out: Path, distill: DistillSettings,
                  vocab: int, width: int, precision: str, cuda: bool, per_device: int) -> tuple[type, dict]:
    """The distilling trainer class and the settings to record. The teacher loads on the trainer's
    device (`args.device`: the student's). With top_k, the teacher's top-k cache is loaded from
    out/teacher_topk/ when its key (teacher files, rows, k, T, precision) matches, so the teacher's
    weights are not even loaded, else computed once (main process first) and saved."""
    from pipeline.io.models import load_model, resolve_model
    from pipeline.io.progress import StageProgress
    from train import distill as d

    teacher, temperature, alpha, top_k = str(distill.teacher), distill.temperature, distill.alpha, distill.top_k

    ref = resolve_model(teacher)
    info: dict = {"teacher": teacher, "teacher_resolved": ref.name, "temperature": temperature, "alpha": alpha,
                  "top_k": top_k, "cache": None, "cache_reused": None}

    def load_teacher() -> Any:
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32") if cuda else "float32"
        model = load_model(ref, dtype=dtype, device=str(args.device))
        if d.output_width(model) < vocab:
            raise SiftError(f"teacher {teacher!r} has {d.output_width(model)} output logits, fewer than the "
                            f"{vocab} tokens of the tokenizer", field="distill.teacher")
        return model

    if not top_k:
        return d.distill_trainer(base, teacher=load_teacher(), temperature=temperature, alpha=alpha,
                                 precision=precision), info
    folder = out / "teacher_topk"
    key = d.cache_key(teacher=d.model_fingerprint(ref.path_or_id), rows=rows, k=top_k, temperature=temperature,
                      width=width, precision=precision, pad_token_id=collator.pad_token_id)
    with args.main_process_first(desc="teacher top-k"):
        topk = d.load_topk(folder, key)
        info["cache_reused"] = topk is not None
        if topk is None:
            model = load_teacher()
            t0 = time.perf_counter()
            with StageProgress("teacher top-k", len(rows), unit="row") as bar:
                topk = d.build_topk(model, rows, collator, k=top_k, temperature=temperature, width=width,
                                    device=str(args.device), precision=precision, batch_rows=per_device,
                                    progress=lambda n: bar.update(done=n))
            del model
            if int(os.environ.get("RANK", "0")) == 0:
                d.save_topk(topk, folder, key, {"teacher": ref.name, "k": top_k, "rows": len(rows)})
            print(f"distill: teacher top-{topk.logprobs.shape[1]} over {topk.logprobs.shape[0]} answer tokens "
                  f"in {time.perf_counter() - t0:.0f} s, cached in {folder}/")
        else:
            print(f"distill: reusing the teacher top-{top_k} cache in {folder}/")
    info["cache"] = str(folder)
    return d.distill_trainer(base, topk=topk, temperature=temperature, alpha=alpha, precision=precision), info
