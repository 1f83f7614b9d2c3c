"""Records -> chat messages -> token ids with a completion-only label mask.

Pure data side of the student (no I/O but reading the Alpaca template from prompts/); used by
`sift export`, `sift train` and `sift sample`, so training and inference render prompts the
same way. Two rules this module exists to enforce:
- the loss covers the assistant's answer only, and the answer's labels end with the EOS token,
  so the student learns to stop (alpaca-lora #439, #269);
- the pad token is never the EOS token, so nothing that masks padding can drop the EOS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE = -100  # label of a token that carries no loss
TEMPLATES = ("auto", "chat", "alpaca")  # auto: the tokenizer's chat template if it has one, else alpaca
OVERLONG = ("drop", "truncate", "error")
ROLES = ("system", "user", "assistant")
# existing special tokens worth reusing as padding (no new embedding row needed)
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<unk>", "[UNK]")
NEW_PAD = "[PAD]"
ALPACA_TEMPLATE = Path(__file__).resolve().parents[1] / "prompts" / "alpaca_chat_template.jinja"


class DataError(ValueError):
    """A record that cannot be trained on; `field` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------- records


def to_messages(instruction: str, input: str, output: str) -> list[dict]:
    """The Alpaca triple as a two-turn chat; the input follows the instruction after a blank line."""
    user = instruction + ("\n\n" + input if input else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def check_messages(messages: Any) -> list[dict]:
    """Validate a `messages` field: roles known, contents strings, ending in a non-empty answer."""
    if not isinstance(messages, list) or not messages:
        raise DataError("expected a non-empty list of {role, content} objects", field="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i}: expected an object with string 'role' and 'content'",
                            field="messages")
        if m["role"] not in ROLES:
            raise DataError(f"message {i}: unknown role {m['role']!r} (use {', '.join(ROLES)})",
                            field="messages")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise DataError("the last message must be a non-empty assistant answer", field="messages")
    if not any(m["role"] == "user" for m in messages):
        raise DataError("no user message", field="messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------- tokenizer setup


def alpaca_chat_template() -> str:
    return ALPACA_TEMPLATE.read_text(encoding="utf-8")


def setup_tokenizer(tokenizer: Any, template: str = "auto") -> dict:
    """Make a tokenizer fit for training, in place: a chat template and a pad token that is not EOS.

    Returns what was decided: the template kind, the pad token, and whether a token was added
    (then the model's embeddings must be resized; reusing an existing special token avoids it).
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token; the student could never learn to stop")
    kind = template
    if template == "auto":
        kind = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if kind == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat' asked for, but the tokenizer has no chat template; use alpaca")
    if kind == "alpaca":
        tokenizer.chat_template = alpaca_chat_template()
    added = 0
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != tokenizer.eos_token_id), None)
        if pad is None:
            added = tokenizer.add_special_tokens({"pad_token": NEW_PAD})
        else:
            tokenizer.pad_token = pad
    tokenizer.padding_side = "right"
    return {"template": kind, "pad_token": tokenizer.pad_token, "pad_token_id": tokenizer.pad_token_id,
            "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id, "added_tokens": added}


# ---------------------------------------------------------------- tokenisation


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """Everything before the answer: the conversation so far plus the assistant header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of the prompt exactly as training saw it (for generation)."""
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token id on the answer (ending with EOS)


def tokenize_example(tokenizer: Any, messages: list[dict]) -> Example:
    """Prompt and answer tokenised apart (as at inference), the answer cut after its EOS.

    The answer is the text the chat template renders after the generation prompt. If it holds
    the EOS token, anything after the last one (a template's trailing newline) is dropped;
    otherwise EOS is appended. Only the answer carries labels.
    """
    prompt = render_prompt(tokenizer, messages[:-1])
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the chat template does not render the prompt as a prefix of the conversation")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in c_ids:
        c_ids = c_ids[: len(c_ids) - c_ids[::-1].index(eos)]
    else:
        c_ids = [*c_ids, eos]
    return Example(input_ids=p_ids + c_ids, labels=[IGNORE] * len(p_ids) + c_ids)


@dataclass
class TokenStats:
    examples: int = 0  # kept
    dropped_overlong: int = 0  # longer than max_length, dropped (overlong="drop")
    truncated: int = 0  # longer than max_length, cut (overlong="truncate"; their EOS is lost)
    tokens: int = 0  # in kept examples
    label_tokens: int = 0  # tokens that carry loss
    longest: int = 0  # before dropping or cutting
    overlong_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "overlong_ids"} | {
            "overlong_ids": self.overlong_ids[:20]}


def tokenize_records(tokenizer: Any, records: list[tuple[str, list[dict]]], *, max_length: int,
                     overlong: str = "drop") -> tuple[list[Example], TokenStats]:
    """Tokenise (id, messages) pairs. Examples over `max_length` are dropped and counted, cut and
    counted, or refused, as `overlong` says; a cut answer loses its EOS, hence drop by default."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    out, stats = [], TokenStats()
    for rec_id, messages in records:
        ex = tokenize_example(tokenizer, messages)
        n = len(ex.input_ids)
        stats.longest = max(stats.longest, n)
        if n > max_length:
            stats.overlong_ids.append(rec_id)
            if overlong == "error":
                raise DataError(f"record {rec_id!r} has {n} tokens, more than max_length {max_length}")
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
            if all(label == IGNORE for label in ex.labels):
                stats.dropped_overlong += 1  # the prompt alone fills max_length: nothing to learn
                continue
            stats.truncated += 1
        out.append(ex)
        stats.examples += 1
        stats.tokens += len(ex.input_ids)
        stats.label_tokens += sum(label != IGNORE for label in ex.labels)
    return out, stats
