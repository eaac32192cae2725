"""Scoring: strict vs lenient per sample, split scores, correlations."""

from __future__ import annotations

import numpy as np
import pytest

from lime.scoring import (
    REGRESSION_FALLBACK,
    MetricSpec,
    as_metric,
    extract_choice,
    lenient_score,
    normalize,
    parse_number,
    pearson,
    score_both,
    score_split,
    spearman,
    strict_score,
)

# --- normalisation / exact match ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat.", "cat"),
        ("  a  big   dog ", "big dog"),
        ("Yes!", "yes"),
        ("(Paris)", "paris"),
        ("St. Louis", "st. louis"),  # inner punctuation is kept
        ("two", "2"),
        ("the", "the"),  # an answer made only of an article is kept, not emptied
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("Yes.", "yes"),
        ("  NEW   york ", "New York"),
        ("the golden retriever", "Golden Retriever"),
        ("Answer: yes", "yes"),
        ("The answer is blue.", "blue"),
        ("answer1", "answer1"),  # a label that starts with "answer" is not a prefix
    ],
)
def test_strict_exact_match_after_normalisation(prediction, answer):
    assert strict_score(prediction, answer) == 1.0


@pytest.mark.parametrize(("prediction", "answer"), [("no", "yes"), ("dog", "cat"), ("answer2", "answer1")])
def test_strict_exact_match_rejects_different_answers(prediction, answer):
    assert strict_score(prediction, answer) == 0.0


# --- multiple-choice letters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction",
    [
        "B", "b", "B.", "(B)", "B) a red car", "B. a red car", "(B) A dog", "B: text", "Answer: B",
        "The answer is B", "The correct answer is (B).", "Option B", "B\nbecause it is red",
    ],
)
def test_letter_extraction_positives(prediction):
    assert extract_choice(prediction) == "B"
    assert strict_score(prediction, "B") == 1.0
    assert strict_score(prediction, "(B)") == 1.0  # the gold letter may carry the same decorations


@pytest.mark.parametrize(
    "prediction",
    [
        "B or C",  # several letters
        "B, C",
        "B and C",
        "B) x (C) y",
        "B\nnot C",
        "(B) or (C)",
        "Bus",  # the letter inside a word
        "Bob",
        "b) bus (D)",  # a second letter after the option text
        "I think B",  # does not start with the choice
        "",
    ],
)
def test_letter_extraction_negatives(prediction):
    assert strict_score(prediction, "B") == 0.0


def test_letter_extraction_returns_the_letter_or_none():
    assert extract_choice("c) something") == "C"
    assert extract_choice("B or C") is None
    assert extract_choice("Bus") is None
    assert extract_choice("J.") == "J"
    assert extract_choice("K") is None  # only A-J are option letters


def test_article_a_is_not_option_a():
    # Strict reads "A cat" as a sentence beginning with an article, not as a commitment to option A; a
    # letter followed by option text needs a marker ("A)", "A.", "(A)").
    assert strict_score("A cat", "A") == 0.0
    assert strict_score("A", "A") == 1.0
    assert strict_score("A) a cat", "A") == 1.0
    assert strict_score("(A) A cat", "A") == 1.0
    # ... and an article inside option text does not count as a second letter.
    assert strict_score("B) A cat on a mat", "B") == 1.0
    # The lenient scorer accepts "A cat" for "A" -- and for every other answer that is a substring of it.
    assert lenient_score("A cat", "A") == 1.0
    assert lenient_score("A cat", "C") == 1.0


def test_wrong_letter_is_wrong():
    assert strict_score("C", "B") == 0.0
    assert strict_score("(C) blue", "B") == 0.0


# --- numbers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3", (3.0, "")),
        ("3.0", (3.0, "")),
        ("-2.5", (-2.5, "")),
        ("1,000", (1000.0, "")),
        ("$5", (5.0, "$")),  # a currency is a unit: "$5" == "5 dollars" == "5", "$5" != "5 euros"
        ("45%", (45.0, "%")),
        ("12 kg", (12.0, "kg")),
        ("two", (2.0, "")),
        ("Answer: 12.", (12.0, "")),
        ("12 or 13", None),
        ("about 12", None),
        ("1,5", None),  # not a thousands separator: not a number
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("3", "3.0", 1.0),
        ("3.0", "3", 1.0),
        ("12", "13", 0.0),
        ("1,000", "1000", 1.0),
        ("45%", "45", 1.0),
        ("45 %", "45%", 1.0),
        ("45 kg", "45 m", 0.0),  # both carry a unit and they differ
        ("2", "two", 1.0),
        ("12 or 13", "12", 0.0),
        ("-3", "3", 0.0),
    ],
)
def test_numeric_exact(prediction, answer, expected):
    assert strict_score(prediction, answer) == expected


def test_numeric_tolerances():
    relative = MetricSpec(rel_tol=0.05)
    assert strict_score("104", "100", relative) == 1.0
    assert strict_score("96", "100", relative) == 1.0
    assert strict_score("106", "100", relative) == 0.0
    absolute = MetricSpec(abs_tol=0.5)
    assert strict_score("2.4", "2", absolute) == 1.0
    assert strict_score("2.6", "2", absolute) == 0.0
    assert strict_score("2.4", "2") == 0.0  # default tolerance is zero


def test_metric_specs():
    assert as_metric(None) == MetricSpec("accuracy", 0.0, 0.0)
    assert as_metric("pearson") == MetricSpec("pearson")
    assert as_metric("choice") == MetricSpec()
    # entries of the data taxonomy (configs/data/taxonomy/*.yaml)
    assert as_metric({"metric": "numeric", "rel_tolerance": 0.05}) == MetricSpec(rel_tol=0.05)
    assert as_metric({"metric": "numeric", "tolerance": 0.5, "chance": 0.1}) == MetricSpec(abs_tol=0.5)
    assert as_metric({"metric": "pearson"}) == MetricSpec("pearson")
    with pytest.raises(ValueError, match="metric name"):
        MetricSpec("f1")
    with pytest.raises(ValueError, match="split-level"):
        strict_score("3", "3", "pearson")


# --- empty predictions and substrings: where strict and lenient disagree ------------------------------


@pytest.mark.parametrize("answer", ["yes", "B", "3", "golden retriever"])
def test_empty_prediction_strict_wrong_lenient_right(answer):
    for empty in ("", "   ", "\n"):
        assert strict_score(empty, answer) == 0.0
        assert lenient_score(empty, answer) == 1.0


def test_failed_generation_is_wrong_in_both_scorers():
    assert strict_score(None, "yes") == 0.0
    assert lenient_score(None, "yes") == 0.0


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [("cat", "cats"), ("cats", "cat"), ("yes and no", "yes"), ("yes", "yes and no"), ("A B C D", "C")],
)
def test_substrings_strict_wrong_lenient_right(prediction, answer):
    assert strict_score(prediction, answer) == 0.0
    assert lenient_score(prediction, answer) == 1.0


def test_lenient_normalises_case_and_whitespace_only():
    assert lenient_score("  YES ", "yes") == 1.0
    assert lenient_score("dog", "cat") == 0.0


# --- split scores ------------------------------------------------------------------------------------


def test_score_split_accuracy_strict_and_lenient():
    predictions = ["yes", "", "cats", "B", None]
    answers = ["yes", "no", "cat", "B", "no"]
    strict = score_split(predictions, answers)
    assert strict["scorer"] == "strict"
    assert strict["score"] == pytest.approx(40.0)
    assert strict["samples"] == 5
    assert strict["num_correct"] == 2
    assert strict["failures"] == 2  # the empty prediction and the failed one
    assert strict["correct"] == [True, False, False, True, False]
    both = score_both(predictions, answers)
    assert both["strict"]["score"] == pytest.approx(40.0)
    assert both["lenient"]["score"] == pytest.approx(80.0)  # "" and "cats" count as correct
    assert both["lenient"]["correct"] == [True, True, True, True, False]


def test_score_split_rejects_bad_input():
    with pytest.raises(ValueError, match="predictions for"):
        score_split(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="empty split"):
        score_split([], [])
    with pytest.raises(ValueError, match="scorer"):
        score_split(["a"], ["a"], scorer="fuzzy")


# --- regression -------------------------------------------------------------------------------------


def _reference_ranks(xs):
    # Average rank by counting: rank = (number smaller) + (number equal + 1) / 2.
    return [sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs]


def test_pearson_spearman_match_numpy():
    xs = [0.5, 2.0, 3.5, 1.0, 4.8, 2.0, 3.0]
    ys = [0.0, 1.8, 4.0, 1.5, 5.0, 2.5, 2.5]
    assert pearson(xs, ys) == pytest.approx(np.corrcoef(xs, ys)[0, 1], abs=1e-12)
    expected_rho = np.corrcoef(_reference_ranks(xs), _reference_ranks(ys))[0, 1]
    assert spearman(xs, ys) == pytest.approx(expected_rho, abs=1e-12)
    assert pearson([1.0, 1.0], [1.0, 2.0]) is None
    assert pearson([1.0], [1.0]) is None


def test_score_split_regression():
    answers = ["0.0", "1.8", "4.0", "1.5", "5.0", "2.5", "2.5"]
    predictions = ["0.5", "2", "3.5", "1.0", "4.8", "2.0", "3"]
    result = score_split(predictions, answers, "pearson")
    gold = [float(a) for a in answers]
    values = [float(p) for p in predictions]
    assert result["score"] == pytest.approx(100 * np.corrcoef(values, gold)[0, 1])
    assert result["pearson"] == result["score"]
    assert result["spearman"] == pytest.approx(
        100 * np.corrcoef(_reference_ranks(values), _reference_ranks(gold))[0, 1]
    )
    assert result["samples"] == 7
    assert result["failures"] == 0
    assert score_split(predictions, answers, "spearman")["score"] == result["spearman"]
    # Same under both scorers.
    assert score_split(predictions, answers, "pearson", scorer="lenient")["score"] == result["score"]


def test_regression_unparseable_prediction_is_kept_and_counted():
    answers = ["0.0", "1.0", "2.0", "3.0", "4.0"]
    predictions = ["0.2", "about one", "2.1", "", "3.9"]
    result = score_split(predictions, answers, "pearson")
    assert result["failures"] == 2
    assert result["samples"] == 5
    assert result["fallback"] == REGRESSION_FALLBACK == 0.0
    expected = np.corrcoef([0.2, 0.0, 2.1, 0.0, 3.9], [0.0, 1.0, 2.0, 3.0, 4.0])[0, 1]
    assert result["score"] == pytest.approx(100 * expected)
    assert result["degenerate"] is False


def test_regression_all_failures_is_degenerate_zero():
    result = score_split(["?", "?", "?"], ["1.0", "2.0", "3.0"], "pearson")
    assert result["score"] == 0.0
    assert result["failures"] == 3
    assert result["degenerate"] is True
    with pytest.raises(ValueError, match="not a number"):
        score_split(["1"], ["high"], "pearson")
