"""Results files: per-category aggregation, results.json / results.csv, predictions/<split>.jsonl."""

from __future__ import annotations

import csv
import json
import math

import pytest

from lime.results import IncompleteResultsError, aggregate, write_predictions, write_results
from lime.scoring import score_split

# --- aggregation ------------------------------------------------------------------------------------

CATEGORIES = {"Commonsense": ["boolq", "piqa"], "GLUE": ["sst2", "stsb", "cola"]}


def test_aggregate_complete():
    scores = {"boolq": 80.0, "piqa": 70.0, "sst2": 90.0, "stsb": 60.0, "cola": 30.0}
    out = aggregate(scores, CATEGORIES)
    assert out["categories"]["Commonsense"]["score"] == pytest.approx(75.0)
    assert out["categories"]["GLUE"]["score"] == pytest.approx(60.0)
    assert out["overall"]["mean_of_categories"] == pytest.approx(67.5)
    assert out["overall"]["mean_of_tasks"] == pytest.approx(66.0)
    assert out["overall"]["complete"] is True
    assert out["uncategorised"] == []


def test_aggregate_missing_task_is_reported_not_averaged_away():
    scores = {"boolq": 80.0, "piqa": 70.0, "sst2": 90.0, "cola": 30.0, "extra": 1.0}
    out = aggregate(scores, CATEGORIES)
    glue = out["categories"]["GLUE"]
    assert glue["score"] is None
    assert glue["complete"] is False
    assert glue["missing"] == ["stsb"]
    assert glue["mean_of_present_tasks"] == pytest.approx(60.0)
    assert out["categories"]["Commonsense"]["score"] == pytest.approx(75.0)
    assert out["overall"]["mean_of_categories"] is None
    assert out["overall"]["mean_of_tasks"] is None
    assert out["overall"]["missing"] == ["stsb"]
    assert out["uncategorised"] == ["extra"]
    with pytest.raises(IncompleteResultsError, match="stsb"):
        aggregate(scores, CATEGORIES, strict=True)


def test_aggregate_rejects_nan():
    with pytest.raises(ValueError, match="non-finite"):
        aggregate({"boolq": math.nan}, {"C": ["boolq"]})


# --- result files -----------------------------------------------------------------------------------


def _per_task(scorer):
    predictions = {"boolq": ["yes", "", "no", "yes"], "piqa": ["A", "B", "A cat", "C"]}
    answers = {"boolq": ["yes", "no", "no", "no"], "piqa": ["A", "B", "A", "D"]}
    per_task = {t: score_split(predictions[t], answers[t], scorer=scorer) for t in predictions}
    stsb = score_split(["1.0", "2.5", "x", "4.0"], ["1.0", "2.0", "3.0", "4.0"], "pearson", scorer=scorer)
    per_task["stsb"] = {**stsb, "split": "glue_test_stsb"}
    return per_task


def test_write_results_round_trip(tmp_path):
    categories = {"Commonsense": ["boolq", "piqa"], "GLUE": ["stsb"]}
    strict, lenient = _per_task("strict"), _per_task("lenient")
    written = write_results(tmp_path, strict, categories, "strict", other_scorers={"lenient": lenient})

    results = json.loads((tmp_path / "results.json").read_text())
    assert results == written
    assert results["scorer"] == "strict"
    assert results["tasks"]["boolq"] == {
        "split": "boolq", "metric": "accuracy", "score": 50.0, "samples": 4, "failures": 1,
        "num_correct": 2, "category": "Commonsense",
    }
    assert results["tasks"]["piqa"]["score"] == 50.0  # "A cat" is not option A under strict
    assert results["tasks"]["stsb"]["split"] == "glue_test_stsb"
    assert results["tasks"]["stsb"]["failures"] == 1
    assert results["tasks"]["stsb"]["score"] == pytest.approx(strict["stsb"]["score"])
    assert results["categories"]["Commonsense"]["score"] == 50.0
    assert results["categories"]["Commonsense"]["samples"] == 8
    assert results["overall"]["mean_of_categories"] == pytest.approx((50.0 + strict["stsb"]["score"]) / 2)
    assert results["overall"]["mean_of_tasks"] == pytest.approx((50.0 + 50.0 + strict["stsb"]["score"]) / 3)
    assert results["overall"]["samples"] == 12
    assert results["other_scorers"]["lenient"]["tasks"]["boolq"]["score"] == 75.0  # "" counted correct
    assert results["other_scorers"]["lenient"]["tasks"]["piqa"]["score"] == 75.0  # "A cat" counted correct

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {(r["scorer"], r["level"], r["task"] or r["category"] or r["metric"]): r for r in rows}
    assert len(rows) == 2 * (3 + 2 + 2)  # per scorer: 3 tasks, 2 categories, 2 overall rows
    boolq = by_key[("strict", "task", "boolq")]
    assert (boolq["split"], boolq["category"], boolq["metric"]) == ("boolq", "Commonsense", "accuracy")
    assert (float(boolq["score"]), int(boolq["samples"]), int(boolq["failures"])) == (50.0, 4, 1)
    stsb = by_key[("strict", "task", "stsb")]
    assert (stsb["split"], stsb["metric"]) == ("glue_test_stsb", "pearson")
    assert float(stsb["score"]) == results["tasks"]["stsb"]["score"]  # exact: floats round-trip via repr
    assert float(by_key[("strict", "category", "GLUE")]["score"]) == results["categories"]["GLUE"]["score"]
    overall = by_key[("strict", "overall", "mean_of_tasks")]
    assert float(overall["score"]) == results["overall"]["mean_of_tasks"]
    assert float(by_key[("lenient", "task", "boolq")]["score"]) == 75.0


def test_write_results_incomplete_and_bare_scores(tmp_path):
    categories = {"Commonsense": ["boolq", "piqa"]}
    written = write_results(tmp_path, {"boolq": 80.0}, categories, "lenient", sample_counts={"boolq": 10})
    assert "empty prediction" in written["warning"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tasks"]["boolq"]["samples"] == 10
    assert results["categories"]["Commonsense"]["score"] is None
    assert results["categories"]["Commonsense"]["missing"] == ["piqa"]
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    category = next(r for r in rows if r["level"] == "category")
    assert (category["score"], category["missing"]) == ("", "piqa")
    with pytest.raises(ValueError, match="no sample count"):
        write_results(tmp_path, {"boolq": 80.0}, categories, "strict")
    with pytest.raises(ValueError, match="sample_counts says"):
        write_results(tmp_path, {"boolq": {"score": 1.0, "samples": 3}}, categories, "strict", {"boolq": 4})


def test_write_predictions_round_trip(tmp_path):
    rows = [
        {"question": "Is it red?", "answer": "yes", "prediction": "yes", "correct": True, "lenient_correct": True},
        {"question": "Pick one: (A) x (B) y", "answer": "B", "prediction": "", "correct": False,
         "lenient_correct": True},
    ]
    path = write_predictions(tmp_path, "text_test_boolq", rows)
    assert path == tmp_path / "predictions" / "text_test_boolq.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines == rows
    assert list(lines[0]) == ["question", "answer", "prediction", "correct", "lenient_correct"]
    with pytest.raises(ValueError, match="lacks"):
        write_predictions(tmp_path, "x", [{"question": "q"}])
    with pytest.raises(ValueError, match="plain file name"):
        write_predictions(tmp_path, "../x", rows)
