"""The per-method suite, parametrised over every registered (method, variant) pair (lime.registry.cases()).

Identity at init, the fast path against the method's reference path (outputs and every gradient, in float64),
a training step that reduces the loss, the save/load round trip, and the trainable count against the
per-layer formula the method registered. A method is run by this suite the moment it is registered; the toys
of tests/toy_methods.py show it (test_toys_are_in_the_suite).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

import lime
from lime import presets, registry
from lime.inject import lime_modules
from tests import registered
from tests.scripts import load_script
from tests.toy_methods import TOY_METHOD, TOY_VARIANT

CASES = registry.cases()
IDS = registered.case_ids()
LINEAR_CASES = [(m, v) for m, v in CASES if registry.VARIANTS[v].build is not None]
# The cases whose layer has a separate reference path (LiME's `reference_forward`, the toy baseline's).
REFERENCE_CASES = [(m, v) for m, v in LINEAR_CASES if hasattr(registry.METHODS[m].layer, "reference_forward")]
LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def config_of(method: str, variant: str, *overrides: str, model: str = "tiny_llava_ov") -> lime.LiMEConfig:
    return presets.lime_config(presets.compose([f"model={model}", *registered.case_overrides(method, variant),
                                                *overrides]))


def inputs_of(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def test_toys_are_in_the_suite() -> None:
    """tests/toy_methods.py's two registration lines put both toys in every list the suite runs over."""
    assert (TOY_METHOD, "lora") in CASES
    assert ("lime", TOY_VARIANT) in CASES and ("plain", TOY_VARIANT) in CASES
    assert ("lime", TOY_VARIANT) in REFERENCE_CASES and (TOY_METHOD, "lora") in REFERENCE_CASES
    assert TOY_VARIANT in registered.low_rank_variants()


def test_every_preset_is_a_registered_pair_and_back() -> None:
    """configs/peft holds one preset per built-in (method, variant) pair, with the method's routing group."""
    pairs = registered.preset_pairs()
    assert len(pairs) == len(presets.peft_presets())  # no two presets for one pair
    toys = {(m, v) for m, v in CASES if m == TOY_METHOD or v == TOY_VARIANT}
    assert set(pairs) == set(CASES) - toys
    for (method, _), name in pairs.items():
        routing = registered.composed_preset(name).routing
        assert routing == registered.composed_routing(registry.METHODS[method].routing_group), name


@pytest.mark.parametrize(("method", "variant"), LINEAR_CASES, ids=[f"{m}/{v}" for m, v in LINEAR_CASES])
def test_identity_at_init(method: str, variant: str, tiny_llava, image_batch) -> None:
    base = tiny_llava[0]
    with torch.no_grad():
        reference = base(**inputs_of(image_batch)).logits
        config = config_of(method, variant)
        model = lime.apply_lime(copy.deepcopy(base), config)
        layers = [m for _, m in lime_modules(model)]
        # q, k, v, o and SigLIP's q, k, v, out_proj, 2 blocks each (MoCLE's preset: the language model only)
        assert len(layers) == (8 if config.language_model_only else 16)
        layer = registry.METHODS[method].layer
        assert all(type(m) is layer for m in layers) or not isinstance(layer, type)  # the registered layer
        torch.testing.assert_close(model(**inputs_of(image_batch)).logits, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "variant"), REFERENCE_CASES, ids=[f"{m}/{v}" for m, v in REFERENCE_CASES])
def test_fast_path_equals_reference(method: str, variant: str) -> None:
    """A left-padded causal-LM training step (+ balance loss) and a no-grad forward: same numbers both ways."""
    registered.assert_reference_agrees(dataclasses.replace(config_of(method, variant), targets=LM_TARGETS))


@pytest.mark.parametrize(("method", "variant"), CASES, ids=IDS)
def test_trains_and_round_trips(method: str, variant: str, tiny_llava, image_batch, tmp_path: Path) -> None:
    base = tiny_llava[0]
    model = lime.apply_lime(copy.deepcopy(base), config_of(method, variant)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    routed = registry.METHODS[method].routed
    torch.manual_seed(6)
    losses = []
    for _ in range(5):
        loss = model(**image_batch).loss
        losses.append(loss.item())
        if routed:  # the balance losses, over every routed layer of both towers
            loss = loss + lime.balance_loss(model, importance_weight=0.1, kl_weight=0.01)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0], losses
    if registry.METHODS[method].routing_group == "moe":  # top-2 of configs/routing/moe.yaml
        assert lime.routing_summary(model)["routing/experts_per_token"] == 2.0

    model.eval()
    with torch.no_grad():
        expected = model(**inputs_of(image_batch)).logits
        lime.save_adapter(model, tmp_path / "adapter")
        loaded = lime.load_adapter(copy.deepcopy(base), tmp_path / "adapter").eval()
        assert torch.equal(loaded(**inputs_of(image_batch)).logits, expected)


@pytest.fixture(scope="module")
def count_params():
    return load_script("count_params")


@pytest.mark.parametrize(("method", "variant"), LINEAR_CASES, ids=[f"{m}/{v}" for m, v in LINEAR_CASES])
def test_count_params_is_the_registered_formula(method: str, variant: str, count_params) -> None:
    """scripts/count_params.py's count (the model's own tensors, on the meta device) equals the formula: on the
    tiny LLaVA-OV, whose two towers give four (d_in, d_out) shapes (the paper's models: test_baselines.py)."""
    cfg = presets.compose(["model=tiny_llava_ov", *registered.case_overrides(method, variant)])
    result = count_params.count(cfg)
    assert result["trainable"] == result["formula"] > 0


def test_bench_builds_every_method_from_configs() -> None:
    """scripts/bench.py's methods are the configs/peft presets as train.py composes them (routing group included),
    with only the benchmark's targets, r and E set: the MoE baselines route with τ = 1 and no jitter."""
    bench = load_script("bench")
    args = bench.parse_args(["--quick", "--rank", "3", "--experts", "5"])
    for name in presets.peft_presets():
        preset = presets.lime_config(registered.composed_preset(name))
        want = dataclasses.replace(preset, targets=tuple(args.targets.split(",")), rank=3, num_experts=5)
        assert bench.lime_config(args, bench.METHODS[name]) == want, name
    moe = bench.lime_config(args, bench.METHODS["moe_lora"]).routing
    assert (moe.router, moe.selection, moe.top_k, moe.temperature, moe.jitter) == ("learned", "topk", 2, 1.0, 0.0)
    assert bench.lime_config(args, bench.METHODS["lime_lora_ngram2"]).routing.n_gram == 2
