"""Figures from run directories: one PNG and PDF per panel the runs support.

    python scripts/make_figures.py multirun/2025-01-01/12-00-00                # -> <that dir>/report/
    python scripts/make_figures.py multirun/ablations --out reports/figures --paper

Panels are chosen by each run's experiment name (efficiency, ablation_gamma, ablation_ngram, ...; see
lime/report/ablations.py PANELS) or, for unnamed runs, by the key their overrides sweep. Failed, unfinished
or incomplete runs are listed (stdout, excluded_runs.md) and left out. --paper overlays the paper's values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lime.report import make_figures, usable_runs
from lime.report import paper as paper_numbers
from lime.report.figures import needs_scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, help="output directory (default: <first path>/report)")
    parser.add_argument("--paper", action="store_true", help="overlay the paper's published values")
    parser.add_argument("--scorer", default=None, help="strict | lenient (default: the runs' primary scorer)")
    parser.add_argument("--paper-numbers", type=Path, default=None, help="paper numbers JSON (default: bundled)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    out = args.out or args.paths[0] / "report"
    usable, _, args.scorer = usable_runs(args.paths, out, args.scorer, needs_scores)
    if not usable:
        return []
    data = paper_numbers.load(args.paper_numbers) if args.paper else None
    paths = make_figures(usable, out, paper=args.paper, scorer=args.scorer, paper_data=data)
    for path in paths:
        print(f"wrote {path}")
    if not paths:
        print("No figure panel matched these runs (no experiment name and no swept key).", file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
