"""Figures for `sift report`, drawn with matplotlib (Agg, no display) and returned as PNG data URIs,
so the page embeds every image and opens offline.

Each function takes plain numbers and returns one `data:image/png;base64,...` string; none reads
a file. The report decides what to draw and says so when a stage has not run.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

DPI = 110
COLORS = ("#3465a4", "#f57900", "#4e9a06", "#cc0000", "#75507b", "#c4a000", "#06989a", "#555753")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def to_data_uri(fig: Any) -> str:
    """Render a figure to PNG, close it, and return it as a data URI."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def funnel_chart(stages: Sequence[tuple[str, int]], reasons: Sequence[tuple[str, int]]) -> str:
    """Records per stage (left) and rejected records per reason (right), as horizontal bars."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, max(2.5, 0.38 * max(len(stages), len(reasons), 1) + 1)))
    for ax, rows, color, title in (
        (axes[0], stages, COLORS[0], "records per stage"),
        (axes[1], reasons, COLORS[3], "rejected, by reason"),
    ):
        labels = [r[0] for r in rows][::-1]
        values = [r[1] for r in rows][::-1]
        bars = ax.barh(labels or ["(none)"], values or [0], color=color)
        ax.bar_label(bars, padding=3, fontsize=8)
        ax.set_title(title)
        ax.margins(x=0.15)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return to_data_uri(fig)


def length_histograms(series: dict[str, Sequence[int]], *, unit: str = "words") -> str:
    """One histogram per field (instruction, input, output) of lengths, with the median marked."""
    plt = _pyplot()
    names = list(series)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], names, strict=False)):
        values = list(series[name])
        if values:
            ax.hist(values, bins=min(40, max(5, len(set(values)))), color=COLORS[i % len(COLORS)])
            med = sorted(values)[len(values) // 2]
            ax.axvline(med, color="black", linestyle="--", linewidth=1, label=f"median {med}")
            ax.legend(fontsize=8)
        ax.set_title(f"{name} ({len(values)})")
        ax.set_xlabel(unit)
    fig.tight_layout()
    return to_data_uri(fig)


def similarity_histograms(series: dict[str, Sequence[float]], *, threshold: float | None = 0.7) -> str:
    """Histograms of ROUGE-L to the nearest neighbour on [0, 1] (Self-Instruct's Figure 3)."""
    plt = _pyplot()
    names = list(series)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(5 * max(len(names), 1), 3), squeeze=False)
    bins = [i / 40 for i in range(41)]
    for i, (ax, name) in enumerate(zip(axes[0], names, strict=False)):
        values = list(series[name])
        ax.hist(values, bins=bins, color=COLORS[i % len(COLORS)])
        if threshold is not None:
            ax.axvline(
                threshold, color="black", linestyle=":", linewidth=1, label=f"dedup threshold {threshold}"
            )
            ax.legend(fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_title(f"{name} ({len(values)})")
        ax.set_xlabel("ROUGE-L F1")
    fig.tight_layout()
    return to_data_uri(fig)


def verb_object_chart(top: Sequence[tuple[str, int, Sequence[tuple[str, int]]]]) -> str:
    """Nested rings like Self-Instruct's Figure 2: root verbs inside, their direct objects outside."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 8))
    inner = [n for _, n, _ in top]
    outer: list[int] = []
    outer_labels: list[str] = []
    outer_colors: list[tuple] = []
    inner_colors: list[tuple] = []
    cmap = plt.get_cmap("tab20")
    for i, (_, n, objects) in enumerate(top):
        color = cmap(i % 20)
        inner_colors.append(color)
        shown = sum(c for _, c in objects)
        for obj, c in objects:
            outer.append(c)
            outer_labels.append(obj)
            outer_colors.append((*color[:3], 0.55))
        if n > shown:
            outer.append(n - shown)
            outer_labels.append("")
            outer_colors.append((*color[:3], 0.18))
    total = sum(inner) or 1
    ax.pie(
        inner,
        radius=0.68,
        labels=[v for v, _, _ in top],
        colors=inner_colors,
        labeldistance=0.55,
        textprops={"fontsize": 8},
        wedgeprops={"width": 0.38, "edgecolor": "white"},
    )
    ax.pie(
        outer,
        radius=1.0,
        colors=outer_colors,
        labels=[lab if c / total > 0.006 else "" for lab, c in zip(outer_labels, outer, strict=True)],
        labeldistance=0.84,
        rotatelabels=True,
        textprops={"fontsize": 6},
        wedgeprops={"width": 0.32, "edgecolor": "white"},
    )
    ax.set(aspect="equal")
    return to_data_uri(fig)


def training_curves(
    train: Sequence[tuple[float, float]],
    evals: Sequence[tuple[float, float]],
    accuracy: Sequence[tuple[float, float]] = (),
) -> str:
    """Train and validation loss against the optimizer step; token accuracy on a second axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), color=COLORS[0], label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", color=COLORS[1], label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    if accuracy:
        ax2 = ax.twinx()
        ax2.plot(*zip(*accuracy, strict=True), "s--", color=COLORS[2], label="validation token accuracy")
        ax2.set_ylabel("token accuracy")
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    if lines:
        ax.legend(lines, labels, fontsize=8, loc="best")
    fig.tight_layout()
    return to_data_uri(fig)
