"""What every figure shares: the style, file writing, the subplot grid, colours, and the notes on seed counts and
score metrics (both read from the runs, never assumed)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402

from lime.report.runs import Run  # noqa: E402
from lime.scoring import REGRESSION_METRICS  # noqa: E402

STYLE = {
    "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 8.5,
    "xtick.labelsize": 10, "ytick.labelsize": 10, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False, "figure.titlesize": 13,
}
SCORE_LABEL = "score (%)"
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
        # No creation date in the PDF: a figure rebuilt from the same runs is the same file.
        metadata = {"CreationDate": None} if path.suffix == ".pdf" else None
        fig.savefig(path, dpi=PNG_DPI if path.suffix == ".png" else None, bbox_inches="tight", metadata=metadata)
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


def seeds_text(counts: Iterable[int]) -> str:
    """How many seeds were averaged, from the data: "1 seed", "mean of 3 seeds", "mean of 2–3 seeds"."""
    counts = sorted(set(counts))
    if not counts:
        return "no runs"
    if counts == [1]:
        return "1 seed"
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"mean of {n} seeds"


def run_count_text(points: Sequence[Point]) -> str:
    seeds = {}
    for p in points:
        seeds.setdefault((p.series, p.x, p.baseline), []).append(p.run)
    counts = [len(v) for v in seeds.values()]
    if set(counts) == {1}:
        return "1 seed per point (no error bars)"
    return f"{seeds_text(counts)} per point, error bars ± std"


def score_note(runs: Iterable[Run], tasks: Iterable[str], scorer: str | None = None) -> str:
    """What the score axis means for these runs' tasks, from the metric results.json records per task:
    "score: accuracy %, similarity Pearson × 100" on mmt_mini, "..., stsb Pearson × 100" on MMT-47."""
    shown = set(tasks)
    correlations: dict[str, str] = {}
    for run in runs:
        for task, entry in ((run.scores(scorer) or {}).get("tasks") or {}).items():
            metric = str(entry.get("metric", ""))
            if task in shown and metric in REGRESSION_METRICS:
                correlations[task] = metric.capitalize()
    parts = ["score: accuracy %", *(f"{task} {metric} × 100" for task, metric in sorted(correlations.items()))]
    return ", ".join(parts)


def note(text: str) -> None:
    """A line on stdout for what a figure could not show (make_figures prints it beside the written paths)."""
    print(f"figures: {text}")
