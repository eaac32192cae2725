"""Tables and figures rebuilt from logged run directories (files only: no model, no GPU).

    from lime.report import usable_runs, build_rows, write_tables, make_figures

    # failed / unfinished / incomplete runs are listed (stdout, report/excluded_runs.md), never averaged
    usable, excluded, scorer = usable_runs(["multirun/2025-01-01/12-00-00"], "report/")
    categories, rows = build_rows(usable, paper=True)
    write_tables(rows, categories, "report/")        # table2.md / .tex / .csv / _runs.csv
    make_figures(usable, "report/", paper=True)       # one PNG + PDF per panel the runs support

Command lines: scripts/make_tables.py and scripts/make_figures.py. The paper's numbers: lime.report.paper
(experiments/paper_numbers.json).
"""

from lime.report.runs import (
    Run,
    find_run_dirs,
    load_run,
    load_runs,
    report_excluded,
    split_runs,
    swept_keys,
    usable_runs,
)
from lime.report.tables import Row, Stat, build_rows, write_tables

__all__ = [
    "Row", "Run", "Stat", "build_rows", "find_run_dirs", "load_run", "load_runs", "make_figures",
    "report_excluded", "split_runs", "swept_keys", "usable_runs", "write_tables",
]


def make_figures(*args, **kwargs):
    """lime.report.figures.make_figures, imported on first use (matplotlib is only needed for figures)."""
    from lime.report.figures import make_figures as _make_figures

    return _make_figures(*args, **kwargs)
