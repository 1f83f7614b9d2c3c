"""Pure parsers of teacher output; none of them raises, whatever the text.

Each returns `Parsed(items, problems)`: what could be read, and one `Problem` (a snake_case
reason plus the raw text that failed) per piece that could not, so the stage can put every
failure in its rejected ledger with the raw response. Formats (of the Self-Instruct and Stanford
Alpaca reference code):

- Self-Instruct bootstrap: the continuation of a numbered list, "<text>\n10. <text>\n11. ...";
- classification check: "Yes" / "No";
- instances, input-first: "Example 1\nInput: ...\nOutput: ...\nExample 2\n..." or a bare output;
- instances, output-first: "Class label: ...\n<input>\nClass label: ...";
- Stanford Alpaca: "###"-separated chunks "N. Instruction: ...\nN. Input:\n...\nN. Output:\n...".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

NOINPUT = "<noinput>"
_NUMBERED = re.compile(r"\n[ \t]*\d+[ \t]?[.)](?=\s|$)[ \t]*")
_EXAMPLE = re.compile(r"(?:^|\n)[ \t]*Example\s*\d+\s*[:.]?[ \t]*", re.IGNORECASE)
_OUTPUT = re.compile(r"Output\s*\d*\s*:", re.IGNORECASE)
_INPUT_AT = re.compile(r"Input\s*\d*\s*:", re.IGNORECASE)
_INPUT_PREFIX = re.compile(r"^Input\s*\d*\s*:", re.IGNORECASE)
_NEXT_TASK = re.compile(r"(?:^|\n)\s*Task\s*:", re.IGNORECASE)
_CLASS_LABEL = re.compile(r"Class\s+label\s*:", re.IGNORECASE)
_ALPACA_FIELD = re.compile(r"(?:^|\n)\s*\d+\s*\.\s*(Instruction|Input|Output)\s*:", re.IGNORECASE)
_YES = ("yes", "true", "y")
_NO = ("no", "false", "n")


@dataclass(frozen=True)
class Problem:
    """One piece of a response that could not be used."""

    reason: str  # snake_case, e.g. "empty_response", "malformed_chunk"
    raw: str  # the text that failed (the whole response when nothing could be read)


@dataclass
class Parsed(Generic[T]):
    items: list[T] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def squash(text: str) -> str:
    """Collapse whitespace runs to one space and strip (as both reference repos do)."""
    return re.sub(r"\s+", " ", text).strip()


def _as_text(text: object) -> str:
    return text if isinstance(text, str) else ""


# ---------------------------------------------------------------- Self-Instruct bootstrap


def parse_numbered_list(text: str) -> Parsed[str]:
    """Instructions from the continuation of a numbered list whose prompt ended in "N.".

    The first item is the text before the first "\\nM." line (the continuation of item N).
    Each item is whitespace-squashed, loses a trailing ':' and gets a capital first letter
    (the reference `.capitalize()` also lower-cased the rest, breaking names; we do not).
    """
    text = _as_text(text)
    out: Parsed[str] = Parsed()
    if not text.strip():
        out.problems.append(Problem("empty_response", text))
        return out
    pieces = _NUMBERED.split("\n" + text if re.match(r"\s*\d+\s?[.)]\s", text) else text)
    for i, piece in enumerate(pieces):
        item = squash(piece).rstrip(":").strip()
        if not item:
            if i:  # an empty continuation before the first "\n10." is normal, not a problem
                out.problems.append(Problem("empty_item", piece))
            continue
        out.items.append(item[0].upper() + item[1:])
    return out


# ---------------------------------------------------------------- classification check


def parse_yes_no(text: str) -> Parsed[bool]:
    """True for "Yes", False for "No" (first word, any case, punctuation ignored)."""
    text = _as_text(text)
    out: Parsed[bool] = Parsed()
    words = re.findall(r"[A-Za-z]+", text)
    first = words[0].lower() if words else ""
    if first in _YES:
        out.items.append(True)
    elif first in _NO:
        out.items.append(False)
    else:
        out.problems.append(Problem("empty_response" if not text.strip() else "not_yes_or_no", text))
    return out


# ---------------------------------------------------------------- instances


def _cut_next_task(text: str) -> str:
    """A model that keeps going starts the next few-shot task; only the first task is ours."""
    m = _NEXT_TASK.search(text)
    return text[:m.start()] if m else text


def parse_input_output(chunk: str) -> tuple[str, str]:
    """(input, output) of one example, after the reference `parse_input_output`.

    Text before "Output:" is the input (an "Input:" prefix removed; other field names such as
    "Paragraph:" are kept, they are part of the input); with no "Output:" the whole chunk is the
    output. A second "Input:" inside the output starts another pair and is cut off.
    """
    parts = _OUTPUT.split(chunk)
    if len(parts) >= 2:
        inp, out = parts[0], parts[1]  # a later "Output:" belongs to a pair the model went on to write
    else:
        inp, out = "", chunk
    out = _INPUT_AT.split(out, maxsplit=1)[0]
    inp = _INPUT_PREFIX.sub("", inp.strip())
    return inp.strip(), out.strip()


def parse_input_first(text: str, *, truncated: bool = False) -> Parsed[dict]:
    """Instances of a non-classification task: [{input, output}] in order of appearance.

    With `truncated` (the response hit max_tokens) the last instance is dropped: it is likely
    cut mid-sentence.
    """
    text = _cut_next_task(_as_text(text))
    out: Parsed[dict] = Parsed()
    if not text.strip():
        out.problems.append(Problem("empty_response", text))
        return out
    chunks = _EXAMPLE.split(text)
    if len(chunks) > 1 and not chunks[0].strip():
        chunks = chunks[1:]
    elif len(chunks) > 1:
        head = chunks[0]  # text before "Example 1": an output only when it names one
        chunks = ([head] if _OUTPUT.search(head) else []) + chunks[1:]
        if not _OUTPUT.search(head):
            out.problems.append(Problem("text_before_examples", head))
    kept: list[tuple[dict, str]] = []
    for chunk in chunks:
        inp, outp = parse_input_output(chunk)
        if not outp:
            out.problems.append(Problem("empty_output", chunk))
            continue
        kept.append(({"input": inp, "output": outp}, chunk))
    if truncated and kept:
        out.problems.append(Problem("truncated_instance", kept.pop()[1]))
    out.items = [k for k, _ in kept]
    if not out.items and not out.problems:
        out.problems.append(Problem("no_instances", text))
    return out


def parse_output_first(text: str, *, truncated: bool = False) -> Parsed[dict]:
    """Instances of a classification task: "Class label: L\\n<input>" -> {input, output: L}.

    The first line after "Class label:" is the label, the rest (possibly empty) the input, as in
    the reference. With `truncated` the last instance is dropped.
    """
    text = _cut_next_task(_as_text(text))
    out: Parsed[dict] = Parsed()
    if not text.strip():
        out.problems.append(Problem("empty_response", text))
        return out
    pieces = _CLASS_LABEL.split(text)
    if len(pieces) == 1:
        out.problems.append(Problem("no_class_label", text))
        return out
    kept: list[tuple[dict, str]] = []
    for piece in pieces[1:]:
        label, _, rest = piece.strip().partition("\n")
        label = label.strip()
        if not label:
            out.problems.append(Problem("empty_label", piece))
            continue
        kept.append(({"input": rest.strip(), "output": label}, piece))
    if truncated and kept:
        out.problems.append(Problem("truncated_instance", kept.pop()[1]))
    out.items = [k for k, _ in kept]
    return out


# ---------------------------------------------------------------- Stanford Alpaca


def parse_alpaca(text: str, *, start: int, truncated: bool = False) -> Parsed[dict]:
    """Tasks {instruction, input, output} from a response that continues "N. Instruction:".

    `start` is N, the number the prompt ended on (its text is prepended, as in the reference).
    Chunks are split on "###"; a chunk must hold Instruction, Input and Output in that order
    (numbers are not checked: small models miscount), else it is `malformed_chunk`. "<noinput>"
    becomes "". With `truncated` the last chunk is dropped (`truncated_chunk`).
    """
    text = _as_text(text)
    out: Parsed[dict] = Parsed()
    if not text.strip():
        out.problems.append(Problem("empty_response", text))
        return out
    chunks = [c for c in f"{start}. Instruction:{text}".split("###")]
    while chunks and not chunks[-1].strip():
        chunks.pop()
    for i, chunk in enumerate(chunks):
        if not chunk.strip():
            continue
        if truncated and i == len(chunks) - 1:
            out.problems.append(Problem("truncated_chunk", chunk))
            continue
        parts = _ALPACA_FIELD.split(chunk)
        names = [p.lower() for p in parts[1::2]]
        if names != ["instruction", "input", "output"] or parts[0].strip():
            out.problems.append(Problem("malformed_chunk", chunk))
            continue
        instruction, inp, outp = (parts[2].strip(), parts[4].strip(), parts[6].strip())
        if inp.lower() == NOINPUT:
            inp = ""
        if not instruction or not outp:
            out.problems.append(Problem("empty_field", chunk))
            continue
        out.items.append({"instruction": squash(instruction), "input": inp, "output": outp})
    return out


# ---------------------------------------------------------------- Reflection-Tuning (sift refine)

_REFLECTION_LABEL = (r"(critique|feedback|analysis|(?:new|better|improved|revised|rewritten)\s+"
                     r"(?:instruction|input|answer|response|output)|end|instruction|input|answer|response|output)")
# "[Better Answer]", "[Better Answer]:", "**Better Answer:**", "Better Answer:" or "### Better Answer:" at a line start
_REFLECTION_MARKER = re.compile(
    rf"\[\s*{_REFLECTION_LABEL}\s*\]\s*:?|\*\*\s*{_REFLECTION_LABEL}\s*:?\s*\*\*\s*:?"
    rf"|(?:^|(?<=\n))[ \t]*#*[ \t]*{_REFLECTION_LABEL}[ \t]*:", re.IGNORECASE)
_PLACEHOLDERS = ("your critique", "your answer", "the new instruction", "its answer", "your instruction",
                 "an input for it, or <noinput>")  # the format line of a prompt, echoed back
_NO_INPUT = (NOINPUT, "none", "n/a", "no input", "")


def reflection_lead(prompt: str) -> str:
    """The label a reflection prompt ends with ("[Critique]"), which its reply continues; "" if none.
    The stage puts it back in front of the reply before parsing."""
    text = prompt.rstrip()
    marks = list(_REFLECTION_MARKER.finditer(text))
    return marks[-1].group(0).strip() if marks and marks[-1].end() == len(text) else ""


def _reflection_field(label: str) -> str:
    """The section a label opens: critique, instruction, input, output, or "end"/"other" (a label that
    only closes the section before it: [End], or the prompt's own [Instruction]/[Answer] of a next example)."""
    label = " ".join(label.lower().split())
    if label in ("critique", "feedback", "analysis"):
        return "critique"
    if " " not in label:
        return "end"
    return {"instruction": "instruction", "input": "input"}.get(label.split()[-1], "output")


def parse_reflection(text: str, *, target: str, truncated: bool = False) -> Parsed[dict]:
    """A reflection reply: "[Critique] ... [Better Answer] ... [End]" (target response) or
    "[Critique] ... [New Instruction] ... [New Input] ... [New Answer] ... [End]" (target instruction).

    Labels are read case-insensitively in brackets, bold, or as "Label:" at a line start, with the
    synonyms small models use (Feedback, Improved Answer, New Response, ...); the first non-empty
    section of each kind wins, and [End], or a bare [Instruction], [Input], [Answer] (the model going
    on to a next example), closes a section; what follows such a label is ignored. One item {"critique", "output"} (plus
    "instruction" and "input" for target instruction; "input" is "" when missing or <noinput>), or a
    problem: empty_response, no_rewrite (no section holding the rewrite), truncated (the reply hit
    max_tokens inside the rewrite)."""
    text = _as_text(text)
    if not text.strip():
        return Parsed(problems=[Problem("empty_response", text)])
    marks = list(_REFLECTION_MARKER.finditer(text))
    sections: dict[str, str] = {}
    closed = False  # whether the rewrite's last section was followed by another marker
    needed = ("instruction", "output") if target == "instruction" else ("output",)
    for k, m in enumerate(marks):
        name = _reflection_field(next(g for g in m.groups() if g))
        if name == "end":
            continue
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        body = text[m.end():end].strip().strip("*").strip()
        if body.lower().rstrip(".") in _PLACEHOLDERS:
            body = ""
        if body and name not in sections:
            sections[name] = body
            closed = k + 1 < len(marks)
    if any(not sections.get(n) for n in needed):
        return Parsed(problems=[Problem("no_rewrite", text)])
    if truncated and not closed and list(sections)[-1] in needed:
        return Parsed(problems=[Problem("truncated", text)])
    item = {"critique": sections.get("critique", ""), "output": sections["output"]}
    if target == "instruction":
        given = sections.get("input", "")
        item["instruction"] = sections["instruction"]
        item["input"] = "" if given.lower().strip(" .") in _NO_INPUT else given
    return Parsed(items=[item])
