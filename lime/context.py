"""Per-forward state the LiME layers need and the model does not pass to nn.Linear.

A forward pre-hook on the language model records the text attention mask and the length of the KV cache;
the LiME layers inside the language model read them. Vision-tower layers get no context: their token axis
is image patches and the text mask does not apply. Nothing in the model's `forward` is patched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class TextContext:
    mask: Tensor | None = None  # (B, past + T) bool, True at non-pad tokens; None: every token is real
    past_length: int = 0  # tokens already in the KV cache (0 for a full forward or a prefill)
    sample_clusters: Tensor | None = None  # MoCLE: each sample's instruction cluster (B,) (lime.mocle)

    def valid(self, batch: int, num_new: int, device: torch.device) -> Tensor:
        """(B, past + T) bool mask of real tokens for a layer call over `num_new` new tokens."""
        if self.mask is not None:
            if self.mask.shape[0] != batch or self.mask.shape[1] < num_new:
                raise RuntimeError(
                    f"LiME: the text attention mask has shape {tuple(self.mask.shape)} but a layer saw "
                    f"{batch} sequences of {num_new} new tokens"
                )
            return self.mask
        return torch.ones(batch, self.past_length + num_new, dtype=torch.bool, device=device)


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple cache


def _new_tokens(args: tuple, kwargs: dict) -> int | None:
    for key in ("inputs_embeds", "input_ids"):
        value = kwargs.get(key)
        if value is not None:
            return value.shape[1]
    return args[0].shape[1] if args and isinstance(args[0], Tensor) else None


def track_text_mask(language_model: nn.Module, context: TextContext) -> torch.utils.hooks.RemovableHandle:
    """Keep `context` in step with every call of `language_model`."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        past = _cache_length(kwargs.get("past_key_values"))
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2:
                raise ValueError(
                    "LiME needs the 2-D (batch, length) padding mask at the language model, got "
                    f"{type(mask).__name__}; prepared 4-D masks (static caches, compiled generation) are "
                    "not supported"
                )
            num_new = _new_tokens(args, kwargs)
            if num_new is not None:
                past = mask.shape[1] - num_new
            mask = mask.bool()
        context.mask, context.past_length = mask, past

    return language_model.register_forward_pre_hook(hook, with_kwargs=True)
