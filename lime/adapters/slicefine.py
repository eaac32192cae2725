"""SliceFine: ẑ = ΔW_S · x_S, a trainable update of r consecutive input columns S of W.

In the factored form of lime.adapters.base: u = x_S, heads (ΔW_S, 1), no rescale. Trainable: r·d_out per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lime.adapters.base import LowRankAdapter
from lime.config import LiMEConfig


class SliceFine(LowRankAdapter):
    def __init__(self, base: nn.Linear, rank: int, slice_start: int, dtype: torch.dtype) -> None:
        super().__init__()
        if slice_start + rank > base.in_features:
            raise ValueError(
                f"peft.slice_start={slice_start} with peft.rank={rank} runs past the layer's "
                f"{base.in_features} input columns"
            )
        self.slice_start = slice_start
        self.slice_delta = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=base.weight.device))

    @classmethod
    def from_config(cls, base: nn.Linear, config: LiMEConfig) -> SliceFine:
        return cls(base, config.rank, config.slice_start, getattr(torch, config.param_dtype))

    def hidden(self, x: Tensor) -> Tensor:
        return x[..., self.slice_start : self.slice_start + self.slice_delta.shape[1]]

    def heads(self) -> tuple[Tensor, float]:
        return self.slice_delta, 1.0

    # The reference path: the formula as written.
    def forward(self, x: Tensor, base: nn.Linear) -> tuple[Tensor, Tensor]:
        columns = x[..., self.slice_start : self.slice_start + self.slice_delta.shape[1]]
        return base(x), F.linear(columns, self.slice_delta.to(x.dtype))


def slicefine_params(d_in: int, d_out: int, config: LiMEConfig) -> int:
    return config.rank * d_out


def check_slice(name: str, linear: nn.Linear, config: LiMEConfig) -> str | None:
    if config.slice_start + config.rank > linear.in_features:
        return (f"peft.slice_start: {config.slice_start} + peft.rank {config.rank} runs past the "
                f"{linear.in_features} input columns of {name}")
    return None
