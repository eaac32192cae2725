"""Bad configuration is refused before any model is built, with a message naming the key."""

import pytest
import torch
from torch import nn

import lime
from lime.config import ConfigError, LiMEConfig
from lime.layer import LiMELinear, PEFTLinear
from tests.tiny import tiny_causal_lm


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(num_experts=0), "peft.num_experts"),
        (dict(rank=0), "peft.rank"),
        (dict(variant="lokr"), "peft.variant"),
        (dict(method="moe_everything"), "peft.method"),
        (dict(num_experts=2, routing=dict(selection="topk", top_k=3)), "routing.top_k"),
        (dict(routing=dict(threshold=0.0)), "routing.threshold"),
        (dict(routing=dict(n_gram=0)), "routing.n_gram"),
        (dict(targets=()), "peft.targets"),
        (dict(param_dtype="float8"), "peft.param_dtype"),
    ],
)
def test_invalid_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LiMEConfig(**kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown key.*num_expert"):
        LiMEConfig.from_dict({"num_expert": 4})
    with pytest.raises(ConfigError, match="routing: unknown key.*ngram"):
        LiMEConfig.from_dict({"routing": {"ngram": 2}})


def meta_model():
    with torch.device("meta"):
        return tiny_causal_lm()


def test_model_checks_run_on_the_meta_device_before_any_weights():
    model = meta_model()
    with pytest.raises(ConfigError, match="peft.targets: 'qkv' matches no nn.Linear.*q_proj"):
        lime.validate(model, LiMEConfig(targets=("q_proj", "qkv")))
    with pytest.raises(ConfigError, match=
            "peft.num_experts: 20 is larger than d_out=16 of model.layers.0.self_attn.k_proj"):
        lime.validate(model, LiMEConfig(num_experts=20))
    with pytest.raises(ConfigError, match="peft.slice_start"):
        lime.validate(model, LiMEConfig(variant="slicefine", slice_start=31))
    with pytest.raises(ConfigError, match=r"peft.layer_indices: no block \[5\] in this model \(its blocks: 0..1\)"):
        lime.validate(model, LiMEConfig(layer_indices=(1, 5)))  # one block out of range is not silently dropped
    assert len(lime.validate(model, LiMEConfig())) == 8


def test_targets_match_whole_name_components():
    model = meta_model()
    names = lime.validate(model, LiMEConfig(targets=("self_attn.o_proj", "down_proj"), layer_indices=(1,)))
    assert names == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match="'proj' matches no"):
        lime.validate(model, LiMEConfig(targets=("proj",)))


def test_apply_wraps_targets_and_freezes_the_rest():
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig())
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LiMELinear)]
    assert len(wrapped) == 8
    assert not any(isinstance(m, nn.Linear) and n.endswith("q_proj") for n, m in model.named_modules())
    trainable = {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "expert_vectors", "shared_vector", "shared_gate"}
    # per layer: r (d_in + d_out) + E d_out + d_out + 1
    d_outs = [32, 16, 16, 32] * 2
    assert lime.trainable_parameters(model) == sum(2 * (32 + d) + 5 * d + 1 for d in d_outs)
    with pytest.raises(ConfigError, match="already applied"):
        lime.apply_lime(model, LiMEConfig())
    text = lime.summary(model)
    assert "8 wrapped modules" in text and "expert_vectors" in text


def test_plain_method_adds_no_experts():
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(method="plain", variant="dora"))
    assert all(type(m) is PEFTLinear for n, m in model.named_modules() if n.endswith("_proj") and "attn" in n)
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B", "magnitude"}
