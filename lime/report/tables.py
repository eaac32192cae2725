"""Table 2 from run directories: groups (methods by default) x categories, mean ± std over seeds.

    categories, rows = build_rows(usable_runs, group_by=("peft.name",), paper=True)
    write_tables(rows, categories, out_dir)     # table2.md, table2.tex, table2.csv, table2_runs.csv

Every usable run of a group is one sample (normally one seed); ± is the sample standard deviation (ddof=1)
and is left out when a group has a single run. With ``paper=True`` each method row is followed by the
paper's published row (labelled "(paper)"), its values placed under our matching category columns.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lime.report import paper as paper_numbers
from lime.report.runs import Run, finite, shown_path, swept_keys

MEAN_COLUMN = "Mean"  # the per-run mean over its categories (results.json overall.mean_of_categories)


@dataclass
class Stat:
    """Mean ± sample std of the values of one cell; std is None for fewer than two values."""

    mean: float | None
    std: float | None = None
    n: int = 0

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        values = [v for v in values if finite(v)]
        if not values:
            return cls(None)
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def text(self, digits: int = 2, pm: str = " ± ") -> str:
        if self.mean is None:
            return "–"
        mean = f"{self.mean:.{digits}f}"
        return mean if self.std is None else f"{mean}{pm}{self.std:.{digits}f}"


@dataclass
class Row:
    label: str  # what the table shows: "LiMELoRA", "LiMELoRA (paper)", "LiMELoRA, n_gram=3"
    group: str  # the group-by values joined, e.g. "lime_lora"
    source: str  # "ours" | "paper"
    cells: dict[str, Stat]
    n: int | None = None
    trainable_params: float | None = None
    total_params: float | None = None
    params_text: str = "–"
    runs: list[Run] = field(default_factory=list)
    difference: Any = None  # a lime.report.stats.Difference: Δ Mean vs the reference row, bootstrap 95% interval
    answer_loss: Stat | None = None  # mean ± std over runs of results.json answer_loss (lime/report/stats.py)


# Below this many trainable parameters in every row (tiny models), "0.01M" would hide the differences.
EXACT_PARAMS_BELOW = 1_000_000


def format_params(count: float | None, exact: bool = False) -> str:
    """1_740_800 -> "1.74M", 70_000 -> "0.07M" (the paper's #TTP style); exact: 6032 -> "6,032"."""
    if count is None:
        return "–"
    return f"{count:,.0f}" if exact else f"{count / 1e6:.2f}M"


def _params(runs: Sequence[Run], key: str, exact: bool) -> tuple[float | None, str]:
    """The (normally identical) parameter count of a group's runs; a range when seeds disagree."""
    values = sorted({r.info[key] for r in runs if finite(r.info.get(key))})
    if not values:
        return None, "–"
    if len(values) == 1:
        return values[0], format_params(values[0], exact)
    return statistics.fmean(values), f"{format_params(values[0], exact)}–{format_params(values[-1], exact)}"


def _frozen(value: Any) -> Any:
    """A config value as a dict key: lists (peft.targets, peft.layer_indices) become tuples."""
    return tuple(map(_frozen, value)) if isinstance(value, list | tuple) else value


def group_value(run: Run, group_by: Sequence[str]) -> tuple:
    return tuple(_frozen(run.get(key)) for key in group_by)


def _value_text(value: Any) -> str:
    return f"[{', '.join(map(_value_text, value))}]" if isinstance(value, tuple) else str(value)


def group_label(values: tuple, group_by: Sequence[str]) -> str:
    """The paper's method name for peft.name; "key=value" for every other group-by key."""
    parts = []
    for key, value in zip(group_by, values, strict=True):
        if key == "peft.name":
            parts.append(paper_numbers.method_label(str(value)))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={_value_text(value)}")
    return ", ".join(parts)


def _group_order(values: tuple, group_by: Sequence[str]) -> tuple:
    """Paper row order for methods, then natural order of the other values."""
    order = paper_numbers.method_order()
    key = []
    for k, v in zip(group_by, values, strict=True):
        if k == "peft.name":
            key.append((order.index(v), "") if v in order else (len(order), str(v)))
        else:
            key.append((0, f"{v:020.6f}") if finite(v) else (1, str(v)))
    return tuple(key)


def varying_within_groups(runs: Sequence[Run], group_by: Sequence[str]) -> list[str]:
    """Override keys (other than seed) that differ between runs of one group: averaging over them would
    mix settings, so the caller adds them to the group-by keys."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_value(run, group_by), []).append(run)
    keys = [k for members in groups.values() for k in swept_keys(members)]
    return [k for k in dict.fromkeys(keys) if k not in group_by]


def run_mean(run: Run, scorer: str | None) -> float | None:
    """The run's mean over its categories (results' own overall value when present)."""
    block = run.scores(scorer) or {}
    overall = (block.get("overall") or {}).get("mean_of_categories")
    if finite(overall):
        return overall
    scores = list(run.category_scores(scorer).values())
    return statistics.fmean(scores) if scores else None


def build_rows(
    runs: Sequence[Run],
    group_by: Sequence[str] = ("peft.name",),
    scorer: str | None = None,
    paper: bool = False,
    paper_data: dict | None = None,
) -> tuple[list[str], list[Row]]:
    """(category columns in Table 2 order, rows). Pass only usable runs (see runs.split_runs)."""
    categories = paper_numbers.order_categories(c for r in runs for c in r.category_scores(scorer))
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_value(run, group_by), []).append(run)
    rows, paper_done = [], set()
    exact = all(r.info.get("trainable_params", 0) < EXACT_PARAMS_BELOW for r in runs)
    ordered = sorted(groups, key=lambda v: _group_order(v, group_by))
    for i, values in enumerate(ordered):
        members = groups[values]
        rows.append(_our_row(values, members, group_by, categories, scorer, exact))
        method = values[group_by.index("peft.name")] if "peft.name" in group_by else None
        # The paper row goes after the last group of its method (group_by may split a method further).
        last_of_method = i + 1 == len(ordered) or method is None or (
            ordered[i + 1][group_by.index("peft.name")] != method)
        if paper and method is not None and last_of_method and method not in paper_done:
            paper_row = _paper_row(str(method), categories, paper_data)
            if paper_row is not None:
                rows.append(paper_row)
                paper_done.add(method)
    return categories, rows


def _our_row(values: tuple, runs: list[Run], group_by: Sequence[str], categories: list[str],
             scorer: str | None, exact_params: bool) -> Row:
    cells = {c: Stat.of([r.category_scores(scorer).get(c, math.nan) for r in runs]) for c in categories}
    means = [run_mean(r, scorer) for r in runs]
    cells[MEAN_COLUMN] = Stat.of([math.nan if m is None else m for m in means])
    trainable, params_text = _params(runs, "trainable_params", exact_params)
    total, _ = _params(runs, "total_params", exact_params)
    return Row(label=group_label(values, group_by), group=",".join(map(str, values)), source="ours",
               cells=cells, n=len(runs), trainable_params=trainable, total_params=total,
               params_text=params_text, runs=list(runs))


def _paper_row(method: str, categories: list[str], data: dict | None) -> Row | None:
    """The paper's Table 2 row, its categories matched to ours by name."""
    row = paper_numbers.table2_row(method, data)
    if row is None:
        return None
    cells = {}
    for category in categories:
        paper_cat = paper_numbers.match_name(category, row["scores"])
        value = row["scores"].get(paper_cat) if paper_cat else None
        cells[category] = Stat(value["mean"], value["std"]) if value else Stat(None)
    cells[MEAN_COLUMN] = Stat(None)  # the paper gives no overall mean
    return Row(label=f"{row['label']} (paper)", group=method, source="paper", cells=cells,
               trainable_params=row["trainable_params"], params_text=row["ttp"])


# --------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------


def best_labels(rows: Sequence[Row], column: str) -> set[str]:
    """Labels of our rows holding the highest mean of a column (bolded when there are two or more rows)."""
    ours = [r for r in rows if r.source == "ours" and r.cells[column].mean is not None]
    if len(ours) < 2:
        return set()
    top = max(r.cells[column].mean for r in ours)
    return {r.label for r in ours if math.isclose(r.cells[column].mean, top)}


def _columns(categories: Sequence[str]) -> list[str]:
    return [*categories, MEAN_COLUMN]


def _statistics_columns(rows: Sequence[Row]) -> list[tuple[str, Any]]:
    """(header, row -> text or None) of the columns lime/report/stats.py fills, where some row has them: the
    answer loss and Δ Mean against the reference row with its 95% interval."""
    columns = []
    if any(r.answer_loss is not None for r in rows):
        columns.append(("Answer loss", lambda r: None if r.answer_loss is None else r.answer_loss.text(3)))
    reference = next((r.difference.reference for r in rows if r.difference is not None), None)
    if reference is not None:
        columns.append((f"Δ {MEAN_COLUMN} vs {reference} [95% CI]",
                        lambda r: None if r.difference is None else r.difference.text()))
    return columns


def to_markdown(rows: Sequence[Row], categories: Sequence[str], notes: Sequence[str] = ()) -> str:
    columns = _columns(categories)
    best = {c: best_labels(rows, c) for c in columns}
    extra = _statistics_columns(rows)
    lines = ["| Method | n | #TTP | " + " | ".join([*columns, *(h for h, _ in extra)]) + " |",
             "|---|---|---|" + "---|" * (len(columns) + len(extra))]
    for row in rows:
        cells = []
        for c in columns:
            text = row.cells[c].text()
            cells.append(f"**{text}**" if row.label in best[c] else text)
        cells += [text(row) or "–" for _, text in extra]
        label = f"*{row.label}*" if row.source == "paper" else row.label
        n = "–" if row.n is None else str(row.n)
        lines.append(f"| {label} | {n} | {row.params_text} | " + " | ".join(cells) + " |")
    head = [*notes, ""] if notes else []
    return "\n".join([*head, *lines]) + "\n"


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "$": r"\$", "{": r"\{", "}": r"\}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(rows: Sequence[Row], categories: Sequence[str], caption: str, comment: str = "") -> str:
    """A booktabs table; `caption` is LaTeX already, `comment` goes above it as % lines."""
    columns = _columns(categories)
    best = {c: best_labels(rows, c) for c in columns}
    extra = _statistics_columns(rows)
    header = " & ".join(["Method", "$n$", r"\#TTP", *(latex_escape(c) for c in [*columns, *(h for h, _ in extra)])])
    header += r" \\"
    body = []
    for row in rows:
        cells = []
        for c in columns:
            stat = row.cells[c]
            text = "--" if stat.mean is None else "$" + stat.text(pm=r" \pm ") + "$"
            if row.label in best[c] and stat.mean is not None:
                text = rf"{{\boldmath{text}}}"  # \textbf does not reach inside math mode
            cells.append(text)
        cells += ["--" if text(row) is None else "$" + text(row).replace("±", r"\pm") + "$" for _, text in extra]
        label = latex_escape(row.label)
        if row.source == "paper":
            label = rf"\textit{{{label}}}"
        n = "--" if row.n is None else str(row.n)
        body.append(" & ".join([label, n, row.params_text.replace("–", "--"), *cells]) + r" \\")
    lines = [
        *(f"% {line}" for line in comment.splitlines()),
        r"% needs \usepackage{booktabs,graphicx}",
        r"\begin{table}[t]", r"\centering", r"\small", r"\setlength{\tabcolsep}{3pt}",
        r"\resizebox{\linewidth}{!}{%",
        r"\begin{tabular}{lrr" + "c" * (len(columns) + len(extra)) + "}", r"\toprule", header, r"\midrule", *body,
        r"\bottomrule", r"\end{tabular}}", rf"\caption{{{caption}}}", r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def csv_rows(rows: Sequence[Row], categories: Sequence[str]) -> tuple[list[str], list[dict]]:
    """Unrounded values: one line per table row, "<column> mean" / "<column> std" per column."""
    fields = ["method", "group", "source", "n", "trainable_params", "total_params"]
    for c in _columns(categories):
        fields += [f"{c} mean", f"{c} std"]
    fields += ["answer loss mean", "answer loss std", "delta vs", "delta", "delta low", "delta high"]
    out = []
    for row in rows:
        record = {"method": row.label, "group": row.group, "source": row.source, "n": row.n,
                  "trainable_params": row.trainable_params, "total_params": row.total_params}
        for c in _columns(categories):
            record[f"{c} mean"], record[f"{c} std"] = row.cells[c].mean, row.cells[c].std
        if row.answer_loss is not None:
            record["answer loss mean"], record["answer loss std"] = row.answer_loss.mean, row.answer_loss.std
        if row.difference is not None:
            d = row.difference
            record.update({"delta vs": d.reference, "delta": d.mean, "delta low": d.low, "delta high": d.high})
        out.append(record)
    return fields, out


def per_run_rows(rows: Sequence[Row], categories: Sequence[str], scorer: str | None) -> tuple[list[str], list[dict]]:
    """Every averaged run with its own scores, so each table cell can be traced to its run directories."""
    fields = ["method", "group", "seed", "run", "trainable_params", "total_params", *categories, MEAN_COLUMN]
    out = []
    for row in rows:
        for run in row.runs:
            scores = run.category_scores(scorer)
            out.append({"method": row.label, "group": row.group, "seed": run.seed, "run": shown_path(run.path),
                        "trainable_params": run.info.get("trainable_params"),
                        "total_params": run.info.get("total_params"),
                        **{c: scores.get(c) for c in categories}, MEAN_COLUMN: run_mean(run, scorer)})
    return fields, out


def write_csv(path: Path, fields: list[str], records: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in records)


def write_tables(
    rows: Sequence[Row],
    categories: Sequence[str],
    out_dir: str | Path,
    name: str = "table2",
    scorer: str | None = None,
    notes: Sequence[str] = (),
) -> list[Path]:
    """Write <name>.md, <name>.tex, <name>.csv and <name>_runs.csv; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}{suffix}" for suffix in (".md", ".tex", ".csv", "_runs.csv")]
    title = f"# {name}: average score per category, mean ± std over runs"
    paths[0].write_text(to_markdown(rows, categories, [title, "", *notes]))
    caption = (r"Average score (\%) per category, mean $\pm$ sample std over runs (seeds); $n$ = runs averaged; "
               r"\#TTP = trainable parameters. Rows in italics: the paper's published values.")
    paths[1].write_text(to_latex(rows, categories, caption, comment="\n".join(notes)))
    write_csv(paths[2], *csv_rows(rows, categories))
    write_csv(paths[3], *per_run_rows(rows, categories, scorer))
    return paths


def write_efficiency_table(stats: dict[str, dict[str, Stat]], paper_data: dict | None, out_dir: Path) -> list[Path]:
    """efficiency.md and .csv: the plotted means per method, and the ratios to the reference (ours, paper's)."""
    # Imported here: lime.report.efficiency builds its numbers from this module's Stat.
    from lime.report.efficiency import EFFICIENCY_FIELDS, RELATIVE_FIELDS, relative_efficiency

    reference, ours, paper = relative_efficiency(stats, paper_data)
    fields = ["method", "n", *(f for f in EFFICIENCY_FIELDS)]
    if reference is not None:
        fields += [f"{f}_vs_{reference}{who}" for f in RELATIVE_FIELDS for who in ("", "_paper")]
    records = []
    for method, stat in stats.items():
        record = {"method": paper_numbers.method_label(method), "n": stat["train_time"].n}
        record.update({f: None if stat[f].mean is None else round(stat[f].mean, 4) for f in EFFICIENCY_FIELDS})
        for f in RELATIVE_FIELDS if reference is not None else ():
            for who, value in (("", ours[method][f]), ("_paper", paper[method][f])):
                record[f"{f}_vs_{reference}{who}"] = None if value is None else round(value, 3)
        records.append(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / "efficiency.md", out_dir / "efficiency.csv"
    write_csv(csv_path, fields, records)
    header = {f: spec[0] for f, spec in EFFICIENCY_FIELDS.items()}
    for f in RELATIVE_FIELDS if reference is not None else ():
        ratio = f"{EFFICIENCY_FIELDS[f][0].split(' (')[0]} ÷ {paper_numbers.method_label(reference)}"
        header[f"{f}_vs_{reference}"], header[f"{f}_vs_{reference}_paper"] = ratio, f"{ratio} (paper)"
    header = [header.get(f, f) for f in fields]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join("–" if r.get(f) is None else str(r[f]) for f in fields) + " |" for r in records]
    md.write_text("# Efficiency: means over runs\n\n" + "\n".join(lines) + "\n")
    return [md, csv_path]
