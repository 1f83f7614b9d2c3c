"""One federated client's work on its own data: train the global LoRA adapter locally, and score an
adapter's NLL on a set of chat records. Called by the Flower ClientApp of `sift federate`
(pipeline/federated/apps.py); the server uses `initial_adapter` and `adapter_nll` too.

    sift federate --run demo --federate.clients 3 --federate.rounds 2 --federate.local-steps 8

The training is `sift train`'s (train/lora.py): the same data checks, tokenisation with answer-only
labels and EOS, packing, precision choice, and TRL's SFTTrainer; what differs is that the LoRA
weights start from the adapter the server sent and that a client runs a fixed number of optimizer
steps at a constant learning rate (the round is the schedule's unit). Only tensors and counts leave
these functions: nothing here returns text.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.settings import LoraSettings, StudentSettings, TrainSettings
from train.format import DataError, setup_tokenizer, tokenize_records
from train.lora import packed_batch, pick_precision, read_split

# the fields of each section a client uses; only these travel and are recorded in federate.json
USED: dict[str, tuple[str, ...]] = {
    "student": ("model", "device"),
    "lora": ("r", "alpha", "dropout", "target_modules"),
    "train": ("lr", "batch_size", "grad_accum", "max_length", "precision", "template", "seed"),
}
SECTIONS: dict[str, type] = {"student": StudentSettings, "lora": LoraSettings, "train": TrainSettings}


@dataclasses.dataclass(frozen=True)
class LocalSettings:
    """What every client trains with: the command's own sections (of train: only the learning rate,
    constant inside a round, batch, accumulation, max_length, precision, template and seed count) and
    the optimizer steps per round. The server sends it flat in each round's ConfigRecord."""

    student: StudentSettings
    lora: LoraSettings
    train: TrainSettings
    local_steps: int

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise SiftError(f"must be at least 1, got {self.local_steps}", field="federate.local_steps")
        if self.lora.qlora:
            raise SiftError("4-bit QLoRA is not supported by federated clients", field="lora.qlora")

    def to_config(self) -> dict[str, Any]:
        """Flat {"local_steps": n, "train.lr": x, ...}: a ConfigRecord holds no nested mappings."""
        return {"local_steps": self.local_steps} | {
            f"{section}.{name}": getattr(getattr(self, section), name) for section, names in USED.items()
            for name in names}

    @classmethod
    def from_config(cls, config: Any) -> LocalSettings:
        """Back from to_config's shape (a ConfigRecord or federate.json); fields a client does not use
        take their section's defaults."""
        return cls(local_steps=int(config["local_steps"]), **{
            section: SECTIONS[section](**{name: config[f"{section}.{name}"] for name in names})
            for section, names in USED.items()})


def model_key(settings: LocalSettings) -> tuple:
    """What shapes the PEFT model: everything a client uses but the step count and learning rate."""
    return tuple(sorted((k, v) for k, v in settings.to_config().items() if k not in ("local_steps", "train.lr")))


_CACHE: dict[tuple, tuple[Any, Any]] = {}  # one PEFT model per process (a Flower client is reused)
_INITIAL: dict[tuple, dict[str, Any]] = {}  # the same key -> the adapter as PEFT initialised it


def peft_model(settings: LocalSettings) -> tuple[Any, Any]:
    """(PEFT model, tokenizer) of the student with fresh LoRA layers (seeded), cached per process,
    on the student's device (`student.device`, resolved on each party's own machine)."""
    key = model_key(settings)
    if key in _CACHE:
        return _CACHE[key]
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.io.models import load_model, load_tokenizer

    student, lora = settings.student, settings.lora
    tokenizer = load_tokenizer(student.model)
    try:
        info = setup_tokenizer(tokenizer, settings.train.template)
    except ValueError as e:
        raise SiftError(str(e), field="train.template") from None
    model = load_model(student.model, dtype="float32", device=student.device)  # load_model resolves auto
    if info["added_tokens"]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    modules: str | list[str] = lora.target_modules if lora.target_modules == "all-linear" else \
        [m.strip() for m in lora.target_modules.split(",") if m.strip()]
    torch.manual_seed(settings.train.seed)  # every party builds the same initial adapter
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=modules, task_type="CAUSAL_LM"))
    _CACHE.clear()
    _CACHE[key] = (model, tokenizer)
    _INITIAL.clear()
    _INITIAL[key] = adapter_state(model)  # kept apart: the cached model's LoRA weights change with every load
    return model, tokenizer


def adapter_state(model: Any) -> dict[str, Any]:
    """The LoRA tensors only (detached CPU copies), keyed as PEFT saves them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter(model: Any, state: dict[str, Any]) -> None:
    """Put `state` into the model's LoRA layers; a missing or extra tensor is an error."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state(model))
    if set(state) != expected:
        raise SiftError(f"adapter tensors do not match the student's LoRA layers "
                        f"(e.g. {sorted(set(state) ^ expected)[:2]}); were the LoRA settings changed?",
                        field="adapter")
    set_peft_model_state_dict(model, state)


def initial_adapter(settings: LocalSettings) -> dict[str, Any]:
    """The round-0 global adapter: PEFT's own initialisation (B = 0, so the base model's outputs), as it
    was when the model was built, whatever adapter has been loaded into the cached model since."""
    peft_model(settings)
    return {k: v.clone() for k, v in _INITIAL[model_key(settings)].items()}


def examples(tokenizer: Any, path: Path, settings: LocalSettings, *, allow_empty: bool) -> list[dict]:
    """Tokenised rows {input_ids, labels} of an exported split (sift export's format)."""
    if allow_empty and not path.exists():
        return []
    try:
        ex, _ = tokenize_records(tokenizer, read_split(path, allow_empty=allow_empty),
                                 max_length=settings.train.max_length, overlong="drop")
    except DataError as e:
        raise SiftError(str(e), path=path, field=e.field) from None
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in ex]


def local_train(state: dict[str, Any], data_dir: Path, settings: LocalSettings, *, round_: int,
                client: int) -> tuple[dict[str, Any], int, dict[str, float]]:
    """(trained adapter, example count, metrics): `settings.local_steps` optimizer steps of sift
    train's SFTTrainer on data_dir/train.jsonl, starting from `state`."""
    from datasets import Dataset, disable_progress_bars
    from trl import SFTConfig, SFTTrainer

    from train.packing import Collator, pack_rows

    disable_progress_bars()
    model, tokenizer = peft_model(settings)
    train = settings.train
    load_adapter(model, state)
    rows = examples(tokenizer, data_dir / "train.jsonl", settings, allow_empty=False)
    if not rows:
        raise SiftError(f"no example fits in max_length {train.max_length}", path=data_dir / "train.jsonl")
    packed = pack_rows(rows, train.max_length)
    per_device, accum = packed_batch(len(rows), len(packed), train.batch_size, train.grad_accum)
    on = model.device.type  # where peft_model put it: the trainer keeps it there
    prec = pick_precision(train.precision, cuda=on == "cuda")
    model.train()
    with tempfile.TemporaryDirectory(prefix="sift-client-") as tmp:
        args = SFTConfig(
            output_dir=tmp, max_steps=settings.local_steps, per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accum, learning_rate=train.lr, lr_scheduler_type="constant",
            warmup_steps=0, eval_strategy="no", save_strategy="no", logging_steps=max(settings.local_steps, 1),
            bf16=prec == "bf16", fp16=prec == "fp16", use_cpu=on == "cpu",
            seed=train.seed * 1_000_003 + round_ * 1_009 + client,  # new batches every round
            report_to="none", max_length=train.max_length, packing=False, train_sampling_strategy="random",
            dataloader_pin_memory=False, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(packed), data_collator=Collator(tokenizer.pad_token_id))
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the server prints one line per round
        result = trainer.train()
    model.eval()
    return adapter_state(model), len(rows), {"train_loss": float(result.training_loss)}


def nll(model: Any, rows: list[dict], pad_token_id: int, *, batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL, answer tokens) of rows {input_ids, labels}: the training loss's own terms."""
    import torch

    from train.packing import Collator

    collate, total, tokens = Collator(pad_token_id), 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    model.eval()
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(model.device) for k, v in collate([rows[i] for i in order[start:start + batch_size]]).items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                 reduction="sum")
        total, tokens = total + float(loss), tokens + int((labels != -100).sum())
    return total, tokens


def adapter_nll(state: dict[str, Any], path: Path, settings: LocalSettings, *,
                allow_empty: bool = True) -> tuple[float, int]:
    """(summed NLL, answer tokens) of the student with adapter `state` on an exported split."""
    model, tokenizer = peft_model(settings)
    load_adapter(model, state)
    return nll(model, examples(tokenizer, path, settings, allow_empty=allow_empty), tokenizer.pad_token_id)


def rows_nll(state: dict[str, Any], records: list[tuple[str, list[dict]]],
             settings: LocalSettings) -> tuple[float, int]:
    """(summed NLL, answer tokens) on (id, messages) records already read (a general held-out set)."""
    model, tokenizer = peft_model(settings)
    load_adapter(model, state)
    ex, _ = tokenize_records(tokenizer, records, max_length=settings.train.max_length, overlong="drop")
    return nll(model, [{"input_ids": e.input_ids, "labels": e.labels} for e in ex], tokenizer.pad_token_id)
