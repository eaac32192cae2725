"""Typed settings of the `model`, `data`, `trainer` and `eval` parts of a composed config, checked before any
model or data loads.

Each group's defaults live here, once, in a dataclass; `settings(cfg)` turns the composed (plain) config into
`Settings` and refuses, with a message naming the key:
  * unknown keys (a typo such as `trainer.max_step` is an error, not a silently ignored value),
  * wrong types (`trainer.max_steps=abc`) and values out of range (`trainer.warmup_ratio=1.5`),
  * values that contradict each other (`routing.n_gram` larger than `data.max_length`) or this machine
    (`trainer.device=cuda` without a GPU).
The evaluation keys stay in the `trainer` config group (`trainer.max_new_tokens` on the command line), but the
code gets them as their own `EvalSettings`. The `peft` and `routing` groups are checked by `lime.config`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf

from lime.config import ConfigError, LiMEConfig

# The run directory's default name: time to the microsecond and the process id, so that two runs started at
# once never share a directory (configs/config.yaml's hydra.run.dir).
OmegaConf.register_new_resolver("lime_pid", lambda: os.getpid(), replace=True)

SCHEDULERS = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                     "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"]
TOP_LEVEL = ("model", "routing", "peft", "data", "trainer", "mode", "checkpoint", "seed", "debug", "experiment")


# --- the groups ------------------------------------------------------------------------------------------------

@dataclass
class PretrainSettings:
    """`model.pretrain`: the tiny backbone's own pretraining (lime/pretrain.py)."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    data_seed: int = 1000
    threads: int | None = 1
    cache_dir: str | None = None

    def check(self, key: str) -> None:
        positive(self, key, "steps", "batch_size", "threads")
        require(0 < self.lr < 1, f"{key}.lr", f"{self.lr} must be a learning rate in (0, 1)")
        require(self.data_seed >= 0, f"{key}.data_seed", f"{self.data_seed} must be >= 0")


@dataclass
class ModelSettings:
    name: str
    family: Literal["llava_onevision", "qwen2_vl"]
    name_or_path: str | None = None  # hub id or local directory of the weights
    processor_name_or_path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "auto"] = "bfloat16"
    quantization: Literal["8bit", "4bit"] | None = None
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = None
    device_map: Any = None
    tiny: dict | None = None
    seed: int = 0
    cache_dir: str | None = None
    image_grid_pinpoints: list | None = None
    processor_kwargs: dict = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    lm_targets: list[str] = field(default_factory=list)
    architecture: dict | None = None
    pretrain: PretrainSettings | None = None
    weights_size: str | None = None  # approximate download size, for the message when the weights are missing

    def check(self, key: str) -> None:
        require(bool(self.tiny) != bool(self.name_or_path), f"{key}.name_or_path",
                "set exactly one of model.name_or_path (weights) and model.tiny (a random tiny model)")
        require(self.seed >= 0, f"{key}.seed", f"{self.seed} must be >= 0")
        require(not self.quantization or torch.cuda.is_available(), f"{key}.quantization",
                f"{self.quantization} (bitsandbytes) needs a CUDA GPU and none is visible")
        require(self.pretrain is None or bool(self.tiny), f"{key}.pretrain", "only a tiny model is pretrained here")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DataSettings:
    name: str
    taxonomy: dict
    path: str | None = None  # save_to_disk directory or hub id; null with `generate` (mmt_mini)
    media_root: str | None = None
    cache_dir: str | None = None
    generate: dict | None = None  # mmt_mini's generator arguments (checked by lime.data.mmt_mini)
    categories: list[str] | str | None = None  # a list, or one name / "a,b" from the command line
    tasks: list[str] | str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    seed: int = 0
    on_error: Literal["raise", "skip"] = "raise"
    num_frames: int = 8
    max_length: int | None = None
    truncation: Literal["error", "skip"] = "error"
    unknown_splits: Literal["raise", "skip"] = "raise"  # splits neither train nor {modality}_test_{task}
    frame_sampling: Literal["floor", "round"] = "floor"  # floor: the released code's np.linspace(..., dtype=int)
    pad_short_clips: Literal["eval", "always"] = "eval"  # the released code pads short clips in evaluation only

    def check(self, key: str) -> None:
        positive(self, key, "max_train_samples", "max_eval_samples", "num_frames", "max_length")
        require(self.seed >= 0, f"{key}.seed", f"{self.seed} must be >= 0")
        categories = self.taxonomy.get("categories") or {}
        known_tasks = [task for group in categories.values() for task in group.get("tasks", [])]
        for name in self.categories or []:
            require(name in categories, f"{key}.categories", f"{name!r} is not a category of {self.name} "
                    f"({', '.join(categories)})")
        for name in self.tasks or []:
            require(name in known_tasks, f"{key}.tasks", f"{name!r} is not a task of {self.name} "
                    f"({', '.join(known_tasks)})")
        for name in ("path", "media_root"):
            self._check_path(key, name)

    def _check_path(self, key: str, name: str) -> None:
        value = getattr(self, name)
        if value is None:
            return
        exists = Path(value).expanduser().is_dir() if name == "media_root" else Path(value).expanduser().exists()
        if name == "path" and not exists and is_hub_id(value):
            return
        require(exists, f"{key}.{name}", f"{value} does not exist" + (
            " (and is not a hub id like Kowsher/MMT-47)" if name == "path" else " (not a directory)"))

    def __post_init__(self) -> None:  # a single name or "a,b" from the command line is a list of one or more
        for name in ("categories", "tasks"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [part.strip() for part in value.split(",") if part.strip()])

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BalanceSettings:
    """L = L_task + scale · (importance · L_imp + kl · L_KL) every `every` optimizer steps (docs/method.md,
    "Balance losses")."""

    every: int = 1
    warmup_steps: int = 0
    scale: float = 0.01
    importance: float = 0.1
    kl: float = 0.01

    def check(self, key: str) -> None:
        non_negative(self, key, "every", "warmup_steps", "scale", "importance", "kl")


@dataclass
class WandbSettings:
    enabled: bool = False
    project: str = "lime"
    mode: Literal["offline", "online", "disabled"] = "offline"
    name: str | None = None


@dataclass
class TrainerSettings:
    name: str = "smoke"
    threads: int | None = 1
    device: str | None = None
    epochs: float = 3
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: Literal["adamw_torch", "adamw_8bit", "sgd"] = "adamw_torch"
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    lr_scheduler: SCHEDULERS = "linear"
    max_grad_norm: float | None = 1.0  # null: no clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    balance: BalanceSettings = field(default_factory=BalanceSettings)
    logging_steps: int = 10
    save_steps: int | None = None  # null: a checkpoint per epoch
    save_total_limit: int | None = 2
    resume: bool | str = False
    num_workers: int = 0
    deepspeed: str | None = None
    fsdp: str | None = None
    progress_bar: bool = True
    wandb: WandbSettings = field(default_factory=WandbSettings)

    def check(self, key: str) -> None:
        positive(self, key, "threads", "epochs", "batch_size", "grad_accum", "logging_steps", "save_steps",
                 "save_total_limit", "max_grad_norm")
        non_negative(self, key, "weight_decay", "num_workers")
        require(self.max_steps == -1 or self.max_steps > 0, f"{key}.max_steps",
                f"{self.max_steps} must be a positive number of optimizer steps, or -1 to train trainer.epochs")
        require(0 <= self.warmup_ratio < 1, f"{key}.warmup_ratio",
                f"{self.warmup_ratio} must be a fraction of the training steps in [0, 1)")
        if self.device is not None:
            require(self.device == "cpu" or self.device.split(":")[0] in ("cuda", "mps"), f"{key}.device",
                    f"{self.device!r} is not cpu, cuda or cuda:<index>")
            require(not self.device.startswith("cuda") or torch.cuda.is_available(), f"{key}.device",
                    f"{self.device!r} but no CUDA GPU is visible (leave it null to use the model's device)")
        require(self.precision != "fp16" or torch.cuda.is_available(), f"{key}.precision",
                "fp16 mixed precision needs a CUDA GPU; use fp32 or bf16 here")
        if isinstance(self.resume, str):
            require(Path(self.resume).expanduser().is_dir(), f"{key}.resume",
                    f"{self.resume} does not exist (true: this run directory; or the path of an earlier run)")
        if self.deepspeed is not None:
            require(Path(self.deepspeed).is_file(), f"{key}.deepspeed", f"{self.deepspeed} does not exist")


@dataclass
class EvalSettings:
    """The evaluation keys of the `trainer` group."""

    evaluate: bool = True  # false: train and save only (timing runs)
    eval_batch_size: int = 32
    max_new_tokens: int = 8
    scorer: Literal["strict", "lenient"] = "strict"
    on_generation_error: Literal["raise", "count"] = "raise"

    def check(self, key: str) -> None:
        positive(self, key, "eval_batch_size", "max_new_tokens")


@dataclass
class Settings:
    """A run's checked settings, one section per part of the code."""

    mode: Literal["train", "eval"]
    seed: int
    checkpoint: str | None
    debug: bool
    model: ModelSettings
    data: DataSettings
    trainer: TrainerSettings
    eval: EvalSettings
    peft_lr: float  # the peft group's learning rates: PEFT tensors, and expert vectors / gate / routers
    moe_lr: float
    lime: LiMEConfig | None  # None for mode=eval: the adapter's own config is read when it is loaded


# --- building and checking -----------------------------------------------------------------------------------

def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def positive(section: Any, key: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        require(value is None or value > 0, f"{key}.{name}", f"{value} must be > 0")


def non_negative(section: Any, key: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        require(value is None or value >= 0, f"{key}.{name}", f"{value} must be >= 0")


def is_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def _typed(value: Any, hint: Any, key: str) -> Any:
    """`value` checked (and converted: int -> float, nested dataclasses) against the type hint `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not {_describe(hint)}")
    if origin is Literal:
        require(value in args, key, f"{value!r} is not one of {', '.join(str(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(hint):
        require(isinstance(value, Mapping), key, f"{value!r} is not a section of keys")
        return section(hint, value, key)
    if hint is bool:
        require(isinstance(value, bool), key, f"{value!r} is not true or false")
    elif hint is int:
        require(isinstance(value, int) and not isinstance(value, bool), key, f"{value!r} is not an integer")
    elif hint is float:
        require(isinstance(value, int | float) and not isinstance(value, bool), key, f"{value!r} is not a number")
        return float(value)
    elif hint is str:
        require(isinstance(value, str), key, f"{value!r} is not a string")
    elif (origin or hint) is list:
        require(isinstance(value, list | tuple), key, f"{value!r} is not a list")
        return [_typed(item, args[0], f"{key}[{i}]") if args else item for i, item in enumerate(value)]
    elif (origin or hint) is dict:
        require(isinstance(value, Mapping), key, f"{value!r} is not a section of keys")
        return dict(value)
    return value


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    parts = [names.get(typing.get_origin(a) or a, str(a)) for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(parts) + (" or null" if type(None) in typing.get_args(hint) else "")


def section(cls: type, values: Mapping[str, Any], key: str, also_known: tuple[str, ...] = ()) -> Any:
    """The dataclass `cls` from a config section: unknown keys refused, types checked, defaults filled in.
    `also_known`: keys of the same config group that another section takes."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    require(not unknown, key, f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join([*fields, *also_known])}")
    hints = typing.get_type_hints(cls)
    given = {}
    for name, f in fields.items():
        if name in values:
            given[name] = _typed(values[name], hints[name], f"{key}.{name}")
        else:
            require(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING,
                    f"{key}.{name}", "is required")
    built = cls(**given)
    if hasattr(built, "check"):
        built.check(key)
    return built


EVAL_KEYS = tuple(f.name for f in dataclasses.fields(EvalSettings))


def plain(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def settings(cfg: Mapping[str, Any] | DictConfig) -> Settings:
    """Every check of a composed config that needs no model, data or weights (messages name the key)."""
    cfg = plain(cfg)
    unknown = sorted(set(cfg) - set(TOP_LEVEL))
    require(not unknown, "config", f"unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL)}")
    mode = _typed(cfg.get("mode", "train"), Literal["train", "eval"], "mode")
    seed = _typed(cfg.get("seed", 0), int, "seed")
    require(0 <= seed < 2**32, "seed", f"{seed} must be in [0, 2^32) (numpy's seed range)")
    checkpoint = _typed(cfg.get("checkpoint"), str | None, "checkpoint")
    trainer_values = dict(cfg.get("trainer") or {})
    evaluation = section(EvalSettings, {k: trainer_values.pop(k) for k in EVAL_KEYS if k in trainer_values}, "trainer")
    result = Settings(
        mode=mode, seed=seed, checkpoint=checkpoint, debug=_typed(cfg.get("debug", False), bool, "debug"),
        model=section(ModelSettings, cfg.get("model") or {}, "model"),
        data=section(DataSettings, cfg.get("data") or {}, "data"),
        trainer=section(TrainerSettings, trainer_values, "trainer", EVAL_KEYS), eval=evaluation,
        peft_lr=learning_rate(cfg["peft"], "peft_lr"), moe_lr=learning_rate(cfg["peft"], "moe_lr"),
        lime=LiMEConfig.from_groups(cfg["peft"], cfg["routing"]) if mode == "train" else None)
    check_across(result)
    return result


def learning_rate(peft: Mapping[str, Any], key: str) -> float:
    value = peft.get(key)
    require(isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1, f"peft.{key}",
            f"{value!r} must be a learning rate in (0, 1)")
    return float(value)


def check_across(s: Settings) -> None:
    """Checks that involve two groups."""
    if s.mode == "eval":
        require(bool(s.checkpoint), "checkpoint", "mode=eval needs checkpoint=<run dir or adapter dir>")
        require(Path(s.checkpoint).expanduser().exists(), "checkpoint", f"{s.checkpoint} does not exist")
    if s.lime is not None and s.data.max_length is not None:
        require(s.lime.routing.n_gram <= s.data.max_length, "routing.n_gram",
                f"{s.lime.routing.n_gram} is larger than data.max_length={s.data.max_length}")
    pretrain, generate = s.model.pretrain, s.data.generate
    if pretrain is not None and generate is not None:
        require(pretrain.data_seed != generate.get("seed", 0), "model.pretrain.data_seed",
                f"{pretrain.data_seed} must differ from data.generate.seed (the backbone must not see the "
                "benchmark's samples)")
