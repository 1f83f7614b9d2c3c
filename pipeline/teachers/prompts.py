"""Prompt templates: plain files in prompts/, loaded by name or by a user's path.

    render("self_instruct_generate", examples="1. ...", next=9)     # by name
    render("my_prompts/generate.txt", examples="1. ...", next=9)    # a user's own file

A template file may start with a small header of `key: value` lines closed by a `---` line
(`kind: completion` for plain-text prompts, `kind: chat` to send the body as one user message,
optional `system:` for chat); everything after it is the template. Placeholders are `{name}`;
`{{` and `}}` are literal braces. A missing placeholder is a SiftError naming the file, so a
user's template fails before the model loads. Exactly one trailing newline of the body is
dropped, so a completion prompt can end mid-line ("9.").
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.teachers.base import Request, Sampling

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
PLAIN_CHAT_TEMPLATE = "alpaca_chat_template.jinja"  # chat prompts to a model without a chat template
KINDS = ("completion", "chat")
_HEADER_LINE = re.compile(r"^[A-Za-z_][\w-]*\s*:.*$")
_TOKEN = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*)\}")
_MAX_HEADER_LINES = 20


@dataclass(frozen=True)
class PromptTemplate:
    """One loaded template; `sha` (of the whole file) goes into every record's provenance."""

    name: str
    path: Path
    kind: str
    body: str
    sha: str
    system: str | None = None

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(m.group(1) for m in _TOKEN.finditer(self.body) if m.group(1))

    def check(self, fields: set[str] | frozenset[str], *, required: set[str] | frozenset[str] = frozenset()
              ) -> None:
        """Raise a SiftError unless every placeholder is among `fields` and every `required` one is used."""
        unknown = sorted(self.placeholders - set(fields))
        if unknown:
            raise SiftError(f"prompt template uses {{{unknown[0]}}}, which this stage does not provide "
                            f"(it provides: {', '.join(sorted(fields)) or 'nothing'})", path=self.path)
        unused = sorted(set(required) - self.placeholders)
        if unused:
            raise SiftError(f"prompt template must use {{{unused[0]}}}", path=self.path)

    def render(self, **fields: object) -> str:
        """The body with every `{name}` replaced; unused fields are ignored."""
        self.check(set(fields))

        def sub(m: re.Match) -> str:
            if m.group(0) == "{{":
                return "{"
            if m.group(0) == "}}":
                return "}"
            return str(fields[m.group(1)])

        return _TOKEN.sub(sub, self.body)

    def request(self, sampling: Sampling, **fields: object) -> Request:
        """A teacher Request: plain prompt for `completion`, user (+system) messages for `chat`."""
        text = self.render(**fields)
        if self.kind == "completion":
            return Request(prompt=text, sampling=sampling)
        messages = ({"role": "system", "content": self.system},) if self.system else ()
        return Request(messages=(*messages, {"role": "user", "content": text}), sampling=sampling)

    def provenance(self) -> dict:
        return {"name": self.name, "sha": self.sha, "kind": self.kind}


def _resolve(name_or_path: str | Path) -> tuple[str, Path]:
    text = str(name_or_path)
    looks_like_path = "/" in text or "\\" in text or text.endswith(".txt")
    if looks_like_path:
        path = Path(text).expanduser()
        return path.stem, path
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise SiftError(f"prompt name {text!r} is neither a file path nor a name in {PROMPTS_DIR}",
                        field="prompt")
    return text, PROMPTS_DIR / f"{text}.txt"


def parse_template(text: str, *, name: str, path: Path) -> PromptTemplate:
    """Split the optional header from the body and validate the header."""
    lines = text.split("\n")
    header: dict[str, str] = {}
    body = text
    for i, line in enumerate(lines[:_MAX_HEADER_LINES + 1]):
        if line.strip() == "---":
            if i and all(_HEADER_LINE.match(x) for x in lines[:i]):
                for x in lines[:i]:
                    key, _, value = x.partition(":")
                    header[key.strip().lower()] = value.strip()
                body = "\n".join(lines[i + 1:])
            break
    if body.endswith("\n"):
        body = body[:-1]
    kind = header.get("kind", "completion")
    if kind not in KINDS:
        raise SiftError(f"header 'kind: {kind}' must be one of {', '.join(KINDS)}", path=path, line=1)
    if not body.strip():
        raise SiftError("prompt template is empty", path=path)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return PromptTemplate(name=name, path=path, kind=kind, body=body, sha=sha, system=header.get("system"))


def load(name_or_path: str | Path) -> PromptTemplate:
    """Load a template by name (prompts/<name>.txt) or by path."""
    name, path = _resolve(name_or_path)
    if not path.exists():  # anything else that is not a regular file is refused by read_bounded
        where = "no such prompt file" if path.parent != PROMPTS_DIR else (
            f"no prompt named {name!r} (available: {', '.join(available()) or 'none'})")
        raise SiftError(where, path=path)
    from pipeline.io.files import MAX_SETTINGS_BYTES, read_bounded

    try:
        text = read_bounded(path, MAX_SETTINGS_BYTES).decode("utf-8")
    except UnicodeDecodeError as e:
        raise SiftError(f"cannot read prompt: {e}", path=path) from None
    return parse_template(text, name=name, path=path)


def plain_chat_template() -> str:
    """The chat template a base model's tokenizer lacks: Alpaca's "### Instruction: ... ###
    Response:" layout as Jinja, shared with the student side (train/format.py)."""
    return (PROMPTS_DIR / PLAIN_CHAT_TEMPLATE).read_text(encoding="utf-8")


def available() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.txt"))


def render(name_or_path: str | Path | PromptTemplate, **fields: object) -> str:
    """Load (unless given a template) and fill in a prompt; a missing placeholder is a SiftError."""
    template = name_or_path if isinstance(name_or_path, PromptTemplate) else load(name_or_path)
    return template.render(**fields)
