"""The teacher-forced answer loss (lime/answer_loss.py): per-sample parity with the model's own loss, batch
invariance, aggregation, and its block in results.json."""

import json
import statistics

import pytest
import torch
from omegaconf import OmegaConf

from lime import answer_loss, evaluation
from lime.data import dataset as data
from lime.data.collate import Collator
from lime.data.mmt47 import Taxonomy
from tests.test_train import SMALL, compose_config


@pytest.fixture(scope="module")
def splits():
    cfg = OmegaConf.to_container(compose_config(*SMALL, "data.categories=[GLUE,Vision Benchmark]").data,
                                 resolve=True)
    built = data.build(cfg)
    built.pop("train")
    return built, Taxonomy.from_config(cfg["taxonomy"])


def test_sample_loss_is_the_models_own_loss_of_each_sample_alone_in_any_batch(tiny_llava, splits):
    model, processor = tiny_llava
    split = splits[0]["image_test_count"]
    collator = Collator(processor, mode="train")
    with torch.no_grad():  # the oracle: transformers' loss (mean over the labelled tokens) of one sample at a time
        alone = [model(**collator([split[i]])).loss.item() for i in range(len(split))]
    assert answer_loss.sample_losses(model, processor, split, batch_size=1) == pytest.approx(alone, rel=1e-5)
    # Right padding in batches changes nothing.
    assert answer_loss.sample_losses(model, processor, split, batch_size=8) == pytest.approx(alone, rel=1e-4)


def test_summary_means_tasks_then_categories():
    taxonomy = Taxonomy.named("mmt_mini")
    block = answer_loss.summarize({"count": [1.0, 3.0], "has_color": [4.0], "sentiment": [0.5, 0.5, 2.0]}, taxonomy)
    assert block["tasks"]["count"] == {"loss": 2.0, "samples": 2, "category": "Vision Benchmark"}
    assert block["categories"] == {"Vision Benchmark": 3.0, "GLUE": 1.0}
    assert block["overall"] == {"mean_of_tasks": pytest.approx(statistics.fmean([2.0, 4.0, 1.0])),
                                "mean_of_categories": 2.0}


def test_evaluate_writes_the_answer_loss_per_task_category_and_overall(tiny_llava, splits, tmp_path):
    model, processor = tiny_llava
    built, taxonomy = splits
    results = evaluation.evaluate(model, processor, built, taxonomy, tmp_path, batch_size=4, max_new_tokens=2)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written == results and written["answer_loss"]["unit"] == answer_loss.UNIT
    block = written["answer_loss"]
    assert set(block["tasks"]) == set(written["tasks"]) and set(block["categories"]) == {"GLUE", "Vision Benchmark"}
    expected = answer_loss.sample_losses(model, processor, built["glue_test_grammar"], batch_size=4)
    assert block["tasks"]["grammar"]["loss"] == pytest.approx(statistics.fmean(expected))
    assert all(entry["loss"] > 0 for entry in block["tasks"].values())
