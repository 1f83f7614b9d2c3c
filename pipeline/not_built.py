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


def generate(*, run: str = "demo") -> None:
    """Generate instructions with the teacher (not built yet).

    Args:
        run: run name; artifacts live in runs/<run>/
    """
    _not_built("generate")


def classify(*, run: str = "demo") -> None:
    """Ask the teacher whether each instruction is a classification task (not built yet).

    Args:
        run: run name; artifacts live in runs/<run>/
    """
    _not_built("classify")


def instances(*, run: str = "demo") -> None:
    """Generate input/output instances for each instruction (not built yet).

    Args:
        run: run name; artifacts live in runs/<run>/
    """
    _not_built("instances")



def export(*, run: str = "demo") -> None:
    """Export kept records for training (not built yet).

    Args:
        run: run name; artifacts live in runs/<run>/
    """
    _not_built("export")


def train(*, run: str = "demo") -> None:
    """LoRA fine-tune the student (not built yet).

    Args:
        run: run name; artifacts live in runs/<run>/
    """
    _not_built("train")


def merge(*, run: str = "demo") -> None:
    """Merge the adapter into a full-precision model (not built yet).

    Args:
        run: run name; artifacts live in runs/<run>/
    """
    _not_built("merge")


def sample(*, run: str = "demo") -> None:
    """Answer a prompt with the student (not built yet).

    Args:
        run: run name; artifacts live in runs/<run>/
    """
    _not_built("sample")


