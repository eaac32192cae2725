"""The pretrained tiny backbone of the offline default (lime/pretrain.py): disjoint data, cache, baseline."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lime import pretrain
from lime.data.mmt47 import Taxonomy

ROOT = Path(__file__).resolve().parent.parent


def configs(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=[
            "data.generate.train_per_task=4", "data.generate.test_per_task=1", f"data.cache_dir={tmp_path / 'data'}",
            "model.pretrain.steps=3", "model.pretrain.batch_size=4", "model.pretrain.samples=16",
            f"model.pretrain.cache_dir={tmp_path / 'bb'}",
            *overrides])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    return cfg["model"], cfg["data"]


def test_backbone_is_pretrained_once_evaluated_alone_and_loaded(tmp_path, monkeypatch, caplog):
    model_cfg, data_cfg = configs(tmp_path)
    rng = torch.random.get_rng_state()
    with caplog.at_level(logging.INFO, logger="lime.pretrain"):
        built = pretrain.ensure_backbone(model_cfg, data_cfg)
    alone = [r.getMessage() for r in caplog.records if "alone it scores" in r.getMessage()]
    assert len(alone) == 1 and re.search(r"alone it scores \d+\.\d\d \(mean of tasks", alone[0])  # rounded
    assert torch.equal(torch.random.get_rng_state(), rng)  # first and cached runs draw the same adapter init
    out = Path(built["name_or_path"])
    assert built["tiny"] is None and built["pretrain"] is None and out.parent == tmp_path / "bb"
    info = json.loads((out / pretrain.COMPLETE).read_text())
    assert info["steps"] == 3 and info["samples"] == 16 and info["recipe"]["data_seed"] != data_cfg["generate"]["seed"]
    # The baseline: the backbone alone on every test split of the benchmark (one sample per task here), kept
    # beside the weights per benchmark copy.
    baseline = pretrain.backbone_results(model_cfg, data_cfg)
    scored = pretrain.baseline_dir(model_cfg, data_cfg)
    assert scored.parent == out and baseline == json.loads((scored / pretrain.BASELINE).read_text())
    assert len(baseline["tasks"]) == 18 and all(t["samples"] == 1 for t in baseline["tasks"].values())
    assert len(list((scored / "backbone_eval" / "predictions").glob("*.jsonl"))) == 18
    # The run's comparison: chance, backbone alone, adapted model, per category and overall.
    table = pretrain.comparison_table(baseline, baseline, Taxonomy.from_config(data_cfg["taxonomy"])).splitlines()
    assert len(table) == 1 + 7 + 2
    vision = baseline["categories"]["Vision Benchmark"]["score"]
    assert table[1].split()[-3:] == ["37.50", f"{vision:.2f}", f"{vision:.2f}"]
    # Cached: a second call trains nothing; a data subset in the run does not change the backbone or its baseline.
    monkeypatch.setattr(pretrain, "pretrain", lambda *a: pytest.fail("pretrained again"))
    assert pretrain.ensure_backbone(model_cfg, {**data_cfg, "tasks": ["shape"]}) == built
    # Another benchmark size: the same weights, scored once more on that copy.
    bigger = {**data_cfg, "generate": {**data_cfg["generate"], "test_per_task": 2}}
    assert pretrain.ensure_backbone(model_cfg, bigger) == built
    assert pretrain.backbone_results(model_cfg, bigger)["tasks"]["shape"]["samples"] == 2
    # Another recipe is another backbone.
    other_cfg, _ = configs(tmp_path, "model.pretrain.steps=4")
    assert pretrain.backbone_dir(other_cfg, data_cfg) != out


def test_pretraining_split_must_not_be_the_benchmark(tmp_path):
    model_cfg, data_cfg = configs(tmp_path, "model.pretrain.data_seed=0")
    with pytest.raises(ValueError, match="data_seed"):
        pretrain.ensure_backbone(model_cfg, data_cfg)


def test_pretrain_needs_the_generator(tmp_path):
    model_cfg, data_cfg = configs(tmp_path)
    with pytest.raises(ValueError, match="generate"):
        pretrain.ensure_backbone(model_cfg, {**data_cfg, "generate": None})


def test_comparison_leaves_out_the_backbone_where_the_run_scored_other_samples():
    def results(samples_b):
        tasks = {"a": {"score": 50.0, "samples": 30}, "b": {"score": 70.0, "samples": samples_b}}
        return {"tasks": tasks, "overall": {"mean_of_tasks": 60.0, "mean_of_categories": 60.0},
                "categories": {"X": {"score": 50.0, "tasks": ["a"]}, "Y": {"score": 70.0, "tasks": ["b"]}}}

    baseline = results(30)
    same = pretrain.comparison_table(baseline, results(30)).splitlines()
    assert [line.split()[-2] for line in same[1:]] == ["50.00", "70.00", "60.00", "60.00"]
    fewer = pretrain.comparison_table(baseline, results(2)).splitlines()  # data.max_eval_samples=2
    assert [line.split()[-2] for line in fewer[1:5]] == ["50.00", "-", "-", "-"]
    assert "max_eval_samples" in fewer[-1]
