"""PNG plots with matplotlib's Agg backend (no display needed); each returns its file name."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend is chosen first
from matplotlib.figure import Figure

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
Series = Mapping[str, Sequence[float | None]]
Curve = tuple[Sequence[int], Sequence[float]]


def bars(
    path: Path, title: str, labels: Sequence[str], unit: str, series: Series, log: bool = True
) -> str:
    """Grouped bars, one group per measure, one bar per store, values written on top.

    Log scale by default: a FUSE round trip per 4 KiB request and a 1 MiB request
    differ by two orders of magnitude, and both must stay readable.
    """
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * len(labels) + 2), 4.2))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        heights = [v or 0.0 for v in values]
        drawn = ax.bar(xs, heights, width, label=name, color=COLOURS[k % len(COLOURS)])
        ax.bar_label(drawn, [_short(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel(unit)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def memory_curves(path: Path, corpora: dict[str, dict[str, Curve]]) -> str:
    """Memory held against pages stored as the store fills, one panel per corpus."""
    fig, axes = plt.subplots(1, len(corpora), figsize=(4.2 * len(corpora), 3.8), squeeze=False)
    for ax, (corpus, curves) in zip(axes[0], corpora.items(), strict=True):
        for k, (name, (pages, held)) in enumerate(curves.items()):
            ax.plot(
                pages,
                [b / (1 << 20) for b in held],
                marker=".",
                label=name,
                color=COLOURS[k % len(COLOURS)],
            )
        ax.set_title(f"corpus: {corpus}")
        ax.set_xlabel("pages stored")
        ax.set_ylabel("MiB held")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Memory held vs pages stored")
    return _save(fig, path)


def growth(path: Path, points: Sequence[int], rates: Series, per_page: Series) -> str:
    """Store rate and bytes per page at each checkpoint, log-scaled pages."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, (name, values) in enumerate(rates.items()):
        left.plot(
            points,
            [v or 0 for v in values],
            marker="o",
            label=name,
            color=COLOURS[k % len(COLOURS)],
        )
    for k, (name, values) in enumerate(per_page.items()):
        right.plot(
            points,
            [v or 0 for v in values],
            marker="o",
            label=name,
            color=COLOURS[k % len(COLOURS)],
        )
    left.set_ylabel("pages/s (segment ending here)")
    right.set_ylabel("bytes of memory per page")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("pages stored")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Growth: image, 1 MiB direct writes of distinct compressible pages")
    return _save(fig, path)


def _short(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
