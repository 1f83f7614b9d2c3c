"""Opening the files sift reads, with the same limits everywhere: only regular files (a FIFO would
block for ever, /dev/zero never ends), a bounded line length, and a bounded size for anything read
whole. Every reader of a user-given or run file (artifacts, seeds, eval and teachers files,
manifests, prompt files) goes through here, so a wrong path fails with one clear message instead of
a hang or a machine out of memory.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import SiftError

MAX_LINE_BYTES = 4 * 1024 * 1024  # one record beyond 4 MiB is a broken file, not a record
MAX_DOCUMENT_BYTES = 512 * 1024 * 1024  # one JSON document (a JSON list of records) is read whole: keep it sane
MAX_SETTINGS_BYTES = 1024 * 1024  # a teachers file or prompt template beyond 1 MiB is a wrong path


def _mib(n: int) -> str:
    for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


@contextlib.contextmanager
def open_regular(path: str | Path) -> Iterator[BinaryIO]:
    """Open `path` for reading in binary, refusing anything but a regular file.

    The file is opened non-blocking and checked with fstat on the open descriptor, so a FIFO is
    refused without waiting for a writer, and a path swapped between a check and the open cannot
    slip a device through.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SiftError("no such file", path=path) from None
    except IsADirectoryError:
        raise SiftError("is a directory, expected a file", path=path) from None
    except OSError as e:
        raise SiftError(f"cannot read: {e.strerror or e}", path=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise SiftError("is a directory, expected a file", path=path)
        if not stat.S_ISREG(mode):
            raise SiftError("is not a regular file (a pipe, device or socket); give a file", path=path)
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_bounded(path: str | Path, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The whole of a regular file of at most `limit` bytes."""
    path = Path(path)
    too_big = f"is larger than {_mib(limit)}, too big to read whole (wrong file?)"
    with open_regular(path) as f:
        try:
            if os.fstat(f.fileno()).st_size > limit:
                raise SiftError(too_big, path=path)
            data = f.read(limit + 1)  # the file may have grown since fstat
        except OSError as e:
            raise SiftError(f"cannot read: {e.strerror or e}", path=path) from None
    if len(data) > limit:
        raise SiftError(too_big, path=path)
    return data


def read_head(path: str | Path, n: int) -> bytes:
    """The first `n` bytes of a regular file (to tell a JSON list from JSON Lines without reading it all)."""
    with open_regular(path) as f:
        try:
            return f.read(n)
        except OSError as e:
            raise SiftError(f"cannot read: {e.strerror or e}", path=path) from None


def iter_lines(path: str | Path, max_line: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, bytes without the newline) of a regular file, one line in memory at a time;
    a line longer than `max_line` bytes is an error naming the file and line."""
    path = Path(path)
    with open_regular(path) as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                raw = f.readline(max_line + 2)  # room for the newline (and a \r before it)
            except OSError as e:
                raise SiftError(f"cannot read: {e.strerror or e}", path=path, line=lineno) from None
            if not raw:
                return
            ended = raw.endswith(b"\n")
            if ended:
                raw = raw[:-1]
            if len(raw) > max_line:
                raise SiftError(f"line longer than {_mib(max_line)}", path=path, line=lineno)
            yield lineno, raw
            if not ended:
                return
