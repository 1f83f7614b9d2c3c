"""The model passes of `sift eval`: the fast ones (the student merged, greedy answers by the fast engine,
NLL in length-sorted batches with the output layer only where there are labels) and the plain ones
they are measured against (PEFT model, `model.generate`), which loop also uses.

    .venv/bin/python bench/eval.py --quick      # side by side with the plain path (greedy_answers)

- `load_side`: the base as it is; the student as its base with the LoRA weights merged in (peft's
  merge_and_unload on a fresh float32 copy, then cast), so it is a plain model for the engine and
  every forward costs what the base's does; either on `student.device`;
- `fast_answers`: greedy answers through pipeline/teachers/fast_decode.py (continuous batching, C
  kernels); models the engine does not support, and GPUs, use `model.generate` (`greedy_answers`);
  `student_answers` picks one of the two (loop and the forgetting remedies use it);
- `reference_nll`: examples sorted by length and cut into batches of about TOKEN_BUDGET padded
  tokens; the vocabulary projection runs only on answer positions (the prompt's logits were the
  largest tensor of the old pass and are never used); `answer_nll` is the plain pass.
Every fast pass reports to a progress bar with counts and tokens/s (pipeline/io/progress.py). Inputs
go to the model's device, wherever it was loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.io.progress import StageProgress
from pipeline.settings import StudentSettings
from train.format import prompt_ids, tokenize_example

# padded tokens per NLL forward; on 2 cores, 64 tasks: 2048 took 9.8 s, 8192 17.3 s (less padding, cache-sized)
TOKEN_BUDGET = 2048
MAX_ROWS = 128  # sequences decoding at once in the fast engine (its measured best on 2 cores)

Plain = Callable[..., list[dict]]  # greedy_answers, the fallback


def load_side(spec: str, tokenizer: Any, adapter: Path | None, *, student: StudentSettings, merge: bool = True) -> Any:
    """The model of one side (`spec`, with `adapter` on top if given), in eval mode, on `student.device`
    with `student.dtype`. With an adapter and `merge`, LoRA is merged into a float32 copy of the base and
    the result cast to the dtype (merging in bf16 would round twice); without `merge`, the PEFT model."""
    from pipeline.io.models import load_model, resolve_device, resolve_dtype

    device = resolve_device(student.device)
    model = load_model(spec, dtype="float32" if adapter is not None and merge else student.dtype, device=device)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # training added a pad token
    if adapter is None:
        return model
    from peft import PeftModel

    peft = PeftModel.from_pretrained(model, str(adapter))
    if not merge:
        return peft.eval()
    return peft.merge_and_unload().to(resolve_dtype(student.dtype, device)).eval()


def fast_supported(model: Any) -> bool:
    """Whether the fast engine runs this model (a plain Llama or a Gemma 3 text model on the CPU)."""
    from pipeline.teachers.fast_decode import supports

    return supports(model) and model.device.type == "cpu"


def fast_answers(
    model: Any, tokenizer: Any, rows: list[dict], *, max_new_tokens: int, label: str = "answers",
    max_rows: int = MAX_ROWS,
) -> list[dict]:
    """Greedy answers {text, tokens, stopped} as `greedy_answers` gives them (stopped: EOS
    within max_new_tokens), decoded by the continuous-batching engine, shortest prompts first."""
    from pipeline.teachers.base import Sampling
    from pipeline.teachers.fast_decode import FastDecoder, Job

    eos = tokenizer.eos_token_id
    prompts = [prompt_ids(tokenizer, r["messages"][:-1]) for r in rows]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    greedy = Sampling(temperature=0.0, max_tokens=max_new_tokens, seed=0)
    decoder = FastDecoder(model, eos_ids=[eos], max_rows=max_rows)
    out: list[dict] = [{} for _ in rows]
    with StageProgress(label, len(rows), unit="ans") as bar:

        def finished(j: int, ids: list[int]) -> None:
            stopped = bool(ids) and ids[-1] == eos
            new = ids[:-1] if stopped else ids
            out[order[j]] = {"text": tokenizer.decode(new, skip_special_tokens=True).strip(),
                             "tokens": len(new), "stopped": stopped}
            bar.update(done=1, requests=1, tokens_out=len(ids))

        decoder.run([Job(prompts[i], greedy, 0) for i in order], on_finish=finished)
    return out


def student_answers(
    model: Any, tokenizer: Any, rows: list[dict], *, max_new_tokens: int, batch_size: int, label: str = "answers"
) -> list[dict]:
    """Greedy answers through the fast engine where it runs the model (`fast_supported`), else through
    `model.generate` (`greedy_answers`, batches of `batch_size`): `sift loop` and the forgetting remedies."""
    if fast_supported(model):
        return fast_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, label=label)
    return greedy_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)


def _batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted by length, cut so that rows x longest row stays within `budget` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * lengths[i] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def reference_nll(
    model: Any, tokenizer: Any, rows: list[dict], *, token_budget: int = TOKEN_BUDGET, label: str = "nll",
    lanes: int | None = None,
) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each reference answer given its prompt, as `answer_nll`
    computes it (training's labels: answer tokens and EOS), with logits only at answer positions.
    Where the fast engine runs the model (`fast_supported`), its prefill arithmetic computes the
    hidden states, the batches split over `lanes` threads of one intra-op thread each (default: one
    per torch thread): on 2 cores shared with other jobs, two OpenMP threads meeting at a barrier
    after every op wait for each other; lanes do not."""
    import torch

    examples = [tokenize_example(tokenizer, r["messages"]) for r in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head = model.get_output_embeddings()
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    batches = _batches([len(e.input_ids) for e in examples], token_budget)

    def score(idx: list[int], hidden: Any) -> list[tuple[float, int]]:
        """Each row's summed NLL and count from its final hidden states (rows x width x hidden)."""
        batch = [examples[i] for i in idx]
        width = hidden.shape[1]
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch])
        target = labels[:, 1:]
        rows_at, cols_at = (target != -100).nonzero(as_tuple=True)  # position t predicts token t+1
        logits = head(hidden[:, :-1][rows_at.to(hidden.device), cols_at.to(hidden.device)]).float()
        losses = torch.nn.functional.cross_entropy(
            logits, target[rows_at, cols_at].to(logits.device), reduction="none").cpu()
        sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows_at, losses.double())
        counts = torch.bincount(rows_at, minlength=len(batch))
        return [(float(sums[k]), int(counts[k])) for k in range(len(batch))]

    with StageProgress(label, len(rows), unit="ex") as bar, torch.inference_mode():
        if fast_supported(model):
            from pipeline.teachers.fast_decode import FastDecoder

            engine = FastDecoder(model, eos_ids=[tokenizer.eos_token_id], lanes=lanes)
            lock = threading.Lock()

            def use(j: int, hidden: Any) -> list[tuple[float, int]]:
                done = score(batches[j], hidden)
                with lock:
                    bar.update(done=len(batches[j]), requests=1,
                               tokens_out=sum(len(examples[i].input_ids) for i in batches[j]))
                return done

            results = engine.final_states([[examples[i].input_ids for i in idx] for idx in batches], use)
        else:
            results = []
            for idx in batches:
                batch = [examples[i] for i in idx]
                width = max(len(e.input_ids) for e in batch)
                ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch])
                mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
                hidden = model.get_decoder()(input_ids=ids.to(model.device),
                                             attention_mask=mask.to(model.device)).last_hidden_state
                results.append(score(idx, hidden))
                bar.update(done=len(idx), requests=1, tokens_out=int(mask.sum()))
    for idx, done in zip(batches, results, strict=True):
        for i, value in zip(idx, done, strict=True):
            out[i] = value
    return out


# ---------------------------------------------------------------- the plain passes


def answer_nll(
    model: Any, tokenizer: Any, rows: list[dict], *, batch_size: int
) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each reference answer given its prompt, as in training's labels."""
    import torch

    examples = [tokenize_example(tokenizer, r["messages"]) for r in rows]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [examples[i] for i in idx]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.tensor([e.input_ids + [pad] * (width - len(e.input_ids)) for e in batch])
        labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in batch])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch])
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(logits.device)
        loss = torch.nn.functional.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
        )
        for row, i in enumerate(idx):
            out[i] = (loss[row].sum().item(), int((shift_labels[row] != -100).sum()))
    return out


def greedy_answers(
    model: Any, tokenizer: Any, rows: list[dict], *, max_new_tokens: int, batch_size: int
) -> list[dict]:
    """Greedy answers {text, tokens, stopped}; left-padded batches of similar prompt length."""
    import torch
    from transformers import GenerationConfig

    prompts = [prompt_ids(tokenizer, r["messages"][:-1]) for r in rows]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )
    out: list[dict] = [{}] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                 generation_config=config)
        for row, i in enumerate(idx):
            new = gen[row, width:].tolist()
            stopped = eos in new
            new = new[: new.index(eos)] if stopped else new
            out[i] = {
                "text": tokenizer.decode(new, skip_special_tokens=True).strip(),
                "tokens": len(new),
                "stopped": stopped,
            }
    return out
