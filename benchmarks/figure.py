"""The benchmarks' figures: matplotlib figures drawn without a display, bars labelled, saved as PNG."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def label_bars(ax, bars, labels: list[str]) -> None:
    """Each bar's label just above it."""
    for bar, label in zip(bars, labels):
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8)


def save(fig: Figure, path: Path) -> None:
    """The figure as a PNG at 120 dpi (a `Figure` made directly, not through pyplot, needs no closing)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
