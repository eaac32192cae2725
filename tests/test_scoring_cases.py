"""The strict scorer against a table of cases a model really produces.

Every row is (prediction, gold answer, right?). A wrong prediction scored right is a false positive: a
defect, because it inflates every reported number. A right prediction scored wrong is a false negative. The
test lists every disagreement of either kind, so a failure shows the whole damage at once.
"""

from __future__ import annotations

import pickle

import pytest

from lime.scoring import AcceptedAnswers, lenient_score, score_split, strict_score

RIGHT, WRONG = True, False

CASES = [
    # --- option letters, plain and in markdown -------------------------------------------------------------
    ("B", "B", RIGHT),
    ("**B**", "B", RIGHT),
    ("*B*", "B", RIGHT),
    ("`B`", "B", RIGHT),
    ("__B__", "B", RIGHT),
    ("**(B)**", "B", RIGHT),
    ("**B)** a red car", "B", RIGHT),
    ("**Answer:** B", "B", RIGHT),
    ("Answer: **B**", "B", RIGHT),
    ("### B", "B", RIGHT),
    ("**C**", "B", WRONG),
    ("**B** or **C**", "B", WRONG),
    ("The answer is (B).", "B", RIGHT),
    ("Option B", "B", RIGHT),
    ("B or C", "B", WRONG),
    ("A cat", "A", WRONG),  # an article, not option A
    ("B) A cat on a mat", "B", RIGHT),  # an article inside option text is not a second letter
    ("B) I think so", "B", RIGHT),
    # --- multi-line answers --------------------------------------------------------------------------------
    ("B\nbecause it is red", "B", RIGHT),
    ("B\n\nThe car in the picture is red.", "B", RIGHT),
    ("B\nC is wrong", "B", WRONG),  # another option named after the chosen one ...
    ("B\nA is wrong", "B", WRONG),  # ... whichever letter it is
    ("B\nI is wrong", "B", WRONG),
    ("B\nA or C would also fit", "B", WRONG),
    ("B\nnot C", "B", WRONG),
    ("The answer is B.\nA dog would be brown.", "B", RIGHT),  # "A dog": an article
    ("3\nbecause there are three", "3", WRONG),  # a number must be the whole prediction
    ("Paris\nIt is the capital of France", "Paris", WRONG),  # so must a text answer
    # --- numbers with units and words ----------------------------------------------------------------------
    ("10", "10", RIGHT),
    ("10.0", "10", RIGHT),
    ("**10**", "10", RIGHT),
    ("10 not", "10", WRONG),
    ("1995b", "1995", WRONG),
    ("3 or", "3", WRONG),
    ("3 or 4", "3", WRONG),
    ("about 3", "3", WRONG),
    ("3 apples", "3", WRONG),  # an unknown word after a number: not a number
    ("12 kg", "12", RIGHT),
    ("12kg", "12", RIGHT),
    ("12 kilograms", "12 kg", RIGHT),
    ("12 m", "12 kg", WRONG),
    ("5 seconds", "5 s", RIGHT),
    ("$5", "5", RIGHT),
    ("5 dollars", "$5", RIGHT),
    ("1,000", "1000", RIGHT),
    ("1,5", "15", WRONG),
    ("-3", "3", WRONG),
    ("+3", "3", RIGHT),
    ("3.5", "3", WRONG),
    ("The answer is 42.", "42", RIGHT),
    ("2 times", "2", RIGHT),
    # --- percentages ---------------------------------------------------------------------------------------
    ("45%", "45%", RIGHT),
    ("45 %", "45%", RIGHT),
    ("45 percent", "45%", RIGHT),
    ("45", "45%", RIGHT),  # a unit counts only when both sides carry one
    ("0.45", "45%", WRONG),  # percentages are not converted
    ("46%", "45%", WRONG),
    ("45% or 50%", "45%", WRONG),
    # --- number words --------------------------------------------------------------------------------------
    ("two", "2", RIGHT),
    ("Two.", "2", RIGHT),
    ("2", "two", RIGHT),
    ("twelve", "12", RIGHT),
    ("three kg", "3 kg", RIGHT),
    ("three", "2", WRONG),
    ("one of them", "1", WRONG),
    # --- yes / no ------------------------------------------------------------------------------------------
    ("Yes", "yes", RIGHT),
    ("yes.", "yes", RIGHT),
    ("**Yes**", "yes", RIGHT),
    ("No", "yes", WRONG),
    ("yes and no", "yes", WRONG),
    ("yes or no", "no", WRONG),
    ("Answer: no", "no", RIGHT),
    ("not yes", "yes", WRONG),
    # --- option text and free text -------------------------------------------------------------------------
    ("golden retriever", "Golden Retriever", RIGHT),
    ("The golden retriever.", "golden retriever", RIGHT),
    ("retriever", "golden retriever", WRONG),
    ("a golden retriever or a labrador", "golden retriever", WRONG),
    ("red car", "B", WRONG),  # option text without its letter: the scorer does not see the options
    ("B) red car", "red car", WRONG),  # a letter where option text is the answer
    ("**New York**", "New York", RIGHT),
    ("cats", "cat", WRONG),
    ("", "yes", WRONG),
]


def test_the_table_is_large_and_each_case_is_listed_once():
    assert len(CASES) >= 60
    assert len({(p, a) for p, a, _ in CASES}) == len(CASES)


def test_strict_scorer_agrees_with_every_case():
    false_positives = [(p, a) for p, a, right in CASES if not right and strict_score(p, a) == 1.0]
    false_negatives = [(p, a) for p, a, right in CASES if right and strict_score(p, a) == 0.0]
    assert (false_positives, false_negatives) == ([], [])


# --- gold answers that list several accepted strings (any of them is right) ------------------------------


@pytest.mark.parametrize(
    ("prediction", "accepted", "right"),
    [
        ("no", ["no", "nope"], RIGHT),
        ("nope", ["no", "nope"], RIGHT),
        ("yes", ["no", "nope"], WRONG),
        ("2", ["two", "2 apples"], RIGHT),
        ("NYC", ("New York", "NYC"), RIGHT),
        ("no or nope", ["no", "nope"], WRONG),  # naming several accepted answers is not choosing one
    ],
)
def test_any_of_several_accepted_answers(prediction, accepted, right):
    assert strict_score(prediction, accepted) == float(right)
    assert strict_score(prediction, AcceptedAnswers(accepted)) == float(right)


def test_accepted_answers_are_the_first_string_and_survive_pickling():
    answers = AcceptedAnswers(["no", "nope"])
    assert answers == "no" and str(answers) == "no"  # the training target is the first
    copy = pickle.loads(pickle.dumps(answers))
    assert copy.accepted == ("no", "nope") and copy == "no"
    assert score_split(["nope", "yes"], [answers, "yes"])["correct"] == [True, True]
    assert lenient_score("nope!", answers) == 1.0  # the lenient scorer is any-of as well
    with pytest.raises(TypeError, match="string or a non-empty list of strings"):
        strict_score("3", 3)
    with pytest.raises(TypeError, match="non-empty sequence of strings"):
        AcceptedAnswers([])
    with pytest.raises(ValueError, match="several answers"):
        score_split(["1.0", "2.0"], [["1.0", "1.5"], "2.0"], "pearson")
