"""Build a model and its processor from a model config (``configs/model/*.yaml``).

Three ways to get a model, chosen by the config:

* ``name_or_path`` (hub id or local dir): ``from_pretrained`` with ``dtype``, ``attn_implementation``,
  ``device_map`` and optional bitsandbytes ``quantization`` (8bit | 4bit).
* ``tiny`` (a dict of architecture sizes): the real architecture, randomly initialised from ``seed``,
  with the tiny local processor of :mod:`lime.data.processors`. No downloads; used by tests and smoke runs.
* ``device="meta"``: the architecture only, no weights, from the ``architecture`` key (the checkpoint's
  config.json) or from ``tiny``. Parameter counts of the 7B models are computed this way, offline.

``targets`` and ``lm_targets`` in the config are dotted-name suffixes of ``nn.Linear`` modules, resolved by
:func:`lime.inject.target_linears` (``lm_targets`` with ``language_model_only``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from lime.data import processors as tiny_processors
from lime.settings import plain  # DictConfig -> dict: transformers configs reject DictConfig values

FAMILIES = {
    "llava_onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
}

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

DEFAULT_CACHE = Path("~/.cache/lime/processors")


def build(cfg: Mapping[str, Any], device: str | torch.device | None = None,
          ) -> tuple[PreTrainedModel, ProcessorMixin | None]:
    """Build ``(model, processor)`` from a model config; the model is returned in eval mode.

    ``device="meta"`` builds the architecture without weights; the processor is then the tiny one
    for tiny configs and ``None`` otherwise (a real processor would need the hub). Any other
    ``device`` moves the built model there (not with quantization or a ``device_map``, which place it).
    """
    cfg = plain(cfg)
    _family(cfg)
    if device is not None and torch.device(device).type == "meta":
        return _build_meta(cfg)
    model, processor = _build_tiny(cfg) if cfg.get("tiny") else _load_pretrained(cfg)
    _set_grid_pinpoints(cfg, model.config, processor)
    if device is not None and not cfg.get("quantization") and cfg.get("device_map") is None:
        model.to(device)
    return model.eval(), processor


def tiny_config(cfg: Mapping[str, Any], processor: ProcessorMixin) -> PretrainedConfig:
    """The tiny model config: ``cfg["tiny"]`` sizes on top of the tiny processor's vocabulary and geometry.

    The vocabulary is the tiny tokenizer's, so the image/video token ids (at its end) are in range.
    Vision geometry comes from :mod:`lime.data.processors` so that model and processor always agree.
    """
    cfg = plain(cfg)
    family = _family(cfg)
    sizes = cfg["tiny"]
    tok = processor.tokenizer
    text = {"vocab_size": len(tok), "max_position_embeddings": 4096, "tie_word_embeddings": False,
            "bos_token_id": None, "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.pad_token_id, **sizes["text"]}
    if family == "llava_onevision":
        side = tiny_processors.TINY_IMAGE_SIZE
        vision = {"model_type": "siglip_vision_model", "image_size": side,
                  "patch_size": tiny_processors.TINY_PATCH_SIZE, "vision_use_head": False, **sizes["vision"]}
        return LlavaOnevisionConfig(
            text_config={"model_type": "qwen2", **text}, vision_config=vision,
            image_token_index=processor.image_token_id, video_token_index=processor.video_token_id,
            image_grid_pinpoints=[[side, side]], vision_feature_select_strategy="full",
            vision_feature_layer=-1, tie_word_embeddings=False)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(head_dim)}
    vision = {"patch_size": tiny_processors.TINY_PATCH_SIZE, "spatial_merge_size": tiny_processors.TINY_MERGE_SIZE,
              "temporal_patch_size": 2, "hidden_size": text["hidden_size"], **sizes["vision"]}
    return Qwen2VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), tie_word_embeddings=False)


def config_from_architecture(family: str, architecture: Mapping[str, Any]) -> PretrainedConfig:
    """A model config from a config.json-style mapping (the ``architecture`` key of a model yaml)."""
    config_cls, _ = FAMILIES[family]
    arch = {k: v for k, v in plain(architecture).items() if k != "model_type"}
    return config_cls(**arch)


# --- the three build paths -------------------------------------------------------------------------

def _build_meta(cfg: dict) -> tuple[PreTrainedModel, ProcessorMixin | None]:
    family = _family(cfg)
    if cfg.get("tiny"):
        processor = _tiny_processor(cfg)
        config = tiny_config(cfg, processor)
    elif cfg.get("architecture"):
        processor = None
        config = config_from_architecture(family, cfg["architecture"])
    else:
        raise ValueError(f"model {cfg.get('name')!r}: a meta-device build needs an `architecture` "
                         "(the checkpoint's config.json) or a `tiny` section in the model config")
    _set_grid_pinpoints(cfg, config, None)
    _, model_cls = FAMILIES[family]
    with torch.device("meta"):  # parameters get shapes but no storage: 7B counts in milliseconds
        model = model_cls._from_config(config)
    return model.eval(), processor


def _build_tiny(cfg: dict) -> tuple[PreTrainedModel, ProcessorMixin]:
    processor = _tiny_processor(cfg)
    config = tiny_config(cfg, processor)
    _, model_cls = FAMILIES[_family(cfg)]
    # A forked RNG: the same seed gives the same weights without disturbing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.get("seed") or 0))
        model = model_cls._from_config(config, dtype=_dtype(cfg.get("dtype", "float32")),
                                       **_attn_kwargs(cfg))
    _set_generation_tokens(model, processor)
    return model, processor


def _load_pretrained(cfg: dict) -> tuple[PreTrainedModel, ProcessorMixin]:
    path = cfg.get("name_or_path")
    if not path:
        raise ValueError(f"model {cfg.get('name')!r}: set `name_or_path` (hub id or local dir) or `tiny`")
    _, model_cls = FAMILIES[_family(cfg)]
    kwargs: dict[str, Any] = {"dtype": _dtype(cfg.get("dtype", "bfloat16")), **_attn_kwargs(cfg)}
    quantization = _quantization_config(cfg)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = cfg.get("device_map") or "auto"  # bitsandbytes weights live on the GPU
    elif cfg.get("device_map") is not None:
        kwargs["device_map"] = cfg["device_map"]
    model = model_cls.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(cfg.get("processor_name_or_path") or path,
                                              **(cfg.get("processor_kwargs") or {}))
    return model, processor


# --- helpers ---------------------------------------------------------------------------------------

def _tiny_processor(cfg: dict) -> ProcessorMixin:
    cache = Path(cfg["cache_dir"]) if cfg.get("cache_dir") else DEFAULT_CACHE / cfg.get("name", _family(cfg))
    return tiny_processors.build_tiny_processor(_family(cfg), cache)


def _set_grid_pinpoints(cfg: dict, config: PretrainedConfig, processor: ProcessorMixin | None) -> None:
    """LLaVA-OV anyres grid: the processor tiles with it and the model unpads with it, so set both."""
    pins = cfg.get("image_grid_pinpoints")
    if not pins or _family(cfg) != "llava_onevision":
        return
    pins = [list(p) for p in pins]
    config.image_grid_pinpoints = pins
    if processor is not None:
        processor.image_processor.image_grid_pinpoints = pins


def _set_generation_tokens(model: PreTrainedModel, processor: ProcessorMixin) -> None:
    """Stop at <|im_end|> (end of an assistant turn) or <|endoftext|>, pad with the tokenizer's pad."""
    tok = processor.tokenizer
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies into (temporal, height, width) like Qwen2-VL's [16, 24, 24]."""
    half = head_dim // 2
    spatial = (half - half // 4) // 2
    return [half - 2 * spatial, spatial, spatial]


def _quantization_config(cfg: dict):
    mode = cfg.get("quantization")
    if mode in (None, "none", False):
        return None
    from transformers import BitsAndBytesConfig  # imported lazily: bitsandbytes is GPU-only

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=_dtype(cfg.get("dtype", "bfloat16")))
    raise ValueError(f"model.quantization must be null, 8bit or 4bit, got {mode!r}")


def _attn_kwargs(cfg: dict) -> dict:
    impl = cfg.get("attn_implementation")
    return {"attn_implementation": impl} if impl else {}


def _dtype(name: str | torch.dtype | None) -> torch.dtype | str:
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return name or torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)} or auto, got {name!r}")
    return DTYPES[name]


def _family(cfg: Mapping[str, Any]) -> str:
    family = cfg.get("family")
    if family not in FAMILIES:
        raise ValueError(f"model.family must be one of {sorted(FAMILIES)}, got {family!r}")
    return family
