"""Commands whose stage is not built yet: each says so and exits non-zero."""

from __future__ import annotations

from pipeline.errors import SiftError


def _not_built(stage: str) -> None:
    raise SiftError(f"`sift {stage}` is not built yet in this version")





def loop(*, run: str = "demo", rounds: int = 2) -> None:
    """Student-in-the-loop rounds, LLM2LLM style (not built yet).

    Args:
        run: run name; artifacts live in runs/<run>/
        rounds: number of train / find failures / augment rounds
    """
    _not_built("loop")










