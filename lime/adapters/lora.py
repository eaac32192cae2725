"""LoRA: ẑ = s · B A dropout(x), s = alpha / r.   LoRA-FA: the same with A frozen at its random init.

In the factored form of lime.adapters.base: u = A dropout(x), heads (B, s), no rescale.
Trainable parameters per d_in x d_out layer: LoRA r(d_in + d_out), LoRA-FA r·d_out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lime.adapters.base import LowRankAdapter
from lime.config import LiMEConfig


class LoRA(LowRankAdapter):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, dtype: torch.dtype) -> None:
        super().__init__()
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as HF peft; B = 0 makes ẑ = 0 at init
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_config(cls, base: nn.Linear, config: LiMEConfig) -> LoRA:
        return cls(base, config.rank, config.alpha, config.dropout, getattr(torch, config.param_dtype))

    def hidden(self, x: Tensor) -> Tensor:
        return F.linear(self.dropout(x), self.lora_A.to(x.dtype))

    def heads(self) -> tuple[Tensor, float]:
        return self.lora_B, self.scale

    # The reference path: the formula as written.
    def delta(self, x: Tensor) -> Tensor:
        hidden = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
        return F.linear(hidden, self.lora_B.to(x.dtype)) * self.scale

    def forward(self, x: Tensor, base: nn.Linear) -> tuple[Tensor, Tensor]:
        return base(x), self.delta(x)


class LoRAFA(LoRA):
    """LoRA-FA: A stays at its random init (frozen, but saved with the adapter); only B trains."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, dtype: torch.dtype) -> None:
        super().__init__(base, rank, alpha, dropout, dtype)
        self.lora_A.requires_grad_(False)


def lora_params(d_in: int, d_out: int, config: LiMEConfig) -> int:
    return config.rank * (d_in + d_out)


def lora_fa_params(d_in: int, d_out: int, config: LiMEConfig) -> int:
    return config.rank * d_out
