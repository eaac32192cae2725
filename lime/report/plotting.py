"""What every figure shares: the style, file writing, the subplot grid, colours, and the run-count note."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402

from lime.report.runs import Run  # noqa: E402

STYLE = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 8.5,
    "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "figure.titlesize": 13,
}
SCORE_LABEL = "score (%)"
SCORE_NOTE = "score: accuracy %, STS-B Pearson × 100"
PAPER_STYLE = {"linestyle": "--", "markerfacecolor": "white", "alpha": 0.8}
PNG_DPI = 200


@dataclass
class Point:
    series: str
    x: Any
    baseline: bool
    run: Run


def save_figure(fig: plt.Figure, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=PNG_DPI if path.suffix == ".png" else None, bbox_inches="tight")
    plt.close(fig)
    return paths


def grid(n: int, width: float = 5.0, height: float = 4.0, max_cols: int = 3):
    """n axes in rows of at most `max_cols`; constrained layout makes room for legends outside the axes."""
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def palette(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def run_count_text(points: Sequence[Point]) -> str:
    seeds = {}
    for p in points:
        seeds.setdefault((p.series, p.x, p.baseline), []).append(p.run)
    counts = sorted({len(v) for v in seeds.values()})
    if counts == [1]:
        return "one run per point (no error bars)"
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"mean over {n} seeds per point, error bars ± std"
