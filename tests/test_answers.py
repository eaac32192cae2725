"""Answers in the data: a string, or a list of accepted strings (trained on the first, scored as any-of);
anything else refused naming the row."""

from __future__ import annotations

import json

import datasets
import pytest

from lime.data.collate import Collator
from lime.data.dataset import DataError, MMTDataset, Skip
from lime.results import write_predictions
from lime.scoring import AcceptedAnswers, score_split


def text_split(answers: list) -> list[dict]:
    """Rows as MMTDataset reads them (a list of dicts may mix answer types, which an Arrow column cannot)."""
    return [{"source_type": "text", "media_path": "", "question": f"q{i}?", "answer": a} for i, a in enumerate(answers)]


def test_list_answers_are_accepted_strings_never_their_printed_form():
    rows = datasets.Dataset.from_dict({"source_type": ["text"] * 3, "media_path": [""] * 3, "question": ["q?"] * 3,
                                       "answer": [["no"], [" yes ", "yeah"], ["5", "five", "5"]]})
    split = MMTDataset(rows, "text_test_boolq", None)
    single, several, repeated = split[0].answer, split[1].answer, split[2].answer
    assert single == "no" and type(single) is str  # not "['no']"
    assert several == "yes" and several.accepted == ("yes", "yeah")  # the target is the first, stripped
    assert repeated.accepted == ("5", "five")  # duplicates dropped, order kept
    assert score_split(["yeah", "no", "yes"], [several, single, several])["correct"] == [True, True, True]


def test_the_training_target_of_a_list_answer_is_its_first_element(tiny_llava):
    _, processor = tiny_llava
    sample = MMTDataset(text_split([["nope", "no"]]), "text_test_boolq", None)[0]
    train_text = Collator(processor, mode="train").text(sample)
    prompt = Collator(processor, mode="generate").text(sample)
    assert train_text[len(prompt):].startswith("nope<|im_end|>") and "['" not in train_text
    labels = Collator(processor, mode="train")([sample])["labels"][0]
    target = processor.tokenizer("nope<|im_end|>", add_special_tokens=False)["input_ids"]
    assert labels[labels != -100].tolist() == target  # the loss is on the first accepted answer alone
    batch = Collator(processor, mode="generate")([sample])
    assert batch.references[0].accepted == ("nope", "no")


@pytest.mark.parametrize(
    ("answer", "kind", "said"),
    [
        (3, "bad_answer", "got int 3"),
        (2.5, "bad_answer", "got float 2.5"),
        (True, "bad_answer", "got bool True"),
        ({"text": "no"}, "bad_answer", "got dict"),
        (["ok", 3], "bad_answer", "holds 3"),
        (["ok", " "], "bad_answer", "holds ' '"),
        ([], "empty_answer", "empty list"),
        (None, "empty_answer", "empty answer"),
        ("  ", "empty_answer", "empty answer"),
    ],
)
def test_other_answers_are_refused_naming_the_row(answer, kind, said):
    split = MMTDataset(text_split(["fine", answer]), "text_test_boolq", None)
    assert split[0].answer == "fine"
    with pytest.raises(DataError, match=r"text_test_boolq\[1\]") as info:
        split[1]
    assert info.value.skip.kind == kind and said in str(info.value)
    skipped = MMTDataset(text_split(["fine", answer]), "text_test_boolq", None, on_error="skip")[1]
    assert isinstance(skipped, Skip) and skipped.kind == kind


def test_predictions_file_lists_every_accepted_answer(tmp_path):
    rows = [{"question": "q?", "answer": AcceptedAnswers(["no", "nope"]), "prediction": "nope", "correct": True},
            {"question": "q?", "answer": "yes", "prediction": "no", "correct": False}]
    path = write_predictions(tmp_path, "text_test_boolq", rows)
    assert [json.loads(line)["answer"] for line in path.read_text().splitlines()] == [["no", "nope"], "yes"]
