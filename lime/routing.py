"""Zero-parameter routing (docs/method.md §2): logits, expert selection and n-gram windows.

The functions are pure tensor code over a trailing expert axis E; `Router` strings them together for one
layer. It keeps no state: what cached decoding needs (the weights of the positions n-gram windows reach back
to) lives with the KV cache (lime.context.CacheState).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lime.config import RoutingConfig

if TYPE_CHECKING:
    from lime.context import CacheState

NORM_FLOOR = 1e-6


def channel_indices(d_out: int, num_experts: int, channels: str, seed: int = 0) -> Tensor:
    """The E output channels C whose values feed the router."""
    if channels == "leading":
        return torch.arange(num_experts)
    if channels == "trailing":
        return torch.arange(d_out - num_experts, d_out)
    if channels == "central":
        start = (d_out - num_experts) // 2
        return torch.arange(start, start + num_experts)
    if channels == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(d_out, generator=generator)[:num_experts].sort().values
    raise ValueError(f"routing.channels: unknown value {channels!r}")


def _inf_norm(values: Tensor, norm: str, norm_mask: Tensor | None) -> Tensor:
    """‖·‖∞ per token over the E channels (`token`), or one max over the (masked) batch (`global`)."""
    magnitude = values.abs()
    if norm == "token":
        return magnitude.amax(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    if norm_mask is not None:
        magnitude = magnitude * norm_mask.unsqueeze(-1)
    return magnitude.amax().clamp_min(NORM_FLOOR)


def zero_param_logits(
    z: Tensor, z_hat: Tensor, gamma_routing: float, temperature: float, norm: str = "token",
    norm_mask: Tensor | None = None,
) -> Tensor:
    """((1 − γ_r) · Z / ‖Z‖∞ + γ_r · Ẑ / ‖Ẑ‖∞) / τ over the routing channels (last axis).

    `norm_mask` restricts the global max to some tokens (the n-gram anchors); it is ignored by `token`.
    """
    frozen = z / _inf_norm(z, norm, norm_mask)
    adapted = z_hat / _inf_norm(z_hat, norm, norm_mask)
    return ((1.0 - gamma_routing) * frozen + gamma_routing * adapted) / temperature


def apply_jitter(logits: Tensor, jitter: float) -> Tensor:
    """logits · u with u ~ Uniform(1 − j, 1 + j) elementwise (training only; the caller decides)."""
    if jitter == 0:
        return logits
    noise = torch.empty_like(logits).uniform_(1.0 - jitter, 1.0 + jitter)
    return logits * noise


def select_experts(weights: Tensor, cfg: RoutingConfig) -> tuple[Tensor, Tensor]:
    """Expert selection (docs/method.md §2.1). Returns the renormalised weights w̃ and the boolean selection mask."""
    if cfg.selection == "dense":
        return weights, torch.ones_like(weights, dtype=torch.bool)
    if cfg.selection in ("auto", "soft_auto"):
        cutoff = cfg.threshold * weights.amax(dim=-1, keepdim=True)
    else:  # topk, soft_topk: the k-th largest weight
        cutoff = weights.topk(cfg.top_k, dim=-1).values[..., -1:]
    if cfg.selection.startswith("soft_"):
        # The released code's smooth mask: every expert keeps a non-zero weight.
        masked = weights * torch.sigmoid((weights - cutoff) / cfg.soft_sharpness)
        return masked / masked.sum(dim=-1, keepdim=True), torch.ones_like(weights, dtype=torch.bool)
    if cfg.selection == "topk":
        # Exactly k experts even under ties (a `>=` cutoff could keep more).
        selected = torch.zeros_like(weights, dtype=torch.bool)
        selected.scatter_(-1, weights.topk(cfg.top_k, dim=-1).indices, True)
    else:
        selected = weights >= cutoff
    kept = weights * selected
    return kept / kept.sum(dim=-1, keepdim=True), selected


def token_indices(valid: Tensor) -> Tensor:
    """Index of each position among its sequence's non-pad tokens (pads before the first token get -1)."""
    return valid.long().cumsum(dim=-1) - 1


def window_anchors(
    valid: Tensor, num_new: int, n_gram: int, anchor: str, bounds: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """For the last `num_new` positions of `valid` (B, L), the position (on the L axis) of each one's anchor.

    Windows hold n consecutive non-pad tokens counted from each sequence's first non-pad token. A row holds one
    sequence, or, with `bounds` (first, last) (B, L), several packed ones: the index among the row's non-pad
    tokens of the first and last token of each token's own sequence. Pads are their own anchors. Anchors before
    the new tokens (cached decoding) have positions < L - num_new.
    """
    index = token_indices(valid)
    new_index, new_valid = index[:, -num_new:], valid[:, -num_new:]
    if bounds is None:
        first, last = torch.zeros_like(new_index), index[:, -1:]
    else:
        first, last = bounds[0][:, -num_new:], bounds[1][:, -num_new:]
    offset = (new_index - first).clamp_min(0)
    window_start = first + torch.div(offset, n_gram, rounding_mode="floor") * n_gram
    # last: the window's final token, or the sequence's final token for a short last window
    anchor_index = window_start if anchor == "first" else torch.minimum(window_start + n_gram - 1, last)
    # `index` is non-decreasing and steps up exactly at non-pad tokens, so the first position whose index
    # reaches the anchor's index is the anchor itself.
    anchor_pos = torch.searchsorted(index.contiguous(), anchor_index.contiguous(), side="left")
    own = torch.arange(valid.shape[1] - num_new, valid.shape[1], device=valid.device).expand_as(anchor_pos)
    return torch.where(new_valid, anchor_pos, own)


class Router(nn.Module):
    """Routes each token of one layer to its experts; zero parameters unless `router: learned`.

    forward(x, z, z_hat, valid) -> (w, w̃, selected), each (B, T, E):
    w the softmax weights (shared within n-gram windows), w̃ the selected and renormalised weights.
    The router keeps no state of its own: what cached decoding needs lives with the KV cache (`memory`).
    """

    def __init__(self, d_in: int, d_out: int, num_experts: int, cfg: RoutingConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = num_experts
        if cfg.router == "learned":
            self.proj = nn.Linear(d_in, num_experts, bias=False)
        else:
            self.proj = None
            channels = channel_indices(d_out, num_experts, cfg.channels, cfg.channel_seed)
            # Derived from the config, so not saved with the adapter.
            self.register_buffer("channels", channels, persistent=False)

    def logits(self, x: Tensor, z: Tensor, z_hat: Tensor, norm_mask: Tensor | None) -> Tensor:
        if self.proj is not None:
            return self.proj(x.to(self.proj.weight.dtype)).float() / self.cfg.temperature
        z_feat, z_hat_feat = z[..., self.channels].float(), z_hat[..., self.channels].float()
        return zero_param_logits(z_feat, z_hat_feat, self.cfg.gamma_routing, self.cfg.temperature,
                                 self.cfg.norm, norm_mask)

    def forward(
        self, x: Tensor, z: Tensor, z_hat: Tensor, valid: Tensor, *, memory: CacheState | None = None,
        bounds: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x, z, z_hat: (B, T, ·); valid: (B, past + T) bool, True at non-pad tokens (past: cached tokens).

        `memory`: the state kept with the KV cache (lime.context.CacheState), which holds the weights of the
        cached positions that n-gram windows reach back to; `bounds`: packed sequences (`window_anchors`).
        """
        cfg, num_new = self.cfg, x.shape[-2]
        past = valid.shape[1] - num_new
        if past > 0:
            self._check_cacheable()
        windowed = cfg.n_gram > 1
        anchor_pos = norm_mask = None
        if windowed:
            anchor_pos = window_anchors(valid, num_new, cfg.n_gram, cfg.anchor, bounds)
            own = torch.arange(past, past + num_new, device=x.device)
            norm_mask = valid[:, -num_new:] & (anchor_pos == own)
        elif cfg.norm == "global":
            norm_mask = valid[:, -num_new:]
        logits = self.logits(x, z, z_hat, norm_mask)
        if self.training:
            logits = apply_jitter(logits, cfg.jitter)
        weights = logits.softmax(dim=-1)
        if windowed:
            weights = self._share_windows(weights, anchor_pos, past, memory)
        selected_weights, selected = select_experts(weights, cfg)
        return weights, selected_weights, selected

    def _check_cacheable(self) -> None:
        """Settings under which a decoding step cannot compute what the full forward computes."""
        if self.cfg.n_gram > 1 and self.cfg.anchor == "last":
            raise RuntimeError(
                "routing.anchor='last' looks ahead to the end of each n-gram window, so it cannot run "
                "under cached generation; use routing.anchor='first' (the default) for generation."
            )
        if self.cfg.norm == "global" and self.proj is None:
            raise RuntimeError(
                "routing.norm='global' normalises by one max over every token of the batch, which a decoding "
                "step cannot see, so it cannot run under cached generation; use routing.norm='token' (the "
                "default), or generate with use_cache=False."
            )

    def _share_windows(self, weights: Tensor, anchor_pos: Tensor, past: int, memory: CacheState | None) -> Tensor:
        """Every token takes its window's anchor weights; anchors before this call come from `memory`."""
        if past > 0 and memory is None:
            raise RuntimeError(
                "n-gram routing: a decoding step refers to tokens of an earlier call, but no routing state "
                "came with the KV cache (call the model with the `past_key_values` its prefill returned)."
            )
        kept = None if memory is None else memory.past_weights(self, past)
        every = weights if kept is None else torch.cat([kept.to(weights.dtype), weights], dim=1)
        if memory is not None:
            # An anchor's own weights are its window's: the raw weights of every position are all a later
            # token (or a token after a crop) can need.
            memory.keep_weights(self, every)
        return every.gather(1, anchor_pos.unsqueeze(-1).expand(*anchor_pos.shape, every.shape[-1]))


def routing_entropy(weights: Tensor) -> Tensor:
    """Entropy of each token's routing distribution, in nats."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(dim=-1)


def masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean over the token axes of (B, T, ...) `values` at the positions where `valid` (B, T) is True."""
    mask = valid.to(values.dtype).unsqueeze(-1) if values.dim() > valid.dim() else valid.to(values.dtype)
    return (values * mask).sum(dim=(0, 1)) / mask.sum().clamp_min(1.0)


__all__ = [
    "Router", "apply_jitter", "channel_indices", "masked_mean", "routing_entropy", "select_experts",
    "token_indices", "window_anchors", "zero_param_logits"
]
