"""Artifact I/O: the one module that reads and writes JSON.

Every artifact is JSON Lines (one object a line) or one JSON document. Reads are strict and
name the file, line and field of the first problem; writes are atomic (temporary file, fsync,
rename), so a crash leaves either the old artifact or the new one, never half of one. Long
stages append finished batches to a `Journal` and resume from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import SiftError
from pipeline.io.files import MAX_DOCUMENT_BYTES, MAX_LINE_BYTES, iter_lines, read_bounded, read_head

# ---------------------------------------------------------------- ids


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same content always gives the same text."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_id(obj: Any, prefix: str = "") -> str:
    """A stable id: the first 16 hex digits of the SHA-256 of the canonical JSON of `obj`."""
    digest = hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:16]
    return f"{prefix}{digest}"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- reading

MAX_DEPTH = 64  # a record nests a few levels; anything deeper is a broken or hostile file
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # only a \u escape can put a surrogate in a str
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]')


def _read_bytes(path: Path, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """A regular file's bytes, at most `limit` (see pipeline/io/files.py)."""
    return read_bounded(path, limit)


def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    if b"\x00" in raw:
        raise SiftError("contains a NUL byte", path=path, line=lineno)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SiftError(f"invalid UTF-8 at byte {e.start}", path=path, line=lineno) from None


def _json_error(e: json.JSONDecodeError) -> str:
    return f"invalid JSON: {e.msg} (column {e.colno})"


def _first_field(component: str | int) -> str:
    return f"[{component}]" if isinstance(component, int) else component


def _too_deep_field(text: str) -> str | None:
    """The top-level key (or list index) under which `text` nests deeper than MAX_DEPTH: found by
    scanning tokens, for text too deep for the json module to parse at all."""
    depth, top, last, index, kind = 0, None, "", 0, ""
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if tok[0] == '"':
            last = tok
        elif tok in "{[":
            depth += 1
            if depth == 1:
                kind = tok
                top = _first_field(0) if tok == "[" else None
            elif depth > MAX_DEPTH:
                return top
        elif tok in "}]":
            depth -= 1
        elif depth == 1 and tok == ":":
            try:
                top = json.loads(last)
            except ValueError:
                top = last.strip('"')
        elif depth == 1 and tok == "," and kind == "[":
            index += 1
            top = _first_field(index)
    return top


def _check_value(obj: Any, path: Path, line: int | None, *, surrogates: bool) -> None:
    """Refuse what json.loads accepts but sift cannot use: nesting deeper than MAX_DEPTH (each later
    step that walks the value would hit Python's recursion limit), and a lone surrogate from a
    `\\ud800` escape, which no UTF-8 file can hold, so writing the record would fail."""
    stack: list[tuple[Any, str | None, str | None, int]] = [(obj, None, None, 0)]  # value, field, top field, depth
    while stack:
        value, where, top, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise SiftError(f"nested deeper than {MAX_DEPTH} levels", path=path, line=line, field=top)
            items = list(value.items() if isinstance(value, dict) else enumerate(value))
            for k, v in reversed(items):  # a stack: pushed last, checked first; report in document order
                if isinstance(k, str) and surrogates and _SURROGATE.search(k):
                    raise SiftError("a key holds a lone surrogate escape (like \\ud800): not valid Unicode text",
                                    path=path, line=line, field=where)
                child = f"{where or ''}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else k
                stack.append((v, child, top or _first_field(k), depth + 1))
        elif surrogates and isinstance(value, str) and _SURROGATE.search(value):
            raise SiftError("lone surrogate escape (like \\ud800): not valid Unicode text", path=path, line=line,
                            field=where)


def _loads(text: str, path: Path, line: int | None) -> Any:
    """json.loads plus _check_value; a JSONDecodeError is left to the caller, which words it."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise SiftError(f"nested deeper than {MAX_DEPTH} levels", path=path, line=line,
                        field=_too_deep_field(text)) from None
    surrogates = bool(_ESCAPED_SURROGATE.search(text))
    if surrogates or text.count("{") > 1 or "[" in text:  # else a flat object (most lines): nothing to walk
        _check_value(obj, path, line, surrogates=surrogates)
    return obj


def iter_jsonl(path: str | Path, *, allow_empty: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSON Lines file.

    Rejects with a SiftError naming file and line: anything but a regular file, a line longer
    than MAX_LINE_BYTES, a byte-order mark, invalid UTF-8, NUL bytes, invalid JSON, nesting
    deeper than MAX_DEPTH, a lone surrogate escape, a line that is not a JSON object, a JSON list
    given where JSONL is expected, and (unless `allow_empty`) a file with no records. The file is
    read a line at a time.
    """
    path = Path(path)
    count = 0
    for lineno, raw in iter_lines(path, MAX_LINE_BYTES):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raise SiftError("starts with a UTF-8 byte-order mark; save it as plain UTF-8", path=path, line=1)
        text = _decode_line(raw, path, lineno)
        if not text.strip():
            continue
        try:
            obj = _loads(text, path, lineno)
        except json.JSONDecodeError as e:
            if lineno == 1 and text.lstrip().startswith("["):
                raise SiftError("looks like a JSON list; expected JSON Lines (one object a line)",
                                path=path, line=1) from None
            raise SiftError(_json_error(e), path=path, line=lineno) from None
        if isinstance(obj, list):
            raise SiftError("is a JSON list; expected JSON Lines (one object a line)", path=path, line=lineno)
        if not isinstance(obj, dict):
            raise SiftError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
        count += 1
        yield lineno, obj
    if count == 0 and not allow_empty:
        raise SiftError("is empty: no records", path=path)


def read_jsonl(path: str | Path, *, allow_empty: bool = False) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path, allow_empty=allow_empty)]


HEAD_BYTES = 64 * 1024  # enough to see a file's first non-blank byte and whether it has a second line


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Read JSONL, or one JSON list of objects (Alpaca's `alpaca_data.json` shape).

    Returns (position, object) pairs: the line number for JSONL, the 1-based list index for a
    JSON list, so errors can point at the record either way.
    """
    return list(iter_records(path))


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """`read_records` a record at a time: JSONL is read a line at a time (a JSON list, one document,
    is read whole); the shape checks run when the first record is asked for."""
    path = Path(path)
    data = read_head(path, HEAD_BYTES)
    if data.startswith(b"\xef\xbb\xbf"):  # before the shape checks, which would misread it
        raise SiftError("starts with a UTF-8 byte-order mark; save it as plain UTF-8", path=path, line=1)
    head = data.lstrip()[:1]
    if not head:
        if len(data) == HEAD_BYTES:  # 64 KiB of white space, and more: read it as JSONL, which says what is wrong
            yield from iter_jsonl(path)
            return
        raise SiftError("is empty: no records", path=path)
    if path.suffix == ".json" and head != b"[":
        if head == b"{" and data.strip().count(b"\n") > 0:
            raise SiftError("looks like JSON Lines; a .json file must hold one JSON list (rename it .jsonl)",
                            path=path, line=1)
        raise SiftError("expected a JSON list of objects", path=path, line=1)
    if head == b"[":
        text = _decode_line(_read_bytes(path), path, 1)
        try:
            obj = _loads(text, path, None)
        except json.JSONDecodeError as e:
            raise SiftError(_json_error(e), path=path, line=e.lineno) from None
        if not isinstance(obj, list):
            raise SiftError("expected a JSON list of objects", path=path)
        if not obj:
            raise SiftError("is empty: no records", path=path)
        for i, item in enumerate(obj, start=1):
            if not isinstance(item, dict):
                raise SiftError(f"item {i}: expected a JSON object, got {type(item).__name__}", path=path)
        yield from enumerate(obj, start=1)
        return
    yield from iter_jsonl(path)


def read_json(path: str | Path, *, limit: int = MAX_DOCUMENT_BYTES) -> Any:
    """One JSON document (a regular file of at most `limit` bytes), checked as records are."""
    path = Path(path)
    text = _decode_line(_read_bytes(path, limit), path, 1)
    try:
        return _loads(text, path, None)
    except json.JSONDecodeError as e:
        raise SiftError(_json_error(e), path=path, line=e.lineno) from None


# ---------------------------------------------------------------- field checks

_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
               list: "a list", dict: "an object"}


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(_TYPE_NAMES.get(x, x.__name__) for x in t)
    return _TYPE_NAMES.get(t, t.__name__)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {str: "string", bool: "boolean", int: "integer", float: "number", list: "list",
            dict: "object"}.get(type(value), type(value).__name__)


def require(obj: dict, field: str, kind: type | tuple[type, ...], *, path: str | Path | None,
            line: int | None, optional: bool = False, default: Any = None) -> Any:
    """Return obj[field] if it has the right JSON type, else raise a SiftError naming the field."""
    if field not in obj:
        if optional:
            return default
        raise SiftError("missing", path=path, line=line, field=field)
    value = obj[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise SiftError(f"expected {_type_name(kind)}, got {_json_type(value)}", path=path, line=line,
                        field=field)
    return value


# ---------------------------------------------------------------- kill seam (tests only)

KILL_AT_ENV = "SIFT_TEST_KILL_AT"  # e.g. "generate.journal:3:mid"; unset (always, outside tests): no effect
_writes_by_name: dict[str, int] = {}


def _kill_point(phase: str, path: Path) -> None:
    """Fault injection for tests/pipeline/test_kill_anywhere.py: with SIFT_TEST_KILL_AT="NAME:N:PHASE",
    the process SIGKILLs itself at its N-th durable write (an `atomic_write`, or a non-empty
    `Journal.append`) to a file named NAME. PHASE "before": nothing of that write is on disk;
    "mid": an atomic write's temporary file is complete but not renamed, or half of a journal
    append's bytes are (a torn last line); "after": the write is complete."""
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    if phase == "before":
        _writes_by_name[path.name] = _writes_by_name.get(path.name, 0) + 1
    if spec == f"{path.name}:{_writes_by_name.get(path.name, 0)}:{phase}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicFile:
    """A file written under a temporary name beside `path` and renamed into place by `commit`.

    Until `commit` returns, `path` holds the previous file (or nothing), never a partial one; `abort`
    removes the temporary file. `atomic_write` is one of these; a stage that writes several large
    artifacts from one stream (kept and rejected records) opens one for each and commits them in
    the order it wants them to appear.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _kill_point("before", self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as e:
            raise SiftError(f"cannot write: {e.strerror or e}", path=self.path) from None
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; an artifact gets a normal file's mode
            self.file: IO[str] = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        except BaseException:
            os.close(fd)
            self._unlink()
            raise

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def write(self, text: str) -> None:
        try:
            self.file.write(text)
        except OSError as e:
            raise SiftError(f"cannot write: {e.strerror or e}", path=self.path) from None

    def commit(self) -> None:
        """fsync, then rename over `path`."""
        try:
            with self.file as f:
                f.flush()
                os.fsync(f.fileno())
            _kill_point("mid", self.path)
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._unlink()
            raise SiftError(f"cannot write: {e.strerror or e}", path=self.path) from None
        except BaseException:
            self._unlink()
            raise
        _fsync_dir(self.path.parent)
        _kill_point("after", self.path)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self._unlink()


def atomic_write(path: str | Path, write: Callable[[IO[str]], None]) -> None:
    """Write `path` through `write(file)` into a temporary file beside it, fsync, then rename.

    A crash at any moment leaves the previous file (or none) in place, never a partial one.
    """
    pending = AtomicFile(path)
    try:
        try:
            write(pending.file)
        except OSError as e:
            raise SiftError(f"cannot write: {e.strerror or e}", path=pending.path) from None
    except BaseException:
        pending.abort()
        raise
    pending.commit()


def json_line(record: dict) -> str:
    """One JSON Lines line, as write_jsonl writes it."""
    return json.dumps(record, ensure_ascii=False) + "\n"


class JsonListWriter:
    """Writes the same bytes as `write_json(path, list(records), indent=indent)`, a record at a time."""

    def __init__(self, out: AtomicFile, *, indent: int | None = None) -> None:
        self.out, self.count, self.indent = out, 0, indent

    def add(self, record: Any) -> None:
        text = json.dumps(record, ensure_ascii=False, indent=self.indent)
        if self.indent is None:
            self.out.write(("[" if not self.count else ", ") + text)
        else:  # one level deeper: JSON text holds a raw newline only between tokens, never inside a string
            pad = " " * self.indent
            self.out.write(("[\n" if not self.count else ",\n") + pad + text.replace("\n", "\n" + pad))
        self.count += 1

    def close(self) -> None:
        end = "]" if self.indent is None else "\n]"
        self.out.write((end if self.count else "[]") + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Atomically write records as JSON Lines; returns the count."""
    n = 0

    def _write(f: IO[str]) -> None:
        nonlocal n
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1

    atomic_write(path, _write)
    return n


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n"))


RECORD_SUFFIXES = {".jsonl": "JSON Lines, one record a line", ".json": "one JSON list of records"}


def check_output_suffix(path: str | Path, suffixes: dict[str, str], *, field: str = "output") -> Path:
    """`path` if its extension is one the command writes, else a SiftError listing them: checked
    before any work, so `-o x.json` never gets JSON Lines that sift's own reader then refuses."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        choices = " or ".join(f"{ext} ({what})" for ext, what in suffixes.items())
        raise SiftError(f"{str(path)!r} must end in {choices}", field=field)
    return path


def write_records(path: str | Path, records: Iterable[dict]) -> int:
    """Write records as the extension says (see RECORD_SUFFIXES): a JSON list for .json, JSON
    Lines otherwise; returns the count. Both read back with read_records."""
    if Path(path).suffix.lower() == ".json":
        rows = list(records)
        write_json(path, rows, indent=None)
        return len(rows)
    return write_jsonl(path, records)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


@contextlib.contextmanager
def all_or_none(*paths: str | Path) -> Iterator[None]:
    """Write several artifacts as a set: if the block fails (say the disk fills on the third),
    remove the ones it already wrote, so a failed command leaves no half-finished set behind."""
    targets = [Path(p) for p in paths]
    before = {p: _identity(p) for p in targets}
    try:
        yield
    except BaseException:
        for p in targets:
            if _identity(p) != before[p]:  # atomic_write renames a new file in: a new inode
                with contextlib.suppress(OSError):
                    p.unlink()
        raise


# ---------------------------------------------------------------- journal


class Journal:
    """An append-only JSONL journal of finished work, for the long stages.

    Each `append` writes whole entries and fsyncs, so an entry is either complete on disk or
    (after a kill mid-write) a torn last line, which `read` drops and the next `append`
    truncates away. Write one entry per finished batch to make batches all-or-nothing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._repaired = False  # a torn tail is cut once, before the first append

    def read(self) -> list[dict]:
        """All complete entries; a torn or unparseable last line is ignored."""
        if not self.path.exists():
            return []
        entries, _ = self._scan()
        return entries

    def _scan(self) -> tuple[list[dict], int]:
        """Entries and the byte offset just after the last complete entry."""
        data = self.path.read_bytes()
        entries: list[dict] = []
        good_end = 0
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl == -1:
                break  # torn: no newline at the end
            raw = data[pos:nl]
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if data.find(b"\n", nl + 1) == -1 and not data[nl + 1:].strip():
                    break  # a torn last line that happened to end in a newline
                raise SiftError("corrupt journal entry (not the last line)", path=self.path,
                                line=data[:pos].count(b"\n") + 1) from None
            if not isinstance(obj, dict):
                raise SiftError("corrupt journal entry", path=self.path, line=data[:pos].count(b"\n") + 1)
            entries.append(obj)
            pos = nl + 1
            good_end = pos
        return entries, good_end

    def append(self, entries: Iterable[dict]) -> None:
        payload = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
        if not payload:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._repaired and self.path.exists():
                _, good_end = self._scan()
                if good_end != self.path.stat().st_size:
                    with open(self.path, "r+b") as f:
                        f.truncate(good_end)
            self._repaired = True
            _kill_point("before", self.path)
            with open(self.path, "a", encoding="utf-8", newline="\n") as f:
                if os.environ.get(KILL_AT_ENV):  # the seam's "mid": half the bytes reach the disk first
                    f.write(payload[:len(payload) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                    _kill_point("mid", self.path)
                    payload = payload[len(payload) // 2:]
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise SiftError(f"cannot append to journal: {e.strerror or e}", path=self.path) from None
        _kill_point("after", self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
