"""lime.models and lime.data.processors: tiny models run end to end, 7B totals come out exactly on meta."""

from __future__ import annotations

import pytest
import torch

import lime
from lime import models
from lime.config import LiMEConfig
from lime.data.processors import FAMILIES, build_tiny_processor, example_inputs
from lime.inject import language_model

# docs/method.md §5: frozen-model totals, counted on the meta device from the configs' architecture.
META_TOTALS = {
    "llava_ov_7b": 8_030_807_584,
    "llava_ov_0.5b": 893_675_552,
    "qwen2_vl_7b": 8_291_375_616,  # not in the paper; what Qwen/Qwen2-VL-7B-Instruct's config gives
}
# Wrapped layers: 7B = 28 LM layers x 4 + 26 SigLIP layers x 4 (docs/method.md §5: 216).
TARGET_COUNTS = {"llava_ov_7b": (216, 112), "llava_ov_0.5b": (200, 96), "qwen2_vl_7b": (176, 112)}


@pytest.mark.parametrize("media", ["image", "video"])
def test_forward_gives_finite_logits(tiny_model, media):
    model, processor = tiny_model
    batch = example_inputs(processor, batch_size=2, media=media)
    placeholder = processor.image_token_id if media == "image" else processor.video_token_id
    assert (batch["input_ids"] == placeholder).sum(dim=1).min() > 0  # the media really is in the sequence
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_llava_pixel_values_are_tiled(tiny_llava):
    # LLaVA-OV anyres: (batch, tiles, 3, H, W) with the base image + one tile at one 32 px pinpoint.
    _, processor = tiny_llava
    assert example_inputs(processor, batch_size=2)["pixel_values"].shape == (2, 2, 3, 32, 32)


def test_qwen2_vl_inputs_carry_mm_token_type_ids(tiny_qwen2_vl):
    # transformers 5.x Qwen2-VL refuses image inputs without mm_token_type_ids (needed for M-RoPE).
    _, processor = tiny_qwen2_vl
    batch = example_inputs(processor, batch_size=2)
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape


def test_tokens_lie_inside_the_model_vocabulary(tiny_model):
    model, processor = tiny_model
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert model.config.image_token_id == processor.image_token_id < len(processor.tokenizer)
    assert model.config.video_token_id == processor.video_token_id < len(processor.tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_save_load_round_trip(family, tmp_path):
    first = build_tiny_processor(family, tmp_path / "p")
    again = build_tiny_processor(family, tmp_path / "p")  # second call reloads the cached copy
    text = "Question: How many cats? Options: A. 2 B. 3. Answer: B (naïve café, 42%)"
    ids = first.tokenizer(text)["input_ids"]
    assert again.tokenizer(text)["input_ids"] == ids
    assert first.tokenizer.decode(ids) == text  # byte-level BPE: any text round-trips
    assert first.tokenizer.padding_side == "right"
    for token in (first.image_token, first.video_token, "<|im_start|>", "<|im_end|>"):
        assert len(first.tokenizer(token)["input_ids"]) == 1
    rendered = again.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True)
    assert first.image_token in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="family"):
        build_tiny_processor("llama", tmp_path)
    with pytest.raises(ValueError, match="family"):
        models.build({"family": "llama"}, device="meta")


@pytest.mark.parametrize("name", sorted(META_TOTALS))
def test_meta_totals_are_exact(name, model_cfg):
    cfg = model_cfg(name)
    model, processor = models.build(cfg, device="meta")
    assert processor is None
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == META_TOTALS[name]
    n_all, n_lm = TARGET_COUNTS[name]
    assert len(lime.validate(model, LiMEConfig(targets=cfg.targets))) == n_all
    assert len(lime.validate(model, LiMEConfig(targets=cfg.lm_targets, language_model_only=True))) == n_lm


def test_meta_build_applies_the_grid_pinpoint(model_cfg):
    model, _ = models.build(model_cfg("llava_ov_7b"), device="meta")
    assert model.config.image_grid_pinpoints == [[384, 384]]  # docs/method.md §6


def test_target_names_match_whole_components(tiny_llava):
    model, _ = tiny_llava
    names = lime.validate(model, LiMEConfig(targets=["o_proj"]))
    assert names and all(n.endswith(".o_proj") for n in names)  # never SigLIP's out_proj
    lm = lime.validate(model, LiMEConfig(targets=["q_proj"], language_model_only=True))
    assert lm and not any("vision_tower" in n for n in lm)
    assert any("vision_tower" in n for n in lime.validate(model, LiMEConfig(targets=["q_proj"])))


def test_language_model_is_the_text_decoder(tiny_model):
    model, processor = tiny_model
    decoder = language_model(model)
    assert decoder is model.model.language_model
    seen = {}
    handle = decoder.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**example_inputs(processor, batch_size=1))
    finally:
        handle.remove()
    assert seen["inputs_embeds"] is not None and seen["attention_mask"] is not None


def test_generate_with_kv_cache_matches_without(tiny_model):
    model, processor = tiny_model
    batch = example_inputs(processor, batch_size=2, generation=True)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "min_new_tokens": 4}
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        uncached = model.generate(**batch, use_cache=False, **kwargs)
    assert cached.shape == (2, batch["input_ids"].shape[1] + 4)
    assert torch.equal(cached, uncached)


def test_tiny_build_is_seeded(tiny_qwen2_vl, tmp_path, model_cfg):
    model, _ = tiny_qwen2_vl
    again, _ = models.build(model_cfg("tiny_qwen2_vl", cache_dir=str(tmp_path)))
    other, _ = models.build(model_cfg("tiny_qwen2_vl", cache_dir=str(tmp_path), seed=1))
    first = next(model.parameters())
    assert torch.equal(first, next(again.parameters()))
    assert not torch.equal(first, next(other.parameters()))


def test_pretrained_path_loads_a_saved_model(tiny_llava, tmp_path, model_cfg):
    # The real-checkpoint path (from_pretrained + AutoProcessor), exercised offline on a saved tiny model.
    model, processor = tiny_llava
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    cfg = model_cfg("llava_ov_0.5b", name_or_path=str(tmp_path), dtype="float32", image_grid_pinpoints=[[32, 32]])
    loaded, loaded_processor = models.build(cfg)
    assert not loaded.training
    assert loaded_processor.image_processor.image_grid_pinpoints == [[32, 32]]
    batch = example_inputs(loaded_processor, batch_size=2)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-5)
