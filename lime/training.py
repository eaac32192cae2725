"""Training: a `transformers.Trainer` with LiME's learning-rate groups, balance loss and routing logs.

* Two learning rates (docs/method.md §3): `moe_lr` (no weight decay) for expert vectors, shared vector, gate and
  routers; `peft_lr` for the PEFT tensors.
* The balance loss c · (α L_imp + β L_KL) joins the task loss on every `balance.every`-th optimizer step
  (counted in optimizer steps, from `balance.warmup_steps` on).
* Under torchrun (DDP), `trainer.batch_size` is the global micro-batch, split across the processes, and the
  routing statistics (so the balance loss) are those of the global micro-batch: N processes train as one does.
* Routing statistics and losses go to the console, to `metrics.jsonl` in the run directory, and to wandb.
* Checkpoints hold the adapter only (safetensors), are published by an atomic rename, and `resume` picks the
  newest complete one. Each also holds the run's totals so far (`run_totals.json`: the sum of the per-step
  training losses, the training time, the steps), so that a resumed run reports totals over all its segments:

      train_loss = (Σ_{segments} Σ_{steps} loss) / steps,   samples/s = steps · samples per step / Σ train time
* The console gets one compact line per logging step (`ConsoleLog`), beside the progress bar.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import lime
from lime.balance import RoutingAverage, RoutingStats, clear_routing_stats
from lime.checkpoint import load_adapter, save_adapter
from lime.settings import TrainerSettings

MOE_PARAMETERS = ("expert_vectors", "shared_vector", "shared_gate", "router.")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
TOTALS = "run_totals.json"  # in each checkpoint: the run's totals up to its step (all segments)


def is_moe_parameter(name: str) -> bool:
    return any(part in name for part in MOE_PARAMETERS)


class NonFiniteLoss(RuntimeError):
    """The loss or a gradient became NaN/inf; the message names the optimizer step."""


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM (and SLURM's pre-timeout SIGUSR2): finish the current step, checkpoint, stop cleanly.

    A second signal of the same kind falls back to the default behaviour (e.g. KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


class ConsoleLog(TrainerCallback):
    """One line per logging step, written above the progress bar (instead of the Trainer's raw dicts):

        step 40/600 | loss 1.234 | balance 0.012 | lr 3.9e-04 | 12.3 samples/s
    """

    def __init__(self, samples_per_step: int) -> None:
        self.samples_per_step = samples_per_step
        self.last: tuple[int, float] | None = None  # (step, time) of the previous line

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.last = (state.global_step, time.perf_counter())

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        from tqdm.auto import tqdm

        tqdm.write(self.line(state.global_step, state.max_steps, logs))

    def line(self, step: int, max_steps: int, logs: Mapping[str, Any]) -> str:
        parts = [f"step {step}/{max_steps}", f"loss {logs['loss']:.4f}"]
        if "balance_loss" in logs:
            parts.append(f"balance {logs['balance_loss']:.3g}")  # often ~1e-4: significant digits
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.1e}")
        now = time.perf_counter()
        if self.last is not None and now > self.last[1] and step > self.last[0]:
            parts.append(f"{(step - self.last[0]) * self.samples_per_step / (now - self.last[1]):.1f} samples/s")
        self.last = (step, now)
        return " | ".join(parts)


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar without its raw log dicts (ConsoleLog writes the lines)."""

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        return None


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.random.set_rng_state_all(states["cuda"])


class StepStartRNG(TrainerCallback):
    """The RNG states at the start of each optimizer step. A checkpoint written when a step is abandoned (a
    non-finite loss) holds them, not the states after the abandoned step's draws (routing jitter, dropout): the
    resumed run then replays that step as an uninterrupted run would."""

    def __init__(self) -> None:
        self.states: dict[str, Any] | None = None

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.states = rng_states()


def first_non_finite(model: nn.Module) -> str | None:
    """The name of the first trainable parameter holding a NaN or inf, if any."""
    return next((name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()),
                None)


class LiMETrainer(Trainer):
    def __init__(self, *args: Any, peft_lr: float, moe_lr: float, balance: Mapping[str, float],
                 metrics_path: Path | None = None, samples_per_step: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The console: compact lines (ConsoleLog) instead of the printed dicts, the bar kept if enabled.
        self.remove_callback(PrinterCallback)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(QuietProgress)
        per_step = samples_per_step or self.args.train_batch_size * self.args.gradient_accumulation_steps
        self.add_callback(ConsoleLog(per_step))
        # The totals of the segments before this one (a resumed run), read from the checkpoint it resumes
        self.prior = {"loss_sum": 0.0, "train_time_s": 0.0, "step": 0}
        self.segment_start: float | None = None
        self.peft_lr, self.moe_lr, self.balance = peft_lr, moe_lr, dict(balance)
        self.metrics_path = metrics_path
        self.routing = RoutingAverage()  # over the micro-batches since the last log line
        self.balance_losses: list[float] = []
        self._routed_layers: list[tuple[nn.Module, int]] | None = None
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)
        self.step_start_rng = StepStartRNG()
        self.add_callback(self.step_start_rng)
        self.abandoned_step = False  # set while saving the state before a step that is not taken

    # --- optimisation -------------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = self.model if model is None else model
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if not is_moe_parameter(n)], "lr": self.peft_lr,
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if is_moe_parameter(n)], "lr": self.moe_lr, "weight_decay": 0.0},
            ]
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            kwargs.pop("lr", None)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **kwargs)
        return self.optimizer

    def balance_active(self) -> bool:
        """Whether this optimizer step adds the balance loss."""
        step, every = self.state.global_step, int(self.balance["every"])
        return every > 0 and step >= int(self.balance.get("warmup_steps", 0)) and step % every == 0

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        clear_routing_stats(self.model)
        with self.record_routing_calls() as calls:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        if not torch.isfinite(loss):
            self.stop_non_finite(f"the training loss is {loss.item()}")
        world = self.args.world_size if model.training and torch.distributed.is_initialized() else 1
        self.combine_routing_stats(calls, world)
        self.routing.add(self.model)
        if self.routing.totals and self.balance_active():
            balance = lime.balance_loss(self.model, self.balance["importance"], self.balance["kl"],
                                        self.balance["scale"])
            self.balance_losses.append(balance.detach())
            # DDP averages the gradients over the N processes, and each process's graph holds only its own share
            # of the global usage: N times the gradient, the same value (the logged loss averages the values).
            balance = balance + (world - 1) * (balance - balance.detach())
            token_normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            if token_normalised or self.compute_loss_func is not None:
                # One balance term per optimizer step, the mean over its micro-batches: the task loss is already
                # normalised by the step's tokens, so the Trainer does not divide the loss by the accumulation
                # steps (it does otherwise, the balance term included).
                balance = balance / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + balance
        return (loss, outputs) if return_outputs else loss

    def routed_layers(self) -> list[tuple[nn.Module, int]]:
        """The layers that record routing statistics, with their number of experts (the same on every process)."""
        if self._routed_layers is None:
            self._routed_layers = [(m, m.router.num_experts) for m in self.model.modules() if
                                   hasattr(m, "routing_stats") and hasattr(getattr(m, "router", None), "num_experts")]
        return self._routed_layers

    @contextlib.contextmanager
    def record_routing_calls(self) -> Iterator[dict[nn.Module, list[RoutingStats]]]:
        """The statistics of every call of every routed layer during the block: a layer keeps only those of its
        last call, and the vision tower runs once for the images and once for the videos of a batch."""
        calls: dict[nn.Module, list[RoutingStats]] = {}

        def record(module: nn.Module, args: Any, output: Any) -> None:
            stats = module.routing_stats
            if stats is not None and stats.tokens > 0 and not any(stats is seen for seen in calls.get(module, [])):
                calls.setdefault(module, []).append(stats)

        handles = [module.register_forward_hook(record) for module, _ in self.routed_layers()]
        try:
            yield calls
        finally:
            for handle in handles:
                handle.remove()

    def combine_routing_stats(self, calls: Mapping[nn.Module, list[RoutingStats]], world: int = 1) -> None:
        """Give every routed layer the statistics of all the tokens it routed in this micro-batch: over all its
        calls, and under DDP over all the processes' slices of the global micro-batch.

        The balance loss is not linear in the usage, so neither the last call's loss nor the mean of the
        processes' losses is that of the whole batch. Token-weighted sums (one all-reduce under DDP) give the
        usage, load, entropy and experts per token of one process with the same global batch. The usage stays
        differentiable in this process's tokens (n_local / n_global · ∂usage_local), so the gradients summed over
        the processes are those of the global usage. A layer that ran on other processes only (the vision tower
        when this slice has no image) gets constant statistics here.
        """
        layers = self.routed_layers()
        if not layers or world == 1 and all(len(calls.get(module, [])) <= 1 for module, _ in layers):
            return  # one call per layer in one process: the layers' own statistics are those of the batch
        rows, local_usage = [], []
        for module, experts in layers:
            row, usage = torch.zeros(2 * experts + 3, dtype=torch.float64, device=self.args.device), None
            for s in calls.get(module, []):
                n = float(s.tokens)
                row += torch.cat([s.usage.detach().double() * n, s.load.double() * n, s.entropy.double().reshape(1) * n,
                                  s.experts_per_token.double().reshape(1) * n,
                                  torch.ones(1, dtype=torch.float64, device=s.usage.device) * n]).to(row.device)
                usage = s.usage * n if usage is None else usage + s.usage * n
            rows.append(row)
            local_usage.append(usage)
        totals = torch.cat(rows)
        if world > 1:
            torch.distributed.all_reduce(totals)  # float64 sums: the same value on every process, to rounding
        start = 0
        for (module, experts), usage in zip(layers, local_usage, strict=True):
            row = totals[start : start + 2 * experts + 3]
            start += 2 * experts + 3
            tokens = float(row[-1])
            if tokens == 0:
                module.routing_stats = None
                continue
            mean = (row[:-1] / tokens).float()
            if usage is not None:  # the layer's device; differentiable in this process's tokens
                mean = mean.to(usage.device)
                mean_usage = mean[:experts].to(usage.dtype) + (usage - usage.detach()) / tokens
            else:
                mean_usage = mean[:experts]
            module.routing_stats = RoutingStats(mean_usage, mean[experts : 2 * experts], mean[-2], mean[-1],
                                                int(tokens))

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        for name, parameter in model.named_parameters():
            if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                self.stop_non_finite(f"the gradient of {name} is not finite")
        return loss

    def stop_non_finite(self, what: str) -> None:
        """Save the current state if it is still finite (no update has used the bad loss or gradient yet), then
        stop with a message naming the step and the newest good checkpoint."""
        if first_non_finite(self.model) is None:
            self.abandoned_step = True
            try:
                self._save_checkpoint(self.model, trial=None)
            finally:
                self.abandoned_step = False
        good = complete_checkpoints(self.args.output_dir)
        raise NonFiniteLoss(f"{what} at optimizer step {self.state.global_step + 1}; the newest good checkpoint is "
                            f"{good[-1] if good else 'none'}")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Console/wandb get the routing averages since the last log; metrics.jsonl also gets them per layer."""
        per_layer = {}
        if "loss" in logs:
            per_layer = self.routing.summary(per_layer=True)
            logs = {**logs, **{k: v for k, v in per_layer.items() if not k.startswith("routing/layers/")}}
            if self.balance_losses:
                logs["balance_loss"] = float(torch.stack(self.balance_losses).mean())
            self.routing, self.balance_losses = RoutingAverage(), []
        super().log(logs, start_time)
        if self.metrics_path is not None and self.is_world_process_zero():
            record = {"step": self.state.global_step, "epoch": self.state.epoch, **per_layer, **logs}
            if self.state.global_step >= self.state.max_steps and "train_runtime" in logs:
                record["final"] = True
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    # --- checkpoints: the adapter only, published atomically ----------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = Path(output_dir or self.args.output_dir)
        save_adapter(self.model, output_dir / "adapter")
        torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_adapter(model or self.model, Path(resume_from_checkpoint) / "adapter")
        self.prior = read_totals(resume_from_checkpoint)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.segment_start = time.perf_counter()
        return super().train(*args, **kwargs)

    def run_totals(self, segment_loss_sum: float) -> dict[str, float]:
        """The whole run's totals at this step: the resumed segments' (self.prior) plus this segment's."""
        return {"loss_sum": self.prior["loss_sum"] + segment_loss_sum, "step": self.state.global_step,
                "train_time_s": self.prior["train_time_s"] + time.perf_counter() - (self.segment_start or 0.0)}

    def segment_loss_sum(self) -> float:
        """The sum of this segment's per-step training losses so far (the Trainer's own accumulators)."""
        pending = getattr(self, "_tr_loss", None)
        return getattr(self, "_total_loss_scalar", 0.0) + (float(pending) if pending is not None else 0.0)

    def _get_output_dir(self, trial: Any) -> str:
        return os.path.join(self.args.output_dir, STAGING)  # checkpoints are written here, then renamed

    def _save_rng_state(self, output_dir: str) -> None:
        if not self.abandoned_step or self.step_start_rng.states is None:
            return super()._save_rng_state(output_dir)
        now = rng_states()
        set_rng_states(self.step_start_rng.states)
        try:
            super()._save_rng_state(output_dir)
        finally:
            set_rng_states(now)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Stage, then publish by a rename; a state with a non-finite parameter is never published (the newest
        published checkpoint stays the newest good one, and save_total_limit never rotates it out)."""
        name = f"checkpoint-{self.state.global_step}"
        bad = first_non_finite(self.model)
        if bad is not None:
            good = complete_checkpoints(self.args.output_dir)
            raise NonFiniteLoss(f"parameter {bad} is not finite at optimizer step {self.state.global_step}: not "
                                f"saved as {name}; the newest good checkpoint is {good[-1] if good else 'none'}")
        staged, final = Path(self.args.output_dir, STAGING, name), Path(self.args.output_dir, name)
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            (staged / TOTALS).write_text(json.dumps(self.run_totals(self.segment_loss_sum())) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)  # a crash before this line leaves only a staged, ignored copy
            keep = self.args.save_total_limit
            if keep:
                for old in complete_checkpoints(self.args.output_dir)[:-keep]:
                    shutil.rmtree(old)


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """Published checkpoints under `directory`, oldest first (staged, half-written ones are not listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / "adapter" / "adapter_model.safetensors").is_file()
            and (p / "trainer_state.json").is_file()]


def read_totals(checkpoint: str | Path) -> dict[str, float]:
    """A checkpoint's run totals; a checkpoint without them (written before they existed) counts from zero."""
    path = Path(checkpoint) / TOTALS
    if not path.is_file():
        return {"loss_sum": 0.0, "train_time_s": 0.0, "step": 0}
    return json.loads(path.read_text())


def optimizer_name(name: str) -> str:
    """The Trainer's optimizer name; 8-bit AdamW needs bitsandbytes with a backend for this device."""
    if name != "adamw_8bit":
        return name
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # an ImportError, or a library that fails to load its native backend
        raise RuntimeError(
            f"trainer.optimizer=adamw_8bit needs bitsandbytes, which does not load here ({error}); "
            "use trainer.optimizer=adamw_torch"
        ) from error
    return "adamw_bnb_8bit"


def training_arguments(cfg: TrainerSettings, run_dir: Path, seed: int) -> TrainingArguments:
    """The Trainer's arguments from the (checked) `trainer` settings."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm or 0.0,  # null: no clipping
        optim=optimizer_name(cfg.optimizer),
        bf16=cfg.precision == "bf16",
        fp16=cfg.precision == "fp16",
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "epoch",
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataloader_num_workers=cfg.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,
        report_to=["wandb"] if cfg.wandb.enabled else [],
        run_name=cfg.wandb.name,
        seed=seed,
        data_seed=seed,
        disable_tqdm=not cfg.progress_bar,
        # torchrun on CPU: gloo (NCCL needs GPUs); a single process initialises no process group at all. Without
        # use_cpu, accelerate creates the process group but sets up no DDP (DistributedType.NO): no gradient
        # all-reduce, no token count across processes, and each process trains its own copy.
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        use_cpu=distributed and not torch.cuda.is_available(),
        # A process whose slice has no image (or no video) leaves the vision tower's adapter out of its graph;
        # DDP must not wait for those gradients (it would hang).
        ddp_find_unused_parameters=True,
        # trainer.batch_size is the global micro-batch, split across processes: the same samples per optimizer
        # step, and so the same training, on 1 or N processes
        accelerator_config={"split_batches": True},
        deepspeed=cfg.deepspeed,  # a ZeRO config file (configs/distributed/zero2.json), launched by deepspeed
        fsdp=cfg.fsdp or "",  # e.g. "full_shard auto_wrap", launched by torchrun
    )


def resume_checkpoint(resume: bool | str, run_dir: Path) -> str | None:
    """`trainer.resume`: false, true (this run directory) or another run directory."""
    if resume in (None, False):
        return None
    directory = run_dir if resume is True else Path(str(resume))
    checkpoints = complete_checkpoints(directory / "checkpoints")
    if not checkpoints:
        if resume is True:
            return None  # nothing to resume yet: start fresh (first submission of a requeued job)
        raise FileNotFoundError(f"trainer.resume: no complete checkpoint under {directory / 'checkpoints'}")
    return str(checkpoints[-1])
