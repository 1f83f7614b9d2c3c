"""Stage `train`: LoRA fine-tuning of the student, top to bottom: load, format, train, save.

    sift train --run demo                      # or: make train
    accelerate launch -m pipeline.cli train --run demo    # several GPUs (DDP), same command

Reads runs/<run>/train.jsonl and valid.jsonl (from `sift export`), trains a LoRA adapter with
TRL's SFTTrainer (trl==1.16.0, pinned) on transformers + peft + accelerate, on `student.device`,
and writes runs/<run>/student/: the adapter, the tokenizer with its chat template and a pad token
that is not EOS, train_config.json (the settings sections, what they resolved to, the tokenizer's
setup and the data's counts), metrics.jsonl (train loss, eval loss and token accuracy, tokens/s,
and a final summary with eval loss before and after training), and checkpoints/ for
--train.resume. The parts (loading, callbacks, checkpoints, distillation) are in train/lora.py;
this module runs them in order. With --distill.enabled --distill.teacher T the student also learns
the teacher's token distributions (train/distill.py). With --forget.self_distill the student's base
first rewrites the answers, with --forget.replay R a share R of the examples are the base's own
answers to general prompts (train/forget.py; cached in runs/<run>/forget/).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal, write_json, write_jsonl
from pipeline.io.runs import locked, record_stage, run_dir
from pipeline.settings import DistillSettings, ForgetSettings, LoraSettings, StudentSettings, TrainSettings, to_dict
from train import forget as forget_remedies
from train.format import DataError, TokenStats, setup_tokenizer, tokenize_records
from train.lora import (
    MAX_EFFECTIVE_BATCH,
    check_teacher_tokenizer,
    disk_errors,
    distill_setup,
    last_checkpoint,
    load_student_base,
    loss_state_callback,
    main_process_first,
    metrics_callback,
    no_final_eval_callback,
    packed_batch,
    pick_precision,
    planned_steps,
    read_split,
    restored_loss,
    resumed_metrics,
    save_final,
    saved_loss,
    whole_run_loss,
)


def train(*, run: str = "demo", student: StudentSettings = StudentSettings(), lora: LoraSettings = LoraSettings(),
          train: TrainSettings = TrainSettings(), distill: DistillSettings = DistillSettings(),
          forget: ForgetSettings = ForgetSettings()) -> None:
    """LoRA fine-tune the student on the exported data; writes runs/<run>/student/.

    Args:
        run: Run name; reads runs/<run>/train.jsonl and valid.jsonl.
        student: the base model, and the device it trains on.
        lora: the adapter: rank, alpha, dropout, layers, QLoRA.
        train: the training run: epochs, learning rate, batches, checkpoints, resume.
        distill: the optional distillation loss against a teacher sharing the student's tokenizer.
        forget: the optional remedies for forgetting: self-distilled answers, replay of the base's own answers.
    """
    train_in(run_dir(run), label=run, student=student, lora=lora, train=train, distill=distill, forget=forget)


# ---------------------------------------------------------------- the steps, in the order they run


@dataclass(frozen=True)
class Data:
    """The tokenized splits and the rows the trainer sees (packed or one per example)."""

    train_ex: list
    valid_ex: list
    train_stats: TokenStats
    valid_stats: TokenStats
    rows: list[dict]
    per_device: int  # rows per device per forward pass
    accum: int  # forward passes per optimizer step


@dataclass(frozen=True)
class Resume:
    """Where this process starts: `last` is the newest complete checkpoint, `resume` whether this
    process continues from it, at step `resumed_at`."""

    last: str | None
    resume: bool
    resumed_at: int


def check_distill(distill: DistillSettings) -> None:
    if distill.enabled and not distill.teacher:
        raise SiftError("--distill.enabled needs a teacher model: --distill.teacher SPEC", field="distill.teacher")


def read_splits(directory: Path) -> tuple[list, list]:
    """The exported train split and the validation split (none, or empty, is allowed)."""
    train_records = read_split(directory / "train.jsonl")
    valid_path = directory / "valid.jsonl"
    return train_records, read_split(valid_path, allow_empty=True) if valid_path.exists() else []


def apply_remedies(directory: Path, records: tuple[list, list], tokenizer: Any, *, student: StudentSettings,
                   train: TrainSettings, forget: ForgetSettings, template_kind: str) -> tuple[tuple[list, list], dict]:
    """The splits after the remedies for forgetting (train/forget.py): the training split's answers
    self-distilled, replay examples added to it; the validation split as it was. Made by the main process
    first (cached in runs/<run>/forget/), then read back from the cache by the others."""
    if not forget.active:
        return records, {}
    with main_process_first():
        train_records, info = forget_remedies.prepare(directory, records, tokenizer, student=student, forget=forget,
                                                      template_kind=template_kind, seed=train.seed)
    return (train_records, records[1]), info


def student_tokenizer(student: StudentSettings, train: TrainSettings, distill: DistillSettings) -> tuple[Any, dict]:
    """The student's tokenizer set up for training (template, pad token) and what was set; with
    distillation, the teacher's tokenizer is checked first, before any weights load."""
    from pipeline.io.models import load_tokenizer

    tokenizer = load_tokenizer(student.model)
    if distill.enabled:
        check_teacher_tokenizer(tokenizer, student.model, distill.teacher)
    try:
        tok_info = setup_tokenizer(tokenizer, train.template)
    except ValueError as e:
        raise SiftError(str(e), field="train.template") from None
    if train.template == "auto" and tok_info["template"] == "alpaca":
        print(f"train: {student.model} has no chat template (a base model): using --train.template alpaca "
              "(eval and sample use it too)")
    return tokenizer, tok_info


def prepare_data(directory: Path, tokenizer: Any, records: tuple[list, list], train: TrainSettings) -> Data:
    """Tokenize both splits (overlong examples counted), then pack the training rows and size the
    batches so a step still holds about batch_size * grad_accum examples."""
    from train.packing import pack_rows

    def tokenize(split: list, path: Path) -> tuple[list, TokenStats]:
        try:
            return tokenize_records(tokenizer, split, max_length=train.max_length, overlong=train.overlong)
        except DataError as e:
            raise SiftError(str(e), path=path, field=e.field) from None

    train_ex, train_stats = tokenize(records[0], directory / "train.jsonl")
    valid_ex, valid_stats = tokenize(records[1], directory / "valid.jsonl")
    if not train_ex:
        raise SiftError(f"no example fits in max_length {train.max_length} (longest: {train_stats.longest} "
                        "tokens); raise --train.max_length", path=directory / "train.jsonl")
    for split, st in (("train", train_stats), ("valid", valid_stats)):
        if st.dropped_overlong or st.truncated:
            print(f"{split}: {st.dropped_overlong} examples over max_length {train.max_length} dropped, "
                  f"{st.truncated} truncated (longest {st.longest} tokens)")
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in train_ex]
    per_device, accum = train.batch_size, train.grad_accum
    if train.packing:
        rows = pack_rows(rows, train.max_length)
        per_device, accum = packed_batch(len(train_ex), len(rows), train.batch_size, train.grad_accum)
    elif train.batch_size * train.grad_accum > MAX_EFFECTIVE_BATCH:
        print(f"note: effective batch {train.batch_size * train.grad_accum} is above {MAX_EFFECTIVE_BATCH}")
    return Data(train_ex, valid_ex, train_stats, valid_stats, rows, per_device, accum)


def training_device(student: StudentSettings) -> str:
    """`student.device` resolved; under a multi-GPU launch each process takes its own GPU."""
    from pipeline.io.models import resolve_device

    device = resolve_device(student.device)
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    if device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(device)  # the trainer places the model on the current CUDA device
    return device


def student_model(student: StudentSettings, lora: LoraSettings, tokenizer: Any, added_tokens: int,
                  device: str) -> tuple[Any, Any]:
    """The base model on `device`, its embeddings grown for an added pad token, and the LoRA config."""
    from peft import LoraConfig

    model = load_student_base(student.model, lora.qlora, device.startswith("cuda"), device)
    if added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=target_modules(lora), task_type="CAUSAL_LM")
    return model, peft_config


def target_modules(lora: LoraSettings) -> str | list[str]:
    if lora.target_modules == "all-linear":
        return lora.target_modules
    return [m.strip() for m in lora.target_modules.split(",") if m.strip()]


def resume_state(out: Path, resume: bool, journal: Journal, *, main_process: bool) -> Resume:
    """Continue from the newest complete checkpoint when asked and there is one; otherwise start
    over, clearing earlier checkpoints and metrics (main process only)."""
    ckpt_dir = out / "checkpoints"
    last = last_checkpoint(ckpt_dir, remove_partial=main_process) if ckpt_dir.is_dir() else None
    if resume and last is None:  # killed before the first checkpoint: the same command starts over
        if ckpt_dir.is_dir() or journal.path.exists():  # an earlier process got this far
            print(f"train: no checkpoint in {ckpt_dir} yet; starting from the beginning")
        resume = False
    if main_process and not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        journal.remove()
    return Resume(last, resume, int(last.rsplit("-", 1)[1]) if resume and last else 0)


def sft_args(out: Path, train: TrainSettings, data: Data, *, precision: str, cuda: bool) -> Any:
    """The trainer's arguments: cosine schedule, checkpoints every save_steps (two kept), evaluation
    every eval_steps when there is a validation split."""
    from trl import SFTConfig

    # warmup_steps below 1 is a share of the total steps from transformers 5 on (pyproject requires it)
    return SFTConfig(
        output_dir=str(out / "checkpoints"), num_train_epochs=train.epochs, max_steps=train.max_steps,
        per_device_train_batch_size=data.per_device, per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=data.accum, learning_rate=train.lr, lr_scheduler_type="cosine",
        warmup_steps=train.warmup_ratio, eval_strategy="steps" if data.valid_ex else "no",
        eval_steps=train.eval_steps, save_strategy="steps", save_steps=train.save_steps, save_total_limit=2,
        logging_steps=train.logging_steps, bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda,
        seed=train.seed, report_to="none", gradient_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        max_length=train.max_length, packing=False,
        train_sampling_strategy="random" if train.packing else "group_by_length", dataloader_pin_memory=cuda)


def make_trainer(model: Any, peft_config: Any, tokenizer: Any, args: Any, data: Data, *, out: Path,
                 journal: Journal, distill: DistillSettings, precision: str, cuda: bool,
                 added_tokens: int) -> tuple[Any, dict | None]:
    """The SFT trainer (a distilling one with `distill.enabled`) and what distillation recorded."""
    from datasets import Dataset
    from trl import SFTTrainer

    from train.packing import Collator

    trainer_class, collator, distill_info, rows = SFTTrainer, Collator(tokenizer.pad_token_id), None, data.rows
    loss_state = loss_state_callback()  # the running loss across a resume (train/lora.py)
    if distill.enabled:
        trainer_class, distill_info = distill_setup(
            SFTTrainer, rows, collator, args, out=out, distill=distill, vocab=len(tokenizer) - added_tokens,
            width=model.get_output_embeddings().weight.shape[0], precision=precision, cuda=cuda,
            per_device=data.per_device)
        from train.distill import RowCollator

        rows, collator = [{**r, "teacher_row": i} for i, r in enumerate(rows)], RowCollator(collator)
    trainer = trainer_class(
        model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in data.valid_ex])
        if data.valid_ex else None,
        data_collator=collator,
        callbacks=[metrics_callback(journal, data.train_stats.tokens, loss_state), no_final_eval_callback(),
                   loss_state])
    loss_state.trainer = trainer
    if not cuda:  # TRL's fused LM head falls back to slow float32 tiles without Triton (train/lm_head.py)
        from train.lm_head import plain_lm_head

        plain_lm_head(trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model")
                      else trainer.model)
    return trainer, distill_info


def eval_before_training(trainer: Any, journal: Journal, kept: list[dict], eval_before: dict | None, *,
                         has_valid: bool, main_process: bool) -> dict:
    """The untrained model's eval metrics: as logged before a kill, as the caller measured them on
    this very split (a loop's later rounds: logged, marked reused), or measured now."""
    logged = kept[0] if kept and kept[0].get("kind") == "eval" and kept[0].get("step") == 0 else None
    if logged is not None:  # measured (and logged) before the kill
        return {k: v for k, v in logged.items() if k.startswith("eval_")}
    if eval_before is not None and has_valid:
        before = {k: v for k, v in eval_before.items() if k.startswith("eval_")}
        if main_process:
            journal.append([{"kind": "eval", "step": 0, "epoch": 0.0, **before, "reused": True}])
        return before
    return trainer.evaluate() if has_valid else {}


def restore_finished(trainer: Any, last: str) -> tuple[int, float, float | None, dict | None]:
    """Killed after the last checkpoint: load its adapter instead of training (resuming, transformers
    5.23 would run a step past the end). Returns (steps, 0.0 for this call's loss, epoch, the
    checkpoint's saved running loss)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(trainer.model, load_file(str(Path(last) / "adapter_model.safetensors")))
    state = json.loads((Path(last) / "trainer_state.json").read_text(encoding="utf-8"))
    steps_done, epoch_done = int(last.rsplit("-", 1)[1]), state.get("epoch")
    trainer.state.global_step, trainer.state.epoch = steps_done, epoch_done  # for the eval's log
    return steps_done, 0.0, epoch_done, saved_loss(state)


def train_in(directory: Path, *, label: str, student: StudentSettings, lora: LoraSettings, train: TrainSettings,
             distill: DistillSettings, eval_before: dict | None = None,
             forget: ForgetSettings = ForgetSettings()) -> None:
    """`sift train` on any directory holding train.jsonl (and valid.jsonl): a run, or a loop round
    (`label` names it in the settings). `eval_before`: the untrained model's eval_* metrics on this
    very validation split, when the caller has them (a loop's later rounds), so they are logged
    instead of measured again. `forget`: the remedies applied to the training records first."""
    check_distill(distill)
    forget_remedies.check(forget, directory)
    out = directory / "student"
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch only rank 0 writes
    with locked(directory) if main_process else contextlib.nullcontext():
        records = read_splits(directory)
        tokenizer, tok_info = student_tokenizer(student, train, distill)
        records, forget_info = apply_remedies(directory, records, tokenizer, student=student, train=train,
                                              forget=forget, template_kind=tok_info["template"])
        data = prepare_data(directory, tokenizer, records, train)
        device = training_device(student)
        cuda = device.startswith("cuda")
        precision = pick_precision(train.precision, cuda)
        model, peft_config = student_model(student, lora, tokenizer, tok_info["added_tokens"], device)
        journal = Journal(out / "metrics.jsonl")
        start = resume_state(out, train.resume, journal, main_process=main_process)
        args = sft_args(out, train, data, precision=precision, cuda=cuda)
        trainer, distill_info = make_trainer(model, peft_config, tokenizer, args, data, out=out, journal=journal,
                                             distill=distill, precision=precision, cuda=cuda,
                                             added_tokens=tok_info["added_tokens"])
        finished = start.resume and start.resumed_at >= planned_steps(trainer, train.epochs, train.max_steps)
        kept = resumed_metrics(journal.read(), start.resumed_at, finished=finished) if start.resume else []
        if start.resume and main_process:
            write_jsonl(journal.path, kept)
        before = eval_before_training(trainer, journal, kept, eval_before, has_valid=bool(data.valid_ex),
                                      main_process=main_process)
        t0 = time.perf_counter()
        if finished:
            steps_done, last_call_loss, epoch_done, saved = restore_finished(trainer, str(start.last))
        else:
            ckpt_dir = out / "checkpoints"
            with disk_errors(ckpt_dir, on_error=lambda: last_checkpoint(ckpt_dir, remove_partial=main_process)):
                result = trainer.train(resume_from_checkpoint=start.last if start.resume else None)
            steps_done, last_call_loss, epoch_done = result.global_step, result.training_loss, \
                result.metrics.get("epoch")
            saved = restored_loss(trainer)
        seconds = time.perf_counter() - t0
        after = trainer.evaluate() if data.valid_ex else {}
        if not trainer.is_world_process_zero():
            return
        tokens = data.train_stats.tokens * (epoch_done or train.epochs)
        summary = {
            "kind": "summary", "step": steps_done, "train_seconds": round(seconds, 1),
            "train_tokens": round(tokens), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "train_loss": whole_run_loss(kept, start.resumed_at, steps_done, last_call_loss, saved) if start.resume
            else last_call_loss,
            "eval_loss_before": before.get("eval_loss"), "eval_loss_after": after.get("eval_loss"),
            "eval_token_accuracy_before": before.get("eval_mean_token_accuracy"),
            "eval_token_accuracy_after": after.get("eval_mean_token_accuracy")}
        journal.append([summary])
        with disk_errors(out):
            save_final(trainer, tokenizer, out)
        settings = {"run": label, **to_dict(student=student, lora=lora, train=train, distill=distill, forget=forget),
                    "resume": start.resume, **tok_info,
                    "resolved": resolved(student, device=device, precision=precision, data=data,
                                         world_size=trainer.args.world_size),
                    "data": {"train": data.train_stats.to_dict(), "valid": data.valid_stats.to_dict(),
                             "packed_rows": len(data.rows) if train.packing else None}}
        if distill_info:
            settings["distill"] = {**settings["distill"], **distill_info}
        if forget_info:
            settings["forget"] = {**settings["forget"], "applied": forget_info}
        write_json(out / "train_config.json", settings)
        models = {"student": settings["resolved"]["student"]}
        if distill_info:
            models["teacher"] = distill_info["teacher_resolved"]
        record_stage(directory, "train", settings, models=models,
                     stats={k: v for k, v in summary.items() if k != "kind"})
    loss_msg = f"; eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}" if before and after else ""
    print(f"trained {steps_done} steps in {seconds:.0f} s ({summary['tokens_per_s']:.0f} tokens/s){loss_msg}; "
          f"adapter in {out}/")


def resolved(student: StudentSettings, *, device: str, precision: str, data: Data, world_size: int) -> dict:
    """What the settings came to on this machine, for train_config.json: the student's resolved
    name, the device and precision, and the batch shape after packing."""
    from pipeline.io.models import resolve_model

    return {"student": resolve_model(student.model).name, "device": device, "precision": precision,
            "per_device_rows": data.per_device, "accumulation_steps": data.accum, "world_size": world_size}
