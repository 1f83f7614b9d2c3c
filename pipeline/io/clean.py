"""`sift clean --run R`: delete one run's folder, runs/R/ (what `make clean RUN=R` calls).

    sift clean --run demo

The run name goes through the same check as every command's --run (a plain name: never empty,
`.`, `..` or a path), so `make clean RUN=..` or `make clean RUN=` cannot reach outside runs/ or
remove every run. The run's lock is taken first: a run another sift process is using is not deleted.
Only a folder sift made a run is deleted: it holds the marker sift writes when it creates a run
folder, or manifest.json; an empty $SIFT_RUNS_DIR (the current folder as runs folder) is refused.
"""

from __future__ import annotations

import shutil

from pipeline.errors import SiftError
from pipeline.io.runs import MANIFEST, RUN_MARKER, is_run_folder, locked, run_dir


def clean(*, run: str = "demo") -> None:
    """Delete the run folder runs/<run>/ and everything in it.

    Args:
        run: Run name (a plain name, never a path); runs/<run>/ is removed.
    """
    directory = run_dir(run)
    if directory.is_symlink():
        raise SiftError("is a symbolic link; remove the link yourself (sift deletes only real run folders)",
                        path=directory)
    if not directory.exists():
        print(f"clean: nothing to do, {directory} does not exist")
        return
    if not directory.is_dir():
        raise SiftError("is not a folder", path=directory)
    if not is_run_folder(directory):
        raise SiftError(f"is not a sift run folder (it has no {MANIFEST} or {RUN_MARKER}); sift deletes only "
                        "folders it made, remove it yourself if you mean to", path=directory)
    with locked(directory, check_manifest=False):  # a damaged manifest is no reason to keep the run
        try:
            shutil.rmtree(directory)
        except OSError as e:
            raise SiftError(f"cannot remove: {e.strerror or e}", path=getattr(e, "filename", None) or directory
                            ) from None
    print(f"clean: removed {directory}/")
