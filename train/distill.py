"""Knowledge distillation for `sift train --distill.enabled`: the loss, the tokenizer check, the top-k cache.

    sift train --run demo --distill.enabled --distill.teacher runs/big/merged       # teacher run on the fly
    sift train --run demo --distill.enabled --distill.teacher runs/big/merged --distill.top_k 64   # cached

The student learns the teacher's next-token distribution on every completion token (labels not
-100), mixed with the usual cross-entropy on the data's tokens:

    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE

p_T = softmax(teacher_logits / T), q_T = softmax(student_logits / T). The KL is the forward one
(teacher first: the student is pushed to cover all the teacher's mass), summed over the vocabulary,
averaged over completion tokens; the T^2 factor keeps its gradient on the scale of the CE term as T
changes (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network"). CE is at
T = 1 on the data's own tokens. Both terms share one normaliser: the batch's completion tokens, or
Trainer's `num_items_in_batch` (completion tokens over all accumulated micro-batches).

Top-k cache (`--distill.top_k k`): the teacher runs once over the packed training rows and keeps, at
each completion position, its k most likely tokens with their log-probabilities at temperature T,
plus one tail bucket: the log of its total mass on every other token. The cached KL is over those
k + 1 outcomes, the student's softmax at T grouped the same way (its own mass on the k tokens, and
the sum of the rest):

    KL_k = sum_{i in top k} p_T(i) log(p_T(i) / q_T(i)) + p_T(tail) log(p_T(tail) / q_T(tail))

It is exact where the teacher is sure (equal to the full KL when k = vocabulary size), never above
the full KL (grouping outcomes cannot raise a KL), and zero when the student matches the teacher,
for any k: the student must give the tail the teacher's total mass but may spread it as it likes.
(Renormalising the teacher over its k tokens instead, tried first, was measured to pull the
student's softened tail towards zero: at T = 2 and k = 64 on the embedded model, eval loss after 6
steps 1.569 against 1.447 with the teacher on the fly.) The cache depends on T, so T is in its key.
It holds about 8 bytes per kept entry (float32 log-prob, int32 id): completion tokens x k x 8 bytes.
Only the positions that predict a completion token go through the LM head (`logits_to_keep`), for
the student and the teacher alike: the rest of a packed row never reaches the loss.

Teacher and student must share the tokenizer: the teacher reads the student's token ids, so every
token string must have the same id in both, and EOS and BOS must agree (the student learns to stop
on its EOS; a teacher with another EOS would teach it not to). Pad is left out: padding never
reaches the loss. If the two embedding matrices differ in width (models padded to a multiple of
64, or a pad token added for training), the distributions are compared over the ids both have.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE = -100
CACHE_FORMAT = 2  # bump when the cache layout or the way it is computed changes


# ---------------------------------------------------------------- the loss (pure tensor functions)


@dataclass
class DistillTerms:
    """One batch's distillation loss and its parts. The sums are over completion tokens, so
    callers can average them across micro-batches and devices."""

    loss: Any  # alpha * T^2 * kl_sum / n + (1 - alpha) * ce_sum / n, with n = num_items or tokens
    kl_sum: Any  # sum over completion tokens of KL(p_T || q_T), no T^2
    ce_sum: Any  # sum over completion tokens of -log q_1(label)
    correct: Any  # completion tokens whose student argmax is the label
    tokens: int  # completion tokens in this batch


def keep_mask(labels: Any) -> Any:
    """(B, L) bool: positions t whose next token labels[:, t+1] is a completion token (the last
    position predicts nothing). Logits and teacher top-k are kept at these positions only, in
    row-major order."""
    import torch

    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def next_tokens(labels: Any, mask: Any) -> Any:
    """(N,) the completion tokens that the kept positions of `keep_mask` predict, in the same order."""
    return labels[:, 1:][mask[:, :-1]]


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model (under DDP and PEFT wrappers) takes `logits_to_keep`, so the LM head runs only
    at the kept positions (transformers >= 5.x accepts a boolean (B, L) mask there)."""
    import inspect

    inner = getattr(model, "module", model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return "logits_to_keep" in inspect.signature(type(inner).forward).parameters


def kept_logits(model: Any, inputs: dict, mask: Any, *, compact: bool) -> tuple[Any, Any]:
    """(N, V) logits at the positions of `mask` and the model outputs. With `compact` the model is
    asked for those positions only; a model that still returns every position is sliced here."""
    outputs = model(**inputs, logits_to_keep=mask) if compact else model(**inputs)
    logits = outputs.logits
    n = int(mask.sum())
    if logits.dim() == 2 and logits.size(0) == n:
        return logits, outputs
    if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(mask.shape):
        return logits[mask], outputs
    raise ValueError(f"logits of shape {tuple(logits.shape)} for {n} kept positions of a {tuple(mask.shape)} batch")


def kl_full(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Per-position KL(softmax(teacher/T) || softmax(student/T)) over the ids both share; (N, V) -> (N,)."""
    import torch

    v = min(student_logits.size(-1), teacher_logits.size(-1))
    log_q = torch.log_softmax(student_logits[..., :v].float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits[..., :v].float() / temperature, dim=-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def kl_topk(student_logits: Any, teacher_logprobs: Any, teacher_ids: Any, teacher_log_tail: Any,
            temperature: float, teacher_vocab: int | None = None) -> Any:
    """Per-position KL over k + 1 outcomes: the teacher's top-k tokens and one tail bucket.

    `teacher_logprobs` (N, k) are log p_T of the tokens `teacher_ids`, `teacher_log_tail` (N,) the log
    of p_T's mass on all other tokens (-inf when k covers the vocabulary); the student's softmax at T
    (over the ids both share) is grouped the same way."""
    import torch

    v = student_logits.size(-1) if teacher_vocab is None else min(student_logits.size(-1), teacher_vocab)
    log_q = torch.log_softmax(student_logits[..., :v].float() / temperature, dim=-1)
    ids = teacher_ids.long()
    log_p = teacher_logprobs.float()
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q.gather(-1, ids)), 0.0).sum(-1)
    if ids.size(-1) >= v:  # nothing outside the kept tokens
        return kl
    log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, float("-inf")), dim=-1)
    log_p_tail = teacher_log_tail.float()
    p_tail = log_p_tail.exp()
    has_tail = p_tail > 0
    # where() alone would still send NaN gradients through the branch it drops
    term = p_tail * (log_p_tail.masked_fill(~has_tail, 0.0) - log_q_tail.masked_fill(~has_tail, 0.0))
    return kl + torch.where(has_tail, term, 0.0)


def distill_loss(student_logits: Any, targets: Any, *, teacher_logits: Any = None,
                 teacher_topk: tuple[Any, Any, Any, int] | None = None, temperature: float = 2.0,
                 alpha: float = 0.5, num_items: Any = None) -> DistillTerms:
    """The distillation loss of one batch, over its N completion positions.

    Args:
        student_logits: (N, V), the student's logits at the positions that predict `targets`
            (`kept_logits` with `keep_mask`; from full (B, L, V) logits: logits[keep_mask(labels)]).
        targets: (N,) the completion tokens (`next_tokens`).
        teacher_logits: (N, V') the teacher's at the same positions, or None when `teacher_topk` is given.
        teacher_topk: (log p_T (N, k), ids (N, k), log tail mass (N,), teacher vocabulary width),
            from the cache (`TopK.for_rows`), computed at this temperature.
        temperature: T > 0; both distributions are softened by it in the KL term.
        alpha: Weight of the KL term; 1 - alpha weighs the cross-entropy. 0 is plain fine-tuning.
        num_items: Normaliser (completion tokens across accumulated micro-batches); default N.
    """
    import torch

    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("give exactly one of teacher_logits and teacher_topk")
    n = targets.numel()
    if student_logits.size(0) != n:
        raise ValueError(f"{student_logits.size(0)} student positions for {n} targets")
    if teacher_logits is not None:
        if teacher_logits.size(0) != n:
            raise ValueError(f"{teacher_logits.size(0)} teacher positions for {n} targets")
        kl = kl_full(student_logits, teacher_logits, temperature)
    else:
        logprobs, ids, log_tail, vocab = teacher_topk
        if logprobs.size(0) != n:
            raise ValueError(f"the teacher top-k holds {logprobs.size(0)} positions, the batch has {n}")
        kl = kl_topk(student_logits, logprobs, ids, log_tail, temperature, vocab)
    s32 = student_logits.float()
    ce = torch.nn.functional.cross_entropy(s32, targets, reduction="sum")
    denom = torch.as_tensor(n if num_items is None else num_items, device=s32.device).clamp(min=1)
    loss = alpha * temperature ** 2 * kl.sum() / denom + (1 - alpha) * ce / denom
    return DistillTerms(loss=loss, kl_sum=kl.sum().detach(), ce_sum=ce.detach(),
                        correct=(s32.argmax(-1) == targets).sum().detach() if n else s32.new_zeros(()), tokens=n)


# ---------------------------------------------------------------- the tokenizer check


def tokenizer_differences(student: Any, teacher: Any, *, examples: int = 3) -> list[str]:
    """What keeps the teacher from reading the student's token ids; empty when they agree.

    Compares the whole token -> id mapping (special and added tokens included) and the EOS and
    BOS ids. The pad token is left out: padding never reaches the loss."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    out = []
    if len(sv) != len(tv):
        out.append(f"vocabulary sizes differ: {len(sv)} (student) vs {len(tv)} (teacher)")
    moved = sorted((sv[t], t) for t in sv if t in tv and sv[t] != tv[t])
    if moved:
        shown = ", ".join(f"{t!r} is {i} vs {tv[t]}" for i, t in moved[:examples])
        out.append(f"{len(moved)} tokens have other ids ({shown})")
    for who, mine, other in (("student", sv, tv), ("teacher", tv, sv)):
        missing = sorted((i, t) for t, i in mine.items() if t not in other)
        if missing:
            shown = ", ".join(repr(t) for _, t in missing[:examples])
            out.append(f"{len(missing)} {who} tokens are not in the other vocabulary ({shown})")
    for name in ("eos", "bos"):
        a, b = getattr(student, f"{name}_token_id", None), getattr(teacher, f"{name}_token_id", None)
        if a != b:
            out.append(f"{name.upper()} differs: {getattr(student, f'{name}_token', None)!r} (id {a}) vs "
                       f"{getattr(teacher, f'{name}_token', None)!r} (id {b})")
    return out


# ---------------------------------------------------------------- teacher forward and top-k cache


def teacher_inputs(batch: dict, vocab: int) -> dict:
    """The student's batch for the teacher: same ids, positions and mask; ids the teacher has no
    embedding for (a pad token added for training) become 0, which only padding can hold."""
    ids = batch["input_ids"]
    out = {"input_ids": ids.masked_fill(ids >= vocab, 0), "use_cache": False}
    for key in ("attention_mask", "position_ids"):
        if key in batch:
            out[key] = batch[key]
    return out


def autocast(device: str, precision: str) -> Any:
    """The mixed-precision context the student trains under, for the teacher's forward too."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype or torch.float32,
                          enabled=dtype is not None)


def output_width(model: Any) -> int:
    """Number of logits the model produces per position."""
    return int(model.get_output_embeddings().weight.shape[0])


@dataclass
class TopK:
    """The teacher's top-k log-probs at every completion position of every training row.

    Row r's positions are logprobs[offsets[r]:offsets[r+1]], in the order `keep_mask` gives."""

    logprobs: Any  # (M, k) float32 log p_T, sorted descending
    ids: Any  # (M, k) int32
    log_tail: Any  # (M,) float32 log of p_T's mass outside the k tokens
    offsets: Any  # (rows + 1,) int64
    vocab: int  # teacher logits width

    def for_rows(self, rows: Sequence[int]) -> tuple[Any, Any, Any, int]:
        """Concatenated (log-probs, ids, log tail, vocab) of the given rows, in order, for `distill_loss`."""
        import torch

        spans = [(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows]
        return (torch.cat([self.logprobs[a:b] for a, b in spans]), torch.cat([self.ids[a:b] for a, b in spans]),
                torch.cat([self.log_tail[a:b] for a, b in spans]), self.vocab)


def build_topk(teacher: Any, rows: list[dict], collate: Callable[[list[dict]], dict], *, k: int,
               temperature: float, width: int | None = None, device: str = "cpu", precision: str = "fp32",
               batch_rows: int = 8, progress: Callable[[int], None] | None = None) -> TopK:
    """Run the teacher over the training rows as the trainer batches them (same collator, so the
    same packed positions and masks) and keep, at each completion position, its top k at temperature
    T and the log of its remaining mass. `width`: the student's logits width; ids beyond what both
    models have are left out, as in `kl_full`."""
    import torch

    vocab = output_width(teacher) if width is None else min(output_width(teacher), width)
    k = min(k, vocab)
    compact = accepts_logits_to_keep(teacher)
    values, indices, tails, counts = [], [], [], []
    for start in range(0, len(rows), batch_rows):
        batch = collate(rows[start:start + batch_rows])
        inputs = {key: v.to(device) if hasattr(v, "to") else v
                  for key, v in teacher_inputs(batch, output_width(teacher)).items()}
        mask = keep_mask(batch["labels"]).to(device)
        with torch.no_grad(), autocast(device, precision):
            logits, _ = kept_logits(teacher, inputs, mask, compact=compact)
        log_p = torch.log_softmax(logits[..., :vocab].float() / temperature, dim=-1)
        top = log_p.topk(k, dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
        tails.append(torch.logsumexp(log_p.scatter(-1, top.indices, float("-inf")), dim=-1).cpu())
        counts += mask.sum(1).tolist()
        if progress is not None:
            progress(len(batch["labels"]))
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    if not values:
        return TopK(torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int32), torch.zeros(0), offsets, vocab)
    return TopK(torch.cat(values), torch.cat(indices), torch.cat(tails), offsets, vocab)


def model_fingerprint(path_or_id: str) -> dict:
    """What identifies a teacher's weights cheaply: every top-level file's name, size and mtime for
    a local folder (a rewritten folder gets a new fingerprint), else the Hub id."""
    path = Path(path_or_id)
    if not path.is_dir():
        return {"id": path_or_id}
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    return {"path": str(path.resolve()), "files": files}


def cache_key(*, teacher: dict, rows: list[dict], k: int, temperature: float, width: int, precision: str,
              pad_token_id: int) -> str:
    """sha256 over the teacher fingerprint, the exact training rows, and every setting the cache depends on."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "teacher": teacher, "k": k, "temperature": temperature,
                         "width": width, "precision": precision, "pad": pad_token_id}, sort_keys=True).encode())
    for row in rows:
        h.update(json.dumps([row["input_ids"], row["labels"], row.get("seq_lengths")]).encode())
    return h.hexdigest()


def cache_path(folder: Path, key: str) -> Path:
    return folder / f"topk-{key[:16]}.safetensors"


def save_topk(topk: TopK, folder: Path, key: str, info: dict) -> Path:
    """Write the cache atomically as one safetensors file and remove older caches in `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    target = cache_path(folder, key)
    fd, tmp = tempfile.mkstemp(prefix=".topk-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({"logprobs": topk.logprobs.contiguous(), "ids": topk.ids.contiguous(),
                   "log_tail": topk.log_tail.contiguous(), "offsets": topk.offsets.contiguous()}, tmp,
                  metadata={"key": key, "vocab": str(topk.vocab), "info": json.dumps(info, sort_keys=True)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in folder.glob("topk-*.safetensors"):
        if old != target:
            old.unlink(missing_ok=True)
    return target


def load_topk(folder: Path, key: str) -> TopK | None:
    """The cache written for `key`, or None if there is none (or it is unreadable or stale)."""
    from safetensors import safe_open

    from pipeline.io.progress import note

    path = cache_path(folder, key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                note(f"distillation cache {path} was written for other settings or data; recomputing it")
                return None
            return TopK(f.get_tensor("logprobs"), f.get_tensor("ids"), f.get_tensor("log_tail"),
                        f.get_tensor("offsets"), int(meta["vocab"]))
    except Exception as e:  # a torn or foreign file: recompute rather than fail, and say so
        detail = (str(e).splitlines() or [""])[0][:120]
        note(f"distillation cache {path} is unreadable ({type(e).__name__}: {detail}); recomputing it")
        return None


# ---------------------------------------------------------------- trainer wiring


@dataclass
class RowCollator:
    """Wraps the training collator: rows carrying `teacher_row` (their index in the training set)
    pass it on as a tensor, so the loss can find the row's cached teacher top-k."""

    collate: Callable[[list[dict]], dict]

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        if not rows or "teacher_row" not in rows[0]:
            return self.collate(rows)
        batch = self.collate([{k: v for k, v in r.items() if k != "teacher_row"} for r in rows])
        batch["teacher_row"] = torch.tensor([r["teacher_row"] for r in rows])
        return batch


def distill_trainer(base: type, *, teacher: Any = None, topk: TopK | None = None, temperature: float,
                    alpha: float, precision: str) -> type:
    """A subclass of TRL's SFTTrainer (`base`) whose training loss is `distill_loss`.

    Only compute_loss changes, and only in training: evaluation keeps SFTTrainer's plain
    cross-entropy, so eval loss stays comparable with runs trained without a teacher. Logs `kl`
    (mean per completion token, without T^2), `ce` and `mean_token_accuracy` with the train loss,
    weighted by tokens over the logged steps as the loss is (at one step a log: loss = alpha T^2 kl
    + (1 - alpha) ce).
    The teacher runs in eval mode without gradients, on the student's device, under the same
    mixed-precision autocast, with the student's input ids, positions and attention mask."""
    import torch

    if (teacher is None) == (topk is None):
        raise ValueError("give exactly one of teacher and topk")
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    compact_teacher = teacher is not None and accepts_logits_to_keep(teacher)
    compact_student: bool | None = None

    class DistillTrainer(base):  # type: ignore[misc, valid-type]
        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if self._signature_columns is not None and "teacher_row" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "teacher_row"]

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            nonlocal compact_student
            rows = inputs.pop("teacher_row", None)
            if not self.model.training:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            if compact_student is None:
                compact_student = accepts_logits_to_keep(model)
            inputs["use_cache"] = False
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            labels = inputs["labels"]
            mask = keep_mask(labels)
            student_logits, outputs = kept_logits(model, forward, mask, compact=compact_student)
            targets = next_tokens(labels, mask)
            if topk is not None:
                if rows is None:
                    raise ValueError("a training batch without teacher_row: the rows were not indexed")
                lp, ids, tail, vocab = topk.for_rows(rows.tolist())
                dev = labels.device
                terms = distill_loss(student_logits, targets, teacher_topk=(lp.to(dev), ids.to(dev), tail.to(dev),
                                     vocab), temperature=temperature, alpha=alpha, num_items=num_items_in_batch)
            else:
                if next(teacher.parameters()).device != labels.device:
                    teacher.to(labels.device)
                with torch.no_grad(), autocast(str(labels.device), precision):
                    t_logits, _ = kept_logits(teacher, teacher_inputs(forward, output_width(teacher)), mask,
                                              compact=compact_teacher)
                terms = distill_loss(student_logits, targets, teacher_logits=t_logits, temperature=temperature,
                                     alpha=alpha, num_items=num_items_in_batch)
            loss = terms.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as SFTTrainer does
            gather = self.accelerator.gather_for_metrics
            sums = gather(torch.stack([terms.kl_sum, terms.ce_sum, terms.correct.float(),
                                       torch.as_tensor(float(terms.tokens), device=labels.device)])[None])
            prev = getattr(self, "_distill_sums", None)
            self._distill_sums = sums.sum(0).cpu() + (0 if prev is None else prev)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict, start_time: float | None = None) -> None:
            sums = getattr(self, "_distill_sums", None)
            if self.model.training and sums is not None and "loss" in logs:
                kl, ce, correct, n = sums.tolist()
                if n > 0:  # token-weighted over the logged steps: loss = alpha T^2 kl + (1 - alpha) ce
                    logs.update(kl=kl / n, ce=ce / n, mean_token_accuracy=correct / n)
                self._distill_sums = None
            super().log(logs, start_time)

    return DistillTrainer
