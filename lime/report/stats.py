"""Statistics of the tables: a backbone-alone row and paired bootstrap intervals of differences.

    notes = add_statistics(rows, runs, reference={"peft.name": "lora"})

Difference of a row against the reference row (Table 2: LoRA; an ablation: its default setting), on the
tables' Mean (the mean over categories of the mean over a category's tasks of the per-sample score, in
points). With c_m(i) the correctness of test sample i under row m, averaged over the row's runs (seeds
pooled: every seed scores the same test samples), the per-sample difference is d(i) = c_m(i) - c_ref(i) and

    Δ = mean_categories mean_tasks mean_{i in task} d(i)

The paired bootstrap resamples the test samples of every task with replacement (the same draw for both rows,
so what the two rows share cancels), B times, and reports Δ with the 2.5 and 97.5 percentiles of the
resampled Δ: a 95% interval over test samples. Seeds enter through c(i); the ± of the tables is the spread
over seeds. Tasks scored at split level (pearson: no per-sample correctness) are left out of Δ and named.

The backbone-alone row: the pretrained tiny backbone's own scores (backbone_results.json, written beside
every run that adapted it; lime/pretrain.py), with its per-sample predictions where the backbone's cache
directory is on this machine.
"""

from __future__ import annotations

import json
import statistics
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lime.report.runs import Run, finite
from lime.report.tables import MEAN_COLUMN, Row, Stat, group_value
from lime.results import prediction_files, prediction_split, read_predictions

RESAMPLES = 2000
BACKBONE_LABEL = "Backbone alone (no adapter)"


@dataclass
class Difference:
    """Δ Mean of a row against the reference row, with its paired-bootstrap 95% interval (points)."""

    reference: str
    mean: float
    low: float
    high: float
    samples: int
    tasks: int

    def text(self, digits: int = 2) -> str:
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"

    @property
    def resolved(self) -> bool:
        """The interval excludes zero: the difference is beyond the test samples' noise."""
        return self.low > 0 or self.high < 0


# --- per-sample correctness ----------------------------------------------------------------------

def sample_correctness(run: Run) -> dict[str, dict[str, float]]:
    """{task: {sample id: 1.0 / 0.0}} from the run's predictions/<split>.jsonl (or .jsonl.gz); tasks scored at
    split level (correct is null) are left out."""
    tasks = ((run.results or {}).get("tasks")) or {}
    task_of_split = {entry.get("split"): task for task, entry in tasks.items() if entry.get("split")}
    out: dict[str, dict[str, float]] = {}
    for path in prediction_files(run.path / "predictions"):
        split = prediction_split(path)
        task = task_of_split.get(split, split.split("_test_", 1)[-1])
        rows = read_predictions(path)
        if rows and all(r.get("correct") is not None for r in rows):
            out[task] = {str(r["id"]): float(r["correct"]) for r in rows}
    return out


def pooled_correctness(runs: Sequence[Run]) -> dict[str, dict[str, float]]:
    """Each sample's correctness averaged over the runs (seeds) that scored it."""
    sums: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for task, samples in sample_correctness(run).items():
            for sample_id, value in samples.items():
                sums.setdefault(task, {}).setdefault(sample_id, []).append(value)
    return {task: {i: statistics.fmean(v) for i, v in samples.items()} for task, samples in sums.items()}


def categories_of(runs: Sequence[Run]) -> dict[str, str]:
    """{task: category} from the runs' results."""
    return {task: entry["category"] for run in runs for task, entry in ((run.results or {}).get("tasks") or {}).items()
            if entry.get("category")}


# --- the paired bootstrap ------------------------------------------------------------------------

def paired_bootstrap(row: Mapping[str, Mapping[str, float]], reference: Mapping[str, Mapping[str, float]],
                     category_of: Mapping[str, str], resamples: int = RESAMPLES,
                     seed: int = 0) -> tuple[float, float, float, int, int] | None:
    """(Δ, low, high, samples, tasks) over the samples both rows scored, in points; None without any.
    Each task's draw comes from its own seeded stream, so a table's intervals do not depend on row order."""
    by_category: dict[str, list[np.ndarray]] = {}
    points: dict[str, list[float]] = {}
    samples = 0
    for task in sorted(set(row) & set(reference)):
        ids = sorted(set(row[task]) & set(reference[task]))
        if not ids or task not in category_of:
            continue
        d = 100 * np.array([row[task][i] - reference[task][i] for i in ids])
        rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
        draws = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
        by_category.setdefault(category_of[task], []).append(draws)
        points.setdefault(category_of[task], []).append(float(d.mean()))
        samples += len(ids)
    if not by_category:
        return None
    resampled = np.mean([np.mean(draws, axis=0) for draws in by_category.values()], axis=0)
    delta = statistics.fmean(statistics.fmean(values) for values in points.values())
    low, high = np.percentile(resampled, [2.5, 97.5])
    return delta, float(low), float(high), samples, sum(len(v) for v in by_category.values())


# --- the rows ------------------------------------------------------------------------------------

def matches(row: Row, reference: Mapping[str, Any]) -> bool:
    """The row's runs have the reference's value for every key (lists compared as lists)."""
    if not row.runs or row.source != "ours":
        return False
    keys = tuple(reference)
    return group_value(row.runs[0], keys) == tuple(_frozen(v) for v in reference.values())


def _frozen(value: Any) -> Any:
    return tuple(map(_frozen, value)) if isinstance(value, list | tuple) else value


def add_differences(rows: Sequence[Row], reference: Mapping[str, Any], resamples: int = RESAMPLES) -> list[str]:
    """Set `difference` on every row with runs (the backbone row included) against the reference row; the
    notes the table prints about it."""
    wanted = ", ".join(f"{k}={v}" for k, v in reference.items())
    ref_rows = [r for r in rows if matches(r, reference)]
    if len(ref_rows) != 1:
        return [f"No paired-bootstrap intervals: {len(ref_rows)} rows match the reference {wanted}."]
    ref = ref_rows[0]
    ref_samples = pooled_correctness(ref.runs)
    category_of = categories_of([r for row in rows for r in row.runs])
    left_out = set(categories_of(ref.runs)) - set(ref_samples)
    for row in rows:
        if row is ref or not row.runs:
            continue
        found = paired_bootstrap(pooled_correctness(row.runs), ref_samples, category_of, resamples)
        if found is not None:
            delta, low, high, samples, tasks = found
            row.difference = Difference(ref.label, delta, low, high, samples, tasks)
    notes = [f"Δ vs {ref.label}: the difference of Mean against {ref.label} ({wanted}) over the test samples both "
             f"scored, seeds pooled (each sample's correctness averaged over a row's seeds), with its paired "
             f"bootstrap 95% interval ({resamples} resamples of each task's samples); an interval that excludes 0 "
             "is a difference beyond the test samples' noise."]
    if left_out:
        notes.append(f"Left out of Δ (scored per split, no per-sample correctness): {', '.join(sorted(left_out))}.")
    return notes


def backbone_row(runs: Sequence[Run], categories: Sequence[str], scorer: str | None) -> Row | None:
    """The backbone alone, from the backbone_results.json the runs carry; None when they carry none or
    several different ones (runs of different backbones)."""
    found = {}
    for run in runs:
        path = run.path / "backbone_results.json"
        if path.is_file():
            found[path.read_text()] = run
    if len(found) != 1:
        return None
    text, run = next(iter(found.items()))
    evaluated = _backbone_eval_dir(run)
    alone = Run(path=evaluated or run.path / "backbone_results.json", results=json.loads(text),
                info={"method": "backbone"})
    scores = alone.category_scores(scorer)
    cells = {c: Stat(scores.get(c)) for c in categories}
    values = [scores[c] for c in categories if c in scores]
    cells[MEAN_COLUMN] = Stat(statistics.fmean(values) if values and len(values) == len(categories) else None)
    loss = _answer_loss(alone)
    return Row(label=BACKBONE_LABEL, group="backbone", source="backbone", cells=cells, n=None,
               trainable_params=0, params_text="0", runs=[alone] if evaluated else [],
               answer_loss=Stat(loss) if finite(loss) else None)


def _backbone_eval_dir(run: Run) -> Path | None:
    """The backbone's own evaluation (per-sample predictions): the copy a committed run carries
    (<run>/backbone_eval, scripts/small_scale.py), else the backbone's cache, where this machine has it."""
    if (run.path / "backbone_eval" / "predictions").is_dir():
        return run.path / "backbone_eval"
    try:
        from lime.pretrain import baseline_dir
        path = baseline_dir(run.config["model"], run.config["data"]) / "backbone_eval"
    except (KeyError, TypeError, ImportError):
        return None
    return path if (path / "predictions").is_dir() else None


def pair_differences(rows: Sequence[Row], pairs: Sequence[tuple[str, str]],
                     resamples: int = RESAMPLES) -> list[tuple[Row, Row, Difference]]:
    """Δ Mean of row A against row B for each (A, B) pair of row groups (e.g. each LiME method against the
    PEFT method it modulates), with the paired-bootstrap interval of the Δ column. A pair naming a group the
    rows lack is a ValueError naming it."""
    ours = {row.group: row for row in rows if row.source == "ours" and row.runs}
    unknown = sorted({g for pair in pairs for g in pair} - set(ours))
    if unknown:
        raise ValueError(f"--pair names rows that are not in the table: {unknown}; rows: {sorted(ours)}")
    category_of = categories_of([run for row in ours.values() for run in row.runs])
    out = []
    for a, b in pairs:
        found = paired_bootstrap(pooled_correctness(ours[a].runs), pooled_correctness(ours[b].runs), category_of,
                                 resamples)
        if found is not None:
            delta, low, high, samples, tasks = found
            out.append((ours[a], ours[b], Difference(ours[b].label, delta, low, high, samples, tasks)))
    return out


def add_statistics(rows: list[Row], runs: Sequence[Run], categories: Sequence[str], scorer: str | None,
                   reference: Mapping[str, Any] | None, backbone: bool = True,
                   resamples: int = RESAMPLES) -> list[str]:
    """The backbone-alone row first (with `backbone`, where the runs carry one), then the differences against
    `reference` (None: none). Changes `rows` in place; returns the notes for the table."""
    notes = []
    alone = backbone_row(runs, categories, scorer) if backbone else None
    if alone is not None:
        rows.insert(0, alone)
        mean = alone.cells[MEAN_COLUMN].mean
        notes.append(f"{BACKBONE_LABEL}: the pretrained tiny backbone before any adapter (one model, no seeds; "
                     f"Mean {mean:.2f})." if finite(mean) else f"{BACKBONE_LABEL}: the pretrained tiny backbone.")
    for row in rows:
        if row.source == "ours":
            row.answer_loss = Stat.of([_answer_loss(run) for run in row.runs])
            row.answer_loss = row.answer_loss if row.answer_loss.mean is not None else None
    if any(row.answer_loss is not None for row in rows):
        notes.append("Answer loss: the teacher-forced loss of the gold answers (nats per answer token, mean over "
                     "categories; lower is better), mean ± std over runs.")
    if reference:
        notes += add_differences(rows, reference, resamples)
    return notes


def _answer_loss(run: Run) -> float:
    value = (((run.results or {}).get("answer_loss") or {}).get("overall") or {}).get("mean_of_categories")
    return value if finite(value) else float("nan")
