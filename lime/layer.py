"""The wrapped Linear layers: plain PEFT and LiME (docs/method.md §1).

    h = z + ẑ ⊙ P + γ · (ẑ ⊙ p_s),    P = Σ_{e ∈ S} w̃_e p_e

z is the frozen output (DoRA: rescaled by its magnitude), ẑ the shared PEFT module's delta, p_e the expert
vectors, w̃ the routed weights of each token (lime.routing), p_s the shared vector and γ its gate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lime import fused
from lime.adapters import Adapter, build_adapter
from lime.adapters.base import LowRankAdapter
from lime.balance import RoutingStats, routing_stats
from lime.config import LiMEConfig
from lime.context import CacheState, TextContext, VisionContext
from lime.fused import Factors, hidden_and_base, is_low_rank, modulated_direct, modulated_output
from lime.routing import Router


def _as_sequences(x: Tensor) -> Tensor:
    """View any (..., T, d) input as (B, T, d); a 2-D input (Qwen2-VL's vision tower) is one sequence."""
    return x.unsqueeze(0) if x.dim() == 2 else x.reshape(-1, x.shape[-2], x.shape[-1])


def token_layout(context: TextContext | VisionContext | None, x: Tensor, batch: int, num_new: int,
                 ) -> tuple[Tensor, CacheState | None, tuple[Tensor, Tensor] | None]:
    """What a layer call over `num_new` new tokens per sequence needs to know about its token axis:
    (B, past + T) bool, True at real tokens; the state kept with the KV cache; packed-sequence bounds."""
    if context is None:  # every token is real, each row one sequence
        return torch.ones(batch, num_new, dtype=torch.bool, device=x.device), None, None
    bounds = context.bounds(num_new) if x.dim() == 2 else None
    return context.valid(batch, num_new, x.device), context.state, bounds


def add_expert_vectors(module: nn.Module, width: int, config: LiMEConfig, dtype: torch.dtype,
                       device: torch.device) -> None:
    """Register `expert_vectors` p_e ~ U(1 - σ, 1 + σ) (E x width) and, with `config.shared`, `shared_vector`
    p_s ~ N(0, std²) and its gate γ = 0 (docs/method.md §1); both are None without it."""
    sigma = config.expert_init_sigma
    experts = torch.empty(config.num_experts, width, dtype=dtype, device=device)
    module.expert_vectors = nn.Parameter(experts.uniform_(1.0 - sigma, 1.0 + sigma))
    if config.shared:
        shared = torch.empty(width, dtype=dtype, device=device).normal_(0.0, config.shared_init_std)
        module.shared_vector = nn.Parameter(shared)
        module.shared_gate = nn.Parameter(torch.zeros((), dtype=dtype, device=device))
    else:
        module.shared_vector = module.shared_gate = None


class PEFTLinear(nn.Module):
    """A frozen Linear plus its PEFT module: h = z + ẑ (the plain baselines)."""

    def __init__(self, base: nn.Linear, adapter: Adapter,
                 text_context: TextContext | VisionContext | None = None) -> None:
        super().__init__()
        self.base = base
        self.adapter = adapter
        # A plain attribute, not a submodule (shared by the layers of one tower); its state, during cached
        # decoding, keeps what does not change inside one decoding run (`kept_while_decoding`).
        self.text_context = text_context
        # DoRA's μ costs a pass over W: kept with the KV cache while decoding (the reference forward is
        # `base_output(x, base, μ)` and `μ ⊙ delta(x)` with the same μ, so the kept path is the same ops).
        self.rescaled = is_low_rank(adapter) and hasattr(adapter, "delta") and \
            type(adapter).rescale is not LowRankAdapter.rescale

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:  # some model code reads `proj.weight.dtype`
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.rescaled and self.decoding_state() is not None:
            mu = self.kept_while_decoding(x.dtype, lambda: self.adapter.rescale(self.base).to(x.dtype))
            return self.adapter.base_output(x, self.base, mu) + mu * self.adapter.delta(x)
        z, delta = self.adapter(x, self.base)
        return z + delta

    def decoding_state(self) -> CacheState | None:
        """The state kept with the KV cache during cached decoding without autograd; None otherwise."""
        state = getattr(self.text_context, "state", None)
        return None if state is None or torch.is_grad_enabled() else state

    def kept_while_decoding(self, dtype: torch.dtype, build: Callable[[], Any]) -> Any:
        """`build()` (token-independent tensors of this layer), built once per cached decoding run and kept with
        the KV cache: parameters cannot change inside one decoding run, and every other call (training, a new
        run, no cache) builds afresh, so no parameter update, whatever the optimizer, leaves them stale."""
        state = self.decoding_state()
        return build() if state is None else state.layer_factors(self, dtype, build)


class LiMELinear(PEFTLinear):
    """A frozen Linear, one shared PEFT module, and E expert vectors chosen per token by a router.

    Tensors: `adapter.lora_A` (r x d_in), `adapter.lora_B` (d_out x r), `adapter.magnitude` (DoRA, d_out),
    `adapter.slice_delta` (SliceFine, d_out x r), `expert_vectors` (E x d_out), `shared_vector` (d_out),
    `shared_gate` (scalar), `router.proj.weight` (learned router only, E x d_in).
    """

    fused = True  # take the fast paths of lime.fused where the delta producer is low-rank
    direct_max_tokens = 256  # without autograd, up to this many tokens per call use `modulated_direct`

    def __init__(self, base: nn.Linear, config: LiMEConfig,
                 text_context: TextContext | VisionContext | None = None) -> None:
        super().__init__(base, build_adapter(base, config))
        dtype, device = getattr(torch, config.param_dtype), base.weight.device
        d_out = base.out_features
        add_expert_vectors(self, d_out, config, dtype, device)
        self.router = Router(base.in_features, d_out, config.num_experts, config.routing).to(device)
        if self.router.proj is not None:
            self.router.proj.to(dtype)
        # Shared by every layer of the language model (TextContext) or of the vision tower (VisionContext);
        # None: every token is real and each row is one sequence.
        self.text_context = text_context
        self.track_routing = False  # record routing statistics outside training too
        self.routing_stats: RoutingStats | None = None

    def modulation(self, weights: Tensor, dtype: torch.dtype) -> Tensor:
        """P + γ p_s for each token, from its routed weights w̃ (B, T, E)."""
        mix = weights.to(dtype) @ self.expert_vectors.to(dtype)
        if self.shared_vector is None:
            return mix
        return mix + self.shared_gate.to(dtype) * self.shared_vector.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        """h = z + ẑ ⊙ P + γ · (ẑ ⊙ p_s) for every token; padding positions keep the frozen output W x + b.

        LoRA, LoRA-FA, DoRA and SliceFine take the fast paths of `lime.fused`. With autograd, or for more than
        `direct_max_tokens` tokens: h = z + Q Kᵀ, one product of rank r·(E+1) that never builds or saves ẑ and
        P at full width. Without autograd for few tokens (decoding): the formula itself in three fused ops, with
        the token-independent tensors kept between calls. `fused = False`, or any other delta producer, runs
        `reference_forward`: the formula as written.
        """
        if not (self.fused and is_low_rank(self.adapter)):
            return self.reference_forward(x)
        sequences = _as_sequences(x)
        batch, num_new = sequences.shape[:2]
        valid, state, bounds = token_layout(self.text_context, x, batch, num_new)
        new_valid = valid[:, -num_new:]
        keep = new_valid if self.text_context is not None and self.text_context.mask is not None else None
        f = self._factors(sequences.dtype)
        hidden, z = hidden_and_base(self.adapter, sequences, self.base, None)  # u (rank r) and W x + b
        if f.mu is not None:
            z = self._rescaled(z, f.mu, keep)
        route = {"memory": state, "bounds": bounds}
        if not torch.is_grad_enabled() and batch * num_new <= self.direct_max_tokens:
            delta = F.linear(hidden, f.heads)  # ẑ
            weights, routed, selected = self.router(sequences, z, delta, valid, **route)
            h = modulated_direct(z, delta, routed, f, keep)
        else:
            # The router reads Z = z[..., C] and Ẑ = ẑ[..., C]; ẑ is computed at those channels only.
            weights, routed, selected = self.router(sequences, z, self._router_delta(hidden, f, z), valid, **route)
            h = modulated_output(z, hidden, routed, f.k, keep)  # z + Q Kᵀ = z + ẑ ⊙ (P + γ p_s)
        if self.training or self.track_routing:
            self.routing_stats = routing_stats(weights, selected, new_valid)
        return h.reshape(*x.shape[:-1], h.shape[-1])

    def reference_forward(self, x: Tensor) -> Tensor:
        """The plain path: docs/method.md §1 written out, with ẑ and P built at full width."""
        sequences = _as_sequences(x)
        batch, num_new = sequences.shape[:2]
        z, delta = self.adapter(sequences, self.base)
        valid, state, bounds = token_layout(self.text_context, x, batch, num_new)
        weights, routed, selected = self.router(sequences, z, delta, valid, memory=state, bounds=bounds)
        new_valid = valid[:, -num_new:]
        if self.training or self.track_routing:
            self.routing_stats = routing_stats(weights, selected, new_valid)

        h = z + delta * self.modulation(routed, delta.dtype)

        if self.text_context is not None and self.text_context.mask is not None:
            # Padding keeps the frozen output (W x + b: for DoRA, not its rescaled μ ⊙ W x + b).
            h = torch.where(new_valid.unsqueeze(-1), h, self.base(sequences))
        return h.reshape(*x.shape[:-1], h.shape[-1])

    def _rescaled(self, frozen: Tensor, mu: Tensor, keep: Tensor | None) -> Tensor:
        """z = μ ⊙ W x + b (DoRA) from the frozen output W x + b: μ ⊙ (W x + b) + (1 − μ) ⊙ b. Padding keeps
        W x + b itself, as in every other variant (and autograd keeps no per-token μ for the backward)."""
        bias = self.base.bias
        z = mu * frozen if bias is None else torch.addcmul((1.0 - mu) * bias.to(mu.dtype), mu, frozen)
        return z if keep is None else torch.where(keep.unsqueeze(-1), z, frozen)

    def _factors(self, dtype: torch.dtype) -> Factors:
        """K, the router's heads and DoRA's μ (lime.fused): part of the graph in training, kept for one cached
        decoding run otherwise (`kept_while_decoding`)."""
        channels = self.router.channels if self.router.proj is None else None
        return self.kept_while_decoding(dtype, lambda: fused.factors(
            self.adapter, self.base, self.expert_vectors, self.shared_gate, self.shared_vector, channels, dtype))

    def _router_delta(self, hidden: Tensor, f: Factors, z: Tensor) -> Tensor:
        """A tensor whose [..., C] is Ẑ = ẑ[..., C], for `Router` (which indexes its inputs at its channels C)."""
        if f.router_heads is None:  # a learned router reads x only
            return z
        delta_c = F.linear(hidden, f.router_heads)  # ẑ at the E channels only
        channels = self.router.channels
        if self.router.cfg.channels == "leading":  # C = 0..E-1: Ẑ itself
            return delta_c
        # Other channel sets: Ẑ placed at its channels of a zero tensor as wide as the last channel.
        carrier = delta_c.new_zeros(*delta_c.shape[:-1], int(channels.max()) + 1)
        return carrier.index_copy(-1, channels, delta_c)
