"""The fault matrix: each bad value, bad file, signal or collision is refused with a message naming it, or
survived with nothing lost (tiny model, a few steps)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import lime
from lime import evaluation, models
from lime.checkpoint import AdapterError, read_adapter_config
from lime.config import ConfigError
from lime.data import dataset as data
from lime.data import mmt_mini
from lime.data.dataset import DataError, SampleId, Skip, SkipLog
from lime.data.media import MediaError, load_video
from lime.data.mmt47 import SchemaError
from lime.run import RunDirectoryBusy, RunLock, run
from lime.settings import EvalSettings, TrainerSettings, settings
from lime.training import LiMETrainer, NonFiniteLoss, complete_checkpoints, training_arguments
from tests.test_train import ROOT, SMALL, compose_config, train_command
from tests.tiny import tiny_causal_lm

# --- 1. every bad value refused when the config is composed, before any model or data loads ------------------

BAD_VALUES = [
    ("trainer.max_steps=abc", "trainer.max_steps: 'abc' is not an integer"),
    ("trainer.warmup_ratio=1", r"trainer.warmup_ratio: 1.0 must be a fraction .* \[0, 1\)"),
    ("trainer.max_grad_norm=-1", "trainer.max_grad_norm: -1.0 must be > 0"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay: -0.1 must be >= 0"),
    ("trainer.balance.scale=-1", "trainer.balance.scale: -1.0 must be >= 0"),
    ("routing.n_gram=600", "routing.n_gram: 600 is larger than data.max_length=512"),
    ("trainer.max_new_tokens=0", "trainer.max_new_tokens: 0 must be > 0"),
    ("trainer.resume=/nope", "trainer.resume: /nope does not exist"),
    ("data.categories=[Nope]", "data.categories: 'Nope' is not a category of mmt_mini"),
    ("data.tasks=[nope]", "data.tasks: 'nope' is not a task of mmt_mini"),
    ("data.on_error=ignore", "data.on_error: 'ignore' is not one of raise, skip"),
    ("model.dtype=float8", "model.dtype: 'float8' is not one of"),
    ("trainer.lr_scheduler=bogus", "trainer.lr_scheduler: 'bogus' is not one of linear"),
    ("trainer.logging_steps=0", "trainer.logging_steps: 0 must be > 0"),
    ("seed=-1", r"seed: -1 must be in \[0, 2\^32\)"),
    ("data.num_frames=0", "data.num_frames: 0 must be > 0"),  # a config error, not a bad video
    ("trainer.epochs=0", "trainer.epochs: 0.0 must be > 0"),  # zero training steps never count as a run
    ("trainer.max_steps=-5", "trainer.max_steps: -5 must be a positive number"),
    ("trainer.max_steps=0", "trainer.max_steps: 0 must be a positive number"),
    ("data.max_train_samples=0", "data.max_train_samples: 0 must be > 0"),
    ("trainer.batch_size=2.5", "trainer.batch_size: 2.5 is not an integer"),
    ("trainer.progress_bar=maybe", "trainer.progress_bar: 'maybe' is not true or false"),
    ("+trainer.max_step=3", "trainer: unknown key.*max_step; known keys: .*max_steps"),
    ("+model.dtpye=float32", "model: unknown key.*dtpye"),
    ("+data.balance=1", "data: unknown key.*balance"),
    ("+lr=1", "config: unknown top-level key.*lr"),
    ("checkpoint=/nope", None),  # mode=train ignores checkpoint
    ("mode=eval", "checkpoint: mode=eval needs"),
    ("trainer.scorer=loose", "trainer.scorer: 'loose' is not one of strict, lenient"),
]
if not torch.cuda.is_available():
    BAD_VALUES += [("trainer.device=cuda", "trainer.device: 'cuda' but no CUDA GPU is visible"),
                   ("trainer.precision=fp16", "trainer.precision: fp16 mixed precision needs a CUDA GPU"),
                   ("model.quantization=8bit", "model.quantization: 8bit .* needs a CUDA GPU")]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Records any model build or data load (there must be none)."""
    loaded = []
    monkeypatch.setattr(models, "build", lambda *a, **k: loaded.append("model"))
    monkeypatch.setattr(data, "build", lambda *a, **k: loaded.append("data"))
    return loaded


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[v[0] for v in BAD_VALUES])
def test_a_bad_value_is_refused_at_composition_naming_the_key(override, message):
    cfg = compose_config(*SMALL, override)
    if message is None:
        settings(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        settings(cfg)


@pytest.mark.parametrize("override, message", [BAD_VALUES[0], BAD_VALUES[5], BAD_VALUES[7]])
def test_a_run_with_a_bad_value_fails_before_loading_anything(tmp_path, nothing_loads, override, message):
    with pytest.raises(ConfigError, match=message):
        run(compose_config(*SMALL, override), tmp_path)
    assert nothing_loads == []
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["status"] == "failed" and info["error"].startswith("ConfigError: " + override.split("=")[0])


def test_a_subset_may_be_named_on_the_command_line_as_one_string():
    assert settings(compose_config("data.categories=GLUE")).data.categories == ["GLUE"]
    assert settings(compose_config("data.tasks='sentiment,digit'")).data.tasks == ["sentiment", "digit"]
    with pytest.raises(ConfigError, match="data.tasks: 'nope' is not a task"):
        settings(compose_config("data.tasks='sentiment,nope'"))


def test_the_pretraining_split_must_differ_from_the_benchmark():
    with pytest.raises(ConfigError, match="model.pretrain.data_seed: 1000 must differ from data.generate.seed"):
        settings(compose_config("data.generate.seed=1000"))


def test_the_shipped_trainer_defaults_are_the_settings_defaults():
    """Defaults in one place: configs/trainer/smoke.yaml states exactly the dataclass defaults."""
    smoke = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "trainer" / "smoke.yaml"))
    checked = settings(compose_config())
    assert checked.trainer == TrainerSettings() and checked.eval == EvalSettings()
    assert set(smoke) == set(TrainerSettings.__dataclass_fields__) | set(EvalSettings.__dataclass_fields__)


@pytest.mark.parametrize("name, want", [("llava_ov", "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
                                        ("qwen2_vl", "Qwen/Qwen2-VL-7B-Instruct"), ("tiny", None)])
def test_short_model_names_compose(name, want):
    model = settings(compose_config(f"model={name}")).model
    assert model.name_or_path == want and (want is not None or model.name == "tiny_llava_ov")


def test_missing_weights_are_named_with_their_size_and_the_fix_before_anything_loads(tmp_path, monkeypatch,
                                                                                     nothing_loads):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model.name_or_path: the weights of llava-hf/llava-onevision-qwen2-7b-ov-hf"
                                          r" \(~16 GB in bfloat16 .*\) .* model.name_or_path=<dir>"):
        run(compose_config("model=llava_ov"), tmp_path / "run")
    assert nothing_loads == []
    with pytest.raises(ConfigError, match="model.name_or_path: /no/such/weights does not exist"):
        run(compose_config("model=llava_ov", "model.name_or_path=/no/such/weights"), tmp_path / "run2")


# --- 2. bad files: errors that name split, index and path ---------------------------------------------------

@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The SMALL mmt_mini (64 train, 32 test samples): (dataset dict, media root)."""
    cfg = OmegaConf.to_container(compose_config(*SMALL, f"data.cache_dir={tmp_path_factory.mktemp('data')}").data,
                                 resolve=True)
    root = mmt_mini.ensure(cfg)
    return datasets.load_from_disk(str(root / mmt_mini.DATASET_DIR)), root / mmt_mini.MEDIA_DIR


def saved_copy(tmp_path, mini, **splits) -> list[str]:
    """Overrides that point data at a copy of the SMALL mmt_mini with some splits replaced."""
    dataset, media = mini
    copy = datasets.DatasetDict({**dataset, **splits})
    copy.save_to_disk(str(tmp_path / "copy"))
    return [f"data.path={tmp_path / 'copy'}", f"data.media_root={media}"]


def with_question(rows: datasets.Dataset, position: int, question) -> datasets.Dataset:
    """`rows` with the question at `position` replaced (a str, or bytes that are not UTF-8)."""
    table = rows.data.table
    questions = table.column("question").to_pylist()
    if isinstance(question, bytes):
        column = pa.array([q.encode() for q in questions[:position]] + [question]
                          + [q.encode() for q in questions[position + 1:]], pa.binary()).cast(pa.string(), safe=False)
    else:
        column = pa.array(questions[:position] + [question] + questions[position + 1:], pa.string())
    index = table.column_names.index("question")
    return datasets.Dataset(datasets.table.InMemoryTable(table.set_column(index, "question", column)))


def test_non_utf8_text_is_an_error_naming_split_and_index(tmp_path, mini):
    split = "glue_test_sentiment"
    overrides = saved_copy(tmp_path, mini, **{split: with_question(mini[0][split], 1, b"\xff\xfe not text")})
    with pytest.raises(DataError, match=rf"{split}\[1\]: a text field is not valid UTF-8"):
        built = data.build(settings(compose_config(*SMALL, *overrides)).data)
        built[split].questions()


@pytest.mark.parametrize("split", ["train", "glue_test_sentiment"])
def test_an_empty_saved_split_is_named_before_the_model_is_built(tmp_path, mini, monkeypatch, split):
    overrides = saved_copy(tmp_path, mini, **{split: mini[0][split].select([])})
    built = []
    monkeypatch.setattr(models, "build", lambda *a, **k: built.append(1))
    with pytest.raises(SchemaError, match=f"split .{split}. is empty"):
        run(compose_config(*SMALL, *overrides), tmp_path / "run")
    assert built == []


def test_a_train_split_emptied_by_the_subset_is_refused(tmp_path, mini, monkeypatch):
    train = mini[0]["train"]
    overrides = saved_copy(tmp_path, mini, train=train.filter(lambda row: row["task"] != "sentiment"))
    with pytest.raises(ConfigError, match="data: the train split is empty"):
        run(compose_config(*SMALL, *overrides, "data.tasks=[sentiment]"), tmp_path / "run")


def test_an_existing_row_index_column_is_not_trusted(tmp_path, mini):
    split = "glue_test_sentiment"
    rows = mini[0][split]
    overrides = saved_copy(tmp_path, mini, **{split: rows.add_column("row_index", [7] * len(rows))})
    built = data.build(settings(compose_config(*SMALL, *overrides)).data)
    assert [built[split][i].id for i in range(len(rows))] == [SampleId(split, i) for i in range(len(rows))]


def test_a_png_is_not_a_video(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "still.png")
    with pytest.raises(MediaError, match=r"a still image \(png_pipe\), not a video.*still.png"):
        load_video(tmp_path / "still.png", 4)


def test_an_adapter_config_that_is_a_json_list_is_named(tmp_path):
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="adapter_config.json: holds a JSON list, not an object"):
        read_adapter_config(tmp_path)


def test_a_missing_checkpoint_folder_is_reported_as_missing(tmp_path):
    with pytest.raises(AdapterError, match="no such directory"):
        read_adapter_config(tmp_path / "nope")
    with pytest.raises(ConfigError, match=f"checkpoint: {tmp_path / 'nope'} does not exist"):
        settings(compose_config("mode=eval", f"checkpoint={tmp_path / 'nope'}"))


def test_a_skipped_sample_is_counted_once_whatever_the_epochs():
    log, skip = SkipLog(), Skip(SampleId("train", 3), "corrupt_image", "truncated")
    for _ in range(3):  # three epochs draw it three times
        log.add(skip)
    log.add(Skip(SampleId("train", 4), "corrupt_image", "truncated"))
    assert len(log) == 2 and log.counts() == {"corrupt_image": 2}


# --- 3. evaluation bounded like training ---------------------------------------------------------------------

LONG_QUESTION = "why " * 25_000  # 100,000 characters


def test_a_huge_test_question_is_refused_before_training(tmp_path, mini):
    split = "glue_test_sentiment"
    overrides = saved_copy(tmp_path, mini, **{split: with_question(mini[0][split], 0, LONG_QUESTION)})
    with pytest.raises(DataError, match=rf"{split}\[0\].*the question alone is \d+ tokens > data.max_length=512"):
        run(compose_config(*SMALL, *overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no training step was taken


def test_a_huge_test_question_is_skipped_and_listed_in_the_results(tmp_path, mini):
    split = "glue_test_sentiment"
    overrides = saved_copy(tmp_path, mini, **{split: with_question(mini[0][split], 0, LONG_QUESTION)})
    results = run(compose_config(*SMALL, *overrides, "data.truncation=skip", "trainer.max_steps=1",
                                 "data.categories=[GLUE]"), tmp_path / "run")
    (skipped,) = results["skipped_samples"]
    assert skipped["id"] == f"{split}[0]" and skipped["kind"] == "too_long"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["skipped_samples"] == [skipped]
    task = split.removeprefix("glue_test_")
    assert results["tasks"][task]["samples"] == 1  # of 2


# --- 4. run directories: one run at a time, no leftovers, a status that is always true -----------------------

def test_a_live_owner_refuses_a_second_run_and_keeps_its_records(tmp_path, nothing_loads):
    (tmp_path / "run_info.json").write_text('{"status": "running", "seed": 0}')
    # this process is the live owner
    with RunLock(tmp_path), pytest.raises(RunDirectoryBusy, match=rf"in use by pid {os.getpid()} on "):
        run(compose_config(*SMALL, "seed=1"), tmp_path)
    assert json.loads((tmp_path / "run_info.json").read_text()) == {"status": "running", "seed": 0}
    assert not (tmp_path / ".lock").exists()


def test_a_stale_lock_is_taken_over_and_said_so(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"pid {dead.pid}" in caplog.text and "stale lock" in caplog.text


def test_default_run_directories_cannot_collide():
    cfg = compose_config_with_hydra()
    first, second = cfg.hydra.run.dir, compose_config_with_hydra().hydra.run.dir
    assert re.fullmatch(rf"outputs/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{{6}}-{os.getpid()}", first)
    assert first != second


def compose_config_with_hydra():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", return_hydra_config=True)
    OmegaConf.resolve(cfg.hydra.run)
    return cfg


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    leftovers = [tmp_path / "run_info.tmp", tmp_path / ".adapter.tmp-abc" / "x", tmp_path / "checkpoints" /
                 ".staging" / "checkpoint-2" / "x"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    run(compose_config(*SMALL, "trainer.max_steps=1", "trainer.evaluate=false"), tmp_path)
    assert not any(p.exists() for p in [tmp_path / "run_info.tmp", tmp_path / ".adapter.tmp-abc",
                                        tmp_path / "checkpoints" / ".staging"])
    assert json.loads((tmp_path / "run_info.json").read_text())["status"] == "completed"


def test_a_full_disk_leaves_no_empty_run_info_tmp(tmp_path, monkeypatch):
    from lime.run import RunRecord

    record = RunRecord(tmp_path, OmegaConf.to_container(compose_config(*SMALL), resolve=True), None)
    real_write = Path.write_text

    def full(path, text, *args, **kwargs):
        if path.name == "run_info.tmp":
            real_write(path, "")  # the file is created, then the disk is full
            raise OSError(28, "No space left on device")
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space left"):
        record.update(status="completed")
    assert not (tmp_path / "run_info.tmp").exists()
    assert json.loads((tmp_path / "run_info.json").read_text())["status"] == "running"  # the last good record


@pytest.mark.parametrize("phase, target", [("start-up", "lime.data.dataset.build"),
                                           ("evaluation", "lime.evaluation.evaluate")])
def test_a_signal_in_any_phase_leaves_status_interrupted(tmp_path, monkeypatch, phase, target):
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(target, killed)
    with pytest.raises(SystemExit) as exit_info:
        run(compose_config(*SMALL, "trainer.max_steps=1"), tmp_path)
    assert exit_info.value.code == 128 + signal.SIGTERM
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["status"] == "interrupted" and info["error"] == f"Interrupted: stopped by SIGTERM during {phase}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are the caller's again


def test_an_error_in_evaluation_leaves_status_failed_with_the_reason(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(evaluation, "evaluate", broken)
    with pytest.raises(RuntimeError):
        run(compose_config(*SMALL, "trainer.max_steps=1"), tmp_path)
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["status"] == "failed" and info["error"] == "RuntimeError: disk full (simulated)"


@pytest.mark.slow
def test_two_train_py_into_one_directory(tmp_path):
    """The second run is refused naming the first; the first's records stay its own (seed 0, not 1)."""
    first = subprocess.Popen(train_command(tmp_path, "trainer.max_steps=400", "trainer.evaluate=false"), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.time() + 120
        while not (tmp_path / "run_info.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(train_command(tmp_path, "seed=1"), cwd=ROOT, capture_output=True, text=True)
        assert second.returncode == 1
        assert f"is in use by pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert OmegaConf.load(tmp_path / ".hydra" / "config.yaml").seed == 0
        assert json.loads((tmp_path / "run_info.json").read_text())["seed"] == 0
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
    assert json.loads((tmp_path / "run_info.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_a_user_error_is_one_message_without_a_traceback(tmp_path):
    env = {**os.environ, "LIME_DEBUG": "0"}
    result = subprocess.run(train_command(tmp_path, "trainer.max_steps=abc"), cwd=ROOT, capture_output=True,
                            text=True, env=env)
    assert result.returncode == 1
    assert "error: trainer.max_steps: 'abc' is not an integer" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, env, want", [("debug=true", "0", True), ("debug=false", "1", True),
                                             ("debug=false", "0", False), ("debug=false", "", False)])
def test_tracebacks_only_with_the_debug_flag(monkeypatch, flag, env, want):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.setenv("LIME_DEBUG", env)
    assert train.debugging(compose_config(flag)) is want


# --- 5. checkpoints: only finite states are published --------------------------------------------------------

def tiny_trainer(tmp_path, *overrides, callbacks=()):
    model = lime.apply_lime(tiny_causal_lm(), lime.LiMEConfig())
    trainer_settings = settings(compose_config(*SMALL, "trainer.batch_size=2", *overrides)).trainer
    args = training_arguments(trainer_settings, tmp_path, seed=0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (20, 8),
                                                                        generator=torch.Generator().manual_seed(0))]
    trainer = LiMETrainer(model=model, args=args, train_dataset=rows, peft_lr=1e-3, moe_lr=1e-3,
                          balance={"every": 1, "scale": 0.01, "importance": 0.1, "kl": 0.01},
                          callbacks=list(callbacks))
    return model, trainer


class PoisonAt(lime.training.TrainerCallback):
    """Writes a NaN into a trainable parameter at the end of optimizer step `step` (before that step's save)."""

    def __init__(self, model, step):
        self.model, self.step = model, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in self.model.parameters() if p.requires_grad).view(-1)[0] = float("nan")


def test_a_non_finite_state_at_a_save_step_is_never_published(tmp_path):
    model, trainer = tiny_trainer(tmp_path, "trainer.max_steps=6", "trainer.save_steps=2",
                                  "trainer.save_total_limit=1")
    trainer.add_callback(PoisonAt(model, 4))
    with pytest.raises(NonFiniteLoss, match=r"parameter .* is not finite at optimizer step 4: not saved as "
                                            r"checkpoint-4; the newest good checkpoint is .*checkpoint-2"):
        trainer.train()
    (good,) = complete_checkpoints(tmp_path / "checkpoints")  # save_total_limit=1 kept the last good one
    assert good.name == "checkpoint-2"
    assert not (tmp_path / "checkpoints" / "checkpoint-4").exists()


class RNGAtStepBegin(lime.training.TrainerCallback):
    def __init__(self):
        self.states = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self.states[state.global_step] = torch.random.get_rng_state().clone()


def test_a_nan_stop_saves_the_rng_state_of_the_start_of_the_abandoned_step(tmp_path):
    recorder = RNGAtStepBegin()
    model, trainer = tiny_trainer(tmp_path, "trainer.max_steps=5", "trainer.save_steps=100", callbacks=[recorder])
    calls = []

    def poison(module, args, output):  # the 3rd forward (optimizer step 3) produces NaN logits, after the jitter
        calls.append(1)
        return output * float("nan") if len(calls) == 3 else output

    model.lm_head.register_forward_hook(poison)
    with pytest.raises(NonFiniteLoss, match="optimizer step 3"):
        trainer.train()
    (saved,) = complete_checkpoints(tmp_path / "checkpoints")
    rng = torch.load(saved / "rng_state.pth", weights_only=False)
    assert torch.equal(rng["cpu"], recorder.states[2])  # the state step 3 started from, not one mid-step
    assert not torch.equal(torch.random.get_rng_state(), recorder.states[2])
    assert isinstance(rng["numpy"], tuple) and np.asarray(rng["numpy"][1]).size > 0
