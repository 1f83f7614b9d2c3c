"""The one error type the CLI turns into a clear message and a non-zero exit (no traceback)."""

from __future__ import annotations

from pathlib import Path

from pipeline.redact import redact_urls


class SiftError(Exception):
    """A user-facing error: bad input, a missing model, an unwritable output.

    The message names the file, line and field where they apply, e.g.
    ``seeds.jsonl:3: field 'instances': expected a list, got str``.
    """

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.path, self.line, self.field = path, line, field
        where = ""
        if path is not None:
            where = str(path) + (f":{line}" if line is not None else "") + ": "
        what = f"field '{field}': " if field else ""
        self.reason = redact_urls(message)  # a base URL quoted in a message keeps no credentials
        super().__init__(redact_urls(f"{where}{what}{message}"))
