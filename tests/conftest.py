"""Shared session-scoped fixtures: tiny LLaVA-OV and Qwen2-VL models with their processors.

Built once per test session from ``configs/model/tiny_*.yaml`` (random weights, fixed seed, local
tokenizer), with the processors cached in a session temp directory: no downloads, a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import tests.toy_methods  # noqa: F401  (registers the toy variant and MoE baseline: CONTRIBUTING.md's examples)
from lime import models
from lime.data.processors import example_inputs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def model_config(name: str, **overrides):
    """A model config from configs/model/<name>.yaml with keys overridden."""
    cfg = OmegaConf.load(CONFIGS / "model" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def _tiny(name: str, tmp_path_factory: pytest.TempPathFactory):
    cfg = model_config(name, cache_dir=str(tmp_path_factory.mktemp("processors") / name))
    model, processor = models.build(cfg)
    return model.float().eval(), processor


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """(model, processor): a tiny LlavaOnevisionForConditionalGeneration, float32, eval mode."""
    return _tiny("tiny_llava_ov", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory):
    """(model, processor): a tiny Qwen2VLForConditionalGeneration, float32, eval mode."""
    return _tiny("tiny_qwen2_vl", tmp_path_factory)


@pytest.fixture(params=["tiny_llava", "tiny_qwen2_vl"])
def tiny_model(request):
    """Both tiny families in turn: (model, processor)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def model_cfg():
    """``model_cfg(name, **overrides)`` -> the DictConfig of configs/model/<name>.yaml."""
    return model_config


@pytest.fixture(scope="session")
def make_inputs():
    """``make_inputs(processor, batch_size=2, media="image", seed=0, generation=False)`` -> BatchFeature."""
    return example_inputs


@pytest.fixture(scope="session")
def image_batch(tiny_llava) -> dict:
    """Two right-padded samples with one image each for the tiny LLaVA-OV, labels on the real tokens."""
    batch = dict(example_inputs(tiny_llava[1], batch_size=2))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch
