"""Scoring MMT-47 predictions, strings in and verdicts out: a strict scorer (the default), a lenient one, and
split-level scores (accuracy, Pearson / Spearman). Aggregation and result files: ``lime.results``.

Two scorers, both plain functions ``(prediction, answer, metric) -> float`` (1.0 right, 0.0 wrong):

* ``strict_score`` (THE DEFAULT). Checked in this order:
    1. a missing (``None``, a failed generation) or empty prediction is wrong;
    2. an answer that is a single option letter A-J ("B", "(B)", "B.") -> multiple-choice letter extraction
       (``extract_choice``);
    3. an answer that parses as a number ("3", "1,000", "45%", "two") -> numbers compared with the task's
       tolerance (``MetricSpec.abs_tol`` / ``rel_tol``); units are ignored unless both sides carry one, and
       only known units count as units: "10 not", "3 or" and "1995b" are not numbers, so they are wrong;
    4. anything else -> exact match after ``normalize``. Substrings are never accepted.
  Markdown marks ("**B**", "`12`") and a leading "Answer:" / "The (correct) answer is" are removed from the
  prediction first. Multi-line predictions: a letter on the first line commits to it (the rest must not name
  another option); a number or a text answer must be the whole prediction.
  A gold answer may list several accepted strings (``AcceptedAnswers`` or a list): right if any one matches.

* ``lenient_score`` -- REFERENCE MODE ONLY, NEVER THE DEFAULT. Mimics the authors' released scorer: lowercase
  and strip both strings, then count the prediction correct if ``pred == answer or pred in answer or answer
  in pred``. Consequences, reproduced on purpose so both numbers can be reported side by side: an EMPTY
  prediction is counted CORRECT ("" is a substring of every answer), "cat" matches "cats", "yes" matches
  "yes and no", and a prediction that lists every option letter matches any letter answer. (The released
  normalisation is approximated as lowercase + strip.) A ``None`` prediction (failed generation) is wrong in
  both scorers: the released code never saw one, and counting it correct would hide the failure.

Scores of a split are percentages (0-100), so accuracy and STS-B's Pearson x 100 share one scale. The
regression metrics (``pearson`` / ``spearman``) are computed over the whole split and are the same under both
scorers; an unparseable regression prediction is kept, counted in ``failures``, and scored as
``REGRESSION_FALLBACK`` (see ``score_regression``).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SCORERS = ("strict", "lenient")
ACCURACY = "accuracy"
REGRESSION_METRICS = ("pearson", "spearman")

# An unparseable STS-B prediction becomes 0.0, the bottom of the 0-5 similarity scale. Keeping the sample
# (rather than dropping it) means a model cannot raise its correlation by refusing to answer hard pairs;
# every such sample is counted in ``failures`` so the number is visible next to the score.
REGRESSION_FALLBACK = 0.0

LENIENT_WARNING = (
    "lenient scorer (reference mode, like the released code): substring match in both directions; "
    "an empty prediction counts as correct. Not the default; report the strict score next to it."
)


@dataclass(frozen=True)
class MetricSpec:
    """How one task is scored.

    ``name``: "accuracy" (per-sample, strict or lenient) or "pearson" / "spearman" (over the split).
    ``abs_tol`` / ``rel_tol``: numeric answers match when ``math.isclose(pred, answer, rel_tol, abs_tol)``;
    both 0 means numerically equal ("3" == "3.0", "12" != "13").
    """

    name: str = ACCURACY
    abs_tol: float = 0.0
    rel_tol: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in (ACCURACY, *REGRESSION_METRICS):
            names = (ACCURACY, *REGRESSION_METRICS)
            raise ValueError(f"metric name must be one of {names}, got {self.name!r}")
        if self.abs_tol < 0 or self.rel_tol < 0:
            raise ValueError(f"metric tolerances must be >= 0, got {self.abs_tol=}, {self.rel_tol=}")


MetricLike = MetricSpec | str | Mapping | None

def as_metric(metric: MetricLike) -> MetricSpec:
    """A MetricSpec from a spec, a name, None (accuracy), or a task's entry of the data taxonomy.

    Taxonomy entries (configs/data/taxonomy/*.yaml) look like {metric: exact|choice|numeric|pearson|spearman,
    tolerance: 0.5, rel_tolerance: 0.05}. exact, choice and numeric are all per-sample accuracy here: the
    strict scorer picks letter extraction or numeric comparison from the form of the gold answer.
    """
    if metric is None:
        return MetricSpec()
    if isinstance(metric, MetricSpec):
        return metric
    if isinstance(metric, str):
        return MetricSpec(metric if metric in REGRESSION_METRICS else ACCURACY)
    values = dict(metric)
    name = values.get("metric", ACCURACY)
    return MetricSpec(name if name in REGRESSION_METRICS else ACCURACY,
                      abs_tol=float(values.get("tolerance", 0.0)), rel_tol=float(values.get("rel_tolerance", 0.0)))


# --------------------------------------------------------------------------------------------------------
# Normalisation and parsing
# --------------------------------------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})
# VQA's normalisation maps number words to digits so "two" and "2" compare equal; zero..ten is what it covers.
_NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
}
_EDGE_CHARS = string.punctuation + string.whitespace
# "Answer: x", "The answer is x", "the correct answer is: x". "is" or ":" is required so that answers such
# as "answer1" (a label, not a prefix) survive.
_ANSWER_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:correct\s+|final\s+|best\s+)?answer\s*(?:is\b\s*:?|:)\s*", re.I
)


# Markdown emphasis and code marks ("**B**", "`12`", "__yes__") and heading marks ("### B") carry no answer.
_MARKDOWN = re.compile(r"\*+|`+|(?<!\w)_+|_+(?!\w)|^\s*#+\s*", re.M)


def strip_markdown(text: str) -> str:
    """Remove markdown emphasis, code and heading marks: "**(B)** red" -> "(B) red"."""
    return _MARKDOWN.sub("", text)


def strip_answer_prefix(text: str) -> str:
    """Remove one leading "Answer:" / "The (correct) answer is" phrase."""
    return _ANSWER_PREFIX.sub("", text, count=1).strip()


def normalize(text: str) -> str:
    """Strict normalisation: lowercase; strip surrounding whitespace and punctuation; number words zero..ten
    -> digits; drop the articles a/an/the (unless nothing else is left, so "the" still equals "the");
    collapse runs of whitespace. Punctuation inside the text is kept ("st. louis", "don't")."""
    words = text.lower().strip(_EDGE_CHARS).split()
    words = [_NUMBER_WORDS.get(w, w) for w in words]
    kept = [w for w in words if w not in _ARTICLES]
    return " ".join(kept or words)


# Parsing only (not `normalize`): number words up to twenty, so "twelve" is 12 as a numeric answer.
_PARSE_NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
    )
}
_LEADING_NUMBER_WORD = re.compile(rf"^({'|'.join(_PARSE_NUMBER_WORDS)})\b")
# The units a number may carry. Only these: a trailing word that is not a unit ("10 not", "3 or", "1995b")
# makes the text something other than a number, so it is never read as one. Spellings of one unit map to
# one name ("percent" -> "%"), so "45 percent" and "45%" compare equal.
_UNIT_NAMES = {
    "%": ("%", "percent", "per cent", "pct"),
    "°": ("°", "deg", "degree", "degrees"),
    "°c": ("°c", "celsius"), "°f": ("°f", "fahrenheit"),
    "mg": ("mg",), "g": ("g", "gram", "grams"), "kg": ("kg", "kgs", "kilogram", "kilograms"),
    "lb": ("lb", "lbs", "pound", "pounds"),
    "mm": ("mm",), "cm": ("cm",), "m": ("m", "meter", "meters", "metre", "metres"),
    "km": ("km", "kilometer", "kilometers", "kilometre", "kilometres"), "mi": ("mi", "mile", "miles"),
    "ft": ("ft", "foot", "feet"), "inch": ("inch", "inches"),
    "s": ("s", "sec", "secs", "second", "seconds"), "min": ("min", "mins", "minute", "minutes"),
    "h": ("h", "hr", "hrs", "hour", "hours"), "day": ("day", "days"), "week": ("week", "weeks"),
    "month": ("month", "months"), "year": ("year", "years", "yr", "yrs"),
    "$": ("dollar", "dollars", "usd"), "€": ("euro", "euros", "eur"), "x": ("x", "times"),
}
_UNITS = {spelling: name for name, spellings in _UNIT_NAMES.items() for spelling in spellings}
_UNIT_PATTERN = "|".join(sorted(map(re.escape, _UNITS), key=len, reverse=True))
# A number: optional sign and currency sign, digits with optional thousands separators, optional decimals,
# then at most one unit from the list above.
_NUMBER = re.compile(
    r"(?P<sign>[-+]?)(?P<currency>[$€£]?)(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    rf"(?:\s*(?P<unit>{_UNIT_PATTERN}))?"
)
_CURRENCY = {"$": "$", "€": "€", "£": "£"}


def parse_number(text: str) -> tuple[float, str] | None:
    """Parse "3", "-2.5", "1,000", "$5", "45%", "45 percent", "12 kg", "two", "twelve" -> (value, unit);
    anything else -> None.

    The whole string (after markdown, an answer prefix and trailing sentence punctuation) must be the number,
    so "12 or 13", "about 12", "10 not" and "1995b" are not numbers: the only words allowed after the
    number are units (``_UNITS``). Percent is not converted: "45%" is (45.0, "%")."""
    s = strip_answer_prefix(strip_markdown(text)).lower().strip(" \t\n\"'").rstrip(".,;:!?")
    s = _LEADING_NUMBER_WORD.sub(lambda m: _PARSE_NUMBER_WORDS[m[1]], s)
    m = _NUMBER.fullmatch(s)
    if m is None:
        return None
    value = float(m["num"].replace(",", ""))
    unit = _UNITS[m["unit"]] if m["unit"] else _CURRENCY.get(m["currency"], "")
    return (-value if m["sign"] == "-" else value), unit


# --------------------------------------------------------------------------------------------------------
# Multiple-choice letters
# --------------------------------------------------------------------------------------------------------

_LETTER_ANSWER = re.compile(r"\(?([A-J])\)?[.:)]?", re.I)
# Before a choice: "Answer: B", "The answer is B", "The correct option is (B)", "Option B", "Choice: B".
_CHOICE_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:correct\s+|right\s+|best\s+|final\s+)?(?:answer|option|choice)\b\s*(?:is\b)?\s*:?\s*",
    re.I,
)
# A letter followed by option text needs a marker -- "B) text", "B. text", "B: text", "(B) text" -- so the
# article in "A cat" is never read as option A.
_LETTER_WITH_TEXT = re.compile(r"(?:\(([A-J])\)[.:]?|([A-J])[.:)])\s+(\S.*)", re.I | re.S)
# Any other option letter mentioned after the chosen one ("B) not C", "B\n(C) is also possible") makes the
# prediction ambiguous: "(C)" or a standalone uppercase B-J. "A" and "I" followed by a lowercase word are
# English words ("B) A dog", "B) I think"), not options -- unless that word is one that talks about an
# option ("A is wrong", "A or B", "I would also work"): then they are letters like any other, so
# "B\nA is wrong" and "B\nC is wrong" are treated alike. Lowercase letters never count.
_OPTION_TALK = r"(?:is|isn't|was|wasn't|are|and|or|nor|would|could|can|might|may|also|too|seems|looks|fits)\b"
_OTHER_LETTER = re.compile(
    rf"(?<![\w'])(?:\(([A-J])\)|([B-HJ])(?![\w'])|([AI])(?![\w'])(?!\s+(?!{_OPTION_TALK})[a-z]))"
)


def answer_letter(answer: str) -> str | None:
    """The option letter when the gold answer is a single letter A-J ("B", "(B)", "b."), else None."""
    m = _LETTER_ANSWER.fullmatch(answer.strip())
    return m[1].upper() if m else None


def extract_choice(prediction: str) -> str | None:
    """The single option letter a prediction commits to, or None.

    Accepted: "B", "b", "B.", "(B)", "B) text", "B. text", "(B) text", "Answer: B", "The answer is (B).",
    "Option B", and a first line that is just the letter ("B\\nbecause ..."). Rejected (None): a bare letter
    followed by words ("A cat" -- an article, not option A), a letter inside a word ("Bus"), several
    letters ("B or C", "B, C", "B) x (C) y", "B\\nnot C", "B\\nA is wrong"), and anything not starting
    with the letter. Markdown marks are ignored ("**B**", "**(B)** text").
    Strict errs towards "wrong": option text that itself contains a standalone capital B-J ("B) Vitamin D")
    is rejected, and a prediction giving only the option text (no letter) is wrong, since the scorer does
    not see the options.
    """
    text = _CHOICE_PREFIX.sub("", strip_markdown(prediction).strip(), count=1).strip()
    first_line, _, rest = text.partition("\n")
    m = _LETTER_ANSWER.fullmatch(first_line.strip())
    if m:
        letter = m[1]
    else:
        m = _LETTER_WITH_TEXT.fullmatch(text)
        if m is None:
            return None
        letter, rest = m[1] or m[2], m[3]
    letter = letter.upper()
    others = {"".join(groups) for groups in _OTHER_LETTER.findall(rest)} - {letter}
    return None if others else letter


# --------------------------------------------------------------------------------------------------------
# Per-sample scorers
# --------------------------------------------------------------------------------------------------------


def _numbers_match(pred: tuple[float, str], gold: tuple[float, str], metric: MetricSpec) -> bool:
    (p, p_unit), (g, g_unit) = pred, gold
    if p_unit and g_unit and p_unit != g_unit:
        return False
    return math.isclose(p, g, rel_tol=metric.rel_tol, abs_tol=metric.abs_tol)


GoldAnswer = str | Sequence[str]


class AcceptedAnswers(str):
    """A gold answer with several accepted strings (a dataset row whose answer is a list).

    As a ``str`` it is the first accepted string: the training target. The scorers count a prediction right
    when it matches any of ``accepted``. Built by ``lime.data.mmt47.answer_value``; pickles (DataLoader workers).
    """

    accepted: tuple[str, ...]

    def __new__(cls, accepted: Sequence[str]) -> AcceptedAnswers:
        accepted = tuple(accepted)
        if not accepted or not all(isinstance(a, str) for a in accepted):
            raise TypeError(f"accepted answers must be a non-empty sequence of strings, got {accepted!r}")
        answers = super().__new__(cls, accepted[0])
        answers.accepted = accepted
        return answers

    def __getnewargs__(self) -> tuple[tuple[str, ...]]:
        return (self.accepted,)

    def __repr__(self) -> str:
        return f"AcceptedAnswers({list(self.accepted)!r})"


def accepted_answers(answer: GoldAnswer) -> tuple[str, ...]:
    """Every accepted string of a gold answer: a string, a list / tuple of strings, or ``AcceptedAnswers``."""
    if isinstance(answer, AcceptedAnswers):
        return answer.accepted
    if isinstance(answer, str):
        return (answer,)
    if isinstance(answer, list | tuple) and answer and all(isinstance(a, str) for a in answer):
        return tuple(answer)
    raise TypeError(f"a gold answer is a string or a non-empty list of strings, got {answer!r}")


def _strict_one(prediction: str, answer: str, metric: MetricSpec) -> bool:
    letter = answer_letter(answer)
    if letter is not None:
        return extract_choice(prediction) == letter
    gold = parse_number(answer)
    if gold is not None:
        pred = parse_number(prediction)
        return pred is not None and _numbers_match(pred, gold, metric)
    pred_text = normalize(strip_answer_prefix(strip_markdown(prediction)))
    return bool(pred_text) and pred_text == normalize(answer)


def _accuracy_metric(metric: MetricLike) -> MetricSpec:
    metric = as_metric(metric)
    if metric.name != ACCURACY:
        raise ValueError(f"{metric.name} is a split-level metric; use score_split")
    return metric


def strict_score(prediction: str | None, answer: GoldAnswer, metric: MetricLike = None) -> float:
    """1.0 if the prediction is right under the strict rules (module docstring) for any accepted answer."""
    metric = _accuracy_metric(metric)
    if prediction is None or not prediction.strip():
        return 0.0
    return float(any(_strict_one(prediction, gold, metric) for gold in accepted_answers(answer)))


def lenient_score(prediction: str | None, answer: GoldAnswer, metric: MetricLike = None) -> float:
    """REFERENCE MODE, never the default: the released scorer's rule. Lowercase + strip, then correct if
    ``pred == answer or pred in answer or answer in pred`` (for any accepted answer) -- so an empty prediction
    counts as correct. ``None`` (a failed generation, which the released code never saw) is wrong."""
    _accuracy_metric(metric)
    if prediction is None:
        return 0.0
    pred = prediction.strip().lower()
    golds = [gold.strip().lower() for gold in accepted_answers(answer)]
    return float(any(pred == gold or pred in gold or gold in pred for gold in golds))


_SAMPLE_SCORERS = {"strict": strict_score, "lenient": lenient_score}


# --------------------------------------------------------------------------------------------------------
# Split-level scores
# --------------------------------------------------------------------------------------------------------


def _ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (what Spearman's rho needs)."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r, or None when undefined (fewer than 2 samples or a constant side)."""
    n = len(xs)
    if n != len(ys):
        raise ValueError(f"pearson needs equal lengths, got {n} and {len(ys)}")
    if n < 2:
        return None
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    syy = math.fsum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(_ranks(xs), _ranks(ys))


def score_regression(predictions: Sequence[str | None], answers: Sequence[GoldAnswer], metric: MetricLike) -> dict:
    """Pearson and Spearman x 100 over a split (STS-B). The same under both scorers.

    An unparseable prediction (or ``None``) is kept as ``REGRESSION_FALLBACK`` and counted in ``failures``.
    An undefined correlation (constant predictions, e.g. every one failed) scores 0.0 -- no linear or rank
    information -- and is flagged with ``degenerate: True``. An unparseable gold answer is a data error."""
    metric = as_metric(metric)
    gold = []
    for i, answer in enumerate(answers):
        accepted = accepted_answers(answer)
        if len(accepted) > 1:
            raise ValueError(f"regression answer {i} lists several answers {list(accepted)}; it needs one number")
        parsed = parse_number(accepted[0])
        if parsed is None:
            raise ValueError(f"regression answer {i} is not a number: {answer!r}")
        gold.append(parsed[0])
    values, failures = [], 0
    for prediction in predictions:
        parsed = None if prediction is None else parse_number(prediction)
        failures += parsed is None
        values.append(REGRESSION_FALLBACK if parsed is None else parsed[0])
    r, rho = pearson(values, gold), spearman(values, gold)
    pearson_100 = 0.0 if r is None else 100 * r
    spearman_100 = 0.0 if rho is None else 100 * rho
    return {
        "metric": metric.name,
        "score": pearson_100 if metric.name == "pearson" else spearman_100,
        "pearson": pearson_100,
        "spearman": spearman_100,
        "samples": len(values),
        "failures": failures,
        "fallback": REGRESSION_FALLBACK,
        "degenerate": r is None or rho is None,
        "correct": None,
    }


def score_split(
    predictions: Sequence[str | None],
    answers: Sequence[GoldAnswer],
    metric: MetricLike = None,
    scorer: str = "strict",
) -> dict:
    """Score one split. Returns a dict with ``score`` (0-100), ``samples``, ``failures``, ``metric``,
    ``scorer`` and, for accuracy, ``num_correct`` and per-sample ``correct`` booleans.

    ``failures`` counts missing/empty predictions for accuracy (they are scored, not dropped) and
    unparseable ones for regression. Call it once per scorer to report both (or use ``score_both``)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("cannot score an empty split")
    metric = as_metric(metric)
    if metric.name in REGRESSION_METRICS:
        return {**score_regression(predictions, answers, metric), "scorer": scorer}
    score_one = _SAMPLE_SCORERS[scorer]
    correct = [score_one(p, a, metric) == 1.0 for p, a in zip(predictions, answers, strict=True)]
    return {
        "metric": metric.name,
        "scorer": scorer,
        "score": 100 * sum(correct) / len(correct),
        "samples": len(correct),
        "num_correct": sum(correct),
        "failures": sum(p is None or not p.strip() for p in predictions),
        "correct": correct,
    }


def score_both(predictions: Sequence[str | None], answers: Sequence[GoldAnswer], metric: MetricLike = None) -> dict:
    """``{"strict": score_split(...), "lenient": score_split(...)}`` for the same predictions."""
    return {name: score_split(predictions, answers, metric, scorer=name) for name in SCORERS}
