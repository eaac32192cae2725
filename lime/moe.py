"""The MoE-PEFT baselines of docs/method.md §4: routed LoRA experts chosen per token by a learned router.

One layer, `MoELinear`, covers every baseline; `config.method` picks the expert layout (`LAYOUTS`, the one
place the four baselines are named; each is registered in lime.registry from it). With w̃ the top-k
routing weights of a token (they sum to 1, unselected experts get exactly 0), s = alpha / r, W, b the frozen
weight and bias and z = W x + b:

    moe        MoELoRA     h = z + Σ_e w̃_e · s B_e A_e x  +  s B_0 A_0 x        (B_0 A_0: the always-on shared LoRA)
    moe+dora   MoEDoRA     h = Σ_e w̃_e μ_e ⊙ (W x + s B_e A_e x) + b  +  s B_0 A_0 x
                           μ_e = m_e / ‖W + s B_e A_e‖_row (detached): expert e is a DoRA of W
    moe+lora_fa MoELoRA-FA as moe, every A (routed and shared) frozen at its random init
    mola       MoLA        h = z + Σ_e w̃_e · s B_e A_e x                        (MoELoRA without the shared LoRA)
    hydralora  HydraLoRA   h = z + Σ_e w̃_e · s B_e A x                          (one A, E routed B heads)
    mixlora    MixLoRA     h = z + (Σ_e w̃_e 1_e) ⊙ s B A x                       (expert e = output block e of one LoRA)

Router: `lime.routing.Router` with `routing.router: learned`, w = softmax(R x / τ) with R a bias-free
Linear(d_in -> E), then `select_experts` (`selection: topk`, k = 2 in the configs). Statistics and balance
losses are those of LiME (`routing_stats` per layer, collected by lime.balance).

Trainable parameters per layer (E experts, rank r; the router adds E·d_in everywhere):
MoELoRA (E+1)·r(d_in+d_out) + E·d_in; MoEDoRA + E·d_out; MoELoRA-FA (E+1)·r·d_out + E·d_in;
MoLA E·r(d_in+d_out) + E·d_in; HydraLoRA r·d_in + E·r·d_out + E·d_in; MixLoRA r(d_in+d_out) + E·d_in.
MoEDoRA's shared LoRA is a plain LoRA (no magnitude): that is what the E·d_out of the paper's count
(docs/method.md §5) allows.

How the routed experts are computed: one batched pair of matmuls over all experts, not gather/scatter.
The experts' A's are stacked into one (E·r x d_in) matrix and their B's into one (d_out x E·r) matrix; the
routing weights gate each expert's rank-r block of the hidden activation in between:

    u = [A_1; …; A_E] x  (E·r),    u_e ← w̃_e u_e,    ẑ = s [B_1 … B_E] u

Unselected experts have w̃_e = 0 exactly, so ẑ is the sparse top-k mixture and unselected experts get zero
gradient. Computing all E experts costs E·r·(d_in + d_out) multiply-adds per token (8·(d_in + d_out) at
E = 4, r = 2: about 0.4 % of the frozen d_in·d_out product for a 3584 x 3584 projection), two dense GEMMs that
run at full speed on any device; gather/scatter (sorting tokens by expert, one small GEMM per expert, scatter
back) would save at most (E − k)/E of that tiny cost and pay for index bookkeeping and E kernel launches per
layer. It would pay off only for large E·r. DoRA's per-expert rescale folds into B (μ_e ⊙ B_e A_e x =
(μ_e B_e) A_e x), so MoEDoRA uses the same two matmuls.

MixLoRA. The original MixLoRA (Li et al., 2024) routes LoRA experts on the feed-forward block and gives
attention layers plain LoRAs; with the attention-only targets used here that design has no routed experts
at all, yet the paper counts r(d_in+d_out) + E·d_in per layer: one rank-r LoRA plus a router. We therefore
define MixLoRA as one LoRA whose E experts are slices of it: expert e owns a contiguous block of
⌈d_out/E⌉ or ⌊d_out/E⌋ output channels, i.e. its head is the block of rows B_e of B, and A is shared
(HydraLoRA with the heads cut out of one B instead of E full copies). Each token updates the output channels
of its k selected experts, scaled by their weights. Why this and not the alternatives: it matches the count
exactly; the experts are distinct functions, so the task loss trains the router (a single LoRA gated by a
scalar Σ w̃ would make all experts identical, and the renormalised top-k weights sum to 1, so the router would
learn nothing but the balance loss); slicing the rank instead needs r ≥ E (r = 2 < E = 4); and with E = 1
it is exactly plain LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lime.adapters import LoRA, LoRAFA
from lime.balance import RoutingStats, routing_stats
from lime.config import LiMEConfig
from lime.context import TextContext
from lime.layer import PEFTLinear, _as_sequences, token_layout
from lime.registry import Variant, register_method
from lime.routing import Router


@dataclass(frozen=True)
class Layout:
    """How a baseline lays out its E experts over LoRA tensors."""

    a_per_expert: bool  # E A's (else one A shared by the experts)
    b_per_expert: bool  # E B's (else one B whose E output blocks are the experts: MixLoRA)
    shared_lora: bool = False  # the always-on shared LoRA (when peft.shared)
    variants: tuple[str, ...] = ("lora",)

    def params(self, d_in: int, d_out: int, config: LiMEConfig, variant: Variant) -> int:
        """Trainable parameters per layer (the counts of the module docstring)."""
        e, r, frozen_a = config.num_experts, config.rank, config.variant == "lora_fa"
        a = 0 if frozen_a else (e if self.a_per_expert else 1) * r * d_in
        b = (e if self.b_per_expert else 1) * r * d_out
        magnitude = e * d_out if config.variant == "dora" else 0
        shared = (r * d_out + (0 if frozen_a else r * d_in)) if self.shared_lora and config.shared else 0
        return a + b + magnitude + shared + e * d_in  # + the router


LAYOUTS = {
    "moe": Layout(a_per_expert=True, b_per_expert=True, shared_lora=True, variants=("lora", "dora", "lora_fa")),
    "mola": Layout(a_per_expert=True, b_per_expert=True),
    "hydralora": Layout(a_per_expert=False, b_per_expert=True),
    "mixlora": Layout(a_per_expert=False, b_per_expert=False),
}
MOE_METHODS = tuple(LAYOUTS)


class RoutedLinear(PEFTLinear):
    """What every routed baseline shares: a learned router over E experts, the text mask, routing statistics.

    A subclass builds its tensors, calls `init_routing` last (so that the router's random init follows the
    experts', as it always has), and in `forward` calls `route` for the gates and `keep_padding` at the end.
    """

    def init_routing(self, config: LiMEConfig, text_context: TextContext | None) -> None:
        base, dtype = self.base, getattr(torch, config.param_dtype)
        self.router = Router(base.in_features, base.out_features, config.num_experts, config.routing)
        self.router.to(base.weight.device)
        if self.router.proj is None:
            raise ValueError(f"routing.router: the MoE-PEFT baseline {config.method!r} needs routing.router='learned'")
        self.router.proj.to(dtype)
        # A plain attribute, not a submodule: it is shared by every layer of the language model.
        self.text_context = text_context
        self.track_routing = False  # record routing statistics outside training too
        self.routing_stats: RoutingStats | None = None

    def route(self, x: Tensor, sequences: Tensor, frozen: Tensor) -> tuple[Tensor, Tensor]:
        """The routed weights w̃ (B, T, E) in the activation dtype, and the real-token mask of the new tokens.

        x: the layer's input as it came; sequences: x viewed as (B, T, d_in); frozen: the frozen output z.
        """
        batch, num_new = sequences.shape[:2]
        valid, state, bounds = token_layout(self.text_context, x, batch, num_new)
        # A learned router reads x only; z is passed for the zero-parameter router's signature.
        weights, routed, selected = self.router(sequences, frozen, frozen, valid, memory=state, bounds=bounds)
        new_valid = valid[:, -num_new:]
        if self.training or self.track_routing:
            self.routing_stats = routing_stats(weights, selected, new_valid)
        return routed.to(sequences.dtype), new_valid

    def keep_padding(self, h: Tensor, frozen: Tensor, new_valid: Tensor) -> Tensor:
        """Padding positions keep the frozen output."""
        if self.text_context is not None and self.text_context.mask is not None:
            h = torch.where(new_valid.unsqueeze(-1), h, frozen)
        return h


class MoELinear(RoutedLinear):
    """A frozen Linear plus E routed LoRA experts (and MoELoRA's always-on shared LoRA).

    Tensors: `lora_A` (E x r x d_in; one A for hydralora/mixlora: 1 x r x d_in), `lora_B` (E x d_out x r;
    mixlora: 1 x d_out x r), `magnitude` (dora: E x d_out), `adapter.lora_A/B` (the shared LoRA of
    `method: moe` with `shared: true`), `router.proj.weight` (E x d_in).
    """

    def __init__(self, base: nn.Linear, config: LiMEConfig, text_context: TextContext | None = None) -> None:
        if config.method not in MOE_METHODS:
            raise ValueError(f"peft.method: MoELinear builds {', '.join(MOE_METHODS)}, not {config.method!r}")
        layout = LAYOUTS[config.method]
        dtype, device = getattr(torch, config.param_dtype), base.weight.device
        d_in, d_out, experts, rank = base.in_features, base.out_features, config.num_experts, config.rank
        shared = None
        if layout.shared_lora and config.shared:
            shared_cls = LoRAFA if config.variant == "lora_fa" else LoRA
            shared = shared_cls(base, rank, config.alpha, config.dropout, dtype)
        super().__init__(base, shared)
        self.method, self.variant, self.num_experts, self.rank = config.method, config.variant, experts, rank
        self.layout = layout
        self.scale = config.alpha / rank

        # A: one per expert (MoELoRA family, MoLA) or one shared by all experts (HydraLoRA, MixLoRA).
        num_a = experts if layout.a_per_expert else 1
        lora_a = torch.empty(num_a, rank, d_in, dtype=dtype, device=device)
        for a in lora_a:  # per expert, so the fan-in is d_in as in HF peft (a 3-D tensor would get r·d_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_a, requires_grad=config.variant != "lora_fa")
        # B = 0: every expert starts at ẑ = 0, so the wrapped layer equals its base at init.
        num_b = experts if layout.b_per_expert else 1
        self.lora_B = nn.Parameter(torch.zeros(num_b, d_out, rank, dtype=dtype, device=device))
        self.magnitude = None
        if config.variant == "dora":  # m_e starts at the row norms of W, so every μ_e = 1 at init
            with torch.no_grad():
                row_norms = base.weight.detach().to(dtype).norm(dim=1)
            self.magnitude = nn.Parameter(row_norms.expand(experts, -1).clone())
        if not layout.b_per_expert:
            # Output channel c belongs to expert ⌊c·E / d_out⌋: E contiguous, near-equal blocks.
            owner = torch.div(torch.arange(d_out, device=device) * experts, d_out, rounding_mode="floor")
            self.register_buffer("channel_expert", owner, persistent=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.init_routing(config, text_context)

    def rescale(self) -> Tensor:
        """MoEDoRA: μ_e = m_e / ‖W + s B_e A_e‖_row for every expert, (E, d_out); the norm is detached."""
        with torch.no_grad():  # the E full weights are transient: no graph is kept for them
            weight = self.base.weight.to(self.lora_B.dtype)
            norms = (weight + self.scale * (self.lora_B @ self.lora_A)).norm(dim=-1)
        return self.magnitude / norms

    def routed_delta(self, x: Tensor, gates: Tensor, heads: Tensor) -> Tensor:
        """s · Σ_e w̃_e B_e A_e x as two matmuls over the stacked experts; gates (B, T, E), heads (E, d_out, r)."""
        hidden = F.linear(x, self.lora_A.flatten(0, 1).to(x.dtype))  # (B, T, E_A·r), E_A ∈ {E, 1}
        hidden = hidden.unflatten(-1, (-1, self.rank)) * gates.unsqueeze(-1)  # (B, T, E, r): gate each expert
        stacked = heads.permute(1, 0, 2).flatten(1).to(x.dtype)  # (d_out, E·r), columns in the same order
        return F.linear(hidden.flatten(-2), stacked) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        sequences = _as_sequences(x)
        bias = self.base.bias
        if self.magnitude is None:
            frozen = self.base(sequences)
        else:  # W x once: DoRA rescales it per expert
            wx = F.linear(sequences, self.base.weight)
            frozen = wx if bias is None else wx + bias
        gates, new_valid = self.route(x, sequences, frozen)
        dropped = self.dropout(sequences)
        if not self.layout.b_per_expert:  # MixLoRA: expert e owns output block e of one LoRA
            one_lora = F.linear(F.linear(dropped, self.lora_A[0].to(x.dtype)), self.lora_B[0].to(x.dtype))
            h = frozen + gates[..., self.channel_expert] * (one_lora * self.scale)
        elif self.magnitude is not None:  # Σ_e w̃_e μ_e ⊙ (W x + s B_e A_e x) + b
            # (E, d_out), in the adapter dtype; folded into the heads: μ_e ⊙ B_e. A pass over W per expert:
            # kept with the KV cache while decoding, as DoRA's and LiME-DoRA's μ.
            mu = self.kept_while_decoding(wx.dtype, self.rescale)
            h = (gates @ mu.to(wx.dtype)) * wx + self.routed_delta(dropped, gates, mu.unsqueeze(-1) * self.lora_B)
            if bias is not None:
                h = h + bias
        else:
            h = frozen + self.routed_delta(dropped, gates, self.lora_B)
        if self.adapter is not None:  # MoELoRA's always-on shared LoRA
            h = h + self.adapter.delta(sequences)

        h = self.keep_padding(h, frozen, new_valid)
        return h.reshape(*x.shape[:-1], h.shape[-1])


for _name, _layout in LAYOUTS.items():
    register_method(_name, MoELinear, _layout.params, variants=_layout.variants, router="learned", routing_group="moe")

__all__ = ["LAYOUTS", "MOE_METHODS", "Layout", "MoELinear", "RoutedLinear"]
