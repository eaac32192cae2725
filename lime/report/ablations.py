"""The ablation figures: score vs the swept value for every `ablation_*` experiment, and routing statistics.

Every `ablation_*` name has a row in `PANELS` (the swept config key, axis labels, options) drawn by the one
generic `plot_sweep`: score vs swept value, one subplot per category, thin lines per task and a bold category
mean ± std over seeds. Panels with `routing_plots` add expert-usage heatmaps (layers x experts, coloured around
uniform usage 1/E) and routing entropy vs the swept value. With `paper=True` the paper's published values
(experiments/paper_numbers.json) are overlaid as hollow markers / dashed lines labelled "paper", matched to our
tasks by name; where none match, a note says so (stdout and the figure's subtitle) and no "paper" entry is drawn.
Titles, seed counts and the score note are read from the runs (their task names and per-task metrics).
"""

from __future__ import annotations

import math
import re
import statistics
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import CenteredNorm, Normalize
from matplotlib.lines import Line2D

from lime.report import paper as paper_numbers
from lime.report.plotting import (
    PAPER_STYLE,
    SCORE_LABEL,
    Point,
    grid,
    note,
    palette,
    run_count_text,
    save_figure,
    score_note,
    seeds_text,
)
from lime.report.runs import Run, finite
from lime.report.tables import Stat


def _targets_text(value: Any, run: Run) -> str:
    """["q_proj", "k_proj", "v_proj", "o_proj"] -> "q,k,v,o"."""
    if isinstance(value, str):
        value = [value]
    return ",".join(str(v).removesuffix("_proj") for v in (value or []))


def _on_off(value: Any, run: Run) -> str:
    return "on" if value in (True, "true", "True", 1) else "off"


def _layer_count(value: Any, run: Run) -> int | str:
    """Number of wrapped LM blocks: len(layer_indices); all of the LM's blocks when null ("all" when the config
    does not say how many the LM has)."""
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)):
        return len(value)
    return (run.get("model.architecture.text_config.num_hidden_layers") or run.get("model.tiny.text.num_hidden_layers")
            or run.get("model.num_layers") or "all")


@dataclass(frozen=True)
class Panel:
    """How to draw one swept experiment. `keys`: candidate config keys for the x axis, the first one the
    runs override is used. `series_key`: one line per value (e.g. methods). `baseline`: runs with
    config[key] == value are drawn as horizontal reference lines instead of points."""

    name: str
    keys: tuple[str, ...]
    title: str
    xlabel: str
    categorical: bool = False
    order: tuple = ()
    xscale: str = "linear"
    series_key: str | None = None
    baseline: tuple[str, Any] | None = None
    baseline_label: str = ""
    x_transform: Callable[[Any, Run], Any] | None = None
    routing_plots: bool = False
    marker: float | None = None


PANELS: dict[str, Panel] = {p.name: p for p in (
    Panel("ablation_channels", ("routing.channels",), "Routing channels",
          "output channels feeding the router", categorical=True,
          order=("leading", "trailing", "central", "random")),
    Panel("ablation_router", ("routing.router",), "Zero-parameter vs learned router", "router",
          categorical=True, order=("zero_param", "learned")),
    Panel("ablation_gamma", ("routing.gamma_routing",), "Routing balance γ_r",
          "γ_r (share of the adapted signal in routing)", routing_plots=True, marker=0.7),
    Panel("ablation_ngram", ("routing.n_gram",), "n-gram routing window", "n-gram window n (tokens)",
          routing_plots=True),
    Panel("ablation_topk", ("routing.top_k",), "Fixed top-k vs Auto Top-K", "k (experts per token, fixed top-k)",
          baseline=("routing.selection", "auto"), baseline_label="Auto Top-K", routing_plots=True),
    Panel("ablation_experts", ("peft.num_experts",), "Number of experts: LiME vs MoELoRA",
          "number of experts E", series_key="peft.name"),
    Panel("ablation_balance", ("trainer.balance.scale", "trainer.balance.importance", "trainer.balance.kl"),
          "Load-balancing coefficient", "balance coefficient (scale of α·L_imp + β·L_KL)", xscale="symlog",
          routing_plots=True),
    Panel("ablation_temperature", ("routing.temperature",), "Routing temperature", "temperature τ",
          routing_plots=True),
    Panel("ablation_init", ("peft.expert_init_sigma",), "Expert-vector initialisation",
          "σ of the expert init p_e ~ U(1 − σ, 1 + σ)"),
    Panel("ablation_targets", ("peft.targets",), "Target modules", "projections wrapped", categorical=True,
          x_transform=_targets_text),
    Panel("ablation_shared", ("peft.shared",), "Shared modulator p_s", "shared modulator p_s", categorical=True,
          order=("off", "on"), x_transform=_on_off),
    Panel("ablation_layers", ("peft.layer_indices", "peft.num_layers"), "Number of LiME layers",
          "LiME layers (language-model blocks wrapped)", x_transform=_layer_count),
)}


def panel_for_key(key: str) -> Panel:
    """The known panel sweeping `key`, or a generic one named after it."""
    for panel in PANELS.values():
        if key in panel.keys:
            return panel
    return Panel(f"sweep_{key.replace('.', '_')}", (key,), f"Score vs {key}", key)


def x_key(runs: Sequence[Run], panel: Panel) -> str:
    """The panel key these runs sweep: the first candidate some run overrides, else the first that varies."""
    for key in panel.keys:
        if any(key in r.override_dict for r in runs):
            return key
    for key in panel.keys:
        if len({repr(r.get(key)) for r in runs}) > 1:
            return key
    return panel.keys[0]


def collect(runs: Sequence[Run], panel: Panel) -> list[Point]:
    key = x_key(runs, panel)
    points = []
    for run in runs:
        x = run.get(key)
        if panel.x_transform:
            x = panel.x_transform(x, run)
        elif isinstance(x, list):
            x = ",".join(map(str, x))
        series = paper_numbers.method_label(str(run.get(panel.series_key))) if panel.series_key else ""
        is_base = panel.baseline is not None and run.get(panel.baseline[0]) == panel.baseline[1]
        points.append(Point(series, x, is_base, run))
    return points


def x_order(points: Sequence[Point], panel: Panel) -> list:
    """The distinct x values in plotting order: numeric ascending, or the panel's categorical order."""
    xs = list(dict.fromkeys(p.x for p in points if not p.baseline))
    if not panel.categorical and all(finite(x) for x in xs):
        return sorted(xs)
    known = [x for x in panel.order if x in xs]
    return known + sorted((x for x in xs if x not in known), key=str)


# The x of baseline points: a value of its own, so that a swept value of None (e.g. layer_indices=null) is not one.
BASELINE = "<baseline>"


def _x_of(p: Point) -> Any:
    return BASELINE if p.baseline else p.x


def stats_by(points: Sequence[Point], value: Callable[[Run], float | None]) -> dict[tuple[str, Any], Stat]:
    """{(series, x): Stat over the seeds}; x is BASELINE for baseline points."""
    values: dict[tuple[str, Any], list[float]] = {}
    for p in points:
        v = value(p.run)
        if finite(v):
            values.setdefault((p.series, _x_of(p)), []).append(v)
    return {k: Stat.of(v) for k, v in values.items()}


def _positions(xs: list, categorical: bool) -> dict[Any, float]:
    return {x: float(i) for i, x in enumerate(xs)} if categorical else {x: float(x) for x in xs}


def _line(ax, xs: list, pos: dict, stats: dict, series: str, errors: bool = True, **style) -> None:
    """A mean (± std error bars) line over the x values that have data."""
    have = [x for x in xs if (series, x) in stats]
    if not have:
        return
    means = [stats[(series, x)].mean for x in have]
    if errors:
        stds = [stats[(series, x)].std or 0.0 for x in have]
        ax.errorbar([pos[x] for x in have], means, yerr=stds, capsize=3, **style)
    else:
        ax.plot([pos[x] for x in have], means, **style)


def _set_x(ax, xs: list, pos: dict, panel: Panel, xlabel: str) -> None:
    if panel.categorical or not all(finite(x) for x in xs):
        ax.set_xticks([pos[x] for x in xs], [str(x) for x in xs])
        ax.set_xlim(-0.5, len(xs) - 0.5)
    elif panel.xscale == "symlog":
        positive = [x for x in xs if x > 0]
        linthresh = min(positive) if positive else 1.0
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlim(-0.3 * linthresh if min(xs) >= 0 else None, 1.5 * max(xs) if max(xs) > 0 else None)
    else:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.set_xlabel(xlabel)


def _category_tasks(points: Sequence[Point], scorer: str | None) -> dict[str, list[str]]:
    """{category: its tasks that some run scored}, categories in Table 2 order."""
    scored = {t for p in points for t in p.run.task_scores(scorer)}
    tasks: dict[str, list[str]] = {}
    for p in points:
        for cat, names in p.run.category_tasks(scorer).items():
            tasks.setdefault(cat, [])
            tasks[cat] += [t for t in names if t not in tasks[cat] and t in scored]
    return {c: tasks[c] for c in paper_numbers.order_categories(tasks) if tasks[c]}


def _paper_overlay(ax, panel: Panel, tasks: list[str], colors: list, xs: list, pos: dict,
                   per_task: bool, series_colors: dict[str, Any], data: dict | None) -> list[str]:
    """Draw the paper's values for our tasks of one category; returns the figures used."""
    used = []
    for paper_panel in paper_numbers.ablation_panels(panel.name, data):
        series = paper_numbers.task_series(paper_panel)
        matched = {t: paper_numbers.match_name(t, series) for t in tasks}
        matched = {t: m for t, m in matched.items() if m}
        if not matched:
            continue
        px = [x for x in paper_panel["x"] if x in pos]
        if not px:
            continue
        used.append(f"{paper_panel['figure']} [{paper_panel['tag']}]")
        index = {x: paper_panel["x"].index(x) for x in px}
        if per_task:
            for task, name in matched.items():
                ys = [series[name][index[x]] for x in px]
                keep = [(pos[x], y) for x, y in zip(px, ys, strict=True) if y is not None]
                if keep:
                    ax.plot(*zip(*keep, strict=True), marker="o", markersize=4, linewidth=0.8,
                            color=colors[tasks.index(task)], **PAPER_STYLE)
        # The paper's mean over the tasks we share with it, at x values where all of them are legible.
        avg = []
        for x in px:
            ys = [series[name][index[x]] for name in matched.values()]
            if all(y is not None for y in ys):
                avg.append((pos[x], statistics.fmean(ys)))
        if avg:
            method = paper_panel.get("method")
            color = next((c for s, c in series_colors.items() if method and s.lower().startswith(method)), "0.45")
            ax.plot(*zip(*avg, strict=True), marker="s", markersize=6, linewidth=2, color=color,
                    label=f"paper mean of {len(matched)} tasks ({paper_panel['figure']})", **PAPER_STYLE)
    return used


def _task_lines(ax, points: Sequence[Point], xs: list, pos: dict, tasks: list[str], colors: list, series: str,
                scorer: str | None) -> None:
    """One thin line per task, drawn above the category mean. Tasks with the same scores at every x share one
    line labelled with all their names: a line hidden under an identical one would still get a legend entry."""
    same: dict[tuple, list[tuple[str, Any, dict]]] = {}
    for task, color in zip(tasks, colors, strict=True):
        task_stats = stats_by(points, lambda r, t=task: r.task_scores(scorer).get(t))
        values = tuple((x, round(task_stats[(series, x)].mean, 9)) for x in xs if (series, x) in task_stats)
        if values:
            same.setdefault(values, []).append((task, color, task_stats))
    for members in same.values():
        _, color, task_stats = members[0]
        _line(ax, xs, pos, task_stats, series, errors=False, color=color, marker="o", markersize=4, linewidth=1,
              label=" = ".join(m[0] for m in members), zorder=6)


def _no_overlay_reason(panel: Panel, tasks: Sequence[str], data: dict | None) -> str:
    figures = [p["figure"] for p in paper_numbers.ablation_panels(panel.name, data)]
    if not figures:
        return f"the paper plots no values for {panel.name}"
    return (f"the paper's {', '.join(figures)} share no task and setting with these runs "
            f"(tasks: {', '.join(tasks)})")


def sweep_figure(points: Sequence[Point], panel: Panel, paper: bool = False, scorer: str | None = None,
                 paper_data: dict | None = None) -> plt.Figure | None:
    """Score vs swept value: one subplot per category; per-task lines (single series) and the category
    mean ± std; baseline runs as horizontal lines; the paper's points overlaid when asked."""
    xs = x_order(points, panel)
    pos = _positions(xs, panel.categorical or not all(finite(x) for x in xs))
    categories = _category_tasks(points, scorer)
    if not xs or not categories:
        return None
    series_names = sorted({p.series for p in points})
    single = len(series_names) == 1
    series_colors = dict(zip(series_names, ["black"] if single else palette(len(series_names)), strict=True))
    fig, axes = grid(len(categories), width=7.0, max_cols=2)
    figures_used: set[str] = set()
    for ax, (category, tasks) in zip(axes, categories.items(), strict=True):
        colors = palette(len(tasks))
        if single:
            _task_lines(ax, points, xs, pos, tasks, colors, series_names[0], scorer)
        cat_stats = stats_by(points, lambda r, c=category: r.category_scores(scorer).get(c))
        for name, color in series_colors.items():
            label = "category mean (ours)" if single else f"{name} (ours)"
            _line(ax, xs, pos, cat_stats, name, color=color, marker="D", markersize=6, linewidth=2.4,
                  label=label, zorder=5)
            base = cat_stats.get((name, BASELINE))
            if base is not None:
                ax.axhline(base.mean, color=color, linestyle=":", linewidth=1.8,
                           label=f"{panel.baseline_label or 'baseline'}{'' if single else f' {name}'} (ours)")
                if base.std:
                    ax.axhspan(base.mean - base.std, base.mean + base.std, color=color, alpha=0.08)
        if panel.marker is not None and panel.marker in pos:
            ax.axvline(pos[panel.marker], color="0.5", linestyle=":", linewidth=1, label="paper default")
        if paper:
            figures_used.update(_paper_overlay(ax, panel, tasks, colors, xs, pos, single, series_colors,
                                               paper_data))
        _set_x(ax, xs, pos, panel, panel.xlabel)
        ax.set_ylabel(SCORE_LABEL)
        ax.set_title(f"{category} ({len(tasks)} tasks)")
        handles = sorted(ax.get_legend_handles_labels()[0], key=lambda h: h.get_label().startswith("paper"))
        if paper and figures_used:
            handles += [Line2D([], [], color="0.3", marker="o", label="ours (filled, solid)"),
                        Line2D([], [], color="0.3", marker="o", label="paper (hollow, dashed)", **PAPER_STYLE)]
        # Beside the axes, so that it never hides a point.
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    shown = [t for tasks in categories.values() for t in tasks]
    subtitle = f"{run_count_text(points)}; {score_note([p.run for p in points], shown, scorer)}"
    if figures_used:
        subtitle += f"\npaper: {', '.join(sorted(figures_used))}"
    elif paper:
        reason = _no_overlay_reason(panel, shown, paper_data)
        note(f"{panel.name}: --paper: no paper values drawn: {reason}")
        subtitle += "\npaper: no values comparable to these runs (nothing overlaid)"
    fig.suptitle(f"{panel.title}\n{subtitle}", fontsize=12)
    if paper:
        _claims_footer(fig, panel.name, paper_data)
    return fig


def plot_sweep(points: Sequence[Point], panel: Panel, out_dir: Path, paper: bool = False,
               scorer: str | None = None, paper_data: dict | None = None) -> list[Path]:
    fig = sweep_figure(points, panel, paper, scorer, paper_data)
    return [] if fig is None else save_figure(fig, out_dir, panel.name)


def _claims_footer(fig: plt.Figure, experiment: str, data: dict | None) -> None:
    """The paper's caption-level statements for this experiment (no values to plot), under the figure."""
    lines = [f"paper, {c['figure']} [{c['tag']}]: {c['text']}" for c in paper_numbers.claims(experiment, data)]
    if lines:
        fig.supxlabel("\n".join(textwrap.fill(line, 190) for line in lines), fontsize=8.5, color="0.3")


def entropy(probs: Sequence[float]) -> float | None:
    """Shannon entropy (nats) of a usage vector, normalised to sum to 1."""
    p = np.asarray(probs, dtype=float)
    if p.size == 0 or p.sum() <= 0:
        return None
    p = p / p.sum()
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def usage_entropy(run: Run) -> float | None:
    usage = run.last_metric("routing/usage")
    return entropy(usage) if usage else None


def plot_entropy(points: Sequence[Point], panel: Panel, out_dir: Path, paper: bool = False,
                 paper_data: dict | None = None) -> list[Path]:
    """Routing entropy vs the swept value: the logged per-token entropy and the entropy of mean usage."""
    xs = x_order(points, panel)
    pos = _positions(xs, panel.categorical or not all(finite(x) for x in xs))
    measures = {
        "entropy of mean expert usage": usage_entropy,
        "mean per-token routing entropy (logged)": lambda r: r.last_metric("routing/entropy"),
    }
    if not any(finite(f(p.run)) for p in points for f in measures.values()):
        return []
    fig, ax = plt.subplots(figsize=(9.5, 4.4), layout="constrained")
    series_names = sorted({p.series for p in points})
    colors = palette(len(measures) * len(series_names))
    for i, (label, measure) in enumerate(measures.items()):
        stats = stats_by(points, measure)
        for j, name in enumerate(series_names):
            _line(ax, xs, pos, stats, name, color=colors[i * len(series_names) + j], marker="o",
                  linewidth=2, label=f"{label}{f' — {name}' if name else ''}")
    sizes = {len(u) for p in points if (u := p.run.last_metric("routing/usage"))}
    if len(sizes) == 1:
        size = sizes.pop()
        ax.axhline(math.log(size), color="0.4", linestyle="--", linewidth=1, label=f"uniform over E={size}: ln E")
    if paper:
        for claim in paper_numbers.claims(panel.name, paper_data):
            if "entropy_no_balancing" in claim and 0 in pos:
                ax.plot(pos[0], claim["entropy_no_balancing"], marker="*", markersize=13, color="crimson",
                        linestyle="none", label=f"paper, no balancing ({claim['figure']} [{claim['tag']}])")
            if "entropy_strongest" in claim:
                ax.axhline(claim["entropy_strongest"], color="crimson", linestyle=":", linewidth=1.2,
                           label=f"paper, strongest balancing ({claim['figure']} [{claim['tag']}])")
    _set_x(ax, xs, pos, panel, panel.xlabel)
    ax.set_ylabel("entropy (nats)")
    ax.set_title(f"{panel.title}: routing entropy\n{run_count_text(points)}", fontsize=11)
    ax.legend(frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, out_dir, f"{panel.name}_entropy")


_LAYER = re.compile(r"^(?P<stack>.*?)\.(?:layers|layer|h|blocks)\.(?P<idx>\d+)(?:\.|$)")


def layer_matrix(usage: dict[str, list[float]]) -> tuple[list[str], np.ndarray]:
    """(row labels, layers x experts): modules of one block (q, k, v, o) averaged into one row; language-model
    blocks first, then vision-tower blocks, each by index; modules with no block index by name."""
    rows: dict[tuple, list[list[float]]] = {}
    for name, vector in usage.items():
        m = _LAYER.match(name)
        if m:
            stack = "vision" if "vision" in m["stack"] else "LM"
            key = (stack != "LM", stack, int(m["idx"]))
        else:
            key = (2, name, 0)
        rows.setdefault(key, []).append(vector)
    keys = sorted(rows)
    labels = [f"{k[1]} {k[2]}" if k[0] < 2 else k[1] for k in keys]
    return labels, np.array([np.mean(rows[k], axis=0) for k in keys])


@dataclass
class UsageCell:
    title: str
    labels: list[str]
    matrix: np.ndarray  # layers x experts, mean over `seeds` runs
    seeds: int


def usage_norm(matrices: Sequence[np.ndarray]) -> Normalize:
    """Colours scaled to the data: centred on uniform usage 1/E (white) and reaching the largest deviation from
    it, so that a skew of 0.01 is as visible as the data allows; a fixed 0..max scale would hide it. With
    different expert counts there is no common centre: the data's own min..max."""
    experts = {m.shape[1] for m in matrices}
    if len(experts) == 1:
        uniform = 1.0 / experts.pop()
        deviation = max(float(np.abs(m - uniform).max()) for m in matrices)
        return CenteredNorm(vcenter=uniform, halfrange=max(deviation, 1e-6))
    return Normalize(min(float(m.min()) for m in matrices), max(float(m.max()) for m in matrices))


def _annotate(ax, matrix: np.ndarray, norm: Normalize) -> None:
    """Each cell's value, in white on the saturated ends of the colour map."""
    for (row, col), value in np.ndenumerate(matrix):
        color = "white" if abs(float(norm(value)) - 0.5) > 0.3 else "black"
        ax.text(col, row, f"{value:.3f}", ha="center", va="center", fontsize=6.5, color=color)


MAX_ANNOTATED_ROWS = 12  # beyond this (a 24-block LM) the numbers no longer fit in the cells


def usage_cells(points: Sequence[Point], panel: Panel) -> list[UsageCell]:
    """One cell per (series, swept value): the per-layer usage averaged over its seeds."""
    cells = []
    for name in sorted({p.series for p in points}):
        for x in [*x_order(points, panel), BASELINE]:
            runs = [p.run for p in points if p.series == name and _x_of(p) == x]
            matrices = [layer_matrix(u) for r in runs if (u := r.layer_usage())]
            if not matrices or len({m[1].shape for m in matrices}) != 1:
                continue  # no per-layer usage logged, or seeds with different layer sets: nothing to average
            title = panel.baseline_label if x == BASELINE else f"{_short(panel.xlabel)} = {x}"
            cells.append(UsageCell(f"{name}: {title}" if name else title, matrices[0][0],
                                   np.mean([m[1] for m in matrices], axis=0), len(matrices)))
    return cells


def usage_figure(points: Sequence[Point], panel: Panel) -> plt.Figure | None:
    """Expert usage per layer (rows) and expert (columns) for each swept value, averaged over seeds."""
    cells = usage_cells(points, panel)
    if not cells:
        return None
    norm = usage_norm([c.matrix for c in cells])
    n_rows = max(len(c.labels) for c in cells)
    fig, axes = grid(len(cells), width=2.6, height=max(3.0, 0.16 * n_rows + 1.2), max_cols=6)
    for ax, cell in zip(axes, cells, strict=True):
        image = ax.imshow(cell.matrix, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        if len(cell.labels) <= MAX_ANNOTATED_ROWS:
            _annotate(ax, cell.matrix, norm)
        ax.grid(False)
        ax.set_xticks(range(cell.matrix.shape[1]), [str(e + 1) for e in range(cell.matrix.shape[1])])
        step = max(1, math.ceil(len(cell.labels) / 24))  # keep layer labels legible
        ax.set_yticks(range(0, len(cell.labels), step), cell.labels[::step], fontsize=7)
        h = entropy(cell.matrix.mean(axis=0))
        ax.set_title(f"{cell.title}\nH(mean usage) = {h:.3f}" if h is not None else cell.title, fontsize=9)
        ax.set_xlabel("expert")
    axes[0].set_ylabel("layer")
    centre = "\n(white: uniform 1/E)" if isinstance(norm, CenteredNorm) else ""
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"mean routing weight p̄_e{centre}")
    seeds = seeds_text(c.seeds for c in cells)
    fig.suptitle(f"{panel.title}: expert utilisation per layer (final logged step, {seeds})", fontsize=11)
    return fig


def plot_heatmaps(points: Sequence[Point], panel: Panel, out_dir: Path) -> list[Path]:
    fig = usage_figure(points, panel)
    return [] if fig is None else save_figure(fig, out_dir, f"{panel.name}_usage")


def _short(label: str) -> str:
    return label.split(" (")[0]


def plot_panel(runs: Sequence[Run], panel: Panel, out_dir: Path, paper: bool = False,
               scorer: str | None = None, paper_data: dict | None = None) -> list[Path]:
    points = collect(runs, panel)
    paths = plot_sweep(points, panel, out_dir, paper, scorer, paper_data)
    if panel.routing_plots:
        paths += plot_entropy(points, panel, out_dir, paper, paper_data)
        paths += plot_heatmaps(points, panel, out_dir)
    return paths
