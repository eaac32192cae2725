"""LiME: Lightweight Mixture of Experts for parameter-efficient multimodal multi-task fine-tuning.

    config = lime.LiMEConfig(variant="lora", num_experts=4, rank=2, targets=("q_proj", "v_proj"))
    model = lime.apply_lime(model, config)
    lime.save_adapter(model, "adapter/")
"""

from lime import _quiet  # noqa: F401  (first: filters a bitsandbytes notice logged on import)
from lime.balance import balance_loss, routing_summary
from lime.checkpoint import AdapterError, load_adapter, save_adapter
from lime.config import ConfigError, LiMEConfig, RoutingConfig
from lime.inject import apply_lime, summary, trainable_parameters, validate
from lime.layer import LiMELinear, PEFTLinear
from lime.prompt import PromptTuning
from lime.registry import register_method, register_variant

__all__ = [
    "AdapterError", "ConfigError", "LiMEConfig", "LiMELinear", "PEFTLinear", "PromptTuning", "RoutingConfig",
    "apply_lime", "balance_loss", "load_adapter", "register_method", "register_variant", "routing_summary",
    "save_adapter", "summary", "trainable_parameters", "validate",
]
