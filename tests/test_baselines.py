"""The PEFT baselines of docs/method.md §4: plain LoRA/DoRA/LoRA-FA/SliceFine/prompt tuning and the MoE-PEFT layers.

Parameter counts on the meta device (docs/method.md §5), the configs/peft presets, the MoE layer against the plain
method and against a naive per-token loop, HF peft parity and cached decoding. Identity at init and a few
training steps with save/load run for every registered method in tests/test_methods.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path

import peft
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch import nn

import lime
from lime import models, presets, registry
from lime.adapters import build_adapter
from lime.config import PEFT_GROUP_EXTRAS
from lime.context import TextContext
from lime.inject import lime_modules
from lime.layer import PEFTLinear
from lime.moe import MoELinear
from tests.registered import composed_preset, preset_pairs
from tests.tiny import tiny_causal_lm

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHOD_OF = {name: method for (method, _), name in preset_pairs().items()}
PLAIN = [name for name in presets.peft_presets() if METHOD_OF[name] == "plain"]
ROUTED = [name for name in presets.peft_presets() if registry.METHODS[METHOD_OF[name]].routing_group == "moe"]

# docs/method.md §5 (and the per-layer formulas of §4 where it gives no total):
# LLaVA-OV-7B, q,k,v,o,out_proj in both towers (216 layers); LLaVA-OV-0.5B, LM-only q,k,v,o (96 layers).
EXPECTED_COUNTS = {
    "lora": (1_740_800, 270_336),
    "dora": (2_089_984, 319_488),
    "lora_fa": (698_368, 98_304),
    "slicefine": (698_368, 98_304),
    "prompt": (71_680, 17_920),
    "moe_lora": (10_788_864, 1_695_744),
    "moe_dora": (12_185_600, 1_892_352),
    "moe_lora_fa": (5_576_704, 835_584),  # 0.5B: Figure 2's 0.84M
    "mola": (9_048_064, 1_425_408),  # 7B: the paper's table prints 9.04M (9,048,064 rounds to 9.05M)
    "hydralora": (5_920_768, 909_312),
    "mixlora": (3_825_664, 614_400),
}
LM_ONLY = ("peft.targets=${model.lm_targets}", "peft.language_model_only=true")


@functools.cache
def compose(name: str, model: str = "tiny_llava_ov", overrides: tuple[str, ...] = ()) -> DictConfig:
    """`peft=<name>` composed as train.py composes it: the routing group first, then the peft group."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return hydra_compose(overrides=[f"+model={model}", "+routing=zero_param", f"+peft={name}", *overrides])


def peft_config(name: str, model: str = "tiny_llava_ov", *overrides: str) -> lime.LiMEConfig:
    cfg = compose(name, model, overrides)
    return lime.LiMEConfig.from_groups(OmegaConf.to_container(cfg.peft, resolve=True),
                                       OmegaConf.to_container(cfg.routing, resolve=True))


def wrapped(base: nn.Module, config: lime.LiMEConfig) -> nn.Module:
    return lime.apply_lime(copy.deepcopy(base), config)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every zero-initialised tensor away from its init, so adapters and experts change the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if any(key in name for key in ("lora_B", "slice_delta", "prompt_delta", "magnitude")):
            noise = torch.randn(parameter.shape, generator=generator) * 0.1
            parameter.add_(noise * parameter.abs() if "magnitude" in name else noise)


# --- configs and parameter counts --------------------------------------------------------------


@pytest.mark.parametrize("name", presets.peft_presets())
def test_peft_config_composes(name: str) -> None:
    assert (CONFIGS / "peft" / f"{name}.yaml").read_text().startswith(f"# python train.py peft={name}\n")
    cfg = compose(name)
    fields = {f.name for f in dataclasses.fields(lime.LiMEConfig)}
    assert set(cfg.peft) - fields == set(PEFT_GROUP_EXTRAS)  # every LiMEConfig key is present after composition
    assert cfg.peft.name == name
    assert cfg.peft.peft_lr == (2e-4 if cfg.peft.variant in ("dora", "prompt") else 4e-4)
    assert cfg.peft.moe_lr == 1e-3
    config = peft_config(name)
    assert config.targets == tuple(cfg.model.lm_targets if config.language_model_only else cfg.model.targets)
    if name in ROUTED:  # the peft file selects routing=moe: learned router, top-2
        assert (config.routing.router, config.routing.selection, config.routing.top_k) == ("learned", "topk", 2)
        assert (config.num_experts, config.rank) == (4, 2)
    else:
        assert config.routing.router == "zero_param"


def peft_file(name: str) -> dict:
    """A configs/peft file's own keys, interpolations unresolved."""
    values = OmegaConf.to_container(OmegaConf.load(CONFIGS / "peft" / f"{name}.yaml"), resolve=False)
    values.pop("defaults", None)
    return values


def test_peft_base_holds_the_dataclass_defaults() -> None:
    """configs/peft/_base.yaml: every LiMEConfig key (but routing) with the dataclass's default value."""
    base = peft_file("_base")
    defaults = {f.name: f.default for f in dataclasses.fields(lime.LiMEConfig) if f.name != "routing"}
    assert set(base) - set(defaults) == set(PEFT_GROUP_EXTRAS)
    defaults["targets"] = "${model.targets}"  # the model's own target list, not the dataclass's
    for key, default in defaults.items():
        assert base[key] == default, key


@pytest.mark.parametrize("name", presets.peft_presets())
def test_peft_files_state_only_what_differs(name: str) -> None:
    """A preset's own keys all differ from the base; every other key composes to the base's value."""
    own, base = peft_file(name), peft_file("_base")
    assert {key for key, value in own.items() if base[key] == value} == set(), name
    composed = OmegaConf.to_container(composed_preset(name).peft, resolve=False)
    assert set(composed) == set(base)
    assert {key: composed[key] for key in set(base) - set(own)} == {key: base[key] for key in set(base) - set(own)}


def test_primary_config_selects_moe_routing() -> None:
    """train.py's own composition. Needs `routing` before `peft` in configs/config.yaml's defaults list:
    a peft file can only override the routing group if that group is already in the list."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=["peft=moe_lora", "~data", "~trainer"])
        assert (cfg.routing.router, cfg.routing.selection) == ("learned", "topk")
        cfg = hydra_compose(config_name="config", overrides=["peft=moe_lora", "routing.top_k=3", "~data", "~trainer"])
        assert cfg.routing.top_k == 3  # command-line routing keys still win


@pytest.fixture(scope="module")
def meta_models(model_cfg) -> dict[str, nn.Module]:
    return {name: models.build(model_cfg(name), device="meta")[0] for name in ("llava_ov_7b", "llava_ov_0.5b")}


@pytest.mark.parametrize("name", EXPECTED_COUNTS)
@pytest.mark.slow
def test_parameter_counts_match_spec(name: str, meta_models) -> None:
    seven_b, half_b = EXPECTED_COUNTS[name]
    model = wrapped(meta_models["llava_ov_7b"], peft_config(name, "llava_ov_7b"))
    assert lime.trainable_parameters(model) == seven_b
    if name != "prompt":
        assert len(list(lime_modules(model))) == 216
    model = wrapped(meta_models["llava_ov_0.5b"], peft_config(name, "llava_ov_0.5b", *LM_ONLY))
    assert lime.trainable_parameters(model) == half_b


def layer_formula(name: str, d_in: int, d_out: int, e: int, r: int) -> int:
    """docs/method.md §4: trainable parameters of one wrapped layer."""
    moe_lora = (e + 1) * r * (d_in + d_out) + e * d_in
    return {
        "moe_lora": moe_lora,
        "moe_dora": moe_lora + e * d_out,
        "moe_lora_fa": (e + 1) * r * d_out + e * d_in,
        "mola": e * r * (d_in + d_out) + e * d_in,
        "hydralora": r * d_in + e * r * d_out + e * d_in,
        "mixlora": r * (d_in + d_out) + e * d_in,
    }[name]


@pytest.mark.parametrize("name", ROUTED)
@pytest.mark.parametrize(("d_in", "d_out", "e", "r"), [(24, 40, 4, 2), (40, 18, 3, 5)])
def test_layer_count_is_the_formula(name: str, d_in: int, d_out: int, e: int, r: int) -> None:
    layer = MoELinear(nn.Linear(d_in, d_out), peft_config(name, "tiny_llava_ov", f"peft.num_experts={e}",
                                                          f"peft.rank={r}"))
    trainable = sum(p.numel() for n, p in layer.named_parameters() if p.requires_grad and not n.startswith("base."))
    assert trainable == layer_formula(name, d_in, d_out, e, r)


# --- behaviour on the tiny model -----------------------------------------------------------------


def inputs_of(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


# (config, the plain variant it reduces to with one expert)
ONE_EXPERT = [("moe_lora", "lora"), ("moe_dora", "dora"), ("moe_lora_fa", "lora_fa"), ("mola", "lora"),
              ("hydralora", "lora"), ("mixlora", "lora")]


@pytest.mark.parametrize(("name", "variant"), ONE_EXPERT)
def test_one_expert_equals_plain(name: str, variant: str) -> None:
    """E = 1: the softmax over one expert is the constant 1, so the layer is the plain method (+ the shared LoRA)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = MoELinear(base, peft_config(name, "tiny_llava_ov", "peft.num_experts=1", "routing.top_k=1"))
    perturb(layer)
    plain = PEFTLinear(base, build_adapter(base, lime.LiMEConfig(method="plain", variant=variant, rank=2)))
    with torch.no_grad():
        plain.adapter.lora_A.copy_(layer.lora_A[0])
        plain.adapter.lora_B.copy_(layer.lora_B[0])
        if variant == "dora":
            plain.adapter.magnitude.copy_(layer.magnitude[0])
        x = torch.randn(3, 5, 16)
        expected = plain(x)
        if layer.adapter is not None:  # MoELoRA's shared LoRA rides on top
            expected = expected + layer.adapter.delta(x)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def naive_moe(layer: MoELinear, x: torch.Tensor) -> torch.Tensor:
    """The MoE layer written out one token and one expert at a time, from docs/method.md §4."""
    W, b, s, k = layer.base.weight, layer.base.bias, layer.scale, layer.router.cfg.top_k
    num_experts, d_out = layer.num_experts, W.shape[0]
    out = torch.empty(*x.shape[:-1], d_out)
    for i in range(x.shape[0]):
        for t in range(x.shape[1]):
            v = x[i, t]
            weights = torch.softmax(layer.router.proj.weight @ v / layer.router.cfg.temperature, dim=-1)
            top = weights.topk(k).indices
            y = torch.zeros(d_out)
            for e in top.tolist():
                gate = weights[e] / weights[top].sum()
                a = layer.lora_A[e] if layer.lora_A.shape[0] > 1 else layer.lora_A[0]
                if layer.method == "mixlora":  # expert e: the output channels c with ⌊c·E / d_out⌋ = e
                    owned = (torch.arange(d_out) * num_experts // d_out == e).float().unsqueeze(1)
                    expert_weight = W + s * (owned * layer.lora_B[0]) @ a
                else:
                    expert_weight = W + s * layer.lora_B[e] @ a
                expert = expert_weight @ v
                if layer.magnitude is not None:  # a DoRA expert: m_e ⊙ (W + s B_e A_e) x / ‖W + s B_e A_e‖_row
                    expert = layer.magnitude[e] / expert_weight.norm(dim=1) * expert
                y = y + gate * (expert + b)
            if layer.adapter is not None:
                y = y + s * layer.adapter.lora_B @ (layer.adapter.lora_A @ v)
            out[i, t] = y
    return out


@pytest.mark.parametrize("name", ROUTED)
def test_topk_routing_matches_a_per_token_loop(name: str) -> None:
    torch.manual_seed(1)
    layer = MoELinear(nn.Linear(16, 10), peft_config(name)).eval()  # d_out = 10: uneven MixLoRA blocks
    perturb(layer)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["moe_dora", "mixlora"])
def test_padding_keeps_frozen_output_and_stats(name: str) -> None:
    torch.manual_seed(2)
    context = TextContext(mask=torch.tensor([[True] * 4 + [False] * 2, [False] + [True] * 5]))
    layer = MoELinear(nn.Linear(16, 12), peft_config(name), context).eval()
    layer.track_routing = True  # statistics outside training too (and no jitter)
    perturb(layer)
    x = torch.randn(2, 6, 16)
    h = layer(x)
    frozen, pads = layer.base(x), ~context.mask
    torch.testing.assert_close(h[pads], frozen[pads], rtol=0, atol=0)
    assert not torch.allclose(h[~pads], frozen[~pads])
    stats = layer.routing_stats
    assert stats.tokens == 9
    assert float(stats.experts_per_token) == 2.0
    weights = torch.softmax(x[~pads] @ layer.router.proj.weight.T / layer.router.cfg.temperature, dim=-1)
    torch.testing.assert_close(stats.usage, weights.mean(0))  # p̄ over the real tokens only


@pytest.mark.parametrize(("name", "n_gram"), [("moe_lora", 1), ("mixlora", 1), ("moe_dora", 2), ("dora", 1)])
def test_cached_decoding_equals_full_forward(name: str, n_gram: int, tiny_llava) -> None:
    model = wrapped(tiny_llava[0], peft_config(name, "tiny_llava_ov", f"routing.n_gram={n_gram}")).eval()
    perturb(model)
    ids = torch.randint(3, 700, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as in batched generation
    prefill = 8
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
        steps = [out.logits]
        for t in range(prefill, ids.shape[1]):  # one token per call, each routed on its own input
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                        past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=1e-5, atol=1e-5)


# --- HF peft parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_plain_lora_dora_match_hf_peft(variant: str, tiny_llava, image_batch) -> None:
    base = tiny_llava[0]
    config = peft_config(variant)
    ours = wrapped(base, config)
    perturb(ours)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=list(config.targets),
        use_dora=variant == "dora"))
    layers = dict(lime_modules(ours))
    assert len(layers) == 16  # q, k, v, o in 2 LM layers; q, k, v, out_proj in 2 SigLIP layers
    with torch.no_grad():
        for name, layer in layers.items():  # peft names: <module>.lora_A.default.weight etc.
            theirs = reference.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.adapter.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.adapter.lora_B)
            if variant == "dora":
                theirs.lora_magnitude_vector["default"].weight.copy_(layer.adapter.magnitude)
        expected = reference(**inputs_of(image_batch)).logits
        assert not torch.allclose(expected, base(**inputs_of(image_batch)).logits)
        torch.testing.assert_close(ours(**inputs_of(image_batch)).logits, expected, rtol=0, atol=1e-5)


def test_prompt_tuning_matches_hf_peft() -> None:
    base = tiny_causal_lm(seed=4)
    ours = wrapped(base, peft_config("prompt"))
    perturb(ours)
    prompt = ours.lime_prompt
    n = prompt.num_virtual_tokens
    reference = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n)).eval()
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(prompt.prompt_base + prompt.prompt_delta)
        ids = torch.randint(1, base.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
        mask = torch.ones_like(ids)
        mask[0, 5:] = 0  # right padding
        expected = reference(input_ids=ids, attention_mask=mask).logits[:, n:]  # peft keeps the N prompt positions
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
