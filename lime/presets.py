"""The method presets of `configs/peft/` and the composition scripts and tests share.

A preset is a `configs/peft/<name>.yaml` that states what differs from `configs/peft/_base.yaml` (a file
whose name starts with `_` is a base, not a method). A registered (method, variant) pair with no file of its
own (a new method before its file is written, the toys of the tests) composes as the base with the method,
the variant and the method's routing group set (`case_overrides`).
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from lime.config import LiMEConfig
from lime.registry import METHODS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def peft_presets(configs: Path = CONFIGS) -> list[str]:
    """The method names of configs/peft/, sorted."""
    return sorted(p.stem for p in (Path(configs) / "peft").glob("*.yaml") if not p.stem.startswith("_"))


def compose(overrides: list[str] | tuple[str, ...] = (), configs: Path = CONFIGS) -> DictConfig:
    """configs/config.yaml with command-line style `overrides`, as train.py composes it."""
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def lime_config(cfg: DictConfig) -> LiMEConfig:
    """The LiMEConfig of a composed config's `peft` and `routing` groups, interpolations resolved."""
    return LiMEConfig.from_groups(OmegaConf.to_container(cfg.peft, resolve=True),
                                  OmegaConf.to_container(cfg.routing, resolve=True))


def case_overrides(method: str, variant: str) -> list[str]:
    """The overrides that compose a registered (method, variant) pair from the base preset."""
    return [f"routing={METHODS[method].routing_group}", "peft=_base", f"peft.name={method}_{variant}",
            f"peft.method={method}", f"peft.variant={variant}"]


__all__ = ["CONFIGS", "case_overrides", "compose", "lime_config", "peft_presets"]
