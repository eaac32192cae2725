"""The worked examples of CONTRIBUTING.md: a new variant and a new MoE baseline, each one definition and one
registration line. tests/conftest.py imports this module, so both are registered in every test session and
the per-method suite (tests/test_methods.py, and the registry-driven lists of test_fused/test_layer) runs on
them exactly as on the built-in methods.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lime.adapters import LowRankAdapter, build_adapter
from lime.config import LiMEConfig
from lime.context import TextContext
from lime.layer import _as_sequences
from lime.moe import RoutedLinear
from lime.registry import Variant, register_method, register_variant

# --- a variant: LoRA with a fixed scale of its own ------------------------------------------------------


class HalfScaleLoRA(LowRankAdapter):
    """ẑ = ½ · B A x: LoRA whose scale is fixed at ½ instead of alpha / r.

    Factored form (lime/adapters/base.py): u = A x, heads (B, ½), no rescale. Trainable: r(d_in + d_out).
    """

    SCALE = 0.5

    def __init__(self, base: nn.Linear, config: LiMEConfig) -> None:
        super().__init__()
        dtype, device = getattr(torch, config.param_dtype), base.weight.device
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: ẑ = 0 at init

    def hidden(self, x: Tensor) -> Tensor:
        return F.linear(x, self.lora_A.to(x.dtype))

    def heads(self) -> tuple[Tensor, float]:
        return self.lora_B, self.SCALE

    def forward(self, x: Tensor, base: nn.Linear) -> tuple[Tensor, Tensor]:  # the reference path
        return base(x), self.SCALE * (x @ self.lora_A.T.to(x.dtype) @ self.lora_B.T.to(x.dtype))


register_variant("toy_half_lora", HalfScaleLoRA, lambda d_in, d_out, c: c.rank * (d_in + d_out))


# --- a MoE baseline: one LoRA, its output scaled per channel by the routed experts' gains -------------------


class GainMoE(RoutedLinear):
    """h = z + (Σ_e w̃_e g_e) ⊙ ẑ: one shared LoRA ẑ, E learned gain vectors g_e (E x d_out, init 1), routed
    per token by a learned top-k router. Trainable: r(d_in + d_out) + E·d_out + E·d_in (the router)."""

    def __init__(self, base: nn.Linear, config: LiMEConfig, text_context: TextContext | None = None) -> None:
        super().__init__(base, build_adapter(base, config))
        dtype, device = getattr(torch, config.param_dtype), base.weight.device
        self.gains = nn.Parameter(torch.ones(config.num_experts, base.out_features, dtype=dtype, device=device))
        self.init_routing(config, text_context)

    def forward(self, x: Tensor) -> Tensor:  # the fast path: one (E x d_out) matmul per token
        sequences = _as_sequences(x)
        z, delta = self.adapter(sequences, self.base)
        gates, new_valid = self.route(x, sequences, z)
        h = self.keep_padding(z + (gates @ self.gains.to(delta.dtype)) * delta, z, new_valid)
        return h.reshape(*x.shape[:-1], h.shape[-1])

    def reference_forward(self, x: Tensor) -> Tensor:  # the formula as written: a sum over experts
        sequences = _as_sequences(x)
        z, delta = self.adapter(sequences, self.base)
        gates, new_valid = self.route(x, sequences, z)
        mixed = sum(gates[..., e : e + 1] * self.gains[e].to(delta.dtype) for e in range(self.gains.shape[0]))
        h = self.keep_padding(z + mixed * delta, z, new_valid)
        return h.reshape(*x.shape[:-1], h.shape[-1])


def gain_moe_params(d_in: int, d_out: int, config: LiMEConfig, variant: Variant) -> int:
    return variant.params(d_in, d_out, config) + config.num_experts * (d_out + d_in)


register_method("toy_gain_moe", GainMoE, gain_moe_params, variants=("lora",), router="learned", routing_group="moe")

TOY_VARIANT, TOY_METHOD = "toy_half_lora", "toy_gain_moe"
