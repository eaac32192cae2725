"""Walk a model, wrap the target Linear layers, freeze everything else.

`lime.registry.METHODS` maps `peft.method` to the layer that wraps one frozen nn.Linear (`lime` and `plain`
are registered here, the MoE-PEFT baselines in lime.moe); a variant that wraps no Linear (prompt tuning)
wraps the language model's input instead (lime.prompt).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

import lime.moe  # noqa: F401  (registers the MoE-PEFT baselines)
from lime.adapters import build_adapter
from lime.config import ConfigError, LiMEConfig
from lime.context import TextContext, VisionContext, track_text_mask, track_vision_sequences
from lime.layer import LiMELinear, PEFTLinear
from lime.mocle import track_instruction_clusters  # (and registers MoCLE)
from lime.registry import METHODS, VARIANTS, Variant, register_method


def plain_layer(base: nn.Linear, config: LiMEConfig, context: TextContext | None = None) -> PEFTLinear:
    return PEFTLinear(base, build_adapter(base, config), context)


def plain_params(d_in: int, d_out: int, config: LiMEConfig, variant: Variant) -> int:
    return variant.params(d_in, d_out, config)


def lime_params(d_in: int, d_out: int, config: LiMEConfig, variant: Variant) -> int:
    """The shared module + E expert vectors (+ p_s and γ) (+ the learned router's E·d_in)."""
    experts = config.num_experts * d_out + (d_out + 1 if config.shared else 0)
    router = config.num_experts * d_in if config.routing.router == "learned" else 0
    return variant.params(d_in, d_out, config) + experts + router


register_method("lime", LiMELinear, lime_params)
register_method("plain", plain_layer, plain_params, routed=False)

_BLOCK_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def language_model(model: nn.Module) -> nn.Module:
    """The text decoder: the module whose forward receives the attention mask and the input embeddings.

    `get_decoder()` where the model has one (every HF causal LM and VLM), else the model itself.
    """
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, nn.Module) else model


def matches_target(name: str, target: str) -> bool:
    """Whether dotted module `name` ends with the dotted `target` (whole components: `proj` != `o_proj`)."""
    return name == target or name.endswith("." + target)


def target_linears(model: nn.Module, config: LiMEConfig) -> Iterator[tuple[str, nn.Linear]]:
    """The (name, Linear) pairs `config` wraps, in module order."""
    scope = language_model(model) if config.language_model_only else model
    inside = {id(m) for m in scope.modules()}
    for name, module in model.named_modules():
        if id(module) not in inside:
            continue
        if not isinstance(module, nn.Linear) or not any(matches_target(name, t) for t in config.targets):
            continue
        if config.layer_indices is not None:
            block = _BLOCK_INDEX.search(name)
            if block is None or int(block.group(1)) not in config.layer_indices:
                continue
        yield name, module


def validate(model: nn.Module, config: LiMEConfig) -> list[str]:
    """Check `config` against `model` (a meta-device copy will do) and return the names it wraps.

    Raises ConfigError naming the key for targets that match nothing, num_experts > d_out, a SliceFine
    slice past the input columns, or a model that already carries LiME layers.
    """
    if any(isinstance(m, PEFTLinear) for m in model.modules()) or hasattr(model, "lime_config"):
        raise ConfigError("model: LiME is already applied to this model; load adapters with lime.load_adapter")
    if VARIANTS[config.variant].build is None:  # prompt tuning: wraps the language model's input
        width = language_model(model).get_input_embeddings().embedding_dim
        if config.num_experts > width:
            raise ConfigError(f"peft.num_experts: {config.num_experts} is larger than the embedding width {width}")
        return []
    if config.layer_indices is not None:
        scope = language_model(model) if config.language_model_only else model
        blocks = {int(m.group(1)) for name, _ in scope.named_modules() if (m := _BLOCK_INDEX.search(name + "."))}
        missing = sorted(set(config.layer_indices) - blocks)
        if missing:
            raise ConfigError(f"peft.layer_indices: no block {missing} in this model (its blocks: "
                              f"{min(blocks, default=None)}..{max(blocks, default=None)})")
    wrapped = list(target_linears(model, config))
    names = [name for name, _ in wrapped]
    for target in config.targets:
        if not any(matches_target(name, target) for name in names):
            sample = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(
                f"peft.targets: {target!r} matches no nn.Linear"
                + (f" in peft.layer_indices={list(config.layer_indices)}" if config.layer_indices else "")
                + f"; Linear names in this model end with: {', '.join(sample)}"
            )
    routed, check = METHODS[config.method].routed, VARIANTS[config.variant].check
    for name, linear in wrapped:
        if routed and config.num_experts > linear.out_features:
            raise ConfigError(
                f"peft.num_experts: {config.num_experts} is larger than d_out={linear.out_features} of {name} "
                "(the router reads E output channels)"
            )
        problem = check(name, linear, config) if check is not None else None
        if problem is not None:
            raise ConfigError(problem)
    return names


def apply_lime(model: nn.Module, config: LiMEConfig) -> nn.Module:
    """Wrap every target Linear of `model` (language model and vision tower alike), freeze the rest.

    The model is changed in place and returned; `model.lime_config` records the config.
    """
    names = validate(model, config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    text_model = language_model(model)
    text_prefix = next(n for n, m in model.named_modules() if m is text_model)
    if VARIANTS[config.variant].build is None:
        from lime.prompt import attach_prompt

        attach_prompt(model, text_model, config)
    else:
        vision = VisionContext()
        context = TextContext()
        build = METHODS[config.method].layer
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            in_text = text_prefix == "" or name.startswith(text_prefix + ".")
            base = getattr(parent, child)
            setattr(parent, child, build(base, config, context if in_text else vision).train(base.training))
        model.lime_hooks = [*track_text_mask(text_model, context), *track_vision_sequences(model, vision),
                            track_instruction_clusters(model, context)]
    model.lime_config = config
    return model


def lime_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules LiME added (wrapped layers and the prompt module), by name."""
    from lime.prompt import PromptTuning

    for name, module in model.named_modules():
        if isinstance(module, PEFTLinear | PromptTuning):
            yield name, module


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary(model: nn.Module) -> str:
    """Layers wrapped, trainable parameters per group, and the routing settings, as printable text."""
    config: LiMEConfig = model.lime_config
    text_prefix = next(n for n, m in model.named_modules() if m is language_model(model))
    layers = list(lime_modules(model))
    in_text = sum(1 for n, _ in layers if n.startswith(text_prefix))
    groups: dict[str, int] = {}
    for _, module in layers:
        for pname, p in module.named_parameters():
            if p.requires_grad:
                group = pname.split(".")[0] if pname.startswith(("adapter", "router")) else pname
                groups[group] = groups.get(group, 0) + p.numel()
    total = sum(p.numel() for p in model.parameters())
    lines = [
        f"LiME {config.method}/{config.variant}: {len(layers)} wrapped modules "
        f"({in_text} in the language model, {len(layers) - in_text} elsewhere), targets {list(config.targets)}",
        f"trainable {trainable_parameters(model):,} of {total:,} parameters "
        f"({100 * trainable_parameters(model) / max(total, 1):.4f}%)",
        *(f"  {group:16s} {count:,}" for group, count in sorted(groups.items())),
    ]
    if METHODS[config.method].routed:
        r = config.routing
        lines.append(
            f"routing: {r.router} E={config.num_experts} selection={r.selection} (θ={r.threshold}, k={r.top_k}) "
            f"γ_r={r.gamma_routing} τ={r.temperature} jitter={r.jitter} norm={r.norm} channels={r.channels} "
            f"n_gram={r.n_gram} anchor={r.anchor} shared={config.shared}"
        )
    return "\n".join(lines)
