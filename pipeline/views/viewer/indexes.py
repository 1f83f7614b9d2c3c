"""The viewer's indexes, one per artifact: built on first open, rebuilt when the artifact changes.

A small artifact's index is built while the request waits (under a second). A large one is built
in a background thread while the table shows its first page read straight from the file, so the
first page of any artifact shows at once; search, filters and sorting come when the index is ready.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import SiftError
from pipeline.views.viewer.catalog import Catalog
from pipeline.views.viewer.index import ArtifactIndex, build_index, is_fresh

SYNC_BYTES = 4 * 1024 * 1024  # up to this size an index is built while the request waits


@dataclass
class Status:
    state: str  # ready, building or error
    error: str = ""


class Indexes:
    def __init__(self, catalog: Catalog, *, sync_bytes: int = SYNC_BYTES) -> None:
        self.catalog = catalog
        self.sync_bytes = sync_bytes
        self._lock = threading.Lock()
        self._building: dict[str, threading.Thread] = {}
        self._errors: dict[str, tuple[str, tuple[int, int]]] = {}  # name -> (message, the file's size, mtime)

    def _build(self, name: str, path: Path, index_file: Path) -> None:
        try:
            build_index(path, index_file)
            self._errors.pop(name, None)
        except SiftError as e:
            self._errors[name] = (str(e), _stamp(path))
        except OSError as e:
            self._errors[name] = (f"{path}: cannot index: {e.strerror or e}", _stamp(path))
        finally:
            with self._lock:
                self._building.pop(name, None)

    def status(self, name: str) -> Status:
        """ready, building (in the background) or error, starting a build when the index is stale."""
        path = self.catalog.resolve(name)
        index_file = self.catalog.index_file(name)
        with self._lock:
            if name in self._building:
                return Status("building")
            if is_fresh(index_file, path):
                return Status("ready")
            if name in self._errors and self._errors[name][1] == _stamp(path):
                return Status("error", self._errors[name][0])  # the same broken file: not indexed again
            if path.stat().st_size <= self.sync_bytes:
                thread = None
            else:
                thread = threading.Thread(target=self._build, args=(name, path, index_file), daemon=True)
                self._building[name] = thread
                self._errors.pop(name, None)
        if thread is None:
            self._build(name, path, index_file)
            return Status("error", self._errors[name][0]) if name in self._errors else Status("ready")
        thread.start()
        return Status("building")

    def wait(self, name: str) -> None:
        """Block until a background build of `name` has finished (the bench and the tests)."""
        thread = self._building.get(name)
        if thread is not None:
            thread.join()

    def open(self, name: str) -> ArtifactIndex | None:
        """The artifact's open index, or None while it is still building; a broken artifact is an error."""
        status = self.status(name)
        if status.state == "error":
            raise SiftError(status.error)
        if status.state == "building":
            return None
        return ArtifactIndex(self.catalog.resolve(name), self.catalog.index_file(name))

    def find(self, name: str, record_id: str) -> dict[str, Any] | None:
        """The record with `record_id` in artifact `name` (building its index if need be), as
        {artifact, rowid, record}; None when the artifact is absent, not ready, or has no such id."""
        try:
            idx = self.open(name)
        except (PermissionError, SiftError):
            return None
        if idx is None:
            return None
        with idx:
            row = idx.find(record_id)
            return None if row is None else {"artifact": name, "rowid": row.rowid, "record": idx.read(row)}


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def preview(path: Path, limit: int) -> list[dict[str, Any]]:
    """The first `limit` records of a file, read directly (shown while its index builds)."""
    out: list[dict[str, Any]] = []
    with open(path, "rb") as f:
        for raw in f:
            if len(out) >= limit:
                break
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except ValueError:
                    break  # the index build reports the bad line with its number
                if isinstance(obj, dict):
                    out.append(obj)
    return out
