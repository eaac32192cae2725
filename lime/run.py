"""One run of train.py: check the config, build, adapt, train, evaluate, and record it all in the run directory.

    <run_dir>/.hydra/config.yaml   the composed config (Hydra)
    <run_dir>/run_info.json        status, versions, device, times, throughput, peak memory, parameter counts;
                                   after trainer.resume, totals over all segments and a resume_history
    <run_dir>/metrics.jsonl        one line per logging step (a resumed run appends to it)
    <run_dir>/adapter/             adapter_model.safetensors + adapter_config.json
    <run_dir>/results.json|csv     per task, per category, overall; predictions/<split>.jsonl
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import sys
import threading
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
from lime.config import ConfigError
from lime.data import dataset as data
from lime.data import mmt47
from lime.data.collate import Collator, check_lengths
from lime.data.dataset import SkipLog
from lime.data.mmt47 import Taxonomy
from lime.settings import ModelSettings, Settings, WandbSettings, is_hub_id, plain, settings
from lime.training import StopOnSignal

logger = logging.getLogger(__name__)

def check_config(cfg: Mapping[str, Any]) -> Settings:
    """Every check that needs no model weights, with messages naming the key: the typed settings of each group
    (lime.settings), the adapter of mode=eval, whether the model's weights are here, and the routing anchor."""
    checked = settings(cfg)
    if checked.mode == "eval":
        checked.lime = lime.checkpoint.config_from_meta(read_adapter_config(adapter_dir(checked.checkpoint)))
    check_weights(checked.model)
    routing = checked.lime.routing
    if routing.anchor == "last" and routing.n_gram > 1 and checked.eval.evaluate:
        raise ConfigError("routing.anchor: 'last' looks ahead in each n-gram window and cannot run under cached "
                          "generation; use routing.anchor=first, or trainer.evaluate=false for a training-only run")
    if routing.norm == "global" and checked.eval.evaluate:
        raise ConfigError("routing.norm: 'global' takes one max over the whole batch and cannot run under cached "
                          "generation; use routing.norm=token, or trainer.evaluate=false for a training-only run")
    return checked


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (for weights that are not in the local cache)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def check_weights(model: ModelSettings) -> None:
    """The model's weights must be on this machine or downloadable; else one message says which weights, their
    size and how to point model.name_or_path at a local copy, before anything is loaded."""
    path = model.name_or_path
    if not path:
        return  # a tiny model, built from its config
    local = Path(path).expanduser()
    if local.exists() or not is_hub_id(path):
        if not (local / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {path} " + ("has no config.json (not a saved model)"
                                                                 if local.exists() else "does not exist"))
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str) or hub_reachable():
        return
    size = f" ({model.weights_size})" if model.weights_size else ""
    raise ConfigError(
        f"model.name_or_path: the weights of {path}{size} for model={model.name} are not on this machine and the "
        f"Hugging Face hub cannot be reached. Download them where there is a network (huggingface-cli download "
        f"{path} --local-dir <dir>), copy <dir> here and run with model.name_or_path=<dir>")


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


def build_model(settings: Settings) -> tuple[torch.nn.Module, Any]:
    """Validate the LiME config against the architecture on the meta device, then build the real model."""
    model_cfg, data_cfg = settings.model.as_dict(), settings.data.as_dict()
    meta, _ = models.build(model_cfg, device="meta")
    lime.validate(meta, settings.lime)
    del meta
    model_cfg = pretrain.ensure_backbone(model_cfg, data_cfg)
    model, processor = models.build(model_cfg, device=settings.trainer.device)
    return model, processor


def wandb_settings(wandb: WandbSettings, run_dir: Path) -> dict[str, Any]:
    """With trainer.wandb.enabled, log to wandb inside the run directory (offline by default: no network here)."""
    if not wandb.enabled:
        return {}
    os.environ.setdefault("WANDB_MODE", wandb.mode)
    os.environ.setdefault("WANDB_PROJECT", wandb.project)
    os.environ["WANDB_DIR"] = str(run_dir)
    return {"wandb_dir": str(run_dir / "wandb"), "wandb_mode": os.environ["WANDB_MODE"]}


class Interrupted(Exception):
    """A signal stopped the run: in training after saving a checkpoint (resume with trainer.resume), or in any
    other phase (start-up, evaluation) at once."""

    def __init__(self, signum: int, checkpoint: Path | None = None, phase: str = "training") -> None:
        name = signal.Signals(signum).name
        if checkpoint is not None:
            message = (f"stopped by {name} after saving {checkpoint}; continue with trainer.resume=true and "
                       "hydra.run.dir=<this run directory> (the whole command: resume_command)")
        else:
            message = f"stopped by {name} during {phase}"
        super().__init__(message)
        self.signum, self.checkpoint, self.phase = signum, checkpoint, phase


class SignalsInterrupt:
    """Outside the training loop (which checkpoints first, lime.training.StopOnSignal), SIGINT, SIGTERM and
    SLURM's SIGUSR2 stop the run at once with an `Interrupted` naming the phase, so that run_info.json says
    `interrupted` instead of staying `running`."""

    def __init__(self) -> None:
        self.phase = "start-up"
        self.previous: dict[int, Any] = {}

    def _raise(self, signum: int, frame: Any) -> None:
        raise Interrupted(signum, phase=self.phase)

    def __enter__(self) -> SignalsInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._raise) for s in StopOnSignal.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class RunDirectoryBusy(RuntimeError):
    """Another live run owns the run directory."""


class RunLock:
    """One run at a time in a run directory: `<run_dir>/.lock` holds the owner's pid and host.

    A live owner on this host (or any owner on another host, whose liveness cannot be seen) makes a second run
    fail with a message naming it; a lock left by a dead process on this host, or by an earlier submission of
    this SLURM job (a requeue), is taken over, and the log says so."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                      "started": datetime.datetime.now().isoformat(timespec="seconds")}

    def __enter__(self) -> RunLock:
        if int(os.environ.get("RANK", "0")) != 0:
            return self  # torchrun: rank 0 holds the lock for all the processes of the run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole, then linked into place: the lock never exists half-written (os.link fails if it exists).
        mine = self.path.with_name(f".lock.{os.getpid()}")
        mine.write_text(json.dumps(self.owner))
        try:
            while True:
                try:
                    os.link(mine, self.path)
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
        finally:
            mine.unlink()

    def _take_over_if_stale(self) -> None:
        try:
            held = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            held = {}  # half-written by an owner that died at once: stale
        if held and self._alive(held):
            raise RunDirectoryBusy(
                f"run directory {self.path.parent} is in use by pid {held.get('pid')} on {held.get('host')} "
                f"(since {held.get('started')}); choose another hydra.run.dir, or wait for that run to end "
                f"(delete {self.path} only if that process is gone)")
        logger.warning("taking over the stale lock of %s (pid %s on %s is gone)", self.path.parent,
                       held.get("pid"), held.get("host"))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _alive(self, held: Mapping[str, Any]) -> bool:
        slurm_job = self.owner["slurm_job"]
        if slurm_job is not None and held.get("slurm_job") == slurm_job:
            return False  # the same SLURM job, requeued: its earlier submission is over
        if held.get("host") != self.owner["host"]:
            return True
        try:
            os.kill(int(held["pid"]), 0)
        except (ProcessLookupError, KeyError, ValueError, TypeError):
            return False
        except PermissionError:
            return True  # another user's live process
        return True

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(OSError):
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files a killed run leaves behind: run_info.tmp, half-written adapters, staged checkpoints."""
    for path in [run_dir / "run_info.tmp", *run_dir.glob(".adapter.tmp-*"), *run_dir.glob(".adapter.old-*"),
                 run_dir / "checkpoints" / training.STAGING]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


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

    def __init__(self, run_dir: Path, cfg: Mapping[str, Any], experiment: str | None,
                 resumed: Mapping[str, Any] | None = None, previous: Mapping[str, Any] | None = None) -> None:
        """`resumed`: this segment's resume_history entry; `previous`: the record of this run directory's
        earlier segments (trainer.resume=true), whose start, history and wall time it continues."""
        self.path = run_dir / "run_info.json"
        self.start = time.perf_counter()
        previous = previous or {}
        self.earlier_wall_time_s = previous.get("wall_time_s") or 0.0
        memory_scope = reset_peak_memory()
        self.info: dict[str, Any] = {**previous, "status": "running", "error": None, "finished": None}
        self.info.pop("resume_command", None)  # of the interruption this segment continues
        self.info.update({
            "status": "running", "error": None, "mode": cfg["mode"], "method": cfg["peft"].get("name"),
            "model": cfg["model"].get("name"), "data": cfg["data"].get("name"), "seed": cfg["seed"],
            "experiment": experiment,
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "finished": None,
            "versions": {"lime": "0.1.0", "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
            "peak_memory": ("torch.cuda.max_memory_allocated" if torch.cuda.is_available()
                            else "peak resident set (VmHWM)") + f", over the {memory_scope}",
        })
        if previous.get("started"):
            self.info["started"] = previous["started"]  # of the first segment
        if resumed is not None:
            self.info["resume_history"] = [*previous.get("resume_history", []), dict(resumed)]
        self.write()

    def update(self, **values: Any) -> None:
        self.info.update(values)
        self.write()

    def write(self) -> None:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 records the run
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.info, indent=2, default=str) + "\n")
            os.replace(tmp, self.path)
        finally:  # a full disk leaves no empty run_info.tmp behind
            tmp.unlink(missing_ok=True)

    def finish(self, status: str, error: BaseException | None = None) -> None:
        self.update(status=status, error=None if error is None else f"{type(error).__name__}: {error}",
                    finished=datetime.datetime.now().isoformat(timespec="seconds"),
                    wall_time_s=round(self.earlier_wall_time_s + time.perf_counter() - self.start, 2),
                    peak_memory_bytes=peak_memory_bytes())

    def wall_time(self) -> str:
        seconds = int(self.info.get("wall_time_s") or 0)
        return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def fit(model: torch.nn.Module, processor: Any, train_set: data.MMTDataset, settings: Settings,
        run_dir: Path) -> dict[str, Any]:
    """Train with LiMETrainer; returns the Trainer's train metrics (time, samples/s)."""
    trainer_settings, data_settings = settings.trainer, settings.data
    args = training.training_arguments(trainer_settings, run_dir, settings.seed)
    if trainer_settings.gradient_checkpointing:
        model.config.use_cache = False
    skips = SkipLog()  # counted skips (data.on_error=skip, truncation=skip); with num_workers=0 they land here
    mocle.fit_instruction_clusters(model, [str(q) for q in train_set.rows["question"] if q is not None], settings.seed)
    collator = Collator(processor, "train", max_length=data_settings.max_length,
                        truncation=data_settings.truncation, skip_log=skips,
                        instruction_clusters=getattr(model, "lime_clusters", None))
    trainer = training.LiMETrainer(
        model=model, args=args, train_dataset=train_set, data_collator=collator,
        peft_lr=settings.peft_lr, moe_lr=settings.moe_lr, balance=dataclasses.asdict(trainer_settings.balance),
        metrics_path=run_dir / "metrics.jsonl", samples_per_step=samples_per_step(trainer_settings),
    )
    resume = training.resume_checkpoint(trainer_settings.resume, run_dir)
    output = trainer.train(resume_from_checkpoint=resume)
    if trainer.stop_on_signal.received is not None:
        raise Interrupted(trainer.stop_on_signal.received, training.complete_checkpoints(args.output_dir)[-1])
    if trainer.state.global_step == 0:  # never counted as a completed training run
        raise RuntimeError("training took no optimizer step (trainer.epochs, trainer.max_steps and the size of "
                           "the train split give none)")
    metrics = {**output.metrics, **run_totals(trainer, output.metrics, samples_per_step(trainer_settings))}
    if len(skips):
        logger.warning("training skipped %d samples: %s", len(skips), skips.summary())
    return {**metrics, "skipped_samples": len(skips), "train_samples": len(train_set)}


def samples_per_step(trainer: Any) -> int:
    """Samples per optimizer step: trainer.batch_size is the global micro-batch (split across processes)."""
    return trainer.batch_size * trainer.grad_accum


def run_totals(trainer: training.LiMETrainer, metrics: Mapping[str, Any], per_step: int) -> dict[str, Any]:
    """The Trainer's train metrics cover the last segment only (its loss sum over all the steps, its time);
    these cover the whole run, the segments before a resume included."""
    steps = trainer.state.global_step
    train_time = trainer.prior["train_time_s"] + metrics["train_runtime"]
    return {"train_loss": (trainer.prior["loss_sum"] + metrics["train_loss"] * steps) / steps,
            "train_runtime": round(train_time, 4), "train_samples_per_second": round(steps * per_step / train_time, 3),
            "train_steps": steps}


def run(cfg: Mapping[str, Any] | DictConfig, run_dir: Path, experiment: str | None = None,
        hydra_files: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Train (mode=train) or load (mode=eval) an adapter, evaluate it, and write the run directory.

    `experiment` is the name of the `experiment` config chosen (for the reports), if any. `hydra_files`
    (name -> config) are written to `<run_dir>/.hydra/` once this run owns the directory (train.py: Hydra's
    config.yaml, hydra.yaml and overrides.yaml, which Hydra itself would write before any lock could be taken).
    """
    cfg = plain(cfg)
    rank_zero = int(os.environ.get("RANK", "0")) == 0
    overrides = [str(o) for o in (hydra_files or {}).get("overrides.yaml", [])]
    say = print if rank_zero else (lambda *args: None)
    with RunLock(run_dir), SignalsInterrupt() as signals:
        try:
            resumed, previous = resume_point(cfg, run_dir)
        except Exception as error:  # e.g. trainer.resume=<a run directory without a checkpoint>
            RunRecord(run_dir, cfg, experiment).finish("failed", error)
            raise
        if rank_zero:
            remove_leftovers(run_dir)  # of an earlier, killed run in this directory
            segment = len(previous.get("resume_history", [])) + 1 if previous else 0
            write_hydra_files(run_dir, hydra_files or {}, segment)
            if previous and resumed:
                drop_replayed_metrics(run_dir / "metrics.jsonl", resumed["from_step"])
        record = RunRecord(run_dir, cfg, experiment, resumed, previous)
        say(f"run directory: {run_dir}")
        if resumed:
            say(f"resuming from {resumed['from_checkpoint']} (step {resumed['from_step']})")
        try:
            results = _run(cfg, run_dir, record, signals)
        except Interrupted as error:
            record.finish("interrupted", error)
            record.update(resume_command=resume_command(run_dir, overrides))
            say(interrupted_summary(error, run_dir, overrides))
            raise SystemExit(128 + error.signum) from error
        except BaseException as error:
            record.finish("failed", error)
            raise
        finally:
            if rank_zero:
                remove_leftovers(run_dir)
        say(closing_summary(record, results, run_dir))
        return results


def resume_point(cfg: Mapping[str, Any], run_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """With trainer.resume: this segment's resume_history entry (the checkpoint and step it continues from,
    the process) and, when it continues this run directory, the directory's earlier run_info.json."""
    resume = cfg["trainer"].get("resume")
    if resume is not True and not (isinstance(resume, str) and Path(resume).expanduser().is_dir()):
        return None, None  # no resume, or a path that does not exist (check_config names it)
    checkpoint = training.resume_checkpoint(resume, run_dir)
    if checkpoint is None:
        return None, None
    checkpoint = Path(checkpoint)
    entry = {"resumed": datetime.datetime.now().isoformat(timespec="seconds"), "from_checkpoint": str(checkpoint),
             "from_step": int(checkpoint.name.split("-")[1]), "pid": os.getpid(), "host": socket.gethostname()}
    info_path = run_dir / "run_info.json"
    if checkpoint.parent.parent.resolve() != run_dir.resolve() or not info_path.is_file():
        return entry, None  # resumed from another run directory: a new record that says where from
    previous = json.loads(info_path.read_text())
    entry.update(previous_status=previous.get("status"), previous_error=previous.get("error"))
    return entry, previous


def write_hydra_files(run_dir: Path, hydra_files: Mapping[str, Any], segment: int) -> None:
    """Hydra's config.yaml, hydra.yaml and overrides.yaml; a resumed segment (segment > 0) keeps those of the
    first and writes its own beside them (overrides.resume-1.yaml, ...)."""
    for name, content in hydra_files.items():
        path = run_dir / ".hydra" / name
        if segment and path.exists():
            path = path.with_name(f"{path.stem}.resume-{segment}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(content, path)


def drop_replayed_metrics(path: Path, from_step: int) -> None:
    """The lines of the steps after the checkpoint a run resumes from: the resumed run trains and logs those steps
    again, so that metrics.jsonl holds each step once."""
    if not path.is_file():
        return
    def replayed(line: str) -> bool:
        try:
            return json.loads(line)["step"] > from_step
        except (json.JSONDecodeError, KeyError, TypeError):
            return True  # a line cut short by a kill

    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True) if not replayed(line)))


IGNORED_WHEN_MATCHING = ("trainer.resume", "debug")  # differ between a run and its resumption


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (trainer.resume and debug aside)."""
    keys = sorted(set(saved) | set(current))
    found = []
    for key in keys:
        name = f"{prefix}{key}"
        if name in IGNORED_WHEN_MATCHING:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += config_differences(a, b, name + ".")
        elif a != b:
            found.append(name)
    return found


def find_run_to_resume(outputs: Path, cfg: Mapping[str, Any]) -> Path:
    """trainer.resume=true without hydra.run.dir: the newest run directory under `outputs` that did not complete,
    has a checkpoint and was started with this config (trainer.resume and debug aside). Otherwise a ConfigError
    names the unfinished runs and how their configs differ."""
    cfg = plain(cfg)
    unfinished = []
    for info_path in sorted(outputs.glob("**/run_info.json")):
        run_dir = info_path.parent
        with contextlib.suppress(OSError, json.JSONDecodeError):
            info = json.loads(info_path.read_text())
            if info.get("status") != "completed" and training.complete_checkpoints(run_dir / "checkpoints"):
                saved = plain(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
                unfinished.append((info.get("started") or "", run_dir, config_differences(saved, cfg)))
    matching = sorted((started, str(run_dir)) for started, run_dir, differences in unfinished if not differences)
    if matching:
        return Path(matching[-1][1])
    if not unfinished:
        raise ConfigError(f"trainer.resume=true: no unfinished run with a checkpoint under {outputs}; name the run "
                          "to continue with hydra.run.dir=<run directory>")
    listed = "; ".join(f"{run_dir} (differs in {', '.join(differences[:4])})"
                       for _, run_dir, differences in sorted(unfinished, key=lambda u: str(u[1]))[-5:])
    raise ConfigError(f"trainer.resume=true: no unfinished run under {outputs} has this config; candidates: "
                      f"{listed}. Continue one with hydra.run.dir=<run directory> and its overrides")


def resume_command(run_dir: Path, overrides: list[str]) -> str:
    """The command that continues this run: its own overrides, trainer.resume=true and its run directory."""
    kept = [o for o in overrides if not o.startswith(("trainer.resume=", "hydra.run.dir="))]
    return shlex.join(["python", "train.py", *kept, "trainer.resume=true", f"hydra.run.dir={run_dir}"])


def interrupted_summary(error: Interrupted, run_dir: Path, overrides: list[str]) -> str:
    name = signal.Signals(error.signum).name
    if error.checkpoint is not None:
        step = error.checkpoint.name.split("-")[-1]
        return (f"interrupted by {name} at step {step}: saved {error.checkpoint}\n"
                f"continue with: {resume_command(run_dir, overrides)}")
    if (run_dir / "adapter").is_dir():
        return (f"interrupted by {name} during {error.phase}; the trained adapter is in {run_dir / 'adapter'}\n"
                f"evaluate it with: python train.py mode=eval checkpoint={run_dir}")
    return f"interrupted by {name} during {error.phase}; nothing was saved (run directory: {run_dir})"


def closing_summary(record: RunRecord, results: Mapping[str, Any], run_dir: Path) -> str:
    """The last line of a run: status, overall score, time, run directory."""
    parts = [f"{record.info['status']} in {record.wall_time()}"]
    overall = (results or {}).get("overall", {})
    if overall.get("mean_of_tasks") is not None:
        parts.append(f"overall {overall['mean_of_tasks']:.2f} (mean of tasks)")
    if record.info.get("train_loss") is not None:
        parts.append(f"train loss {record.info['train_loss']:.4f}")
    parts.append(f"run directory: {run_dir}")
    return " | ".join(parts)


def train_and_save(model: torch.nn.Module, processor: Any, train_set: data.MMTDataset, checked: Settings,
                   run_dir: Path, record: RunRecord) -> bool:
    """Train, save the adapter and record the training; False on the processes other than rank 0."""
    metrics = fit(model, processor, train_set, checked, run_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    lime.save_adapter(model, run_dir / "adapter")
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        record.update(wandb_run=str(wandb.run.dir))
        wandb.finish()
    record.update(train_peak_memory_bytes=peak_memory_bytes(),  # building, loading and training
                  train_time_s=metrics.get("train_runtime"), train_samples=metrics["train_samples"],
                  train_steps=metrics["train_steps"],
                  train_samples_per_s=metrics.get("train_samples_per_second"),
                  train_loss=metrics.get("train_loss"), skipped_train_samples=metrics["skipped_samples"])
    return True


def _run(cfg: Mapping[str, Any], run_dir: Path, record: RunRecord, signals: SignalsInterrupt) -> dict[str, Any]:
    checked = check_config(cfg)
    if checked.mode == "eval":  # the run is labelled by the adapter it evaluates, not by peft= (the command line)
        record.update(**evaluated_adapter(cfg))
    if checked.trainer.threads:  # tiny CPU runs: one intra-op thread (see configs/trainer/smoke.yaml)
        torch.set_num_threads(checked.trainer.threads)
    transformers.set_seed(checked.seed)
    splits = data.build(checked.data)
    if checked.mode == "train" and not len(splits["train"]):
        raise ConfigError("data: the train split is empty (after data.categories, data.tasks and "
                          "data.max_train_samples)")
    signals.phase = "model loading"
    model, processor = build_model(checked)
    if checked.mode == "eval":
        lime.load_adapter(model, adapter_dir(checked.checkpoint))
    else:
        lime.apply_lime(model, checked.lime)
    print(lime.summary(model))
    record.update(**wandb_settings(checked.trainer.wandb, run_dir))
    record.update(trainable_params=lime.trainable_parameters(model),
                  total_params=sum(p.numel() for p in model.parameters()))
    train_set = splits.pop("train", None)
    test_skips = SkipLog()
    for dataset in splits.values():  # the length policy, before any training (a text-only lower bound)
        check_lengths(dataset, processor, checked.data.max_length, checked.data.truncation, test_skips)
    if checked.mode == "train":
        check_lengths(train_set, processor, checked.data.max_length, checked.data.truncation)
        mmt47.write_train_tasks(train_set.rows, run_dir)  # rows per task, where the data tells them
        signals.phase = "training"
        if not train_and_save(model, processor, train_set, checked, run_dir, record):
            return {}  # torchrun: rank 0 saves the adapter, evaluates and writes the run directory
    if not checked.eval.evaluate:  # timing runs (experiment=efficiency)
        record.finish("completed")
        return {}
    signals.phase = "evaluation"
    taxonomy = Taxonomy.from_config(checked.data.taxonomy)
    results = evaluation.evaluate(
        model, processor, splits, taxonomy, run_dir, batch_size=checked.eval.eval_batch_size,
        max_new_tokens=checked.eval.max_new_tokens, scorer=checked.eval.scorer,
        on_error=checked.eval.on_generation_error, max_length=checked.data.max_length,
        truncation=checked.data.truncation, skip_log=test_skips)
    print(evaluation.format_table(results))
    baseline = pretrain.backbone_results(checked.model.as_dict(), checked.data.as_dict())
    if baseline is not None:  # the pretrained tiny backbone's own scores, before adaptation
        (run_dir / "backbone_results.json").write_text(json.dumps(baseline, indent=2) + "\n")
        print(pretrain.comparison_table(baseline, results, taxonomy))
    record.finish("completed")
    return results

