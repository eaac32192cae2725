"""The LiME layer (docs/method.md §1): the formula, identity at init, peft parity, padding, caching, batch
invariance."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lime
from lime.config import LiMEConfig, RoutingConfig
from lime.context import TextContext
from lime.layer import LiMELinear
from lime.registry import VARIANTS
from tests.registered import linear_variants
from tests.tiny import copy_of, left_padded_batch, perturb_trainable, tiny_causal_lm

LINEAR_VARIANTS = linear_variants()  # every registered variant that wraps Linear layers


def make_layer(variant="lora", seed=0, **kwargs):
    torch.manual_seed(seed)
    base = nn.Linear(12, 10)
    layer = LiMELinear(base, LiMEConfig(variant=variant, **kwargs)).eval()
    return base, layer


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
def test_layer_is_its_base_at_init(variant):
    base, layer = make_layer(variant)
    x = torch.randn(3, 5, 12)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("variant", ["lora", "dora", "lora_fa", "slicefine"])  # the variants written out below
def test_layer_matches_the_formula(variant):
    """h = z + ẑ ⊙ P + γ (ẑ ⊙ p_s), with ẑ, z and w̃ written out by hand."""
    base, layer = make_layer(variant, routing=dict(selection="auto", jitter=0.0))
    perturb_trainable(layer)
    x = torch.randn(2, 4, 12)
    W, b, s = base.weight, base.bias, layer.adapter.__dict__.get("scale")
    if variant == "slicefine":
        delta = x[..., :2] @ layer.adapter.slice_delta.T
        z = x @ W.T + b
    else:
        delta = s * (x @ layer.adapter.lora_A.T @ layer.adapter.lora_B.T)
        z = x @ W.T + b
        if variant == "dora":
            mu = layer.adapter.magnitude / (W + s * layer.adapter.lora_B @ layer.adapter.lora_A).norm(dim=1)
            z, delta = mu * (x @ W.T) + b, mu * delta
    Z, Zh = z[..., :4], delta[..., :4]
    logits = (0.3 * Z / Z.abs().amax(-1, keepdim=True) + 0.7 * Zh / Zh.abs().amax(-1, keepdim=True)) / 0.5
    w = logits.softmax(-1)
    w = w * (w >= 0.5 * w.amax(-1, keepdim=True))
    w = w / w.sum(-1, keepdim=True)
    P = w @ layer.expert_vectors
    want = z + delta * P + layer.shared_gate * (delta * layer.shared_vector)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_padding_keeps_the_frozen_output_and_is_left_out_of_statistics():
    base, layer = make_layer("lora")
    perturb_trainable(layer)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    layer.text_context = TextContext(mask=mask)
    layer.track_routing = True
    x = torch.randn(2, 5, 12)
    out = layer(x)
    assert torch.equal(out[0, :2], base(x)[0, :2])
    assert not torch.allclose(out[0, 2:], base(x)[0, 2:])
    assert layer.routing_stats.tokens == 8
    # statistics over the real tokens only: the same as running the real tokens alone
    usage = layer.routing_stats.usage.clone()
    layer.text_context = TextContext(mask=torch.ones(1, 8, dtype=torch.bool))
    layer(torch.cat([x[0, 2:], x[1]]).unsqueeze(0))
    torch.testing.assert_close(layer.routing_stats.usage, usage)


def test_vision_layers_route_every_patch():
    """A layer with no text context (vision tower) treats every token as real, 2-D inputs included."""
    base, layer = make_layer("lora")
    perturb_trainable(layer)
    patches = torch.randn(7, 12)  # Qwen2-VL's vision tower feeds (patches, d)
    assert layer(patches).shape == (7, 10)
    torch.testing.assert_close(layer(patches), layer(patches.unsqueeze(0))[0])


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_matches_hf_peft_after_training(variant):
    """All p_e = 1 and γ = 0: LiME-LoRA/DoRA equals peft's LoRA/DoRA with the same (trained) weights."""
    model = tiny_causal_lm()
    oracle = get_peft_model(copy_of(model), LoraConfig(
        r=2, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_dora=variant == "dora"))
    ids = torch.randint(0, 97, (2, 12))
    optimizer = torch.optim.AdamW([p for p in oracle.parameters() if p.requires_grad], lr=0.05)
    oracle.train()
    for _ in range(3):
        loss = oracle(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    oracle.eval()

    ours = lime.apply_lime(copy_of(model), LiMEConfig(variant=variant))
    trained = dict(oracle.named_parameters())
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LiMELinear):
                prefix = f"base_model.model.{name}"
                module.adapter.lora_A.copy_(trained[f"{prefix}.lora_A.default.weight"])
                module.adapter.lora_B.copy_(trained[f"{prefix}.lora_B.default.weight"])
                if variant == "dora":
                    module.adapter.magnitude.copy_(trained[f"{prefix}.lora_magnitude_vector.default.weight"])
                    assert not torch.allclose(module.adapter.magnitude, module.base.weight.norm(dim=1))
                assert module.adapter.lora_B.abs().max() > 0
                module.expert_vectors.fill_(1.0)
                module.shared_gate.zero_()
    torch.testing.assert_close(ours(input_ids=ids).logits, oracle(input_ids=ids).logits, atol=1e-6, rtol=0)


def decode_step_by_step(model, ids, mask, prefill):
    out = model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    logits, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache,
                    use_cache=True)
        logits.append(out.logits)
        cache = out.past_key_values
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n_gram", [1, 2, 3, 4])
def test_cached_decoding_equals_full_forward(variant, n_gram):
    # LiME prompt routing reads the mean embedding of the whole input (docs/method.md §1.1), which a prefill of 3 tokens
    # cannot know; its prompts are fixed at the prefill. Plain prompt tuning has no such dependence.
    method = "plain" if VARIANTS[variant].build is None else "lime"
    config = LiMEConfig(variant=variant, method=method, routing=dict(n_gram=n_gram))
    model = lime.apply_lime(tiny_causal_lm(), config)
    perturb_trainable(model)
    ids, mask = left_padded_batch([11, 7, 4], total=11)
    full = model(input_ids=ids, attention_mask=mask).logits
    cached = decode_step_by_step(model, ids, mask, prefill=3)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=0)


def test_anchor_last_refuses_cached_decoding():
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(routing=dict(n_gram=2, anchor="last")))
    ids, mask = left_padded_batch([6], total=6)
    model(input_ids=ids, attention_mask=mask)  # a full forward is fine
    with pytest.raises(RuntimeError, match="anchor='last'"):
        decode_step_by_step(model, ids, mask, prefill=3)


@pytest.mark.parametrize("n_gram", [1, 3])
def test_batch_invariance(n_gram):
    """norm=token: a sample's outputs do not depend on its batch mates or on how much padding it has."""
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(routing=dict(n_gram=n_gram)))
    perturb_trainable(model)
    ids, mask = left_padded_batch([9, 5, 2], total=12, seed=3)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for row, length in enumerate([9, 5, 2]):
        alone = model(input_ids=ids[row : row + 1, -length:]).logits[0]
        torch.testing.assert_close(batched[row, -length:], alone, atol=1e-5, rtol=0)


def test_global_norm_is_not_batch_invariant():
    """The released code's global max couples the samples of a batch (why `token` is the default)."""
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(routing=dict(norm="global")))
    perturb_trainable(model, scale=1.0)
    embeds = torch.randn(2, 9, 32)
    embeds[1] *= 50  # a loud batch mate sets the global max
    batched = model(inputs_embeds=embeds).logits
    alone = model(inputs_embeds=embeds[:1]).logits
    assert not torch.allclose(batched[:1], alone, atol=1e-4)
    token = lime.apply_lime(tiny_causal_lm(), LiMEConfig())
    token.load_state_dict(model.state_dict())
    torch.testing.assert_close(token(inputs_embeds=embeds).logits[:1], token(inputs_embeds=embeds[:1]).logits,
                               atol=1e-5, rtol=0)


def test_every_trainable_tensor_gets_a_gradient_and_nothing_else_does():
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(variant="dora"))
    perturb_trainable(model)
    model.train()
    ids = torch.randint(0, 97, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_balance_loss_collects_every_layer():
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig())
    perturb_trainable(model)
    model.train()
    ids, mask = left_padded_batch([8, 5], total=8)
    model(input_ids=ids, attention_mask=mask)
    layers = [m for m in model.modules() if isinstance(m, LiMELinear)]
    assert len(layers) == 8 and all(m.routing_stats.tokens == 13 for m in layers)
    usage = [m.routing_stats.usage for m in layers]
    imp = torch.stack([4 * (u**2).sum() - 1 for u in usage]).mean()
    kl = torch.stack([(u * (4 * u).log()).sum() for u in usage]).mean()
    loss = lime.balance_loss(model, importance_weight=0.1, kl_weight=0.01, scale=0.01)
    torch.testing.assert_close(loss, 0.01 * (0.1 * imp + 0.01 * kl))
    loss.backward()
    # the zero-parameter router reads z and ẑ only, so the last layer's experts feed no routing decision
    assert layers[-1].expert_vectors.grad is None and layers[0].expert_vectors.grad is not None
    assert torch.isfinite(layers[0].adapter.lora_B.grad).all() and layers[0].adapter.lora_B.grad.abs().sum() > 0
    summary = lime.routing_summary(model)
    assert len(summary["routing/usage"]) == 4 and abs(sum(summary["routing/usage"]) - 1) < 1e-5


def test_learned_router_adds_d_in_times_e_parameters():
    base, plain = make_layer("lora")
    _, learned = make_layer("lora", routing=RoutingConfig(router="learned"))
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad) - base.weight.numel() - 10
    assert count(learned) - count(plain) == 12 * 4
    x = torch.randn(2, 3, 12)
    assert torch.equal(copy.deepcopy(learned)(x), base(x))  # still the base at init: ẑ = 0


@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
def test_vlm_is_its_base_at_init_with_images_and_videos(tiny_model, make_inputs, variant):
    """Both families, both towers wrapped: exactly the base model's logits at init."""
    base, processor = tiny_model
    model = lime.apply_lime(copy.deepcopy(base), LiMEConfig(variant=variant, targets=_targets(base)))
    assert any(isinstance(m, LiMELinear) for n, m in model.named_modules() if "visual" in n or "vision" in n)
    for media in ("image", "video"):
        inputs = make_inputs(processor, batch_size=2, media=media)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, base(**inputs).logits)


def _targets(model):
    """Each family's attention projections in both towers (SigLIP out_proj; Qwen2-VL's fused qkv and proj)."""
    lm = ("q_proj", "k_proj", "v_proj", "o_proj")
    return lm + (("attn.qkv", "attn.proj") if "Qwen2VL" in type(model).__name__ else ("out_proj",))


def test_vlm_generation_with_cache_equals_full_forward(tiny_model, make_inputs):
    """Greedy generation with the KV cache and n-gram windows gives the logits of one full forward pass."""
    base, processor = tiny_model
    model = lime.apply_lime(copy.deepcopy(base), LiMEConfig(targets=_targets(base), routing=dict(n_gram=3)))
    perturb_trainable(model, scale=0.5)
    model.eval()
    inputs = make_inputs(processor, batch_size=2, media="image", generation=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None, min_new_tokens=5)
        sequences = out.sequences
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, inputs["input_ids"].shape[1]:])], 1)
        full_inputs = {**inputs, "input_ids": sequences, "attention_mask": mask}
        if "mm_token_type_ids" in inputs:
            pad = torch.zeros_like(sequences[:, inputs["input_ids"].shape[1]:])
            full_inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], pad], 1)
        full = model(**full_inputs).logits
    prompt = inputs["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        # fp32 sums in another order (cached attention vs one pass) move logits of size ~10 by up to ~1.4e-5; a
        # routing-state error moves them by 1e-2 and more
        torch.testing.assert_close(logits, full[:, prompt - 1 + step], atol=5e-5, rtol=1e-5)


def _update_in_place(model, how):
    """Change every trainable tensor the way an optimizer, a checkpoint load or an EMA swap does."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if how.startswith("adamw"):
        optimizer = torch.optim.AdamW(trainable, lr=0.1, fused=how == "adamw_fused", foreach=how == "adamw_foreach")
        ids = torch.randint(1, 97, (2, 6))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    elif how == "load_state_dict":
        model.load_state_dict({k: v + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()})
    else:
        for p in trainable:
            if how == "data_write":
                p.data.mul_(1.5)
            else:  # EMA swap: copy the averaged weights in through .data (no autograd, no version bump)
                p.data.copy_(p.detach() * 0.5 + 0.2)


@pytest.mark.parametrize("how", ["adamw_fused", "adamw_foreach", "adamw_single", "load_state_dict", "data_write",
                                 "ema_swap"])
def test_no_grad_forward_after_an_update_sees_the_new_parameters(how):
    """Evaluation or generation after an update (mid-training) uses the updated adapter, however it was updated."""
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(variant="dora", routing=dict(n_gram=2)))
    perturb_trainable(model)
    ids, mask = left_padded_batch([8, 5], total=8)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    _update_in_place(model, how)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                   pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want = model(input_ids=ids, attention_mask=mask).logits.detach()  # with autograd: factors built afresh
    assert not torch.allclose(want, before, atol=1e-3)
    torch.testing.assert_close(after, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(generated.logits[0], want[:, -1], atol=1e-5, rtol=0)


def test_factors_are_built_once_per_decoding_run(monkeypatch):
    """Cached decoding keeps each layer's factors with the KV cache: one build per layer per generate call."""
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(variant="dora"))
    perturb_trainable(model)
    builds = []
    original = lime.fused.factors
    monkeypatch.setattr(lime.fused, "factors", lambda *args: builds.append(1) or original(*args))
    ids, mask = left_padded_batch([6, 4], total=6)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                       pad_token_id=0)
    assert len(builds) == 8  # 2 blocks x 4 projections, not 8 per decoding step


def test_deepcopy_after_a_training_forward():
    """Routing statistics hold graph tensors after a training forward; the copy gets their values, detached."""
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(routing=dict(n_gram=2)))
    perturb_trainable(model)
    model.train()
    ids = torch.randint(1, 97, (2, 6))
    model(input_ids=ids, labels=ids)
    clone = copy.deepcopy(model)
    layer, copied = model.model.layers[0].self_attn.q_proj, clone.model.layers[0].self_attn.q_proj
    assert layer.routing_stats.usage.grad_fn is not None and copied.routing_stats.usage.grad_fn is None
    torch.testing.assert_close(copied.routing_stats.usage, layer.routing_stats.usage.detach())
    clone.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_and_the_balance_loss(reentrant):
    """Non-reentrant checkpointing gives the balance loss's gradients; reentrant would drop them: refused."""
    ids, mask = left_padded_batch([8, 5], total=8)
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    for checkpointing in (False, True):
        model = lime.apply_lime(tiny_causal_lm(), LiMEConfig())
        perturb_trainable(model)
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        torch.manual_seed(0)  # the same jitter draws
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if checkpointing and reentrant:
            with pytest.raises(RuntimeError, match="use_reentrant"):
                lime.balance_loss(model, 1.0, 1.0)
            return
        (loss + lime.balance_loss(model, 1.0, 1.0)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_dora_padding_keeps_the_frozen_output(fused, grad, monkeypatch):
    """Padding positions give W x + b in every variant, DoRA included (not its rescaled μ ⊙ W x + b)."""
    monkeypatch.setattr(LiMELinear, "fused", fused)
    base, layer = make_layer("dora")
    perturb_trainable(layer)
    mu = layer.adapter.rescale(base).detach()
    assert (mu - 1).abs().max() > 0.05
    layer.text_context = TextContext(mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool))
    x = torch.randn(2, 5, 12)
    with torch.set_grad_enabled(grad):
        out = layer(x)
    torch.testing.assert_close(out[0, :2], base(x)[0, :2], atol=1e-6, rtol=0)
    real_z = mu * (x @ base.weight.T) + base.bias
    assert not torch.allclose(out[0, 2:], base(x)[0, 2:], atol=1e-3)  # real tokens: adapted
    assert (real_z - base(x)).abs().max() > 1e-2  # so the two frozen outputs really differ


def test_global_norm_refuses_cached_decoding():
    """routing.norm=global normalises over the whole batch, which a decoding step cannot see: refused."""
    model = lime.apply_lime(tiny_causal_lm(), LiMEConfig(routing=dict(norm="global")))
    ids, mask = left_padded_batch([6, 4], total=6)
    model(input_ids=ids, attention_mask=mask)  # a full forward is fine
    with pytest.raises(RuntimeError, match="norm='global'.*cached generation"):
        decode_step_by_step(model, ids, mask, prefill=3)
    with torch.no_grad():  # uncached generation is what it can do
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       use_cache=False)


def _media_features(model, inputs, media):
    """Per image (video): the vision tower's features as the language model receives them."""
    inner = model.model
    if "pixel_values" in inputs and "image_grid_thw" in inputs:  # Qwen2-VL: every image's patches on one axis
        return list(inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
    if "video_grid_thw" in inputs:
        return list(inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output)
    if media == "image":  # LLaVA-OV: a batch axis of tiles
        return list(inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output)
    return list(inner.get_video_features(inputs["pixel_values_videos"]).pooler_output)


def _one_sample(inputs, index):
    """Sample `index` of a processor batch, alone (Qwen2-VL's packed pixel rows sliced by its grid)."""
    one = {}
    for key in ("image", "video"):
        grid_key, pixels_key = f"{key}_grid_thw", "pixel_values" if key == "image" else "pixel_values_videos"
        if grid_key in inputs:
            rows = inputs[grid_key].prod(-1)
            start = int(rows[:index].sum())
            one[pixels_key] = inputs[pixels_key][start : start + int(rows[index])]
            one[grid_key] = inputs[grid_key][index : index + 1]
    for key, value in inputs.items():
        one.setdefault(key, value[index : index + 1])
    return one


@pytest.mark.parametrize("media", ["image", "video"])
def test_vision_features_do_not_depend_on_the_batch(tiny_model, make_inputs, media, monkeypatch):
    """Images and videos of different sizes: each one's features are those it gets alone (n-gram windows and
    every per-sequence statistic stay inside one image, also in Qwen2-VL's packed tower)."""
    # One no-grad path whatever the token count (the paths differ in fp32 summation order only).
    monkeypatch.setattr(LiMELinear, "direct_max_tokens", 0)
    base, processor = tiny_model
    model = lime.apply_lime(copy.deepcopy(base), LiMEConfig(targets=_targets(base), routing=dict(n_gram=3)))
    perturb_trainable(model, scale=0.5)
    inputs = make_inputs(processor, batch_size=3, media=media)
    with torch.no_grad():
        batched = _media_features(model, inputs, media)
        for index in range(3):
            alone = _media_features(model, _one_sample(inputs, index), media)
            assert len(alone) == 1 and alone[0].shape == batched[index].shape
            torch.testing.assert_close(batched[index], alone[0], atol=1e-5, rtol=0)


def test_qwen2_vl_generation_does_not_depend_on_the_batch(tiny_qwen2_vl, make_inputs):
    """End to end: a sample's generated logits are those it gets alone (images of different sizes, n-gram 3)."""
    base, processor = tiny_qwen2_vl
    model = lime.apply_lime(copy.deepcopy(base), LiMEConfig(targets=_targets(base), routing=dict(n_gram=3)))
    perturb_trainable(model, scale=0.5)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    inputs = make_inputs(processor, batch_size=3, generation=True)
    with torch.no_grad():
        batched = model.generate(**inputs, **kwargs)
        for index in range(3):
            alone = model.generate(**_one_sample(inputs, index), **kwargs)
            for step in range(3):
                torch.testing.assert_close(batched.logits[step][index], alone.logits[step][0], atol=1e-4, rtol=0)
