"""A stage journal that knows which settings wrote it, so a resume never mixes two configurations.

    entries = open_journal(run_dir / "generate.journal", fingerprint)   # [] on a fresh start

The first entry is a header with the fingerprint of every setting that changes the stage's
output (not the ones that only say how far to go, such as N). Resuming with a different
fingerprint is a SiftError naming what changed, instead of silently splicing two runs.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.artifacts import Journal


def open_journal(path: str | Path, fingerprint: dict) -> tuple[Journal, list[dict]]:
    """The journal and its work entries; writes the header on a fresh start."""
    journal = Journal(path)
    entries = journal.read()
    if not entries:
        journal.append([{"kind": "header", "fingerprint": fingerprint}])
        return journal, []
    head = entries[0]
    if head.get("kind") != "header":
        raise SiftError("journal has no header entry; delete it to start the stage over", path=path, line=1)
    old = head.get("fingerprint", {})
    if old != fingerprint:
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        raise SiftError(f"journal was written with other settings (changed: {', '.join(changed)}); "
                        "rerun with the same options, use another --run, or delete the journal to "
                        "start this stage over", path=path)
    return journal, entries[1:]
