"""train.py end to end on the tiny model: a run directory, resume equality, DDP, bad configuration."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lime.config import ConfigError
from lime.run import peak_memory_bytes, reset_peak_memory, run
from lime.settings import settings

ROOT = Path(__file__).resolve().parent.parent
# A few samples per task, a random (not pretrained) backbone, a handful of steps: the machinery, not the scores.
SMALL = [
    "data.generate.train_per_task=4", "data.generate.test_per_task=2", "model.pretrain=null",
    "trainer.max_steps=4", "trainer.batch_size=4", "trainer.logging_steps=1", "trainer.eval_batch_size=8",
    "trainer.max_new_tokens=3", "trainer.progress_bar=false",
]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("config", overrides=list(overrides))


def train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *SMALL, f"hydra.run.dir={run_dir}", *overrides]


def test_end_to_end_run_directory(tmp_path):
    results = run(compose_config(*SMALL, "trainer.balance.every=2"), tmp_path)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["status"] == "completed" and info["trainable_params"] == 6032 and info["train_samples"] == 72
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(len(m["routing/usage"]) == 4 for m in steps)
    assert ["balance_loss" in m for m in steps] == [True, False, True, False]  # steps 0 and 2 of 0..3
    assert metrics[-1]["final"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert len(results["tasks"]) == 18 and all(t["samples"] == 2 for t in results["tasks"].values())
    assert "lenient" in results["other_scorers"]
    assert len(list((tmp_path / "predictions").glob("*.jsonl"))) == 18
    assert 0 < info["train_peak_memory_bytes"] <= info["peak_memory_bytes"]

    # mode=eval reloads the adapter and reproduces the predictions
    again = run(compose_config(*SMALL, "mode=eval", f"checkpoint={tmp_path}"), tmp_path / "eval")
    assert again["tasks"] == results["tasks"]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_same_adapter(tmp_path):
    overrides = ["trainer.max_steps=8", "trainer.save_steps=2", "trainer.save_total_limit=null",
                 "trainer.evaluate=false"]
    reference = tmp_path / "reference"
    subprocess.run(train_command(reference, *overrides), check=True, capture_output=True, cwd=ROOT)

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed, *overrides), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "checkpoint-2"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    published = sorted(p.name for p in (killed / "checkpoints").glob("checkpoint-*"))
    assert published and "checkpoint-8" not in published, published
    assert json.loads((killed / "run_info.json").read_text())["status"] == "running"  # killed, not finished

    subprocess.run(train_command(killed, *overrides, "trainer.resume=true"), check=True, capture_output=True,
                   cwd=ROOT)
    want = load_file(reference / "adapter" / "adapter_model.safetensors")
    got = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo")
@pytest.mark.slow
def test_ddp_on_two_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    """torchrun with 2 CPU processes (gloo) trains as one process does with the same global batch.

    `trainer.batch_size` is the global micro-batch (split_batches): 4 samples per step, 2 on each process. With
    no jitter and no dropout the runs differ only by float rounding (per-process padding and summation order):
    the same loss per step, routing statistics (of the global batch, balance loss included) and adapter.
    """
    common = ["routing.jitter=0", "trainer.max_steps=3", "trainer.max_new_tokens=1",
              "data.generate.test_per_task=1"]
    single = tmp_path / "single"
    subprocess.run(train_command(single, *common), check=True, capture_output=True, cwd=ROOT)
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # free port
    subprocess.run([*torchrun, *train_command(ddp, *common)[1:]], check=True, capture_output=True, cwd=ROOT,
                   env=env)

    def steps(run_dir):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [m for m in lines if "loss" in m]

    want, got = steps(single), steps(ddp)
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3]
    for key in ("loss", "grad_norm", "balance_loss", "routing/importance_loss", "routing/entropy"):
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-4, abs=1e-4), key
    assert json.loads((ddp / "run_info.json").read_text())["status"] == "completed"
    want_adapter = load_file(single / "adapter" / "adapter_model.safetensors")
    got_adapter = load_file(ddp / "adapter" / "adapter_model.safetensors")
    assert want_adapter.keys() == got_adapter.keys()
    for key in want_adapter:
        torch.testing.assert_close(got_adapter[key], want_adapter[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize(
    "override, message",
    [
        ("peft.num_experts=0", "peft.num_experts"),
        ("routing.threshold=1.5", "routing.threshold"),
        ("routing.n_gram=0", "routing.n_gram"),
        ("routing.temperature=0", "routing.temperature"),
        ("peft.rank=0", "peft.rank"),
        ("peft.peft_lr=-1", "peft.peft_lr"),
        ("peft.targets=[nothing_here]", "peft.targets: 'nothing_here' matches no nn.Linear"),
        ("data.path=/no/such/dataset", "data.path: /no/such/dataset does not exist"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("mode=eval", "checkpoint: mode=eval needs"),
    ],
)
def test_bad_configuration_is_refused_before_any_model_is_loaded(tmp_path, monkeypatch, override, message):
    from lime import models

    loaded = []
    monkeypatch.setattr(models, "_load_pretrained", lambda cfg: loaded.append(cfg))
    monkeypatch.setattr(models, "_build_tiny", lambda cfg: loaded.append(cfg))
    with pytest.raises(ConfigError, match=message):
        run(compose_config(*SMALL, override), tmp_path)
    assert loaded == []
    assert json.loads((tmp_path / "run_info.json").read_text())["status"] == "failed"


def test_resolved_config_shows_every_spec_value():
    cfg = OmegaConf.to_container(compose_config("trainer=paper", "peft=lime_dora"), resolve=True)
    assert cfg["routing"] | {} == {**cfg["routing"], "gamma_routing": 0.7, "temperature": 0.5, "jitter": 0.1,
                                   "threshold": 0.5, "n_gram": 1, "selection": "auto"}
    assert cfg["peft"]["num_experts"] == 4 and cfg["peft"]["rank"] == 2 and cfg["peft"]["peft_lr"] == 2e-4
    trainer = cfg["trainer"]
    assert (trainer["epochs"], trainer["batch_size"], trainer["grad_accum"]) == (4, 5, 4)
    assert trainer["optimizer"] == "adamw_8bit" and trainer["precision"] == "bf16"
    assert trainer["balance"] == {"every": 50, "warmup_steps": 0, "scale": 0.01, "importance": 0.1, "kl": 0.01}


@pytest.mark.slow
def test_sigterm_checkpoints_stops_cleanly_and_resumes(tmp_path):
    overrides = ["trainer.max_steps=400", "trainer.evaluate=false"]
    process = subprocess.Popen(train_command(tmp_path, *overrides), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 128 + signal.SIGTERM
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["status"] == "interrupted" and "trainer.resume" in info["error"]
    from lime.training import complete_checkpoints

    (checkpoint,) = complete_checkpoints(tmp_path / "checkpoints")
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 2 <= stopped_at < 400

    subprocess.run(train_command(tmp_path, *overrides, "trainer.max_steps=" + str(stopped_at + 2),
                                 "trainer.resume=true"), check=True, capture_output=True, cwd=ROOT)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-1] == stopped_at + 2 and json.loads((tmp_path / "run_info.json").read_text())["status"] == "completed"


def test_non_finite_loss_stops_with_the_step_after_saving_the_last_good_state(tmp_path):
    import lime
    from lime.training import LiMETrainer, NonFiniteLoss, complete_checkpoints, training_arguments
    from tests.tiny import tiny_causal_lm

    model = lime.apply_lime(tiny_causal_lm(), lime.LiMEConfig())
    calls = []

    def poison(module, args, output):  # the 3rd forward produces NaN logits
        calls.append(1)
        return output * float("nan") if len(calls) == 3 else output

    model.lm_head.register_forward_hook(poison)
    trainer_settings = settings(compose_config(*SMALL, "trainer.max_steps=5", "trainer.batch_size=2",
                                               "trainer.save_steps=100")).trainer
    args = training_arguments(trainer_settings, tmp_path, seed=0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (10, 8))]
    trainer = LiMETrainer(model=model, args=args, train_dataset=data, peft_lr=1e-3, moe_lr=1e-3,
                          balance={"every": 1, "scale": 0.01, "importance": 0.1, "kl": 0.01})
    with pytest.raises(NonFiniteLoss, match=r"training loss is nan at optimizer step 3; the newest good checkpoint .*"
                                            r"checkpoint-2"):
        trainer.train()
    (good,) = complete_checkpoints(tmp_path / "checkpoints")
    saved = load_file(good / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert torch.equal(saved["model.layers.0.self_attn.q_proj.adapter.lora_B"],
                       model.get_submodule("model.layers.0.self_attn.q_proj").adapter.lora_B.detach())


@pytest.mark.slow
def test_wandb_logs_offline_into_the_run_directory(tmp_path):
    run(compose_config(*SMALL, "trainer.max_steps=2", "trainer.evaluate=false", "trainer.wandb.enabled=true"),
        tmp_path)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["status"] == "completed" and info["wandb_mode"] == "offline"
    assert info["wandb_run"].startswith(str(tmp_path / "wandb")) and Path(info["wandb_run"]).is_dir()


def test_anchor_last_with_generation_is_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="routing.anchor: 'last'"):
        run(compose_config(*SMALL, "routing=reference", "routing.n_gram=2"), tmp_path)


def test_unknown_group_value_lists_the_valid_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"(?s)peft/lime_lorra.*lime_lora"):
        compose_config("peft=lime_lorra")


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    import lime
    from tests.tiny import perturb_trainable, tiny_causal_lm

    grads = []
    for checkpointing in (False, True):
        model = lime.apply_lime(tiny_causal_lm(), lime.LiMEConfig(routing=dict(jitter=0.0, n_gram=2)))
        perturb_trainable(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids).loss + lime.balance_loss(model, 0.1, 0.01, 0.01)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.slow
def test_a_corrupt_training_image_is_named_or_skipped_and_counted(tmp_path, on_error):
    from lime.data import mmt_mini
    from lime.data.dataset import DataError

    overrides = [*SMALL, f"data.cache_dir={tmp_path / 'data'}", f"data.on_error={on_error}", "trainer.evaluate=false",
                 "trainer.max_steps=36"]  # 36 steps of 4: two epochs, every one of the 72 training samples drawn twice
    cfg = compose_config(*overrides)
    root = mmt_mini.ensure(OmegaConf.to_container(cfg.data, resolve=True))
    image = sorted((root / "media" / "images").rglob("train_*.png"))[3]
    image.write_bytes(image.read_bytes()[:40])  # truncated PNG, in the middle of the training data
    if on_error == "raise":
        with pytest.raises(DataError, match=rf"train\[\d+\].*{image.name}"):
            run(cfg, tmp_path / "run")
        return
    run(cfg, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["status"] == "completed" and info["skipped_train_samples"] == 1  # drawn twice, counted once


def test_peak_memory_is_each_runs_own():
    """A Hydra multirun is one process: each run's peak must not carry the peaks of the runs before it."""
    assert reset_peak_memory() == "run"  # Linux (CI): /proc/self/clear_refs resets the high-water mark
    big = torch.ones(100 * 2**20)  # 400 MiB, written: resident
    first = peak_memory_bytes()
    del big
    assert reset_peak_memory() == "run"
    assert first - peak_memory_bytes() > 300 * 2**20


def test_global_norm_with_generation_is_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="routing.norm: 'global'"):
        run(compose_config(*SMALL, "routing.norm=global"), tmp_path)
