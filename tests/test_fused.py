"""The factored fast path of LiMELinear (lime.fused) against the plain formula: outputs and every gradient."""

import pytest
import torch
from torch import nn

import lime
from lime.balance import importance_loss, kl_loss
from lime.config import LiMEConfig
from lime.context import TextContext
from lime.layer import LiMELinear
from tests.registered import assert_reference_agrees, low_rank_variants
from tests.tiny import left_padded_batch, perturb_trainable, tiny_causal_lm

VARIANTS = low_rank_variants()  # every registered variant with the factored form (tests/registered.py)
D_IN, D_OUT = 12, 10


@pytest.fixture(params=["direct", "factored"])
def no_grad_path(request, monkeypatch):
    """Without autograd LiMELinear uses `modulated_direct` for few tokens, `modulated_output` beyond: test both."""
    monkeypatch.setattr(LiMELinear, "direct_max_tokens", 10**9 if request.param == "direct" else 0)
    return request.param


def make_layer(variant="lora", seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = LiMELinear(nn.Linear(D_IN, D_OUT), LiMEConfig(variant=variant, **kwargs))
    perturb_trainable(layer, seed=seed)
    return layer.train()


def run(layer, x, fused, seed=1, mask=None):
    """Output, and the gradients of every trainable tensor and of x, for loss = <h, g> + balance terms."""
    layer.fused = fused
    layer.text_context = TextContext(mask=mask) if mask is not None else None
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same jitter / dropout draws on both paths
    h = layer(x)
    g = torch.linspace(-1.0, 1.0, h.numel()).reshape(h.shape)
    loss = (h * g).sum()
    if layer.routing_stats is not None and layer.routing_stats.tokens > 0:
        usage = layer.routing_stats.usage
        loss = loss + importance_loss(usage) + kl_loss(usage)
    grads = torch.autograd.grad(loss, [x, *(p for p in layer.parameters() if p.requires_grad)])
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    return h.detach(), dict(zip(names, grads, strict=True))


def assert_paths_agree(layer, x, mask=None, atol=1e-5):
    h_ref, g_ref = run(layer, x, fused=False, mask=mask)
    h_fast, g_fast = run(layer, x, fused=True, mask=mask)
    torch.testing.assert_close(h_fast, h_ref, atol=atol, rtol=1e-5)
    assert g_fast.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], atol=atol, rtol=1e-5, msg=f"gradient of {name}")
    return g_ref


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shared", [True, False])
def test_fast_path_matches_the_formula(variant, shared):
    layer = make_layer(variant, shared=shared)
    grads = assert_paths_agree(layer, torch.randn(3, 6, D_IN))
    # the routing gradients are live: Ẑ feeds the router, the usage feeds the balance terms
    assert grads["expert_vectors"].abs().sum() > 0
    if "adapter.lora_B" in grads:
        assert grads["adapter.lora_B"].abs().sum() > 0


@pytest.mark.parametrize("selection", ["auto", "topk", "soft_auto", "soft_topk", "dense"])
def test_every_selection(selection):
    assert_paths_agree(make_layer(routing=dict(selection=selection)), torch.randn(2, 7, D_IN))


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("n_gram,anchor", [(2, "first"), (3, "first"), (2, "last")])
def test_n_gram_windows(variant, n_gram, anchor):
    layer = make_layer(variant, routing=dict(n_gram=n_gram, anchor=anchor))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert_paths_agree(layer, torch.randn(2, 7, D_IN), mask=mask)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_keeps_the_frozen_output(variant, no_grad_path):
    layer = make_layer(variant)
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(2, 5, D_IN)
    grads = assert_paths_agree(layer, x, mask=mask)
    layer.fused = True
    layer.text_context = TextContext(mask=mask)
    with torch.no_grad():  # exactly the frozen output W x + b (for DoRA too, not μ ⊙ W x + b), not just close
        assert torch.equal(layer(x)[0, :3], layer.base(x)[0, :3])
    assert grads["x"].abs().sum() > 0


@pytest.mark.parametrize("channels", ["trailing", "central", "random"])
@pytest.mark.parametrize("norm", ["token", "global"])
def test_routing_channels_and_norms(channels, norm):
    layer = make_layer("lora", routing=dict(channels=channels, norm=norm))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert_paths_agree(layer, torch.randn(2, 5, D_IN), mask=mask)


def test_learned_router():
    layer = make_layer("dora", routing=dict(router="learned", selection="topk", top_k=2))
    grads = assert_paths_agree(layer, torch.randn(2, 5, D_IN))
    assert grads["router.proj.weight"].abs().sum() > 0


def test_dropout_draws_the_same_mask():
    assert_paths_agree(make_layer("lora", dropout=0.3), torch.randn(2, 5, D_IN))


def test_vision_layers_and_eval_mode(no_grad_path):
    layer = make_layer("lora")
    assert_paths_agree(layer, torch.randn(9, D_IN))  # 2-D input (Qwen2-VL's vision tower)
    layer.eval()
    x = torch.randn(2, 5, D_IN)
    with torch.no_grad():
        layer.fused = False
        want = layer(x)
        layer.fused = True
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("routing", [{}, {"channels": "trailing"}, {"n_gram": 2}, {"router": "learned"}])
def test_no_grad_paths_match_the_formula(variant, shared, routing, no_grad_path):
    layer = make_layer(variant, shared=shared, routing=routing).eval()
    layer.text_context = TextContext(mask=torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool))
    x = torch.randn(2, 6, D_IN)
    with torch.no_grad():
        layer.fused = False
        want = layer(x)
        layer.fused = True
        got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0, :2], want[0, :2])  # padding: exactly the frozen output


def test_low_precision_activations(no_grad_path):
    layer = make_layer("lora").to(torch.bfloat16)
    x = torch.randn(2, 5, D_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.eval()
        layer.fused = False
        want = layer(x)
        layer.fused = True
        got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)


# Trainable tensors per wrapped layer of each built-in variant (a registered one is checked by the rest).
TRAINABLE_TENSORS = {"lora": 5, "dora": 6, "lora_fa": 4, "slicefine": 4}


@pytest.mark.parametrize("variant", VARIANTS)
def test_whole_model_training_step(variant):
    """A left-padded causal-LM batch with the balance loss and n-gram windows: same loss and gradients on both
    paths, every trainable tensor with a gradient (tests/registered.py: `assert_reference_agrees`)."""
    grads = assert_reference_agrees(LiMEConfig(variant=variant, routing=dict(n_gram=2)))
    if variant in TRAINABLE_TENSORS:
        assert len(grads) == 8 * TRAINABLE_TENSORS[variant]  # all trainable


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("n_gram", [1, 2])
def test_cached_generation_matches_the_reference(variant, n_gram, no_grad_path, monkeypatch):
    """Prefill + cached decoding steps of a left-padded batch: the fast paths give the reference's logits."""
    ids, mask = left_padded_batch([8, 5, 3], total=8)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(LiMELinear, "fused", fused)
        model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(variant=variant, routing=dict(n_gram=n_gram)))
        perturb_trainable(model)
        with torch.no_grad():
            out = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
            logits, cache = [out.logits], out.past_key_values
            for t in range(4, 8):
                out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                            use_cache=True)
                logits.append(out.logits)
                cache = out.past_key_values
        results.append(torch.cat(logits, dim=1))
    real = mask.bool()
    torch.testing.assert_close(results[1][real], results[0][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_factors_kept_between_no_grad_calls_follow_updates(variant, no_grad_path):
    """Without autograd K (and DoRA's μ) are reused between calls, and rebuilt when a tensor changes."""
    layer = make_layer(variant).eval()
    x = torch.randn(2, 5, D_IN)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        with torch.no_grad():
            layer.fused = False
            want = layer(x)
            layer.fused = True
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)  # from the kept factors
        layer.fused = True
        layer(x).pow(2).sum().backward()  # an optimizer step changes every tensor in place
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():  # so does loading a state dict
        state = {k: v + 0.1 if v.is_floating_point() else v for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        layer.fused = False
        want = layer(x)
        layer.fused = True
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_factors_built_in_inference_mode_serve_later_calls(no_grad_path):
    layer = make_layer("dora").eval()
    x = torch.randn(2, 3, D_IN)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), first)
    out = layer(x)  # with autograd: built afresh, differentiable
    out.sum().backward()
    torch.testing.assert_close(out.detach(), first)
    assert layer.adapter.magnitude.grad is not None
