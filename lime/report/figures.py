"""Figures from run directories: one PNG and one PDF per panel, chosen by what the runs contain.

    paths = make_figures(usable_runs, "report/", paper=True)

Runs are grouped by their experiment name (the config's ``experiment`` key). ``efficiency`` gives the
Figure 2 panels (lime.report.efficiency_plots); every ``ablation_*`` name has a panel in
lime.report.ablations.PANELS. Runs without a known experiment are grouped by sweep directory and plotted
against whatever key their overrides vary. With ``paper=True`` the paper's published values
(experiments/paper_numbers.json) are overlaid, matched to our tasks and methods by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt

from lime.report.ablations import PANELS, Panel, panel_for_key, plot_panel
from lime.report.efficiency_plots import plot_efficiency
from lime.report.plotting import STYLE
from lime.report.runs import Run, swept_keys


def _unnamed_panels(runs: Sequence[Run]) -> list[tuple[Panel | None, list[Run]]]:
    """Runs with no known experiment: per sweep directory, the panel of the first key their overrides vary
    (None: a sweep over methods, drawn as the efficiency figure)."""
    by_sweep: dict[Path, list[Run]] = {}
    for run in runs:
        by_sweep.setdefault(run.path.parent, []).append(run)
    found = []
    for sweep, members in by_sweep.items():
        keys = swept_keys(members)
        if not keys:
            print(f"figures: {sweep}: no swept key in the overrides, no figure")
            continue
        if keys[0] in ("peft", "peft.name"):
            found.append((None, members))
            continue
        panel = panel_for_key(keys[0])
        if panel.series_key is None and len(keys) > 1:
            panel = replace(panel, series_key=keys[1])
        found.append((panel, members))
    return found


def needs_scores(run: Run) -> bool:
    """The efficiency figure reads only run_info (timings, memory, parameters); every other panel scores."""
    return run.experiment != "efficiency"


def make_figures(runs: Sequence[Run], out_dir: str | Path, paper: bool = False, scorer: str | None = None,
                 paper_data: dict | None = None) -> list[Path]:
    """Every panel the (usable) runs support; returns the written PNG and PDF paths."""
    out = Path(out_dir)
    by_experiment: dict[str | None, list[Run]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment, []).append(run)
    paths: list[Path] = []
    with plt.rc_context(STYLE):
        for experiment, members in by_experiment.items():
            if experiment == "efficiency":
                paths += plot_efficiency(members, out, paper, paper_data)
            elif experiment in PANELS:
                paths += plot_panel(members, PANELS[experiment], out, paper, scorer, paper_data)
            elif experiment == "table2":
                continue  # Table 2 is a table (make_tables.py)
            else:
                for panel, group in _unnamed_panels(members):
                    if panel is None:
                        paths += plot_efficiency(group, out, paper, paper_data)
                    else:
                        paths += plot_panel(group, panel, out, paper, scorer, paper_data)
    return paths
