"""Test parametrisation derived from lime.registry: a registered method or variant is in these lists at once.

tests/toy_methods.py (imported by tests/conftest.py) registers a toy variant and a toy MoE baseline, so the
lists hold them too.
"""

from __future__ import annotations

import functools

from omegaconf import DictConfig
from torch import nn

from lime import presets, registry
from lime.adapters import LowRankAdapter, build_adapter
from lime.config import LiMEConfig


def linear_variants() -> list[str]:
    """The variants that wrap Linear layers (every one but prompt tuning)."""
    return [name for name, v in registry.VARIANTS.items() if v.build is not None]


def low_rank_variants() -> list[str]:
    """The variants that implement the factored protocol of lime/adapters/base.py (LiME's fast paths apply)."""
    return [name for name in linear_variants()
            if isinstance(build_adapter(nn.Linear(8, 8), LiMEConfig(variant=name)), LowRankAdapter)]


@functools.cache
def composed_preset(name: str) -> DictConfig:
    return presets.compose([f"peft={name}", "~data", "~trainer"])


@functools.cache
def composed_routing(group: str) -> DictConfig:
    return presets.compose([f"routing={group}", "~data", "~trainer"]).routing


def preset_pairs() -> dict[tuple[str, str], str]:
    """(method, variant) -> the configs/peft preset that trains it."""
    pairs = {}
    for name in presets.peft_presets():
        peft = composed_preset(name).peft
        pairs[(peft.method, peft.variant)] = name
    return pairs


def case_overrides(method: str, variant: str) -> list[str]:
    """The composition of a registered pair: its preset when it has one, else the base preset."""
    preset = preset_pairs().get((method, variant))
    return [f"peft={preset}"] if preset else presets.case_overrides(method, variant)


def case_ids() -> list[str]:
    return [f"{method}/{variant}" for method, variant in registry.cases()]
