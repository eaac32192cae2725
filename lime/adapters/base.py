"""The interfaces of the shared PEFT modules ("delta producers").

Every module implements `forward(x, base) -> (z, ẑ)`: the base output the layer builds on and the PEFT delta.
For every variant but DoRA, z is the frozen output W x + b; DoRA rescales it by its magnitude. Every variant
starts with ẑ = 0, so a wrapped layer equals its base at init. `forward` is the reference path: the module's
formula as written, which `LiMELinear.reference_forward` uses.

A low-rank module (`LowRankAdapter`) also exposes the pieces of its delta in the factored form

    ẑ = s · μ ⊙ (u Bᵀ),    u = hidden(x) (..., r),    (B, s) = heads(),    μ = rescale(base) (or 1: None)
    z = base_output(x, base, μ)

from which `lime.fused` builds LiME's fast paths without knowing which variant it runs (as HF peft's
`LoraVariant` lets a LoRA layer call a variant's own init and forward). A new variant of this form is one file:
a `LowRankAdapter` subclass and one `register_variant` line (lime/adapters/__init__.py; CONTRIBUTING.md).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Adapter(nn.Module):
    """forward(x, base) -> (z, ẑ)."""

    def forward(self, x: Tensor, base: nn.Linear) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class LowRankAdapter(Adapter):
    """ẑ = s · μ ⊙ (u Bᵀ): the protocol `lime.fused` builds on (see the module docstring)."""

    def hidden(self, x: Tensor) -> Tensor:
        """u (..., r), the rank-r activation, in x's dtype."""
        raise NotImplementedError

    def heads(self) -> tuple[Tensor, float]:
        """B (d_out x r, in its storage dtype) and the scalar scale s."""
        raise NotImplementedError

    def rescale(self, base: nn.Linear) -> Tensor | None:
        """μ (d_out,), the per-channel rescale of both z and ẑ; None when there is none (μ = 1)."""
        return None

    def base_output(self, x: Tensor, base: nn.Linear, mu: Tensor | None) -> Tensor:
        """z: W x + b, or μ ⊙ (W x) + b under a rescale."""
        if mu is None:
            return base(x)
        z = mu * F.linear(x, base.weight)
        return z if base.bias is None else z + base.bias
