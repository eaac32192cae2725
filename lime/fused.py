"""The fast paths of `LiMELinear` for every low-rank delta producer (`lime.adapters.LowRankAdapter`).

Such a module gives ẑ = s · μ ⊙ (u Bᵀ) through its protocol: u = `hidden(x)` the rank-r activation,
(B, s) = `heads()`, μ = `rescale(base)` (None: 1) and z = `base_output(x, base, μ)` (LoRA: u = A dropout(x);
SliceFine: u = x_S, s = 1, B = ΔW_S; DoRA: LoRA's plus μ). Nothing here depends on which variant it is.
With V = [p_1 … p_E, γ p_s] ((E+1) x d_out) and ω = [w̃_1 … w̃_E, 1] per token, the LiME term is a product of
rank r·(E+1):

    ẑ ⊙ (P + γ p_s) = Σ_j Σ_e (u_j ω_e) · s μ ⊙ B_j ⊙ V_e  =  Q Kᵀ

    Q = u ⊗ ω                (tokens x r(E+1)): each token's rank-r activation times its routing weights
    K = s μ ⊙ B_j ⊙ V_e      (d_out x r(E+1)):  one output column per (rank, expert) pair

so h = z + ẑ ⊙ (P + γ p_s) = z + Q Kᵀ is one `addmm` with inner dimension r(E+1) (10 at r = 2, E = 4):
LoRA's second matmul with a few more columns. Nothing of size tokens x d_out is built besides h itself (not
ẑ, not P, not their product), and autograd saves only Q and K for the backward instead of ẑ and P (each
tokens x d_out). The gradients are those of the same function, so they are exact; only the order of the fp32
sums differs from the plain path (`LiMELinear.reference_forward`), which tests/test_fused.py compares against
(outputs and the gradients of every trainable tensor).

The router sees what docs/method.md §2 says: Z = z[..., C] from the frozen output, and Ẑ = ẑ[..., C] computed for the E
channels C only (u (s μ_C ⊙ B_C)ᵀ), differentiable, so the routing gradients are exact too. Padding: zeroing
ω (hence the rows of Q) at padding positions makes h = z + 0 = z there, exactly as the plain path's
`where(valid, h, z)`, with the same (zero) gradients.

Decoding (no autograd, a few tokens per call: `LiMELinear.direct_max_tokens`) takes `modulated_direct`
instead: with one token per sequence, ẑ and P at full width are tiny and the formula in three fused ops
(ẑ = u (s μ ⊙ B)ᵀ; P + γ p_s = addmm(γ p_s, w̃, p); h = addcmul(z, ẑ, P + γ p_s)) runs fewer kernels than the
factored form, and the router reads ẑ directly. On the CPU the cost of a decoding step is the number of
small ops, not their size.

Cached decoding (no autograd, a KV cache) keeps the token-independent pieces (K, s μ ⊙ B, the router's
heads, DoRA's μ, which costs a pass over W) with the KV cache for the whole decoding run
(lime.context.CacheState); every other call builds them afresh, so no parameter update can leave them stale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lime.adapters import LowRankAdapter


def is_low_rank(adapter: nn.Module) -> bool:
    """Whether `adapter` implements the factored form ẑ = s · μ ⊙ (u Bᵀ) (the fast paths apply)."""
    return isinstance(adapter, LowRankAdapter)


@dataclass
class Factors:
    """The token-independent pieces of one layer, in the activation dtype."""

    k: Tensor  # (d_out, r(E+1)) K
    router_heads: Tensor | None  # (|C|, r) s μ_C ⊙ B_C: Ẑ = u @ router_heads.T; None for a learned router
    mu: Tensor | None  # (d_out,) the rescale μ (DoRA's); None without one
    heads: Tensor  # (d_out, r) s μ ⊙ B: ẑ = u @ heads.T at full width (`modulated_direct`)
    experts: Tensor  # (E, d_out) the expert vectors p_e
    shared: Tensor | None  # (d_out,) γ p_s; None without the shared vector


def factors(
    adapter: LowRankAdapter, base: nn.Linear, expert_vectors: Tensor, shared_gate: Tensor | None,
    shared_vector: Tensor | None, channels: Tensor | None, dtype: torch.dtype,
) -> Factors:
    """K, the router's heads and μ, built from the layer's tensors (in their storage dtype, then cast)."""
    heads, scale = adapter.heads()
    mu = adapter.rescale(base)
    rows = expert_vectors.to(heads.dtype)
    if shared_vector is not None:
        rows = torch.cat([rows, (shared_gate * shared_vector).to(heads.dtype).unsqueeze(0)])  # V
    column_scale = scale if mu is None else scale * mu.unsqueeze(-1)  # s μ, per output channel
    k = (heads.unsqueeze(-1) * rows.t().unsqueeze(1)).reshape(heads.shape[0], -1) * column_scale
    scaled_heads = heads * column_scale
    router_heads = None if channels is None else scaled_heads[channels].to(dtype)
    shared = None if shared_vector is None else rows[-1].to(dtype)
    return Factors(k.to(dtype), router_heads, None if mu is None else mu.to(dtype), scaled_heads.to(dtype),
                   expert_vectors.to(dtype), shared)


def hidden_and_base(adapter: LowRankAdapter, x: Tensor, base: nn.Linear, mu: Tensor | None) -> tuple[Tensor, Tensor]:
    """(u, z) as the adapter's own forward computes them: u (..., r) and the base output z (under μ: μ ⊙ W x + b)."""
    return adapter.hidden(x), adapter.base_output(x, base, mu)


def modulated_output(z: Tensor, hidden: Tensor, weights: Tensor, k: Tensor, keep: Tensor | None = None) -> Tensor:
    """h = z + Q Kᵀ, Q = u ⊗ [w̃, 1] (the 1 only when K has the shared column), as one addmm.

    `keep` (..., bool) zeroes Q where h must stay exactly z (padding).
    """
    omega = weights.to(z.dtype)
    if k.shape[1] // hidden.shape[-1] > weights.shape[-1]:  # the shared vector's column
        omega = F.pad(omega, (0, 1), value=1.0)
    if keep is not None:
        omega = omega * keep.unsqueeze(-1)
    q = (hidden.unsqueeze(-1) * omega.unsqueeze(-2)).reshape(-1, k.shape[1])
    return torch.addmm(z.reshape(-1, z.shape[-1]), q, k.t()).view(z.shape)


def modulated_direct(z: Tensor, delta: Tensor, weights: Tensor, f: Factors, keep: Tensor | None = None) -> Tensor:
    """h = z + ẑ ⊙ (w̃ P + γ p_s) with ẑ and P at full width, in three fused ops (few tokens, no autograd).

    `keep` (..., bool) zeroes ẑ where h must stay exactly z (padding).
    """
    mix = weights.to(z.dtype).reshape(-1, weights.shape[-1])
    modulation = mix @ f.experts if f.shared is None else torch.addmm(f.shared, mix, f.experts)
    if keep is not None:
        delta = delta * keep.unsqueeze(-1)
    return torch.addcmul(z, delta, modulation.view(delta.shape))


__all__ = [
    "Factors", "factors", "hidden_and_base", "is_low_rank", "modulated_direct", "modulated_output",
]
