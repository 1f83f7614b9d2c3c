"""Model-based quality scores for instruction records: IFD, length and a reward model.

    sift score --run demo --score.scorers ifd,length     # the stage that calls these (pipeline/stages/score.py)
    .venv/bin/python -m pytest tests/train/test_scorers.py -q

Each scorer takes records ({instruction, input, output}) and returns one result per record, in
order; a result is a dict whose "value" is the score (None when the record cannot be scored)
plus the scorer's own details. No generation anywhere: one forward pass per batch.

- `ifd` (Instruction-Following Difficulty; Li et al., 2024, "From Quantity to Quality", Cherry LLM;
  Li et al., 2024, "Superfiltering"): the mean loss of the answer tokens given the prompt, divided
  by their mean loss given an empty instruction. The prompt is rendered exactly as the student is
  trained (train/format.py: the model's chat template, or the Alpaca template when it has none), and
  the "alone" side renders the same template with an empty user message, so the two losses differ
  only by the instruction (and input) text, over the same answer token ids. Below 1: the
  instruction helps predict the answer; 1 or more: the answer does not depend on the instruction.
  An answer with no tokens has no loss: its IFD is None (reason "empty_answer").
- `rifd` (reversed IFD; Li et al., 2024, "Selective Reflection-Tuning", ACL Findings, Sec. 3): the
  mean loss of the instruction (and input) tokens given the answer, divided by their mean loss
  alone. The paper conditions the instruction on the answer through a short bridging prompt, as its
  released code does (Reflection_Tuning, selection_code/data_analysis.py): REVERSE_PROMPT, with the
  answer in it, is the user turn and the instruction is the assistant's reply; the "alone" side is
  the same template with an empty user message, as for IFD. Low r-IFD: the instruction can be
  recovered from the answer, so the answer fits it. The paper writes both ratios with perplexities
  (its code computes the perplexity and the loss ratios); sift uses the mean-loss ratio for both, as
  Cherry LLM defines IFD, and keeps both losses, so the perplexity ratio exp(given - alone) can be
  recomputed. An empty answer or instruction gives None (reason "empty_answer", "empty_instruction").
- `length`: words in the answer (whitespace split); characters and tokens are in the details.
- `reward`: any sequence-classification reward model folder (e.g. an OpenAssistant DeBERTa reward
  model): its logit for (prompt, answer); with two or more labels, the last label's log-odds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from train.format import render_prompt, setup_tokenizer, to_messages

MAX_ANSWER_TOKENS = 512  # answer tokens scored at most (Cherry LLM cuts whole texts at 512)
MAX_PROMPT_TOKENS = 512  # prompt tokens kept (the last ones) before the answer
# r-IFD's bridge from an answer to its instruction: the wording of the Selective Reflection-Tuning code
REVERSE_PROMPT = ("Below is the response to an instruction, please guess the corresponding instruction for the "
                  "given response.\n{output}\nGenerate the instruction for the above response.")
Progress = Callable[[int], None]  # called with the number of records just finished


def user_text(record: dict) -> str:
    """The user turn as the student sees it: instruction, then the input after a blank line."""
    return to_messages(record["instruction"], record.get("input") or "", "")[0]["content"]


# ---------------------------------------------------------------- length


def length_scores(records: Sequence[dict]) -> list[dict]:
    """Words of each answer (whitespace split), with its characters."""
    return [{"value": len((r.get("output") or "").split()), "chars": len(r.get("output") or "")} for r in records]


# ---------------------------------------------------------------- IFD


def prepare_tokenizer(tokenizer: Any) -> str:
    """Give the tokenizer the student's prompt format (chat template, else Alpaca's); returns which."""
    return setup_tokenizer(tokenizer, "auto")["template"]


def ifd_sequences(tokenizer: Any, record: dict, *, max_answer_tokens: int = MAX_ANSWER_TOKENS,
                  max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, empty-instruction prompt ids, answer ids) of one record. The answer is tokenized
    on its own (as it follows the assistant header in training) and cut to `max_answer_tokens`;
    the prompt keeps its last `max_prompt_tokens` tokens."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = ids(render_prompt(tokenizer, [{"role": "user", "content": user_text(record)}]))
    empty = ids(render_prompt(tokenizer, [{"role": "user", "content": ""}]))
    answer = ids(record.get("output") or "")[:max_answer_tokens] if (record.get("output") or "").strip() else []
    return prompt[-max_prompt_tokens:], empty[-max_prompt_tokens:], answer


def _padded(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any]:
    """Token ids and attention mask of prefix + answer per pair, right-padded."""
    import torch

    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        seq = p + a
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return ids, mask


def _mean_losses(model: Any, pairs: Sequence[tuple[list[int], list[int]]], ids: Any, hidden: Any) -> list[float]:
    """Mean token cross-entropy of each answer from the final hidden states of its padded row."""
    import torch

    device = hidden.device
    rows = torch.tensor([i for i, (p, a) in enumerate(pairs) for _ in a])
    cols = torch.tensor([len(p) - 1 + k for p, a in pairs for k in range(len(a))])  # positions predicting the answer
    # the output layer only where an answer token is predicted: most of the vocabulary work saved
    logits = model.get_output_embeddings()(hidden[rows.to(device), cols.to(device)]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    token_loss = torch.nn.functional.cross_entropy(logits, ids[rows, cols + 1].to(device), reduction="none")
    out, at = [], 0
    for _, a in pairs:
        out.append(float(token_loss[at:at + len(a)].mean()))
        at += len(a)
    return out


def answer_losses(model: Any, pairs: Sequence[tuple[list[int], list[int]]], *, pad_id: int) -> list[float]:
    """Mean token cross-entropy (nats) of each answer given its prefix, in one padded forward pass
    (right padding, so positions are those of an unpadded sequence)."""
    import torch

    ids, mask = _padded(pairs, pad_id)
    device = next(model.parameters()).device
    with torch.inference_mode():
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return _mean_losses(model, pairs, ids, hidden)


def batch_losses(model: Any, batches: Sequence[Sequence[tuple[list[int], list[int]]]], *, pad_id: int,
                 done: Callable[[int], None] | None = None, lanes: int | None = None) -> list[list[float]]:
    """`answer_losses` of every batch, in order; `done(k)` after batch k. Where the fast engine runs the
    model (train/eval_passes.py `fast_supported`), its prefill arithmetic computes the hidden states and
    the batches split over `lanes` threads of one intra-op thread each (as eval's NLL pass does)."""
    import threading

    from train.eval_passes import fast_supported

    if not fast_supported(model):
        out = []
        for k, pairs in enumerate(batches):
            out.append(answer_losses(model, pairs, pad_id=pad_id))
            if done is not None:
                done(k)
        return out
    from pipeline.teachers.fast_decode import FastDecoder

    lock = threading.Lock()
    engine = FastDecoder(model, eos_ids=[pad_id], lanes=lanes)

    def use(k: int, hidden: Any) -> list[float]:
        pairs = batches[k]
        losses = _mean_losses(model, pairs, _padded(pairs, pad_id)[0], hidden)
        if done is not None:
            with lock:
                done(k)
        return losses

    return engine.final_states([[p + a for p, a in pairs] for pairs in batches], use)


def loss_ratios(model: Any, tokenizer: Any, seqs: Sequence[tuple[list[int], list[int], list[int]]], *,
                batch_size: int, progress: Progress | None = None,
                lanes: int | None = None) -> list[tuple[float, float] | None]:
    """(mean loss of each target given its prompt, its mean loss after the empty prompt) for
    (prompt ids, empty-prompt ids, target ids) triples, None where the target has no tokens. Batched
    by length; the "alone" loss depends only on the target, so it is computed once per distinct
    target ("Positive", "No", ...), in the batch where it first appears. Shared by IFD and r-IFD."""
    results: list[tuple[float, float] | None] = [None] * len(seqs)
    todo = sorted((i for i, s in enumerate(seqs) if s[2]), key=lambda i: len(seqs[i][0]) + len(seqs[i][2]))
    plan: list[tuple[list[int], list[tuple[int, ...]]]] = []  # (records, targets first seen) per batch
    seen: set[tuple[int, ...]] = set()
    for lo in range(0, len(todo), batch_size):
        batch = todo[lo:lo + batch_size]
        fresh = list(dict.fromkeys(tuple(seqs[i][2]) for i in batch if tuple(seqs[i][2]) not in seen))
        seen.update(fresh)
        plan.append((batch, fresh))
    pairs = [[(seqs[i][0], seqs[i][2]) for i in batch] + [(seqs[batch[0]][1], list(a)) for a in fresh]
             for batch, fresh in plan]
    done = None if progress is None else (lambda k: progress(len(plan[k][0])))
    # pad with any real id: right padding is never attended to
    losses = batch_losses(model, pairs, pad_id=tokenizer.eos_token_id, done=done, lanes=lanes)
    alone: dict[tuple[int, ...], float] = {}
    for (batch, fresh), got in zip(plan, losses, strict=True):
        alone.update(zip(fresh, got[len(batch):], strict=True))
        for k, i in enumerate(batch):
            results[i] = (got[k], alone[tuple(seqs[i][2])])
    return results


def ifd_scores(model: Any, tokenizer: Any, records: Sequence[dict], *, batch_size: int,
               max_answer_tokens: int = MAX_ANSWER_TOKENS, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
               progress: Progress | None = None) -> list[dict]:
    """IFD of each record: {"value": loss_given_prompt / loss_alone, "loss_given_prompt",
    "loss_alone", "answer_tokens"}; value None with a "reason" when the answer has no tokens.
    `tokenizer` must already have the prompt format (`prepare_tokenizer`)."""
    seqs = [ifd_sequences(tokenizer, r, max_answer_tokens=max_answer_tokens, max_prompt_tokens=max_prompt_tokens)
            for r in records]
    out = []
    for (_, _, answer), pair in zip(seqs, loss_ratios(model, tokenizer, seqs, batch_size=batch_size,
                                                      progress=progress), strict=True):
        if pair is None:
            out.append({"value": None, "reason": "empty_answer", "answer_tokens": 0})
            continue
        given, base = pair
        out.append({"value": given / base if base > 0 else None, "loss_given_prompt": given,
                    "loss_alone": base, "answer_tokens": len(answer)})
    return out


def rifd_sequences(tokenizer: Any, record: dict, *, max_answer_tokens: int = MAX_ANSWER_TOKENS,
                   max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> tuple[list[int], list[int], list[int]]:
    """(bridging prompt ids with the answer in it, empty-instruction prompt ids, instruction ids) of one
    record: r-IFD's sequences. The instruction (with its input, as the student sees them) is tokenized
    on its own and cut to `max_answer_tokens`; the answer inside the prompt is cut to
    `max_answer_tokens` tokens first, and the prompt keeps its last `max_prompt_tokens` tokens."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    answer = record.get("output") or ""
    answer_ids = ids(answer)
    if len(answer_ids) > max_answer_tokens:  # a long answer is cut, so the bridge around it stays whole
        answer = tokenizer.decode(answer_ids[:max_answer_tokens])
    prompt = ids(render_prompt(tokenizer, [{"role": "user", "content": REVERSE_PROMPT.format(output=answer)}]))
    empty = ids(render_prompt(tokenizer, [{"role": "user", "content": ""}]))
    target = user_text(record)
    instruction = ids(target)[:max_answer_tokens] if target.strip() else []
    return prompt[-max_prompt_tokens:], empty[-max_prompt_tokens:], instruction


def rifd_scores(model: Any, tokenizer: Any, records: Sequence[dict], *, batch_size: int,
                max_answer_tokens: int = MAX_ANSWER_TOKENS, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                progress: Progress | None = None) -> list[dict]:
    """Reversed IFD of each record: {"value": loss_given_answer / loss_alone, "loss_given_answer",
    "loss_alone", "instruction_tokens"}; value None with a "reason" when the answer or the
    instruction is empty. `tokenizer` must already have the prompt format (`prepare_tokenizer`)."""
    seqs = [rifd_sequences(tokenizer, r, max_answer_tokens=max_answer_tokens, max_prompt_tokens=max_prompt_tokens)
            for r in records]
    blank = [not (r.get("output") or "").strip() for r in records]
    pairs = loss_ratios(model, tokenizer, [([], [], []) if b else s for s, b in zip(seqs, blank, strict=True)],
                        batch_size=batch_size, progress=progress)
    out = []
    for (_, _, target), pair, empty_answer in zip(seqs, pairs, blank, strict=True):
        if pair is None:
            out.append({"value": None, "reason": "empty_answer" if empty_answer else "empty_instruction",
                        "instruction_tokens": 0 if empty_answer else len(target)})
            continue
        given, base = pair
        out.append({"value": given / base if base > 0 else None, "loss_given_answer": given,
                    "loss_alone": base, "instruction_tokens": len(target)})
    return out


# ---------------------------------------------------------------- reward model


def reward_input(tokenizer: Any, record: dict) -> dict:
    """The reward model's input: the chat rendered by its template when it has one, else the
    (question, answer) text pair that OpenAssistant-style reward models are trained on."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(to_messages(record["instruction"], record.get("input") or "",
                                                         record.get("output") or ""), tokenize=False)
        return {"text": text}
    return {"text": user_text(record), "text_pair": record.get("output") or ""}


def reward_scores(model: Any, tokenizer: Any, records: Sequence[dict], *, batch_size: int,
                  max_length: int = 1024, progress: Progress | None = None) -> list[dict]:
    """The reward model's score per record: the logit with one label, else the log-odds of the last."""
    import torch

    out: list[dict] = []
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for lo in range(0, len(records), batch_size):
        inputs = [reward_input(tokenizer, r) for r in records[lo:lo + batch_size]]
        pairs = "text_pair" in inputs[0]
        enc = tokenizer([x["text"] for x in inputs], [x["text_pair"] for x in inputs] if pairs else None,
                        padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            logits = model(**enc).logits.float()
        for row in logits:
            value = float(row[0]) if row.numel() == 1 else float(row.log_softmax(-1)[-1] - torch.log1p(
                -row.softmax(-1)[-1].clamp(max=1 - 1e-7)))
            out.append({"value": value})
        if progress is not None:
            progress(len(inputs))
    return out
