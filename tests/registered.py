"""Test parametrisation derived from lime.registry (a registered method or variant is in these lists at once),
and the fast-vs-reference check every method with a reference path runs.

tests/toy_methods.py (imported by tests/conftest.py) registers a toy variant and a toy MoE baseline, so the
lists hold them too.
"""

from __future__ import annotations

import functools

import torch
from omegaconf import DictConfig
from torch import nn

import lime
from lime import presets, registry
from lime.adapters import LowRankAdapter, build_adapter
from lime.config import LiMEConfig
from lime.inject import lime_modules
from tests.tiny import left_padded_batch, perturb_trainable, tiny_causal_lm


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


def with_reference_path(model: torch.nn.Module) -> torch.nn.Module:
    """Every wrapped layer runs its reference path (an instance attribute shadows the class's forward)."""
    for _, module in lime_modules(model):
        module.forward = module.reference_forward
    return model


def assert_reference_agrees(config: LiMEConfig) -> dict[str, torch.Tensor]:
    """Every wrapped layer's fast path against its reference path, on the tiny causal LM in float64: the loss
    of a left-padded training step (+ the balance loss) and every gradient, then no-grad logits. Returns the
    reference gradients.

    In float64, so that the comparison is tight: through two transformer blocks the fp32 rounding of the two
    summation orders grows to ~1e-5, which would hide nothing but also prove little.
    """
    ids, mask = left_padded_batch([9, 5, 7], total=9)
    losses, grads, logits = [], [], []
    for reference in (True, False):
        model = lime.apply_lime(tiny_causal_lm(), config).double()
        perturb_trainable(model)
        if reference:
            with_reference_path(model)
        model.train()
        torch.manual_seed(3)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss = loss + lime.balance_loss(model, 0.1, 0.01, 1.0)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        with torch.no_grad():
            logits.append(model.eval()(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-10, rtol=1e-10)
    assert grads[1].keys() == grads[0].keys()
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-10, rtol=1e-8, msg=name)
    real = mask.bool()
    torch.testing.assert_close(logits[1][real], logits[0][real], atol=1e-10, rtol=1e-10)
    return grads[0]
