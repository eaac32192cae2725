"""Figure 2: throughput vs training time, peak memory, parameters per method, and all of it relative to one method.

The paper's absolute values are overlaid only on runs of its model (LLaVA-OV-0.5B); on another model only the
ratios compare (lime.report.efficiency holds the numbers). A "paper" legend entry appears only where a paper value
is drawn; where none can be, a note says why (stdout and the title).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D

from lime.report import paper as paper_numbers
from lime.report.efficiency import (
    EFFICIENCY_FIELDS,
    RELATIVE_FIELDS,
    RELATIVE_TO,
    efficiency_stats,
    memory_label,
    paper_value,
    relative_efficiency,
    same_model_as_paper,
)
from lime.report.plotting import Point, note, palette, run_count_text, save_figure
from lime.report.runs import Run
from lime.report.tables import Stat, write_efficiency_table


def _dot_panel(ax, methods: list[str], stats: dict, field: str, colors: dict, paper: bool,
               data: dict | None) -> None:
    """Horizontal dot plot, one row per method: ours filled (± std), the paper's value hollow."""
    label, _, _ = EFFICIENCY_FIELDS[field]
    for i, method in enumerate(methods):
        stat = stats[method][field]
        if stat.mean is not None:
            ax.errorbar(stat.mean, i, xerr=stat.std or 0.0, marker=_marker(method), markersize=9,
                        color=colors[method], capsize=3, linestyle="none")
        value = paper_value(method, field, data) if paper else None
        if value is not None:
            ax.plot(value, i, marker=_marker(method), markersize=9, color=colors[method], linestyle="none",
                    markerfacecolor="white")
    ax.set_yticks(range(len(methods)), [paper_numbers.method_label(m) for m in methods])
    ax.invert_yaxis()
    if paper:  # the paper's values are read off its figure (PIXEL) or its printed labels (EXACT-img)
        columns = (data or paper_numbers.load())["figure2"]["columns"]
        label += f"\n(paper: {columns[EFFICIENCY_FIELDS[field][2]]['tag']})"
    ax.set_xlabel(label)
    ax.margins(x=0.15)


def _marker(method: str) -> str:
    return "*" if method.startswith("lime") else "o"  # the paper draws LiME variants as stars


def _legend_handles(paper: bool) -> list:
    handles = [Line2D([], [], marker="*", color="0.3", linestyle="none", markersize=10, label="LiME (ours)"),
               Line2D([], [], marker="o", color="0.3", linestyle="none", markersize=7, label="baseline (ours)")]
    if paper:
        handles.append(Line2D([], [], marker="o", color="0.3", markerfacecolor="white", linestyle="none",
                              markersize=7, label="paper (Fig. 2)"))
    return handles


def plot_efficiency(runs: Sequence[Run], out_dir: Path, paper: bool = False,
                    paper_data: dict | None = None) -> list[Path]:
    """Figure 2: throughput vs training time; peak memory; trainable and total parameters, per method; and the
    same relative to one method, ours beside the paper's. The paper's absolute values are overlaid only on runs of
    its model (LLaVA-OV-0.5B): on another model only the ratios compare."""
    stats = efficiency_stats(runs)
    if not stats:
        return []
    methods = list(stats)
    colors = dict(zip(methods, palette(len(methods)), strict=True))
    n = run_count_text([Point(m, 0, False, r) for r in runs for m in [r.method]])
    absolute = paper and same_model_as_paper(runs, paper_data)
    if paper and not any(paper_numbers.efficiency_row(m, paper_data) for m in methods):
        note(f"efficiency: --paper: no paper values drawn: Fig. 2 has none of these methods ({', '.join(methods)})")
        paper = absolute = False
        n += "; paper: Fig. 2 has none of these methods (nothing overlaid)"
    elif paper and not absolute:
        model = (paper_data or paper_numbers.load())["figure2"]["model"]
        ours = ", ".join(sorted({str(r.info.get("model")) for r in runs}))
        note(f"efficiency: --paper: Fig. 2's absolute values are for {model}, these runs for {ours}: "
             "the paper is drawn in the relative figure only")
        n += "; paper values: relative figure only (another model)"
    paths = []

    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for method in methods:
        t, s = stats[method]["train_time"], stats[method]["throughput"]
        if t.mean is None or s.mean is None:
            continue
        ax.errorbar(t.mean, s.mean, xerr=t.std or 0, yerr=s.std or 0, marker=_marker(method),
                    markersize=13 if _marker(method) == "*" else 8, color=colors[method], linestyle="none",
                    capsize=3, label=paper_numbers.method_label(method))
        ax.annotate(paper_numbers.method_label(method), (t.mean, s.mean), textcoords="offset points",
                    xytext=(7, 5), fontsize=8.5)
        pt, ps = (paper_value(method, f, paper_data) if absolute else None for f in ("train_time", "throughput"))
        if pt is not None and ps is not None:
            ax.plot(pt, ps, marker=_marker(method), markersize=11, color=colors[method], markerfacecolor="white",
                    linestyle="none")
            ax.plot([t.mean, pt], [s.mean, ps], color=colors[method], linewidth=0.7, linestyle=":")
    drawn = absolute and _has_paper_values(methods, ["train_time", "throughput"], paper_data)
    tag = " (paper: PIXEL)" if drawn else ""
    ax.set_xlabel(EFFICIENCY_FIELDS["train_time"][0] + tag)
    ax.set_ylabel(EFFICIENCY_FIELDS["throughput"][0] + tag)
    ax.set_title(f"Training throughput vs training time\n{n}", fontsize=11)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + _legend_handles(drawn), frameon=False, fontsize=8,
              loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    paths += save_figure(fig, out_dir, "efficiency_time_throughput")

    for name, fields, title in (
        ("efficiency_memory", ["memory"], f"Peak memory during training ({memory_label(runs)})"),
        ("efficiency_params", ["trainable", "total"], "Trainable and total parameters"),
    ):
        paths += _dot_figure(methods, fields, stats, colors, absolute, paper_data, f"{title}\n{n}", out_dir, name)
    if paper:
        paths += plot_efficiency_relative(stats, colors, paper_data, n, out_dir)
    return paths + write_efficiency_table(stats, paper_data, out_dir)


def _has_paper_values(methods: list[str], fields: list[str], data: dict | None) -> bool:
    """Whether Fig. 2 has every one of `fields` for some method: a point the figure can draw."""
    return any(all(paper_value(m, f, data) is not None for f in fields) for m in methods)


def _dot_figure(methods: list[str], fields: list[str], stats: dict, colors: dict, paper: bool, data: dict | None,
                title: str, out_dir: Path, name: str) -> list[Path]:
    paper = paper and any(_has_paper_values(methods, [f], data) for f in fields)
    fig, axes = plt.subplots(1, len(fields), figsize=(5.2 * len(fields) + 1.5, 0.42 * len(methods) + 1.8),
                             squeeze=False)
    for ax, field in zip(axes[0], fields, strict=True):
        _dot_panel(ax, methods, stats, field, colors, paper, data)
    axes[0][-1].legend(handles=_legend_handles(paper), frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("\n".join(textwrap.fill(line, 90) for line in title.splitlines()), fontsize=11)  # keep breaks
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def plot_efficiency_relative(stats: dict[str, dict[str, Stat]], colors: dict, paper_data: dict | None, n: str,
                             out_dir: Path) -> list[Path]:
    """`relative_efficiency` drawn: one row per method, ours filled and the paper's hollow, 1 = the reference."""
    reference, relative, paper_relative = relative_efficiency(stats, paper_data)
    if reference is None:
        note("efficiency: --paper: no relative figure: it needs one of the paper's reference methods "
             f"({', '.join(RELATIVE_TO)}) among the runs")
        return []
    methods = list(stats)
    width, height = 4.2 * len(RELATIVE_FIELDS) + 1.5, 0.42 * len(methods) + 1.8
    fig, axes = plt.subplots(1, len(RELATIVE_FIELDS), figsize=(width, height), squeeze=False, sharey=True)
    label = paper_numbers.method_label(reference)
    for ax, field in zip(axes[0], RELATIVE_FIELDS, strict=True):
        for i, method in enumerate(methods):
            ours, theirs = relative[method][field], paper_relative[method][field]
            if ours is not None:
                ax.plot(ours, i, marker=_marker(method), markersize=9, color=colors[method], linestyle="none")
            if theirs is not None:
                ax.plot(theirs, i, marker=_marker(method), markersize=9, color=colors[method], linestyle="none",
                        markerfacecolor="white")
        ax.axvline(1.0, color="0.5", linewidth=0.8)
        ax.set_xlabel(f"{EFFICIENCY_FIELDS[field][0].split(' (')[0]}\n÷ {label}'s")
        ax.margins(x=0.15)
    axes[0][0].set_yticks(range(len(methods)), [paper_numbers.method_label(m) for m in methods])
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(handles=_legend_handles(True), frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Efficiency relative to {label} (ours vs the paper's Fig. 2)\n{n}", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_dir, "efficiency_relative")
