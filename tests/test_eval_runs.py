"""Evaluation runs are labelled by the adapter they load (method, config, parameter counts) and record it."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

import lime
from lime.checkpoint import WEIGHTS_NAME, method_name
from lime.presets import compose, lime_config, peft_presets
from lime.run import build_model, run
from lime.settings import plain, settings
from tests.test_train import SMALL, compose_config
from tests.tiny import perturb_trainable


@pytest.mark.parametrize("name", peft_presets())
def test_method_name_of_every_peft_preset(name):
    assert method_name(lime_config(compose([f"peft={name}"]))) == name


def test_eval_run_takes_method_and_counts_from_the_adapter_not_the_command_line(tmp_path, caplog):
    cfg = plain(compose_config(*SMALL, "peft=lime_lora", "data.tasks=[arithmetic]"))
    checked = settings(cfg)
    model, _ = build_model(checked)
    lime.apply_lime(model, checked.lime)
    perturb_trainable(model, scale=0.01)
    lime.save_adapter(model, tmp_path / "train" / "adapter")

    with caplog.at_level(logging.WARNING, logger="lime.run"):
        run(compose_config(*SMALL, "mode=eval", "peft=moe_lora", "data.tasks=[arithmetic]",
                           f"checkpoint={tmp_path / 'train'}"), tmp_path / "eval")
    info = json.loads((tmp_path / "eval" / "run_info.json").read_text())
    adapter = (tmp_path / "train" / "adapter").resolve()
    assert info["status"] == "completed"
    assert info["method"] == "lime_lora"  # not moe_lora
    assert info["trainable_params"] == lime.trainable_parameters(model) == 6032
    assert info["checkpoint"] == str(adapter)
    assert info["adapter_sha256"] == hashlib.sha256((adapter / WEIGHTS_NAME).read_bytes()).hexdigest()
    assert info["adapter_config"]["method"] == "lime" and info["adapter_config"]["rank"] == checked.lime.rank
    assert any("peft=moe_lora is ignored" in r.getMessage() and "lime_lora" in r.getMessage()
               for r in caplog.records)
