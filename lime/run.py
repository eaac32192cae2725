"""One run of train.py: check the config, build, adapt, train, evaluate, and record it all in the run directory.

    <run_dir>/.hydra/config.yaml   the composed config (Hydra)
    <run_dir>/run_info.json        status, versions, device, times, throughput, peak memory, parameter counts
    <run_dir>/metrics.jsonl        one line per logging step
    <run_dir>/adapter/             adapter_model.safetensors + adapter_config.json
    <run_dir>/results.json|csv     per task, per category, overall; predictions/<split>.jsonl
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

import lime
from lime import evaluation, mocle, models, pretrain, training
from lime.checkpoint import read_adapter_config
from lime.config import ConfigError, LiMEConfig
from lime.data import dataset as data
from lime.data.collate import Collator
from lime.data.dataset import SkipLog
from lime.data.mmt47 import Taxonomy

logger = logging.getLogger(__name__)

TRAINER_CHOICES = {"precision": ("fp32", "bf16", "fp16"), "optimizer": ("adamw_torch", "adamw_8bit", "sgd"),
                   "scorer": ("strict", "lenient"), "on_generation_error": ("raise", "count")}


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def check_config(cfg: Mapping[str, Any]) -> LiMEConfig:
    """Every check that needs no model weights, with messages naming the key; returns the LiME config."""
    if cfg["mode"] not in ("train", "eval"):
        raise ConfigError(f"mode: {cfg['mode']!r} is not one of train, eval")
    trainer = cfg["trainer"]
    for key, allowed in TRAINER_CHOICES.items():
        if trainer.get(key) not in allowed:
            raise ConfigError(f"trainer.{key}: {trainer.get(key)!r} is not one of {', '.join(allowed)}")
    for key in ("peft_lr", "moe_lr"):
        value = cfg["peft"].get(key)
        if not isinstance(value, int | float) or not 0 < value < 1:
            raise ConfigError(f"peft.{key}: {value!r} must be a learning rate in (0, 1)")
    for key in ("batch_size", "grad_accum", "eval_batch_size"):
        if not isinstance(trainer.get(key), int) or trainer[key] < 1:
            raise ConfigError(f"trainer.{key}: {trainer.get(key)!r} must be a positive integer")
    if cfg["mode"] == "eval":
        if not cfg.get("checkpoint"):
            raise ConfigError("checkpoint: mode=eval needs checkpoint=<run dir or adapter dir>")
        read_adapter_config(adapter_dir(cfg["checkpoint"]))
    path, media_root = cfg["data"].get("path"), cfg["data"].get("media_root")
    if path is not None and not Path(str(path)).expanduser().exists() and not is_hub_id(str(path)):
        raise ConfigError(f"data.path: {path} does not exist (and is not a hub id like Kowsher/MMT-47)")
    if media_root is not None and not Path(str(media_root)).expanduser().is_dir():
        raise ConfigError(f"data.media_root: {media_root} is not a directory")
    if cfg["mode"] == "eval":
        config = lime.checkpoint.config_from_meta(read_adapter_config(adapter_dir(cfg["checkpoint"])))
    else:
        config = LiMEConfig.from_groups(cfg["peft"], cfg["routing"])
    routing = config.routing
    if routing.anchor == "last" and routing.n_gram > 1 and trainer.get("evaluate", True):
        raise ConfigError("routing.anchor: 'last' looks ahead in each n-gram window and cannot run under cached "
                          "generation; use routing.anchor=first, or trainer.evaluate=false for a training-only run")
    return config


def is_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def adapter_dir(checkpoint: str | Path) -> Path:
    """A run directory's adapter, or the adapter directory itself."""
    path = Path(str(checkpoint)).expanduser()
    return path / "adapter" if (path / "adapter").is_dir() else path


def evaluated_adapter(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter an eval run evaluates (method, config, path, sha256); a peft= that names another method
    is overruled, loudly."""
    adapter = lime.checkpoint.describe_adapter(adapter_dir(cfg["checkpoint"]))
    if cfg["peft"].get("name") not in (None, adapter["method"]):
        logger.warning("peft=%s is ignored in mode=eval: the adapter at %s is %s, and the run is recorded as %s",
                       cfg["peft"].get("name"), adapter["checkpoint"], adapter["method"], adapter["method"])
    return adapter


def build_model(cfg: Mapping[str, Any], config: LiMEConfig) -> tuple[torch.nn.Module, Any]:
    """Validate `config` against the architecture on the meta device, then build the real model."""
    meta, _ = models.build(cfg["model"], device="meta")
    lime.validate(meta, config)
    del meta
    model_cfg = pretrain.ensure_backbone(cfg["model"], cfg["data"])
    model, processor = models.build(model_cfg, device=cfg["trainer"].get("device"))
    return model, processor


def wandb_settings(trainer_cfg: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """With trainer.wandb.enabled, log to wandb inside the run directory (offline by default: no network here)."""
    wandb = trainer_cfg.get("wandb") or {}
    if not wandb.get("enabled"):
        return {}
    os.environ.setdefault("WANDB_MODE", wandb.get("mode", "offline"))
    os.environ.setdefault("WANDB_PROJECT", wandb.get("project", "lime"))
    os.environ["WANDB_DIR"] = str(run_dir)
    return {"wandb_dir": str(run_dir / "wandb"), "wandb_mode": os.environ["WANDB_MODE"]}


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; resume with trainer.resume."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by signal {signum} after saving {checkpoint}; continue with trainer.resume=true "
                         "(and this run's hydra.run.dir) or trainer.resume=<this run dir>")
        self.signum = signum


def reset_peak_memory() -> str:
    """Start a new memory peak and say what it covers: "run" or, where it cannot be reset, "process".

    GPU: the CUDA allocator's peak. CPU: the resident-set high-water mark (VmHWM), reset on Linux through
    /proc/self/clear_refs. Without the reset, the runs of a Hydra multirun (one process) would each report the
    highest peak of every run before them."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return "run"
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "run"
    except OSError:  # not Linux: the peak spans the process (recorded as such in run_info.json)
        return "process"


def peak_memory_bytes() -> int:
    """The peak since `reset_peak_memory`: CUDA's max_memory_allocated, else the process's VmHWM."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class RunRecord:
    """run_info.json: written at the start (status running) and rewritten at the end (completed or failed)."""

    def __init__(self, run_dir: Path, cfg: Mapping[str, Any], experiment: str | None) -> None:
        self.path = run_dir / "run_info.json"
        self.start = time.perf_counter()
        memory_scope = reset_peak_memory()
        self.info: dict[str, Any] = {
            "status": "running", "error": None, "mode": cfg["mode"], "method": cfg["peft"].get("name"),
            "model": cfg["model"].get("name"), "data": cfg["data"].get("name"), "seed": cfg["seed"],
            "experiment": experiment,
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "finished": None,
            "versions": {"lime": "0.1.0", "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
            "peak_memory": ("torch.cuda.max_memory_allocated" if torch.cuda.is_available()
                            else "peak resident set (VmHWM)") + f", over the {memory_scope}",
        }
        self.write()

    def update(self, **values: Any) -> None:
        self.info.update(values)
        self.write()

    def write(self) -> None:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 records the run
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def finish(self, status: str, error: BaseException | None = None) -> None:
        self.update(status=status, error=None if error is None else f"{type(error).__name__}: {error}",
                    finished=datetime.datetime.now().isoformat(timespec="seconds"),
                    wall_time_s=round(time.perf_counter() - self.start, 2), peak_memory_bytes=peak_memory_bytes())


def fit(model: torch.nn.Module, processor: Any, train_set: data.MMTDataset, cfg: Mapping[str, Any],
        run_dir: Path) -> dict[str, Any]:
    """Train with LiMETrainer; returns the Trainer's train metrics (time, samples/s)."""
    trainer_cfg, data_cfg = cfg["trainer"], cfg["data"]
    args = training.training_arguments(trainer_cfg, run_dir, cfg["seed"])
    if trainer_cfg.get("gradient_checkpointing"):
        model.config.use_cache = False
    skips = SkipLog()  # counted skips (data.on_error=skip, truncation=skip); with num_workers=0 they land here
    mocle.fit_instruction_clusters(model, [str(q) for q in train_set.rows["question"] if q is not None], cfg["seed"])
    collator = Collator(processor, "train", max_length=data_cfg.get("max_length"),
                        truncation=data_cfg.get("truncation", "error"), skip_log=skips,
                        instruction_clusters=getattr(model, "lime_clusters", None))
    trainer = training.LiMETrainer(
        model=model, args=args, train_dataset=train_set, data_collator=collator,
        peft_lr=cfg["peft"]["peft_lr"], moe_lr=cfg["peft"]["moe_lr"], balance=trainer_cfg["balance"],
        metrics_path=run_dir / "metrics.jsonl",
    )
    resume = training.resume_checkpoint(trainer_cfg.get("resume", False), run_dir)
    output = trainer.train(resume_from_checkpoint=resume)
    if trainer.stop_on_signal.received is not None:
        raise Interrupted(trainer.stop_on_signal.received, training.complete_checkpoints(args.output_dir)[-1])
    if len(skips):
        logger.warning("training skipped %d samples: %s", len(skips), skips.summary())
    return {**output.metrics, "skipped_samples": len(skips), "train_samples": len(train_set)}


def run(cfg: Mapping[str, Any] | DictConfig, run_dir: Path, experiment: str | None = None) -> dict[str, Any]:
    """Train (mode=train) or load (mode=eval) an adapter, evaluate it, and write the run directory.

    `experiment` is the name of the `experiment` config chosen (for the reports), if any.
    """
    cfg = plain(cfg)
    record = RunRecord(run_dir, cfg, experiment)
    try:
        config = check_config(cfg)
        if cfg["mode"] == "eval":  # the run is labelled by the adapter it evaluates, not by peft= (the command line)
            record.update(**evaluated_adapter(cfg))
        if cfg["trainer"].get("threads"):  # tiny CPU runs: one intra-op thread (see configs/trainer/smoke.yaml)
            torch.set_num_threads(int(cfg["trainer"]["threads"]))
        transformers.set_seed(cfg["seed"])
        model, processor = build_model(cfg, config)
        if cfg["mode"] == "eval":
            lime.load_adapter(model, adapter_dir(cfg["checkpoint"]))
        else:
            lime.apply_lime(model, config)
        print(lime.summary(model))
        record.update(**wandb_settings(cfg["trainer"], run_dir))
        record.update(trainable_params=lime.trainable_parameters(model),
                      total_params=sum(p.numel() for p in model.parameters()))
        splits = data.build(cfg["data"])
        if cfg["mode"] == "train":
            metrics = fit(model, processor, splits.pop("train"), cfg, run_dir)
            if int(os.environ.get("RANK", "0")) != 0:
                return {}  # torchrun: rank 0 saves the adapter, evaluates and writes the run directory
            lime.save_adapter(model, run_dir / "adapter")
            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                record.update(wandb_run=str(wandb.run.dir))
                wandb.finish()
            record.update(train_peak_memory_bytes=peak_memory_bytes(),  # building, loading and training
                          train_time_s=metrics.get("train_runtime"), train_samples=metrics["train_samples"],
                          train_samples_per_s=metrics.get("train_samples_per_second"),
                          train_loss=metrics.get("train_loss"), skipped_train_samples=metrics["skipped_samples"])
        splits.pop("train", None)
        trainer_cfg = cfg["trainer"]
        if not trainer_cfg.get("evaluate", True):  # timing runs (experiment=efficiency)
            record.finish("completed")
            return {}
        results = evaluation.evaluate(
            model, processor, splits, Taxonomy.from_config(cfg["data"]["taxonomy"]), run_dir,
            batch_size=trainer_cfg["eval_batch_size"], max_new_tokens=trainer_cfg["max_new_tokens"],
            scorer=trainer_cfg["scorer"], on_error=trainer_cfg["on_generation_error"])
        print(evaluation.format_table(results))
        baseline = pretrain.backbone_results(cfg["model"], cfg["data"])
        if baseline is not None:  # the pretrained tiny backbone's own scores, before adaptation
            (run_dir / "backbone_results.json").write_text(json.dumps(baseline, indent=2) + "\n")
            print(pretrain.comparison_table(baseline, results, Taxonomy.from_config(cfg["data"]["taxonomy"])))
        record.finish("completed")
        return results
    except Interrupted as error:
        record.finish("interrupted", error)
        raise SystemExit(128 + error.signum) from error
    except BaseException as error:
        record.finish("failed", error)
        raise
