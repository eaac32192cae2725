"""Results files of an evaluation: per-category aggregation, ``results.json`` / ``results.csv`` and
``predictions/<split>.jsonl`` (or ``.jsonl.gz``: committed runs keep theirs compressed, scripts/small_scale.py).

Scores come in from ``lime.scoring`` (strings in, verdicts out); this module only aggregates them and writes
them. Category means are unweighted means of task scores; a category missing a task is never averaged over
fewer tasks (its score is null and its missing tasks are listed).
"""

from __future__ import annotations

import csv
import gzip
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lime.scoring import ACCURACY, LENIENT_WARNING, SCORERS, AcceptedAnswers


class IncompleteResultsError(ValueError):
    """A category (or the overall mean) is missing task scores and the caller asked for strictness."""


# --------------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def aggregate(
    task_scores: Mapping[str, float], categories: Mapping[str, Sequence[str]], strict: bool = False
) -> dict:
    """Per-category unweighted means of task scores and two overall means.

    Returns ``{"categories": {cat: {"score", "mean_of_present_tasks", "tasks", "missing", "complete"}},
    "overall": {"mean_of_categories", "mean_of_tasks", "complete", "missing"}, "uncategorised": [...]}``.
    ``mean_of_categories`` averages the category scores (each category weighs the same);
    ``mean_of_tasks`` averages every categorised task (each task weighs the same).
    A category missing a task gets ``score: None`` -- never a mean over fewer tasks -- and lists the missing
    tasks; ``mean_of_present_tasks`` is there for a caller who decides to use it. Overall means are None
    unless every category is complete. ``strict=True`` raises IncompleteResultsError instead.
    Tasks scored but in no category are listed in ``uncategorised`` and left out of the means."""
    for task, score in task_scores.items():
        if not math.isfinite(score):
            raise ValueError(f"task {task!r} has a non-finite score {score}")
    per_category, missing_all = {}, []
    for name, tasks in categories.items():
        if not tasks:
            raise ValueError(f"category {name!r} has no tasks")
        present = [t for t in tasks if t in task_scores]
        missing = [t for t in tasks if t not in task_scores]
        missing_all += [t for t in missing if t not in missing_all]
        per_category[name] = {
            "score": None if missing else _mean([task_scores[t] for t in tasks]),
            "mean_of_present_tasks": _mean([task_scores[t] for t in present]) if present else None,
            "tasks": list(tasks),
            "missing": missing,
            "complete": not missing,
        }
    if strict and missing_all:
        incomplete = {c: v["missing"] for c, v in per_category.items() if v["missing"]}
        raise IncompleteResultsError(f"missing task scores per category: {incomplete}")
    all_tasks = list(dict.fromkeys(t for tasks in categories.values() for t in tasks))
    complete = not missing_all
    return {
        "categories": per_category,
        "overall": {
            "mean_of_categories": _mean([c["score"] for c in per_category.values()]) if complete else None,
            "mean_of_tasks": _mean([task_scores[t] for t in all_tasks]) if complete else None,
            "complete": complete,
            "missing": missing_all,
        },
        "uncategorised": [t for t in task_scores if t not in all_tasks],
    }


# --------------------------------------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------------------------------------

CSV_FIELDS = (
    "level", "split", "task", "category", "metric", "score", "samples", "failures", "missing", "scorer"
)
_EXTRA_TASK_KEYS = ("pearson", "spearman", "num_correct", "fallback", "degenerate")


def _task_entry(task: str, value: float | Mapping, sample_counts: Mapping[str, int]) -> dict:
    """One task's record from either a bare score or a ``score_split`` dict (+ ``sample_counts``)."""
    info = dict(value) if isinstance(value, Mapping) else {"score": value}
    samples = info.get("samples", sample_counts.get(task))
    if samples is None:
        raise ValueError(f"no sample count for task {task!r}: pass it in sample_counts or the score dict")
    if task in sample_counts and sample_counts[task] != samples:
        raise ValueError(f"task {task!r}: sample_counts says {sample_counts[task]}, the score dict {samples}")
    entry = {
        "split": info.get("split", task),
        "metric": info.get("metric", ACCURACY),
        "score": float(info["score"]),
        "samples": int(samples),
        "failures": int(info.get("failures", 0)),
    }
    entry.update({k: info[k] for k in _EXTRA_TASK_KEYS if k in info})
    return entry


def _scorer_block(per_task: Mapping, categories: Mapping[str, Sequence[str]], sample_counts: Mapping) -> dict:
    tasks = {task: _task_entry(task, value, sample_counts) for task, value in per_task.items()}
    summary = aggregate({t: e["score"] for t, e in tasks.items()}, categories)
    for task, entry in tasks.items():
        entry["category"] = ";".join(c for c, members in categories.items() if task in members)
    for cat in summary["categories"].values():
        cat["samples"] = sum(tasks[t]["samples"] for t in cat["tasks"] if t in tasks)
    summary["overall"]["samples"] = sum(e["samples"] for e in tasks.values())
    return {"tasks": tasks, **summary}


def _csv_rows(block: dict, scorer: str) -> list[dict]:
    rows = [
        {"level": "task", "task": task, "scorer": scorer, "missing": "",
         **{k: e[k] for k in ("split", "category", "metric", "score", "samples", "failures")}}
        for task, e in block["tasks"].items()
    ]
    for name, cat in block["categories"].items():
        rows.append({"level": "category", "category": name, "metric": "mean_of_tasks", "score": cat["score"],
                     "samples": cat["samples"], "missing": ";".join(cat["missing"]), "scorer": scorer})
    overall = block["overall"]
    for metric in ("mean_of_categories", "mean_of_tasks"):
        rows.append({"level": "overall", "metric": metric, "score": overall[metric], "scorer": scorer,
                     "samples": overall["samples"], "missing": ";".join(overall["missing"])})
    return rows


def write_results(
    run_dir: str | Path,
    per_task: Mapping[str, float | Mapping],
    categories: Mapping[str, Sequence[str]],
    scorer: str,
    sample_counts: Mapping[str, int] | None = None,
    other_scorers: Mapping[str, Mapping[str, float | Mapping]] | None = None,
) -> dict:
    """Write ``results.json`` and ``results.csv`` into ``run_dir``; return what was written to the JSON.

    ``per_task`` maps a task to its score or to its ``score_split`` dict (which carries samples, failures,
    metric and, optionally, ``split``). ``other_scorers`` (e.g. ``{"lenient": per_task_lenient}``) adds the
    same tables under ``results.json["other_scorers"]`` and as extra CSV rows with their scorer name.
    Incomplete categories are written with a null score (empty in the CSV) and their missing tasks."""
    for name in (scorer, *(other_scorers or {})):
        if name not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {name!r}")
    sample_counts = sample_counts or {}
    results = {"scorer": scorer, **_scorer_block(per_task, categories, sample_counts)}
    if scorer == "lenient":
        results["warning"] = LENIENT_WARNING
    rows = _csv_rows(results, scorer)
    if other_scorers:
        results["other_scorers"] = {}
        for name, scores in other_scorers.items():
            results["other_scorers"][name] = _scorer_block(scores, categories, sample_counts)
            rows += _csv_rows(results["other_scorers"][name], name)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN would make the file invalid JSON for other readers; aggregate already refuses it.
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return results


PREDICTION_FIELDS = ("question", "answer", "prediction", "correct")


def _answer_record(answer: Any) -> Any:
    """A gold answer as the predictions file shows it: its accepted strings as a list when there are several."""
    return list(answer.accepted) if isinstance(answer, AcceptedAnswers) else answer


def write_predictions(run_dir: str | Path, split: str, rows: Iterable[Mapping]) -> Path:
    """Write ``predictions/<split>.jsonl``: one JSON object per sample with question, answer, prediction,
    correct first (all required), then any extra keys the caller added (e.g. ``lenient_correct``)."""
    if not split or "/" in split or "\\" in split or split.startswith("."):
        raise ValueError(f"split name must be a plain file name, got {split!r}")
    path = Path(run_dir) / "predictions" / f"{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            missing = [k for k in PREDICTION_FIELDS if k not in row]
            if missing:
                raise ValueError(f"prediction row {i} of {split} lacks {missing}")
            extra = {k: v for k, v in row.items() if k not in PREDICTION_FIELDS}
            record = {k: row[k] for k in PREDICTION_FIELDS} | extra
            record["answer"] = _answer_record(record["answer"])
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def prediction_files(predictions_dir: str | Path) -> list[Path]:
    """The ``<split>.jsonl`` and ``<split>.jsonl.gz`` files of a predictions folder, sorted by split."""
    folder = Path(predictions_dir)
    return sorted([*folder.glob("*.jsonl"), *folder.glob("*.jsonl.gz")], key=lambda p: p.name)


def prediction_split(path: Path) -> str:
    """The split a predictions file holds: its name less ``.jsonl`` or ``.jsonl.gz``."""
    return path.name.removesuffix(".gz").removesuffix(".jsonl")


def read_predictions(path: str | Path) -> list[dict]:
    """The rows of a predictions file, plain or gzipped."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def compress_predictions(predictions_dir: str | Path) -> None:
    """Gzip every ``<split>.jsonl`` in place, byte-reproducibly (no time stamp in the gzip header), so that a
    rerun of a committed run writes the same bytes."""
    for path in Path(predictions_dir).glob("*.jsonl"):
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes(), mtime=0))
        path.unlink()
