"""Property tests of the routing and the LiME layer over random shapes, experts, windows, paddings and dtypes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lime.config import LiMEConfig, RoutingConfig
from lime.context import TextContext
from lime.layer import LiMELinear
from lime.routing import Router, select_experts

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@st.composite
def routing_cases(draw):
    num_experts = draw(st.integers(1, 8))
    selection = draw(st.sampled_from(["auto", "topk", "soft_auto", "soft_topk", "dense"]))
    cfg = RoutingConfig(
        selection=selection, top_k=draw(st.integers(1, num_experts)), threshold=draw(st.floats(0.05, 1.0)),
        n_gram=draw(st.integers(1, 5)), norm=draw(st.sampled_from(["token", "global"])),
        channels=draw(st.sampled_from(["leading", "trailing", "central", "random"])),
        gamma_routing=draw(st.floats(0.0, 1.0)), temperature=draw(st.floats(0.05, 4.0)),
    )
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    pads = [draw(st.integers(0, length)) for _ in range(batch)]
    left = draw(st.booleans())
    return num_experts, cfg, batch, length, pads, left, draw(st.integers(0, 2**16))


def padding_mask(batch, length, pads, left):
    valid = torch.ones(batch, length, dtype=torch.bool)
    for row, pad in enumerate(pads):
        if left:
            valid[row, :pad] = False
        else:
            valid[row, length - pad :] = False
    return valid


@SETTINGS
@given(routing_cases())
def test_routed_weights_are_a_distribution_over_the_selected_experts(case):
    num_experts, cfg, batch, length, pads, left, seed = case
    torch.manual_seed(seed)
    d_out = num_experts + 5
    router = Router(7, d_out, num_experts, cfg).eval()
    valid = padding_mask(batch, length, pads, left)
    x = torch.randn(batch, length, 7)
    z, z_hat = torch.randn(batch, length, d_out) * 3, torch.randn(batch, length, d_out) * 1e-3
    weights, routed, selected = router(x, z, z_hat, valid)
    assert torch.isfinite(routed).all() and (routed >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, length), atol=1e-5, rtol=0)
    torch.testing.assert_close(routed.sum(-1), torch.ones(batch, length), atol=1e-5, rtol=0)
    if cfg.selection in ("auto", "topk"):
        assert (routed[~selected] == 0).all() and selected.any(-1).all()
    if cfg.selection == "topk":
        assert (selected.sum(-1) == cfg.top_k).all()


@SETTINGS
@given(st.integers(1, 8))
def test_uniform_weights_select_every_expert(num_experts):
    uniform = torch.full((3, num_experts), 1.0 / num_experts)
    routed, selected = select_experts(uniform, RoutingConfig(selection="auto"))
    assert selected.all()  # every expert ties with the max
    torch.testing.assert_close(routed, uniform)


@SETTINGS
@given(routing_cases(), st.sampled_from(["lora", "dora", "lora_fa", "slicefine"]),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_layer_outputs_are_finite_and_padding_keeps_the_frozen_output(case, variant, dtype):
    num_experts, cfg, batch, length, pads, left, seed = case
    torch.manual_seed(seed)
    base = nn.Linear(6, num_experts + 5).to(dtype)
    layer = LiMELinear(base, LiMEConfig(variant=variant, num_experts=num_experts, routing=cfg))
    with torch.no_grad():
        for parameter in layer.parameters():
            if parameter.requires_grad and parameter is not base.weight and parameter is not base.bias:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    valid = padding_mask(batch, length, pads, left)
    layer.text_context = TextContext(mask=valid)
    x = torch.randn(batch, length, 6, dtype=dtype)
    out = layer.eval()(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out[~valid], base(x)[~valid])  # W x + b, for DoRA too
