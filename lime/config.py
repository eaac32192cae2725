"""Configuration dataclasses for LiME and the PEFT baselines.

Keys carry the names of docs/method.md. Everything that can be checked without a model is checked here, in
`__post_init__`, with a message naming the key; checks that need the model (targets, num_experts <= d_out)
live in `lime.inject.validate`. The allowed `peft.variant` and `peft.method` values, and which variants and
router each method takes, are those registered in `lime.registry`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from lime import registry

ROUTERS = ("zero_param", "learned")
NORMS = ("token", "global")
CHANNELS = ("leading", "trailing", "central", "random")
SELECTIONS = ("auto", "topk", "soft_auto", "soft_topk", "dense")
ANCHORS = ("first", "last")
PROMPT_CONTEXTS = ("prompt", "input")
DTYPES = ("float32", "bfloat16", "float16")
EMBEDDERS = ("minilm", "hashed")  # MoCLE's instruction embedders (lime.mocle.EMBEDDERS)
# `${min:2,${peft.num_experts}}` in configs (the experts ablation's MoELoRA top-k).
OmegaConf.register_new_resolver("min", lambda *values: min(values), replace=True)

# Keys of a `configs/peft/*.yaml` file that are not LiMEConfig fields: its name and the two learning rates.
PEFT_GROUP_EXTRAS = ("name", "peft_lr", "moe_lr")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, key: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


@dataclass
class RoutingConfig:
    """How each token picks its experts (docs/method.md §2)."""

    router: str = "zero_param"  # zero_param | learned (a bias-free Linear(d_in -> E), for the ablation)
    gamma_routing: float = 0.7  # γ_r: weight of the adapter signal Ẑ against the frozen signal Z
    temperature: float = 0.5  # τ
    jitter: float = 0.1  # j: multiplicative noise on the logits, training only
    norm: str = "token"  # token (batch-invariant, causal) | global (released code)
    channels: str = "leading"  # which E output channels feed the router
    channel_seed: int = 0  # seed of the fixed channel set for channels=random
    selection: str = "auto"  # auto | topk | soft_auto | soft_topk | dense
    threshold: float = 0.5  # θ of auto selection: keep experts with w_e >= θ · max w
    top_k: int = 2  # k of topk / soft_topk
    soft_sharpness: float = 0.5  # the released soft masks use sigmoid((w - t) / 0.5)
    n_gram: int = 1  # tokens per routing window
    anchor: str = "first"  # first (causal, cache-safe) | last (released code; looks ahead)
    # LiME prompt tuning routes on the mean embedding of: prompt (the tokens before the answer, the same in
    # training and generation) | input (released code: the whole input, answer tokens included in training)
    prompt_context: str = "prompt"

    def __post_init__(self) -> None:
        _one_of(self.router, "routing.router", ROUTERS)
        _one_of(self.norm, "routing.norm", NORMS)
        _one_of(self.channels, "routing.channels", CHANNELS)
        _one_of(self.selection, "routing.selection", SELECTIONS)
        _one_of(self.anchor, "routing.anchor", ANCHORS)
        _one_of(self.prompt_context, "routing.prompt_context", PROMPT_CONTEXTS)
        _require(0.0 <= self.gamma_routing <= 1.0, "routing.gamma_routing", f"{self.gamma_routing} is not in [0, 1]")
        _require(self.temperature > 0, "routing.temperature", f"{self.temperature} must be > 0")
        _require(0.0 <= self.jitter < 1.0, "routing.jitter", f"{self.jitter} is not in [0, 1)")
        _require(0.0 < self.threshold <= 1.0, "routing.threshold", f"{self.threshold} is not in (0, 1]")
        _require(self.soft_sharpness > 0, "routing.soft_sharpness", f"{self.soft_sharpness} must be > 0")
        _require(isinstance(self.n_gram, int) and self.n_gram >= 1, "routing.n_gram", f"{self.n_gram} must be >= 1")
        _require(isinstance(self.top_k, int) and self.top_k >= 1, "routing.top_k", f"{self.top_k} must be >= 1")


@dataclass
class LiMEConfig:
    """One shared PEFT module per wrapped Linear, modulated by routed expert vectors (docs/method.md §1).

    `method` picks the layer family: `lime` (the paper's method), `plain` (the PEFT module alone) or one of
    the MoE-PEFT baselines. `variant` picks the shared PEFT module.
    """

    variant: str = "lora"
    method: str = "lime"
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    language_model_only: bool = False  # match targets inside the language model only (vision tower untouched)
    layer_indices: tuple[int, ...] | None = None  # wrap only blocks `layers.<i>.` with these i (None: all)
    num_experts: int = 4
    rank: int = 2
    alpha: float = 16.0
    dropout: float = 0.0
    expert_init_sigma: float = 0.1  # p_e ~ U(1 - σ, 1 + σ)
    shared: bool = True  # the shared vector p_s and its gate γ
    shared_init_std: float = 0.1
    slice_start: int = 0  # SliceFine: first of the r trained input columns
    num_virtual_tokens: int = 20  # prompt tuning
    param_dtype: str = "float32"  # storage dtype of the adapter and expert tensors
    num_clusters: int = 64  # MoCLE: k-means clusters of the training instructions (lime/mocle.py)
    cluster_temperature: float = 0.05  # MoCLE: τ of the gate's softmax
    cluster_noise: float = 0.1  # MoCLE: std of the Gaussian noise on the gate logits, training only
    instruction_embedder: str = "minilm"  # MoCLE: minilm (all-MiniLM-L6-v2) | hashed (tests)
    routing: RoutingConfig = field(default_factory=RoutingConfig)

    def __post_init__(self) -> None:
        if isinstance(self.routing, dict):
            self.routing = RoutingConfig(**self.routing)
        self.targets = tuple(self.targets)
        if self.layer_indices is not None:
            self.layer_indices = tuple(int(i) for i in self.layer_indices)
        _one_of(self.variant, "peft.variant", tuple(registry.VARIANTS))
        _one_of(self.method, "peft.method", tuple(registry.METHODS))
        _one_of(self.param_dtype, "peft.param_dtype", DTYPES)
        _one_of(self.instruction_embedder, "peft.instruction_embedder", EMBEDDERS)
        _require(isinstance(self.num_clusters, int) and self.num_clusters >= 1, "peft.num_clusters",
                 f"{self.num_clusters} must be >= 1")
        _require(self.cluster_temperature > 0, "peft.cluster_temperature", f"{self.cluster_temperature} must be > 0")
        _require(self.cluster_noise >= 0, "peft.cluster_noise", f"{self.cluster_noise} must be >= 0")
        _require(len(self.targets) > 0 or self.variant == "prompt", "peft.targets", "is empty")
        _require(isinstance(self.num_experts, int) and self.num_experts >= 1, "peft.num_experts",
                 f"{self.num_experts} must be >= 1")
        _require(isinstance(self.rank, int) and self.rank >= 1, "peft.rank", f"{self.rank} must be >= 1")
        _require(self.alpha > 0, "peft.alpha", f"{self.alpha} must be > 0")
        _require(0.0 <= self.dropout < 1.0, "peft.dropout", f"{self.dropout} is not in [0, 1)")
        _require(0.0 <= self.expert_init_sigma < 1.0, "peft.expert_init_sigma",
                 f"{self.expert_init_sigma} is not in [0, 1)")
        _require(self.slice_start >= 0, "peft.slice_start", f"{self.slice_start} must be >= 0")
        _require(self.num_virtual_tokens >= 1, "peft.num_virtual_tokens", f"{self.num_virtual_tokens} must be >= 1")
        if self.routing.selection in ("topk", "soft_topk"):
            _require(self.routing.top_k <= self.num_experts, "routing.top_k",
                     f"{self.routing.top_k} is larger than peft.num_experts={self.num_experts}")
        method = registry.METHODS[self.method]
        allowed = registry.allowed_variants(method)
        _require(self.variant in allowed, "peft.variant",
                 f"method {self.method!r} is defined for {', '.join(allowed)}, not {self.variant!r}")
        _require(method.router in (None, self.routing.router), "routing.router",
                 f"method {self.method!r} routes with the {method.router} router; set routing.router: {method.router}")

    @property
    def scale(self) -> float:
        """The LoRA scale s = alpha / r."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_groups(cls, peft: Mapping[str, Any], routing: Mapping[str, Any]) -> LiMEConfig:
        """The config of the Hydra groups `peft` and `routing` (the peft group's own extra keys dropped)."""
        values = {k: v for k, v in dict(peft).items() if k not in PEFT_GROUP_EXTRAS}
        return cls.from_dict({**values, "routing": dict(routing)})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LiMEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"peft: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        routing = values.get("routing", {})
        if not isinstance(routing, RoutingConfig):
            known_routing = {f.name for f in dataclasses.fields(RoutingConfig)}
            unknown = sorted(set(routing) - known_routing)
            if unknown:
                raise ConfigError(f"routing: unknown key(s) {', '.join(unknown)}; "
                                  f"known keys: {', '.join(sorted(known_routing))}")
            routing = RoutingConfig(**routing)
        return cls(**{**values, "routing": routing})
