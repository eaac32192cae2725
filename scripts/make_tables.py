"""Table 2 from run directories: methods x categories, mean ± std over seeds, as Markdown, LaTeX and CSV.

    python scripts/make_tables.py multirun/2025-01-01/12-00-00                 # -> <that dir>/report/
    python scripts/make_tables.py multirun/a multirun/b --out reports/table2 --paper
    python scripts/make_tables.py multirun/x --group-by peft.name,routing.n_gram --scorer lenient

Every run directory below the given paths is read. Failed, unfinished or incomplete runs (status not
"completed", no results.json, or a category missing tasks) are listed on stdout and in excluded_runs.md and
left out of every mean; so are copies of a run already counted (the same adapter, by sha256: a training run,
its eval run and its resumed run are one seed). Eval runs are labelled by the adapter they evaluated. Override
keys that vary within a group (a sweep's key) are added to --group-by, so different settings are never averaged
as seeds. --paper adds the paper's published row under each of our methods, labelled "(paper)". Statistics
(lime/report/stats.py): a backbone-alone row where the runs carry one, and for every row Δ Mean against the
reference row (--reference; default LoRA when rows are methods) with its paired bootstrap 95% interval over test
samples, seeds pooled.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lime.report import build_rows, usable_runs, write_tables
from lime.report import paper as paper_numbers
from lime.report.runs import parse_override, shown_path
from lime.report.stats import add_statistics, pair_differences
from lime.report.tables import MEAN_COLUMN, varying_within_groups, write_csv


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep directories (searched recursively)")
    parser.add_argument("--out", type=Path, help="output directory (default: <first path>/report)")
    parser.add_argument("--paper", action="store_true", help="add the paper's Table 2 rows beside ours")
    parser.add_argument("--group-by", default="peft.name",
                        help="comma-separated config keys; one table row per distinct value (default peft.name)")
    parser.add_argument("--scorer", default=None, help="strict | lenient (default: the runs' primary scorer)")
    parser.add_argument("--name", default="table2", help="output file stem")
    parser.add_argument("--paper-numbers", type=Path, default=None, help="paper numbers JSON (default: bundled)")
    parser.add_argument("--reference", action="append", default=None, metavar="KEY=VALUE",
                        help="the row the Δ column compares against, e.g. routing.n_gram=2 (repeatable; "
                             "default peft.name=lora when grouping by peft.name alone)")
    parser.add_argument("--pair", action="append", default=[], metavar="ROW=REFERENCE",
                        help="also compare two rows by their group values, e.g. lime_lora=lora (repeatable): "
                             "<name>_pairs.md/.csv, Δ Mean with its paired bootstrap 95%% interval")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    out = args.out or args.paths[0] / "report"
    usable, excluded, args.scorer = usable_runs(args.paths, out, args.scorer)
    if not usable:
        return []
    data = paper_numbers.load(args.paper_numbers) if args.paper else None
    group_by = tuple(k.strip() for k in args.group_by.split(",") if k.strip())
    extra = varying_within_groups(usable, group_by)
    if extra:  # never average different settings as if they were seeds
        print(f"NOTE: {', '.join(extra)} vary within the groups of {', '.join(group_by)}; grouping by them too.")
        group_by += tuple(extra)
    categories, rows = build_rows(usable, group_by, args.scorer, paper=args.paper, paper_data=data)
    reference = dict(map(parse_override, args.reference or (["peft.name=lora"] if group_by == ("peft.name",) else [])))
    statistics_notes = add_statistics(rows, usable, categories, args.scorer, reference)
    notes = [
        f"Runs: {len(usable)} averaged, {len(excluded)} excluded (see excluded_runs.md). Scorer: {args.scorer}.",
        "n = runs averaged (seeds); ± = sample standard deviation (ddof=1), omitted for n = 1; "
        "#TTP = trainable parameters; Mean = mean over each run's categories.",
        f"Source: {', '.join(shown_path(p.resolve()) for p in args.paths)}",
    ]
    if any(r.selected_tasks() is not None for r in usable):
        notes.append("Some runs evaluate a data subset (data.tasks / data.categories): their category scores are "
                     "the means of the evaluated tasks only.")
    if args.paper:
        notes.append("Rows in italics, '(paper)': the paper's published Table 2 (LLaVA-OV-7B) [EXACT-img]; "
                     "its seed count is not stated.")
    paths = write_tables(rows, categories, out, args.name, args.scorer, [*notes, *statistics_notes])
    if args.pair:
        pairs = [tuple(pair.split("=", 1)) for pair in args.pair]
        paths += write_pairs(pair_differences(rows, pairs), out, args.name)
    for path in paths:
        print(f"wrote {path}")
    return paths


def write_pairs(differences: list, out: Path, name: str) -> list[Path]:
    """<name>_pairs.md and .csv: one line per compared pair."""
    records = [{"row": a.label, "reference": b.label, "mean": a.cells[MEAN_COLUMN].mean,
                "reference mean": b.cells[MEAN_COLUMN].mean, "delta": d.mean, "delta low": d.low,
                "delta high": d.high, "beyond noise": d.resolved, "samples": d.samples} for a, b, d in differences]
    csv_path, md_path = out / f"{name}_pairs.csv", out / f"{name}_pairs.md"
    write_csv(csv_path, list(records[0]) if records else ["row"], records)
    lines = [f"# {name}: pairs of rows compared", "",
             "Δ Mean of the row against the reference row over the test samples both scored, seeds pooled, with "
             "its paired bootstrap 95% interval (lime/report/stats.py); beyond noise: the interval excludes 0.", "",
             "| Row | Reference | Mean | Reference Mean | Δ Mean [95% CI] | beyond noise |", "|---" * 6 + "|"]
    lines += [f"| {a.label} | {b.label} | {a.cells[MEAN_COLUMN].text()} | {b.cells[MEAN_COLUMN].text()} | "
              f"{d.text()} | {'yes' if d.resolved else 'no'} |" for a, b, d in differences]
    md_path.write_text("\n".join(lines) + "\n")
    return [md_path, csv_path]


if __name__ == "__main__":
    main()
