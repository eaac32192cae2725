"""Routing statistics and the load-balancing losses of docs/method.md §3.

Each routed layer keeps the statistics of its last forward (`layer.routing_stats`); `balance_loss` and
`routing_summary` collect them across the model, so a trainer calls one function per step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lime.routing import masked_mean, routing_entropy


@dataclass
class RoutingStats:
    usage: Tensor  # (E,) p̄_e: mean routing weight before selection, over non-pad tokens (differentiable)
    load: Tensor  # (E,) share of tokens that selected each expert
    entropy: Tensor  # () mean routing entropy, nats
    experts_per_token: Tensor  # () mean number of selected experts
    tokens: int
    with_grad: bool = True  # recorded with autograd on (else `usage` can carry no gradient to the balance loss)

    def __deepcopy__(self, memo: dict) -> RoutingStats:
        """A copy of the values without their graph (a graph tensor cannot be deep-copied, and a copied model
        must not share the original's graph): `copy.deepcopy(model)` works after a training forward."""
        return dataclasses.replace(self, usage=self.usage.detach().clone(), load=self.load.clone(),
                                   entropy=self.entropy.clone(), experts_per_token=self.experts_per_token.clone())


def routing_stats(weights: Tensor, selected: Tensor, valid: Tensor) -> RoutingStats:
    """Statistics of one layer call: weights/selected (B, T, E), valid (B, T) without the padding."""
    with torch.no_grad():
        load = masked_mean(selected.float(), valid)
        entropy = masked_mean(routing_entropy(weights.detach()), valid)
        experts = masked_mean(selected.float().sum(-1), valid)
    return RoutingStats(masked_mean(weights, valid), load, entropy, experts, int(valid.sum()),
                        torch.is_grad_enabled())


def importance_loss(usage: Tensor) -> Tensor:
    """L_imp = E · Σ_e p̄_e² − 1 (zero when usage is uniform)."""
    return usage.numel() * usage.pow(2).sum() - 1.0


def kl_loss(usage: Tensor) -> Tensor:
    """L_KL = Σ_e p̄_e · log(E · p̄_e), the KL divergence of usage from uniform."""
    return (usage * (usage.numel() * usage).clamp_min(1e-12).log()).sum()


def _stats(model: nn.Module) -> list[tuple[str, RoutingStats]]:
    return [(name, m.routing_stats) for name, m in model.named_modules()
            if getattr(m, "routing_stats", None) is not None]


def clear_routing_stats(model: nn.Module) -> None:
    """Forget the statistics of earlier forwards: a layer that does not run in the next forward (the vision
    tower on a text-only batch) must not contribute stale statistics, or a graph that was already freed."""
    for module in model.modules():
        if getattr(module, "routing_stats", None) is not None:
            module.routing_stats = None


def balance_loss(model: nn.Module, importance_weight: float, kl_weight: float, scale: float = 1.0) -> Tensor:
    """c · (α · mean_layers L_imp + β · mean_layers L_KL) over the routed layers of the last forward."""
    named = [(name, s) for name, s in _stats(model) if s.tokens > 0]
    if not named:
        raise RuntimeError("balance_loss: no routed layer recorded statistics (call it after a training forward)")
    without_grad = [name for name, s in named if not s.with_grad]
    if torch.is_grad_enabled() and without_grad:
        # Reentrant gradient checkpointing runs the forward under no_grad and recomputes it in the backward:
        # the loss would silently get no gradient from the balance terms.
        raise RuntimeError(
            f"balance_loss: the routing statistics of {without_grad[0]} (and {len(without_grad) - 1} more layers) "
            "were recorded without autograd, so the balance loss would have no gradient. Reentrant gradient "
            "checkpointing does this: use gradient_checkpointing_kwargs={'use_reentrant': False} (the trainer's "
            "default), or call balance_loss after a forward run with autograd."
        )
    stats = [s for _, s in named]
    l_imp = torch.stack([importance_loss(s.usage) for s in stats]).mean()
    l_kl = torch.stack([kl_loss(s.usage) for s in stats]).mean()
    return scale * (importance_weight * l_imp + kl_weight * l_kl)


class RoutingAverage:
    """Routing statistics averaged over several forwards (the micro-batches between two log lines).

    `add` keeps running sums on the device (no host sync per step); `summary` converts once.
    """

    def __init__(self) -> None:
        self.totals: dict[str, Tensor] = {}  # per layer: [usage (E), load (E), entropy, experts per token]
        self.counts: dict[str, int] = {}

    def add(self, model: nn.Module) -> RoutingAverage:
        for name, s in _stats(model):
            row = torch.cat([s.usage.detach().float(), s.load.float(), s.entropy.reshape(1).float(),
                             s.experts_per_token.reshape(1).float()])
            self.totals[name] = self.totals[name] + row if name in self.totals else row
            self.counts[name] = self.counts.get(name, 0) + 1
        return self

    def summary(self, per_layer: bool = False) -> dict[str, float | list[float]]:
        """Usage, load, entropy and experts per token, averaged over layers (and per layer if asked)."""
        if not self.totals:
            return {}
        names = list(self.totals)
        rows = torch.stack([self.totals[n] / self.counts[n] for n in names]).cpu()
        e = (rows.shape[1] - 2) // 2
        usage, load, entropy, experts = rows[:, :e], rows[:, e : 2 * e], rows[:, -2], rows[:, -1]
        summary: dict[str, float | list[float]] = {
            "routing/importance_loss": float(torch.stack([importance_loss(u) for u in usage]).mean()),
            "routing/kl_loss": float(torch.stack([kl_loss(u) for u in usage]).mean()),
            "routing/entropy": float(entropy.mean()),
            "routing/experts_per_token": float(experts.mean()),
            "routing/usage": usage.mean(0).tolist(),
            "routing/load": load.mean(0).tolist(),
        }
        if per_layer:
            for i, name in enumerate(names):
                summary[f"routing/layers/{name}/usage"] = usage[i].tolist()
                summary[f"routing/layers/{name}/load"] = load[i].tolist()
                summary[f"routing/layers/{name}/entropy"] = float(entropy[i])
        return summary


def routing_summary(model: nn.Module, per_layer: bool = False) -> dict[str, float | list[float]]:
    """The routing statistics of the model's last forward (see RoutingAverage.summary)."""
    return RoutingAverage().add(model).summary(per_layer)
