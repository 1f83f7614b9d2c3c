"""LoRA fine-tuning of the student, top to bottom: load, format, train, save.

    sift train --run demo                      # or: make train
    accelerate launch -m pipeline.cli train --run demo    # several GPUs (DDP), same command

Reads runs/<run>/train.jsonl and valid.jsonl (from `sift export`), trains a LoRA adapter with
TRL's SFTTrainer (trl==1.16.0, pinned) on transformers + peft + accelerate, and writes
runs/<run>/student/: the adapter, the tokenizer with its chat template and a pad token that is
not EOS, train_config.json (the resolved settings), metrics.jsonl (train loss, eval loss and
token accuracy, tokens/s, and a final summary with eval loss before and after training), and
checkpoints/ for --resume. Loss is on the answers only, and every answer ends with EOS in its
labels (train/format.py). Examples are packed without attending to each other
(train/packing.py), or, with --no-packing, batched by similar length. With --distill --teacher T
the student also learns the teacher's token distributions (train/distill.py).
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
from pipeline.io.artifacts import Journal, iter_jsonl, require, write_json, write_jsonl
from pipeline.io.runs import locked, record_stage, run_dir
from train.format import OVERLONG, TEMPLATES, DataError, check_messages, setup_tokenizer, tokenize_records

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MAX_EFFECTIVE_BATCH = 32  # examples per optimizer step; current LoRA practice stays at or below it


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


def _load_student(student: str, qlora: bool, cuda: bool) -> Any:
    """The base model in full precision (LoRA's master weights), or 4-bit NF4 for QLoRA."""
    import torch

    from pipeline.io.models import load_model, resolve_model

    if not qlora:
        return load_model(student, dtype="float32", device="cpu").train()
    if not cuda:
        raise SiftError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit); train without --qlora on CPU",
                        field="qlora")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SiftError("QLoRA needs bitsandbytes: pip install bitsandbytes", field="qlora") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported()
                               else torch.float16)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return AutoModelForCausalLM.from_pretrained(resolve_model(student).path_or_id, quantization_config=quant,
                                                device_map={"": local_rank})


def _metrics_callback(journal: Journal, tokens_per_epoch: int, loss_state: Any = None) -> Any:
    """A TrainerCallback that appends every log (train and eval) to metrics.jsonl with tokens/s.
    After a resume, the trainer's closing train_loss covers this process's steps only: with the
    checkpoint's saved loss (`loss_state`, see `_loss_state_callback`) it is logged for the whole run."""
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
    """The running loss a checkpoint holds (see `_loss_state_callback`), None for a checkpoint without it."""
    entry = (trainer_state.get("stateful_callbacks") or {}).get(LOSS_STATE)
    saved = (entry or {}).get("attributes", {}).get("loss") if isinstance(entry, dict) else None
    return saved if isinstance(saved, dict) and {"total", "window", "last_logged"} <= set(saved) else None


def _loss_state_callback() -> Any:
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


def _no_final_eval_callback() -> Any:
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


def _save_final(trainer: Any, tokenizer: Any, out: Path) -> None:
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


def check_teacher_tokenizer(tokenizer: Any, student: str, teacher: str | None, field: str = "teacher") -> None:
    """One clear error, before any weights load, when the teacher cannot read the student's token ids."""
    from pipeline.io.models import load_tokenizer
    from train.distill import tokenizer_differences

    diffs = tokenizer_differences(tokenizer, load_tokenizer(str(teacher)))
    if diffs:
        raise SiftError(f"teacher {teacher!r} and student {student!r} do not share a tokenizer, so the teacher "
                        f"cannot read the student's tokens: {'; '.join(diffs)}. Distil from a model of the "
                        "student's family (the same tokenizer)", field=field)


def _distill_setup(base: type, rows: list[dict], collator: Any, args: Any, *, out: Path, teacher: str, vocab: int,
                   width: int, temperature: float, alpha: float, top_k: int, precision: str, cuda: bool,
                   per_device: int) -> tuple[type, dict]:
    """The distilling trainer class and the settings to record. With top_k, the teacher's top-k
    cache is loaded from out/teacher_topk/ when its key (teacher files, rows, k, T, precision) matches,
    so the teacher's weights are not even loaded, else computed once (main process first) and saved."""
    from pipeline.io.models import load_model, resolve_model
    from pipeline.io.progress import StageProgress
    from train import distill as d

    ref = resolve_model(teacher)
    info: dict = {"teacher": teacher, "teacher_resolved": ref.name, "temperature": temperature, "alpha": alpha,
                  "top_k": top_k, "cache": None, "cache_reused": None}

    def load_teacher() -> Any:
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32") if cuda else "float32"
        model = load_model(ref, dtype=dtype, device=str(args.device))
        if d.output_width(model) < vocab:
            raise SiftError(f"teacher {teacher!r} has {d.output_width(model)} output logits, fewer than the "
                            f"{vocab} tokens of the tokenizer", field="teacher")
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


def train(*, run: str = "demo", student: str = "smollm2-135m-instruct", epochs: float = 3.0, lr: float = 2e-4,
          lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, target_modules: str = "all-linear",
          max_length: int = 512, batch_size: int = 8, grad_accum: int = 4, packing: bool = True,
          overlong: str = "drop", eval_steps: int = 50, save_steps: int = 50, logging_steps: int = 5,
          resume: bool = False, gradient_checkpointing: bool = False, qlora: bool = False,
          precision: str = "auto", max_steps: int = -1, warmup_ratio: float = 0.03, seed: int = 0,
          template: str = "auto", distill: bool = False, teacher: str | None = None,
          distill_temperature: float = 2.0, distill_alpha: float = 0.5, distill_top_k: int = 0) -> None:
    """LoRA fine-tune the student on the exported data; writes runs/<run>/student/.

    Args:
        run: Run name; reads runs/<run>/train.jsonl and valid.jsonl.
        student: Base model: the embedded alias, a local folder, a .gguf file or a Hub id.
        epochs: Passes over the training data (fractions allowed).
        lr: Peak learning rate (cosine schedule after a linear warmup).
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (alpha / rank scales the update); twice the rank is usual.
        lora_dropout: Dropout on the LoRA input.
        target_modules: Layers that get adapters: all-linear, or comma-separated names (q_proj,v_proj).
        max_length: Longest example in tokens, prompt plus answer; also the packed row length.
        batch_size: Examples per device per forward pass (packed: rows, sized to match).
        grad_accum: Forward passes per optimizer step; batch_size * grad_accum should stay <= 32.
        packing: Pack examples into rows (they cannot attend to each other); off: length grouping.
        overlong: Examples over max_length: drop (counted), truncate (counted; their EOS is lost) or error.
        eval_steps: Evaluate loss and token accuracy on the validation split every this many steps.
        save_steps: Save a checkpoint every this many steps (the last two are kept).
        logging_steps: Log train loss every this many steps.
        resume: Continue from the latest checkpoint in runs/<run>/student/checkpoints/.
        gradient_checkpointing: Trade compute for memory (non-reentrant, works with frozen embeddings).
        qlora: Load the base in 4-bit NF4 (bitsandbytes, CUDA only); merge later into a full-precision base.
        precision: auto (bf16 where the hardware has it, fp16 on older GPUs), bf16, fp16 or fp32.
        max_steps: Stop after this many optimizer steps (-1: run all epochs).
        warmup_ratio: Share of steps spent warming the learning rate up.
        seed: Seed for LoRA initialisation and data order.
        template: auto (the tokenizer's chat template if it has one, else Alpaca's), chat or alpaca.
        distill: Also learn the teacher's next-token distributions on the answer tokens (needs --teacher).
        teacher: Model to distil from, with the student's tokenizer: alias, folder, .gguf or Hub id.
        distill_temperature: Softens both distributions in the KL term (loss scaled by T^2).
        distill_alpha: Weight of the KL term; 1 - alpha weighs cross-entropy on the data (0: plain SFT).
        distill_top_k: 0: run the teacher at every step; k: cache its top-k log-probs once and reuse them.
    """
    options = dict(locals())  # the parameters above, nothing else yet
    train_in(run_dir(run), **options)


def train_in(directory: Path, *, run: str, student: str, epochs: float, lr: float, lora_r: int, lora_alpha: int,
             lora_dropout: float, target_modules: str, max_length: int, batch_size: int, grad_accum: int,
             packing: bool, overlong: str, eval_steps: int, save_steps: int, logging_steps: int, resume: bool,
             gradient_checkpointing: bool, qlora: bool, precision: str, max_steps: int, warmup_ratio: float,
             seed: int, template: str, distill: bool = False, teacher: str | None = None,
             distill_temperature: float = 2.0, distill_alpha: float = 0.5, distill_top_k: int = 0,
             eval_before: dict | None = None) -> None:
    """`sift train` on any directory holding train.jsonl (and valid.jsonl): a run, or a loop round.
    `eval_before`: the untrained model's eval_* metrics on this very validation split, when the caller
    has them (a loop's later rounds), so they are logged instead of measured again."""
    if template not in TEMPLATES:
        raise SiftError(f"use one of {', '.join(TEMPLATES)}, got {template!r}", field="template")
    if overlong not in OVERLONG:
        raise SiftError(f"use one of {', '.join(OVERLONG)}, got {overlong!r}", field="overlong")
    for name, value in (("max_length", max_length), ("batch_size", batch_size), ("grad_accum", grad_accum),
                        ("lora_r", lora_r), ("eval_steps", eval_steps), ("save_steps", save_steps)):
        if value < 1:
            raise SiftError(f"must be at least 1, got {value}", field=name)
    if not 0 <= warmup_ratio < 1:
        raise SiftError(f"must be in [0, 1), got {warmup_ratio}", field="warmup_ratio")
    if distill:
        from train.distill import check_settings

        if not teacher:
            raise SiftError("--distill needs a teacher model: --teacher SPEC", field="teacher")
        for name, problem in check_settings(temperature=distill_temperature, alpha=distill_alpha,
                                            top_k=distill_top_k):
            raise SiftError(problem, field=name)
    out = directory / "student"
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch only rank 0 writes
    with locked(directory) if main_process else contextlib.nullcontext():
        # ---- data
        train_records = read_split(directory / "train.jsonl")
        valid_path = directory / "valid.jsonl"
        valid_records = read_split(valid_path, allow_empty=True) if valid_path.exists() else []

        import torch
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        from pipeline.io.models import load_tokenizer, resolve_model
        from train.packing import Collator, pack_rows

        tokenizer = load_tokenizer(student)
        if distill:  # before any weights load
            check_teacher_tokenizer(tokenizer, student, teacher)
        try:
            tok_info = setup_tokenizer(tokenizer, template)
        except ValueError as e:
            raise SiftError(str(e), field="template") from None
        if template == "auto" and tok_info["template"] == "alpaca":
            print(f"train: {student} has no chat template (a base model): using --template alpaca "
                  "(eval and sample use it too)")

        def tokenize(records: list, path: Path) -> tuple[list, Any]:
            try:
                return tokenize_records(tokenizer, records, max_length=max_length, overlong=overlong)
            except DataError as e:
                raise SiftError(str(e), path=path, field=e.field) from None

        train_ex, train_stats = tokenize(train_records, directory / "train.jsonl")
        valid_ex, valid_stats = tokenize(valid_records, valid_path)
        if not train_ex:
            raise SiftError(f"no example fits in max_length {max_length} (longest: {train_stats.longest} "
                            "tokens); raise --max-length", path=directory / "train.jsonl")
        for split, st in (("train", train_stats), ("valid", valid_stats)):
            if st.dropped_overlong or st.truncated:
                print(f"{split}: {st.dropped_overlong} examples over max_length {max_length} dropped, "
                      f"{st.truncated} truncated (longest {st.longest} tokens)")
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in train_ex]
        per_device, accum = batch_size, grad_accum
        if packing:
            rows = pack_rows(rows, max_length)
            per_device, accum = packed_batch(len(train_ex), len(rows), batch_size, grad_accum)
        if not packing and batch_size * grad_accum > MAX_EFFECTIVE_BATCH:
            print(f"note: effective batch {batch_size * grad_accum} is above {MAX_EFFECTIVE_BATCH}")

        # ---- model
        cuda = torch.cuda.is_available()
        prec = pick_precision(precision, cuda)
        model = _load_student(student, qlora, cuda)
        if tok_info["added_tokens"]:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        modules: str | list[str] = target_modules if target_modules == "all-linear" else \
            [m.strip() for m in target_modules.split(",") if m.strip()]
        peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                 target_modules=modules, task_type="CAUSAL_LM")

        # ---- trainer
        from datasets import Dataset

        ckpt_dir = out / "checkpoints"
        last = last_checkpoint(ckpt_dir, remove_partial=main_process) if ckpt_dir.is_dir() else None
        if resume and last is None:  # killed before the first checkpoint: the same command starts over
            if ckpt_dir.is_dir() or (out / "metrics.jsonl").exists():  # an earlier process got this far
                print(f"train: no checkpoint in {ckpt_dir} yet; starting from the beginning")
            resume = False
        journal = Journal(out / "metrics.jsonl")
        resumed_at = int(last.rsplit("-", 1)[1]) if resume and last else 0
        if main_process and not resume:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            journal.remove()
        # warmup_steps below 1 is a share of the total steps from transformers 5 on (pyproject requires it)
        args = SFTConfig(
            output_dir=str(ckpt_dir), num_train_epochs=epochs, max_steps=max_steps,
            per_device_train_batch_size=per_device, per_device_eval_batch_size=batch_size,
            gradient_accumulation_steps=accum, learning_rate=lr, lr_scheduler_type="cosine",
            warmup_steps=warmup_ratio, eval_strategy="steps" if valid_ex else "no", eval_steps=eval_steps,
            save_strategy="steps", save_steps=save_steps, save_total_limit=2, logging_steps=logging_steps,
            bf16=prec == "bf16", fp16=prec == "fp16", use_cpu=not cuda, seed=seed, report_to="none",
            gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
            max_length=max_length, packing=False, train_sampling_strategy="random" if packing
            else "group_by_length", dataloader_pin_memory=cuda)
        trainer_class, collator, distill_info = SFTTrainer, Collator(tokenizer.pad_token_id), None
        loss_state = _loss_state_callback()
        if distill:
            trainer_class, distill_info = _distill_setup(
                SFTTrainer, rows, collator, args, out=out, teacher=str(teacher),
                vocab=len(tokenizer) - tok_info["added_tokens"], width=model.get_output_embeddings().weight.shape[0],
                temperature=distill_temperature, alpha=distill_alpha, top_k=distill_top_k, precision=prec,
                cuda=cuda, per_device=per_device)
            from train.distill import RowCollator

            rows, collator = [{**r, "teacher_row": i} for i, r in enumerate(rows)], RowCollator(collator)
        trainer = trainer_class(
            model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
            train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in valid_ex])
            if valid_ex else None,
            data_collator=collator,
            callbacks=[_metrics_callback(journal, train_stats.tokens, loss_state), _no_final_eval_callback(),
                       loss_state])
        loss_state.trainer = trainer
        if not cuda:  # TRL's fused LM head falls back to slow float32 tiles without Triton (train/lm_head.py)
            from train.lm_head import plain_lm_head

            plain_lm_head(trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model")
                          else trainer.model)

        # ---- train
        # killed after the last checkpoint: resuming, transformers (5.23) would run a step past the end
        finished = resume and resumed_at >= planned_steps(trainer, epochs, max_steps)
        kept = resumed_metrics(journal.read(), resumed_at, finished=finished) if resume else []
        if resume and main_process:
            write_jsonl(journal.path, kept)
        logged_before = kept[0] if kept and kept[0].get("kind") == "eval" and kept[0].get("step") == 0 else None
        if logged_before is not None:  # measured (and logged) before the kill
            before = {k: v for k, v in logged_before.items() if k.startswith("eval_")}
        elif eval_before is not None and valid_ex:
            before = {k: v for k, v in eval_before.items() if k.startswith("eval_")}
            if main_process:
                journal.append([{"kind": "eval", "step": 0, "epoch": 0.0, **before, "reused": True}])
        else:
            before = trainer.evaluate() if valid_ex else {}
        t0 = time.perf_counter()
        if finished:
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(trainer.model, load_file(str(Path(str(last)) / "adapter_model.safetensors")))
            state = json.loads((Path(str(last)) / "trainer_state.json").read_text(encoding="utf-8"))
            steps_done, last_call_loss, epoch_done = resumed_at, 0.0, state.get("epoch")
            saved = saved_loss(state)
            trainer.state.global_step, trainer.state.epoch = steps_done, epoch_done  # for the eval's log
        else:
            with disk_errors(ckpt_dir, on_error=lambda: last_checkpoint(ckpt_dir, remove_partial=main_process)):
                result = trainer.train(resume_from_checkpoint=last if resume else None)
            steps_done, last_call_loss, saved = result.global_step, result.training_loss, loss_state.restored
            epoch_done = result.metrics.get("epoch")
        seconds = time.perf_counter() - t0
        after = trainer.evaluate() if valid_ex else {}

        # ---- save
        if not trainer.is_world_process_zero():
            return
        tokens = train_stats.tokens * (epoch_done or epochs)
        summary = {
            "kind": "summary", "step": steps_done, "train_seconds": round(seconds, 1),
            "train_tokens": round(tokens), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "train_loss": whole_run_loss(kept, resumed_at, steps_done, last_call_loss, saved) if resume
            else last_call_loss,
            "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after.get("eval_loss"),
            "eval_token_accuracy_before": before.get("eval_mean_token_accuracy"),
            "eval_token_accuracy_after": after.get("eval_mean_token_accuracy")}
        journal.append([summary])
        with disk_errors(out):
            _save_final(trainer, tokenizer, out)
        settings = {
            "run": run, "student": student, "student_resolved": resolve_model(student).name,
            "epochs": epochs, "lr": lr, "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
            "target_modules": modules, "max_length": max_length, "batch_size": batch_size,
            "grad_accum": grad_accum, "per_device_rows": per_device, "accumulation_steps": accum,
            "world_size": trainer.args.world_size, "packing": packing, "overlong": overlong,
            "eval_steps": eval_steps, "save_steps": save_steps, "resume": resume,
            "gradient_checkpointing": gradient_checkpointing, "qlora": qlora, "precision": prec,
            "max_steps": max_steps, "warmup_ratio": warmup_ratio, "seed": seed, **tok_info,
            "distill": distill_info,
            "data": {"train": train_stats.to_dict(), "valid": valid_stats.to_dict(),
                     "packed_rows": len(rows) if packing else None}}
        write_json(out / "train_config.json", settings)
        models = {"student": settings["student_resolved"]}
        if distill_info:
            models["teacher"] = distill_info["teacher_resolved"]
        record_stage(directory, "train", settings, models=models,
                     stats={k: v for k, v in summary.items() if k != "kind"})
    loss_msg = ""
    if before and after:
        loss_msg = f"; eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"
    print(f"trained {steps_done} steps in {seconds:.0f} s ({summary['tokens_per_s']:.0f} tokens/s){loss_msg}; "
          f"adapter in {out}/")
