"""Per-forward state the LiME layers need and the model does not pass to nn.Linear.

Text. A forward pre-hook on the language model records the text attention mask and the length of the KV cache;
the LiME layers inside the language model read them. It also hands the layers the `CacheState` kept with that
KV cache: what LiME must remember between decoding calls (the routing weights that n-gram windows reach back
to, and the token-independent factors of each layer). The state lives on the cache object and follows every
operation `generate` applies to the cache (beam reordering, cropping for assisted and prompt-lookup decoding,
batch selection and repetition, reset), so cached decoding computes what the uncached forward computes with
any decoding strategy, and a cache reused after other batches ran in between keeps its own state.

Vision. Qwen2-VL's vision tower packs the patches of every image (video) of a batch on one axis; a pre-hook on
the tower records each image's patch count from its `grid_thw`, so that the layers treat each image as its own
sequence. Towers with a batch axis (SigLIP in LLaVA-OneVision) need nothing. Nothing in the model's `forward`
is patched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

_FOLLOWED = ("reorder_cache", "crop", "batch_select_indices", "batch_repeat_interleave", "reset")
_NEEDED = ("get_seq_length", "crop", "reorder_cache")  # a transformers Cache (not a legacy tuple)


class CacheState:
    """What LiME keeps with one KV cache, per routed layer.

    `weights[router]` (B, L, E): the routing weights of every cached position (kept for n-gram windows only: a
    new token takes its window's anchor weights, and after a crop that anchor may be any earlier position).
    `factors[layer]`: the layer's token-independent factors (lime.fused), built at the first call with this
    cache and reused until the cache is reset: parameters do not change inside one decoding run, and any other
    forward builds its factors afresh, so no parameter update (whatever the optimizer) can leave them stale.
    """

    def __init__(self) -> None:
        self.weights: WeakKeyDictionary[nn.Module, Tensor] = WeakKeyDictionary()
        self.factors: WeakKeyDictionary[nn.Module, tuple[torch.dtype, Any]] = WeakKeyDictionary()

    def past_weights(self, router: nn.Module, past: int) -> Tensor | None:
        """The weights of the `past` cached positions for `router`; None when nothing is cached."""
        if past == 0:
            return None
        kept = self.weights.get(router)
        if kept is None or kept.shape[1] != past:
            have = "none" if kept is None else kept.shape[1]
            raise RuntimeError(
                f"n-gram routing: the KV cache holds {past} tokens but LiME's routing state kept with it has "
                f"{have}; the cache was filled or changed outside this LiME model (prefill it with the same model "
                "and change it only through its own methods: crop, reorder_cache, batch_select_indices, ...)"
            )
        return kept

    def keep_weights(self, router: nn.Module, weights: Tensor) -> None:
        self.weights[router] = weights.detach()

    def layer_factors(self, layer: nn.Module, dtype: torch.dtype, build: Callable[[], Any]) -> Any:
        kept = self.factors.get(layer)
        if kept is None or kept[0] != dtype:
            kept = self.factors[layer] = (dtype, build())
        return kept[1]

    def follow(self, op: str, cache: Any, *args: Any) -> None:
        """Apply the cache operation `op` (already applied to `cache`) to the kept routing weights."""
        if op == "reset":
            self.weights.clear()
            self.factors.clear()
            return
        for router, kept in list(self.weights.items()):
            if op == "reorder_cache":
                kept = kept.index_select(0, args[0].to(kept.device))
            elif op == "batch_select_indices":
                kept = kept[args[0]]
            elif op == "batch_repeat_interleave":
                kept = kept.repeat_interleave(args[0], dim=0)
            else:  # crop: whatever the argument's convention, keep as many positions as the cache now holds
                kept = kept[:, : cache.get_seq_length()]
            self.weights[router] = kept


class _Followed:
    """`cache.<op>(...)` as the cache's class defines it, then the same operation on the kept `CacheState`.

    An object rather than a closure, so that `copy.deepcopy(cache)` gives a copy that follows its own state.
    """

    def __init__(self, cache: Any, op: str) -> None:
        self.cache, self.op = cache, op

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = getattr(type(self.cache), self.op)(self.cache, *args, **kwargs)
        self.cache.lime_state.follow(self.op, self.cache, *args, *kwargs.values())
        return result


def cache_state(cache: Any) -> CacheState:
    """The state kept with `cache`, attached at its first use; a fresh one for no cache (yet)."""
    if cache is None:
        return CacheState()
    state = getattr(cache, "lime_state", None)
    if state is None:
        state = CacheState()
        if all(callable(getattr(cache, op, None)) for op in _NEEDED):
            _attach(cache, state)
    return state


def _attach(cache: Any, state: CacheState) -> None:
    cache.lime_state = state
    for op in _FOLLOWED:
        if callable(getattr(type(cache), op, None)):
            setattr(cache, op, _Followed(cache, op))


@dataclass
class TextContext:
    mask: Tensor | None = None  # (B, past + T) bool, True at non-pad tokens; None: every token is real
    past_length: int = 0  # tokens already in the KV cache (0 for a full forward or a prefill)
    state: CacheState | None = field(default=None, repr=False)  # kept with this call's KV cache
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

    def bounds(self, num_tokens: int) -> None:
        return None  # text sequences are the rows of the batch


@dataclass
class VisionContext:
    """Patch counts of the images (videos) whose patches a packed vision tower (Qwen2-VL) runs on one axis."""

    lengths: Tensor | None = None  # (num_images,) patches per image; None outside a packed tower's call
    mask = None  # every patch is real: nothing to keep at its frozen output
    state = None  # no KV cache

    def valid(self, batch: int, num_new: int, device: torch.device) -> Tensor:
        return torch.ones(batch, num_new, dtype=torch.bool, device=device)

    def bounds(self, num_tokens: int) -> tuple[Tensor, Tensor] | None:
        """(first, last) (1, num_tokens): the index of the first and last patch of each patch's image.

        A layer after the patch merger sees `merge` patches per row: the counts are divided accordingly.
        """
        if self.lengths is None:
            return None
        lengths, total = self.lengths, int(self.lengths.sum())
        if num_tokens != total:
            merge = total // num_tokens if num_tokens and total % num_tokens == 0 else 0
            if merge == 0 or bool((lengths % merge).any()):
                raise RuntimeError(f"LiME: a vision layer saw {num_tokens} packed patches, but the tower's grid_thw "
                                   f"gives images of {lengths.tolist()} patches")
            lengths = lengths // merge
        ends = lengths.cumsum(0)
        image = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        return (ends - lengths)[image].unsqueeze(0), (ends - 1)[image].unsqueeze(0)


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


def track_text_mask(language_model: nn.Module, context: TextContext) -> list[torch.utils.hooks.RemovableHandle]:
    """Keep `context` in step with every call of `language_model` (its mask, cache length and cache state)."""

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        past = _cache_length(cache)
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
        context.mask, context.past_length, context.state = mask, past, cache_state(cache)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # A prefill without a cache object: the model made one; the state built in this call goes with it.
        made = getattr(output, "past_key_values", None)
        if context.state is not None and made is not None and getattr(made, "lime_state", None) is None \
                and all(callable(getattr(made, op, None)) for op in _NEEDED):
            _attach(made, context.state)
        context.state = None

    return [language_model.register_forward_pre_hook(before, with_kwargs=True),
            language_model.register_forward_hook(after, with_kwargs=True, always_call=True)]


def _packed_towers(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose forward takes `grid_thw` (Qwen2-VL's vision tower)."""
    towers: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) not in inside and "grid_thw" in inspect.signature(module.forward).parameters:
            towers.append(module)
            inside.update(id(m) for m in module.modules())
    return towers


def track_vision_sequences(model: nn.Module, context: VisionContext) -> list[torch.utils.hooks.RemovableHandle]:
    """Record each image's patch count (t · h · w of its `grid_thw` row) for every call of a packed tower."""

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        context.lengths = None if grid is None else grid.prod(dim=-1).long()

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        context.lengths = None

    handles = []
    for tower in _packed_towers(model):
        handles += [tower.register_forward_pre_hook(before, with_kwargs=True),
                    tower.register_forward_hook(after, with_kwargs=True, always_call=True)]
    return handles
