"""A SQLite index of one JSONL artifact, so the viewer pages, searches, filters and sorts on disk.

    idx = ArtifactIndex.open(Path("runs/demo/filtered.jsonl"), Path("runs/demo/.view/filtered.jsonl.sqlite"))
    total, rows = idx.query(Query(q="poem", where=(("reason", "rouge_duplicate"),), sort="scores.ifd"))

Built on first open by streaming the file once: per record, its line, byte offset and length, its
filterable fields (pipeline/views/viewer/fields.py) as columns, and its text in an FTS5 full-text
table that stores no copy of the text (`content=''`). Records are read back from the artifact by
offset, so memory does not grow with the file and the index stays a fraction of its size. The
index remembers the artifact's size, mtime and SHA-256: a changed size or mtime costs one hash, and
a changed hash a rebuild. A build writes a temporary file and renames it, so a reader never opens
half an index. Column names in SQL are c0, c1, ...: no text from a record ever becomes SQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.io.artifacts import MAX_LINE_BYTES
from pipeline.views.viewer.fields import MAX_SHORT, describe, kind_of

SCHEMA = 2  # bump when the layout changes: an index of an older layout is rebuilt
MAX_COLUMNS = 64  # fields beyond this many are not filterable (the text is still searched)
MAX_FACET_VALUES = 40  # a text column with more distinct values is not offered as a pick list
BATCH = 2000
MAX_PER_PAGE = 500
NONE = "(none)"  # the filter value for "this field is absent"


@dataclass(frozen=True)
class Column:
    key: str  # the field's dotted name, as users see it
    sql: str  # its column in SQL: c<N>
    kind: str  # num, bool or text


@dataclass(frozen=True)
class Query:
    """A table request: full-text words, field == value filters, [lo, hi] ranges, a sort, a page."""

    q: str = ""
    where: tuple[tuple[str, str], ...] = ()
    ranges: tuple[tuple[str, float | None, float | None], ...] = ()
    sort: str | None = None
    desc: bool = False
    page: int = 1
    per: int = 50
    review: str | None = None  # accept, reject, edit or none: the reviewer's standing decision


@dataclass(frozen=True)
class Row:
    rowid: int
    line: int
    offset: int
    length: int


def fts_query(text: str) -> str | None:
    """User words as an FTS5 query that cannot be a syntax error: every word quoted, all required."""
    words = re.findall(r"\w+", text)
    return " ".join('"' + w.replace('"', '""') + '"' for w in words) or None


def _lines(path: Path, hasher: Any) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of every line, hashing the file as it streams."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            hasher.update(raw)
            yield lineno, offset, raw
            offset += len(raw)


def _parse(raw: bytes, path: Path, lineno: int) -> dict | None:
    if len(raw) > MAX_LINE_BYTES:
        raise SiftError(f"line longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB", path=path, line=lineno)
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raise SiftError("starts with a UTF-8 byte-order mark; save it as plain UTF-8", path=path, line=1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SiftError(f"invalid UTF-8 at byte {e.start}", path=path, line=lineno) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SiftError(f"invalid JSON: {e.msg} (column {e.colno}); the viewer reads JSON Lines", path=path,
                        line=lineno) from None
    if not isinstance(obj, dict):
        raise SiftError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
    return obj


class _Builder:
    """Streams an artifact into a fresh index database."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.columns: dict[str, Column] = {}
        self.distinct: dict[str, set[Any] | None] = {}  # a text or bool column's values while few
        self.rows: list[tuple] = []
        self.texts: list[tuple[int, str]] = []

    def _column(self, key: str, value: Any) -> Column | None:
        if len(self.columns) >= MAX_COLUMNS or (isinstance(value, str) and len(value) > MAX_SHORT):
            return None
        col = Column(key, f"c{len(self.columns)}", kind_of(value))
        self.flush()  # rows waiting were made for the old column list
        self.columns[key] = col
        self.distinct[key] = set() if col.kind != "num" else None
        self.conn.execute(f"ALTER TABLE records ADD COLUMN {col.sql}")
        return col

    def add(self, rowid: int, line: int, offset: int, length: int, obj: dict[str, Any]) -> None:
        found, text = describe(obj)
        cells: dict[str, Any] = {}
        columns, distinct = self.columns, self.distinct
        for key, value in found.items():
            col = columns.get(key) or self._column(key, value)
            if col is None or (col.kind != "text" and type(value) is str):
                continue  # a string where the column holds numbers: left out of the column
            if type(value) is str and len(value) > 200:
                value = value[:200]
            cells[col.sql] = value
            seen = distinct[key]
            if seen is not None and value not in seen:
                seen.add(value)
                if len(seen) > MAX_FACET_VALUES:
                    distinct[key] = None
        rid = obj.get("id")
        self.rows.append((rowid, line, offset, length, str(rid) if isinstance(rid, str | int) else None, cells))
        self.texts.append((rowid, text))
        if len(self.rows) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        sqls = [c.sql for c in self.columns.values()]
        names = ", ".join(["rowid", "line", "offset", "length", "rid", *sqls])
        marks = ", ".join("?" * (5 + len(sqls)))
        self.conn.executemany(f"INSERT INTO records ({names}) VALUES ({marks})",
                              [(*r[:5], *map(r[5].get, sqls)) for r in self.rows])
        self.conn.executemany("INSERT INTO fts (rowid, body) VALUES (?, ?)", self.texts)
        self.rows, self.texts = [], []

    def value_counts(self) -> dict[str, list[list[Any]]]:
        """For each column with few distinct values: [value, count] pairs, the most frequent first."""
        out = {}
        for key, seen in self.distinct.items():
            if seen is not None and key != "id" and not key.endswith("_id"):  # ids: one record each
                col = self.columns[key].sql
                out[key] = [list(r) for r in self.conn.execute(
                    f"SELECT {col}, count(*) FROM records WHERE {col} IS NOT NULL GROUP BY {col} "
                    "ORDER BY count(*) DESC")]
        return out


def build_index(artifact: Path, target: Path) -> None:
    """Index `artifact` into `target` (written beside it under a temporary name, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.building-{os.getpid()}-{id(target)}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    st = artifact.stat()
    conn = sqlite3.connect(tmp)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("CREATE TABLE records (rowid INTEGER PRIMARY KEY, line INT, offset INT, length INT, rid TEXT)")
        conn.execute("CREATE VIRTUAL TABLE fts USING fts5(body, content='', columnsize=0, detail=none)")
        builder = _Builder(conn)
        hasher = hashlib.sha256()
        count = 0
        for lineno, offset, raw in _lines(artifact, hasher):
            obj = _parse(raw, artifact, lineno)
            if obj is None:
                continue
            count += 1
            builder.add(count, lineno, offset, len(raw), obj)
        builder.flush()
        conn.execute("CREATE INDEX records_rid ON records (rid)")
        meta = {"schema": SCHEMA, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hasher.hexdigest(),
                "count": count, "columns": [[c.key, c.sql, c.kind] for c in builder.columns.values()],
                "values": builder.value_counts()}
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        conn.commit()
    except BaseException:
        conn.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    conn.close()
    os.replace(tmp, target)


def _meta(conn: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_fresh(index_file: Path, artifact: Path) -> bool:
    """Whether index_file describes the artifact as it is: same size and mtime, or else the same hash
    (the mtime is then brought up to date, so the hash is not computed again)."""
    if not index_file.is_file():
        return False
    try:
        conn = sqlite3.connect(f"file:{index_file}?mode=rw", uri=True)
        try:
            meta = _meta(conn)
            if meta.get("schema") != SCHEMA:
                return False
            st = artifact.stat()
            if meta["size"] == st.st_size and meta["mtime_ns"] == st.st_mtime_ns:
                return True
            if meta["size"] != st.st_size or file_hash(artifact) != meta["sha256"]:
                return False
            conn.execute("UPDATE meta SET value = ? WHERE key = 'mtime_ns'", (json.dumps(st.st_mtime_ns),))
            conn.commit()
            return True
        finally:
            conn.close()
    except (sqlite3.DatabaseError, KeyError, ValueError):
        return False  # a damaged or foreign file: build anew


class ArtifactIndex:
    """An open, fresh index of one artifact. Cheap to open: one connection per request."""

    def __init__(self, artifact: Path, index_file: Path) -> None:
        self.artifact = artifact
        self.conn = sqlite3.connect(f"file:{index_file}?mode=ro", uri=True, check_same_thread=False)
        meta = _meta(self.conn)
        self.count: int = meta["count"]
        self.sha256: str = meta["sha256"]
        self.columns = {k: Column(k, s, kind) for k, s, kind in meta["columns"]}
        self.values: dict[str, list[list[Any]]] = meta["values"]

    @classmethod
    def open(cls, artifact: Path, index_file: Path) -> ArtifactIndex:
        """Open the index of `artifact`, building it first when it is missing or stale."""
        if not artifact.is_file():
            raise SiftError("no such file", path=artifact)
        if not is_fresh(index_file, artifact):
            build_index(artifact, index_file)
        return cls(artifact, index_file)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ArtifactIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ queries

    def _col(self, key: str) -> Column:
        col = self.columns.get(key)
        if col is None:
            raise SiftError(f"no field {key!r} in {self.artifact.name} (fields: {', '.join(self.columns)})",
                            field=key)
        return col

    def _where(self, query: Query, review: dict[str, str] | None) -> tuple[str, list[Any]]:
        conds, args = [], []
        match = fts_query(query.q)
        if match:
            conds.append("rowid IN (SELECT rowid FROM fts WHERE fts MATCH ?)")
            args.append(match)
        for key, value in query.where:
            col = self._col(key)
            if value == NONE:
                conds.append(f"{col.sql} IS NULL")
            elif col.kind == "bool":
                conds.append(f"{col.sql} = ?")
                args.append(1 if value.lower() in ("true", "1", "yes") else 0)
            elif col.kind == "num":
                try:
                    args.append(float(value))
                except ValueError:
                    raise SiftError(f"expected a number, got {value!r}", field=key) from None
                conds.append(f"{col.sql} = ?")
            else:
                conds.append(f"{col.sql} = ?")
                args.append(value)
        for key, lo, hi in query.ranges:
            col = self._col(key)
            if lo is not None:
                conds.append(f"{col.sql} >= ?")
                args.append(lo)
            if hi is not None:
                conds.append(f"{col.sql} <= ?")
                args.append(hi)
        if query.review:
            ids = [i for i, d in (review or {}).items() if d == query.review]
            if query.review == "none":
                ids = list(review or {})
            self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS reviewed (rid TEXT PRIMARY KEY)")
            self.conn.execute("DELETE FROM reviewed")
            self.conn.executemany("INSERT OR IGNORE INTO reviewed VALUES (?)", [(i,) for i in ids])
            conds.append(("rid NOT IN" if query.review == "none" else "rid IN") + " (SELECT rid FROM reviewed)")
        return (" WHERE " + " AND ".join(conds)) if conds else "", args

    def query(self, query: Query, *, review: dict[str, str] | None = None) -> tuple[int, list[Row]]:
        """(matching count, the page's rows) for a table request; `review` maps id -> decision."""
        where, args = self._where(query, review)
        total = self.conn.execute(f"SELECT count(*) FROM records{where}", args).fetchone()[0]
        order = "rowid"
        if query.sort:
            col = self._col(query.sort)
            order = f"{col.sql} {'DESC' if query.desc else 'ASC'} NULLS LAST, rowid"
        elif query.desc:
            order = "rowid DESC"
        per = max(1, min(query.per, MAX_PER_PAGE))
        page = max(1, query.page)
        rows = self.conn.execute(f"SELECT rowid, line, offset, length FROM records{where} ORDER BY {order} "
                                 "LIMIT ? OFFSET ?", [*args, per, (page - 1) * per]).fetchall()
        return total, [Row(*r) for r in rows]

    def ids(self, query: Query, *, review: dict[str, str] | None = None) -> list[str]:
        """Every id matching a request (all pages): for decisions in bulk."""
        where, args = self._where(query, review)
        return [r[0] for r in self.conn.execute(f"SELECT rid FROM records{where} ORDER BY rowid", args)
                if r[0] is not None]

    def row(self, rowid: int) -> Row | None:
        r = self.conn.execute("SELECT rowid, line, offset, length FROM records WHERE rowid = ?", (rowid,)).fetchone()
        return Row(*r) if r else None

    def find(self, record_id: str) -> Row | None:
        r = self.conn.execute("SELECT rowid, line, offset, length FROM records WHERE rid = ? ORDER BY rowid "
                              "LIMIT 1", (record_id,)).fetchone()
        return Row(*r) if r else None

    def read(self, row: Row) -> dict[str, Any]:
        """The record itself, read from the artifact at its offset."""
        with open(self.artifact, "rb") as f:
            f.seek(row.offset)
            raw = f.read(row.length)
        return json.loads(raw.decode("utf-8"))

    def read_many(self, rows: list[Row]) -> list[dict[str, Any]]:
        with open(self.artifact, "rb") as f:
            out = []
            for row in rows:
                f.seek(row.offset)
                out.append(json.loads(f.read(row.length).decode("utf-8")))
        return out
