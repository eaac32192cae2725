"""The shared PEFT modules ("variants"), one file each, registered in lime.registry.

Adding a variant: a file with a `LowRankAdapter` subclass (lime/adapters/base.py) and one `register_variant`
line below; CONTRIBUTING.md walks through one.
"""

from __future__ import annotations

from torch import nn

from lime.adapters.base import Adapter, LowRankAdapter
from lime.adapters.dora import DoRA, check_dense, dora_params
from lime.adapters.lora import LoRA, LoRAFA, lora_fa_params, lora_params
from lime.adapters.slicefine import SliceFine, check_slice, slicefine_params
from lime.config import ConfigError, LiMEConfig
from lime.registry import VARIANTS, register_variant

register_variant("lora", LoRA.from_config, lora_params)
register_variant("dora", DoRA.from_config, dora_params, check=check_dense)
register_variant("lora_fa", LoRAFA.from_config, lora_fa_params)
register_variant("slicefine", SliceFine.from_config, slicefine_params, check=check_slice)
register_variant("prompt", None, None)  # wraps the language model's input, not Linear layers (lime.prompt)


def build_adapter(base: nn.Linear, config: LiMEConfig) -> Adapter:
    """The shared PEFT module of `config.variant` for one frozen Linear."""
    build = VARIANTS[config.variant].build
    if build is None:
        raise ConfigError(f"peft.variant: {config.variant!r} does not wrap Linear layers")
    return build(base, config)


__all__ = ["Adapter", "DoRA", "LoRA", "LoRAFA", "LowRankAdapter", "SliceFine", "build_adapter"]
