"""DoRA: the base becomes μ ⊙ (W x) + b and ẑ = μ ⊙ (s · B A x), μ = m / ‖W + s B A‖_row.

The row norm is detached, as in the DoRA paper (section 4.3) and HF peft. In the factored form of
lime.adapters.base: LoRA's u and heads, plus the rescale μ. Trainable parameters per layer: r(d_in + d_out) + d_out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lime.adapters.lora import LoRA
from lime.config import LiMEConfig


class DoRA(LoRA):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, dtype: torch.dtype) -> None:
        super().__init__(base, rank, alpha, dropout, dtype)
        # m starts at the row norms of W, so μ = 1 and the layer equals its base at init.
        with torch.no_grad():
            row_norms = base.weight.detach().to(dtype).norm(dim=1)
        self.magnitude = nn.Parameter(row_norms)

    def rescale(self, base: nn.Linear) -> Tensor:
        """μ = m / ‖W + s B A‖_row, computed in the adapter's dtype."""
        weight = base.weight.to(self.lora_A.dtype) + self.scale * (self.lora_B @ self.lora_A)
        return self.magnitude / weight.norm(dim=1).detach()

    # The reference path: the formula as written.
    def forward(self, x: Tensor, base: nn.Linear) -> tuple[Tensor, Tensor]:
        mu = self.rescale(base).to(x.dtype)
        z = mu * F.linear(x, base.weight)
        if base.bias is not None:
            z = z + base.bias
        return z, mu * self.delta(x)


def dora_params(d_in: int, d_out: int, config: LiMEConfig) -> int:
    return config.rank * (d_in + d_out) + d_out


def check_dense(name: str, linear: nn.Linear, config: LiMEConfig) -> str | None:
    """DoRA reads W's row norms: a quantized base has no dense W."""
    if type(linear).__module__.startswith("bitsandbytes"):
        return (f"peft.variant: DoRA needs the dense weight of {name} for its row norms; "
                "it is not supported on a bitsandbytes-quantized base (model.quantization)")
    return None
