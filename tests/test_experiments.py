"""Every experiment composes, its sweep expands to the expected jobs, and the #params column is docs/method.md §5."""

import functools
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import lime
from lime import models
from lime.config import LiMEConfig
from lime.results import read_predictions
from lime.settings import settings
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))

JOBS = {
    "table2": 16 * 3, "efficiency": 10, "ablation_channels": 4 * 3, "ablation_router": 2 * 3,
    "ablation_gamma": 11 * 3, "ablation_ngram": 5 * 3, "ablation_topk": 7 * 3, "ablation_experts": 2 * 10 * 3,
    "ablation_balance": 5 * 3, "ablation_temperature": 5 * 3, "ablation_init": 5 * 3, "ablation_targets": 3 * 3,
    "ablation_shared": 2 * 3, "ablation_layers": 6 * 3,
}

SMALL_JOBS = {**JOBS, "ablation_layers": 2 * 3}  # the tiny model's 2 blocks: the last one, or both


def compose_config(overrides, hydra_config=False, configs=CONFIGS):
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)


def sweep_jobs(experiment, extra=(), configs=CONFIGS):
    """The override lists of every job of `python train.py -m experiment=<name>` (Hydra's own expansion)."""
    cfg = compose_config([f"experiment={experiment}"], hydra_config=True, configs=configs)
    params = cfg.hydra.sweeper.params or {}
    # BasicSweeper.sweep's order: the config's sweeper params, then the command line, which wins on a shared key.
    arguments = [*(f"{k}={v}" for k, v in params.items()), f"experiment={experiment}", *extra]
    parsed = OverridesParser.create().parse_overrides(arguments)
    return list(itertools.chain.from_iterable(BasicSweeper.split_arguments(parsed, None)))


def test_every_experiment_has_a_job_count():
    assert sorted(JOBS) == EXPERIMENTS


SMALL_SCALE = load_script("small_scale")


@functools.cache
def meta_model(model_name):
    cfg = OmegaConf.to_container(compose_config([f"model={model_name}"]), resolve=True)
    return models.build(cfg["model"], device="meta")[0]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("scale", ["paper", "small"])
@pytest.mark.slow
def test_every_job_of_every_sweep_composes_into_a_valid_config(experiment, scale):
    # Small scale: what scripts/small_scale.py gives train.py, less its seed and sweep dir.
    extra = [] if scale == "paper" else [*SMALL_SCALE.SMALL, *SMALL_SCALE.TINY_SWEEPS.get(experiment, [])]
    jobs = sweep_jobs(experiment, extra)
    assert len(jobs) == (SMALL_JOBS if scale == "small" else JOBS)[experiment]
    # Composing takes ~0.1 s a job: seeds change nothing else, so compose one seed (all seeds of table2 differ
    # only there). Each job's LiME config is checked against its model's architecture (built on meta).
    jobs = [job for job in jobs if "seed=0" in job or not any(o.startswith("seed=") for o in job)]
    configs = set()
    for job in jobs:
        cfg = OmegaConf.to_container(compose_config(job), resolve=True)
        lime.validate(meta_model(cfg["model"]["name"]), LiMEConfig.from_groups(cfg["peft"], cfg["routing"]))
        configs.add(json.dumps(cfg, sort_keys=True, default=str))
        if scale == "small":
            assert cfg["model"]["name"] == "tiny_llava_ov" and cfg["data"]["name"] == "mmt_mini"
            settings(cfg)  # every key known and in range (paper scale: its data is not on this machine)
    assert len(configs) == len(jobs)  # no two jobs of a sweep train the same thing


def test_small_scale_runs_every_job_of_every_sweep_once_in_its_own_run_directory():
    args = SMALL_SCALE.parse_args([])
    assert args.experiments == SMALL_SCALE.EXPERIMENTS and sorted(args.experiments) == EXPERIMENTS
    for experiment in EXPERIMENTS:
        jobs = SMALL_SCALE.jobs(experiment, args)
        # Hydra's own expansion of `train.py -m`, with the one seed efficiency's timing runs take
        hydra = [[o for o in job if not o.startswith("experiment=")]
                 for job in sweep_jobs(experiment, SMALL_SCALE.TINY_SWEEPS.get(experiment, []))]
        hydra = [job if any(o.startswith("seed=") for o in job) else [*job, "seed=0"] for job in hydra]
        assert [list(job.overrides) for job in jobs] == hydra and len(jobs) == SMALL_JOBS[experiment]
        assert len({job.run_dir(args.out) for job in jobs}) == len(jobs)
    job = SMALL_SCALE.jobs("ablation_targets", args)[0]
    runs = ROOT / "experiments" / "ablation_targets" / "small_scale" / "runs"
    assert job.run_dir(args.out) == runs / "seed0" / "peft.targets=[q_proj,v_proj]"
    command = job.command(args)
    assert command[2:3 + len(SMALL_SCALE.SMALL)] == ["experiment=ablation_targets", *SMALL_SCALE.SMALL]
    assert command[-1] == f"hydra.run.dir='{job.run_dir(args.out)}'" and "seed=0" in command
    with pytest.raises(SystemExit):
        SMALL_SCALE.parse_args(["ablation_nope"])


def test_small_scale_skips_completed_runs_and_restarts_interrupted_ones(tmp_path, monkeypatch):
    """Resumable across sessions: a completed run is never rerun; an interrupted one is cleared and rerun from
    the start; a completed run is compacted (no checkpoints, gzipped predictions)."""
    args = SMALL_SCALE.parse_args(["ablation_shared", "--out", str(tmp_path)])
    done, interrupted = SMALL_SCALE.jobs("ablation_shared", args)[:2]
    (done.run_dir(tmp_path) / ".hydra").mkdir(parents=True)
    (done.run_dir(tmp_path) / "run_info.json").write_text(json.dumps({"status": "completed"}))
    (done.run_dir(tmp_path) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(done.train_overrides(args)))
    (interrupted.run_dir(tmp_path) / "checkpoints").mkdir(parents=True)
    (interrupted.run_dir(tmp_path) / "run_info.json").write_text(json.dumps({"status": "running"}))
    started = []

    def fake_train(command, **kwargs):  # what train.py leaves in its run directory
        run_dir = Path(command[-1].split("=", 1)[1].strip("'"))
        started.append(run_dir)
        assert not (run_dir / "checkpoints").exists()  # the interrupted run's leftovers were cleared first
        (run_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
        (run_dir / "run_info.json").write_text(json.dumps({"status": "completed"}))
        (run_dir / "predictions").mkdir()
        (run_dir / "predictions" / "text_test_a.jsonl").write_text('{"id": "a[0]", "correct": true}\n')
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(command[2:-1]))
        return subprocess.CompletedProcess(command, 0)

    layer = "routing/layers/model.layers.0.q_proj/usage"
    metrics = [{"step": 10, "loss": 2.0, layer: [0.5, 0.5]}, {"step": 20, "loss": 1.0, layer: [0.75, 0.25]},
               {"step": 20, "train_loss": 1.5, "final": True}]

    monkeypatch.setattr(SMALL_SCALE.subprocess, "run", fake_train)
    assert SMALL_SCALE.run(done, args) and SMALL_SCALE.run(interrupted, args)
    assert started == [interrupted.run_dir(tmp_path)]
    run_dir = interrupted.run_dir(tmp_path)
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "metrics.jsonl", "predictions", "run_info.json"]
    assert read_predictions(run_dir / "predictions" / "text_test_a.jsonl.gz") == [{"id": "a[0]", "correct": True}]
    kept = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kept == [{"step": 10, "loss": 2.0}, *metrics[1:]]  # per-layer statistics of the last step only
    assert SMALL_SCALE.run(interrupted, args) and len(started) == 1
    # A completed run of other overrides (here: another number of epochs) is never taken for the job's.
    longer = SMALL_SCALE.parse_args(["ablation_shared", "--out", str(tmp_path), "--epochs", "3"])
    assert not SMALL_SCALE.run(interrupted, longer) and len(started) == 1


def test_experiment_pins_the_paper_setup():
    table2 = OmegaConf.to_container(compose_config(["experiment=table2"]), resolve=True)
    assert (table2["model"]["name"], table2["data"]["name"], table2["trainer"]["name"]) == (
        "llava_ov_7b", "mmt47", "paper")
    efficiency = OmegaConf.to_container(compose_config(["experiment=efficiency", "peft=lime_lora"]), resolve=True)
    assert efficiency["peft"]["language_model_only"] and efficiency["peft"]["targets"] == [
        "q_proj", "k_proj", "v_proj", "o_proj"]
    topk = OmegaConf.to_container(compose_config(["experiment=ablation_topk", "+selection=top5"]), resolve=True)
    assert (topk["routing"]["selection"], topk["routing"]["top_k"], topk["peft"]["num_experts"]) == ("topk", 5, 6)
    experts = compose_config(["experiment=ablation_experts", "peft=moe_lora", "peft.num_experts=1"])
    assert experts.routing.top_k == 1


SPEC_7B = {  # docs/method.md §5
    "lora": 1_740_800, "dora": 2_089_984, "lora_fa": 698_368, "prompt": 71_680, "moe_lora": 10_788_864,
    "moe_dora": 12_185_600, "hydralora": 5_920_768, "mixlora": 3_825_664, "lime_lora": 3_486_936,
    "lime_dora": 3_836_120, "lime_lora_fa": 2_444_504, "lime_slicefine": 2_444_504, "lime_prompt": 89_601,
}
SPEC_05B_LM = {
    "lime_lora": 516_192, "lime_dora": 565_344, "lime_lora_fa": 344_160, "moe_lora": 1_695_744,
    "moe_dora": 1_892_352, "hydralora": 909_312, "mixlora": 614_400, "lime_prompt": 22_401,
}


def count_params(*args):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "count_params.py"), *args], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_params_column_7b_is_spec_section_5():
    column = count_params("model=llava_ov_7b")
    counts = {row["method"]: row["trainable"] for row in column["methods"]}
    assert {k: counts[k] for k in SPEC_7B} == SPEC_7B
    assert all(row["base_total"] == 8_030_807_584 for row in column["methods"])


@pytest.mark.slow
def test_params_efficiency_setting_is_spec_section_5():
    counts = {m: count_params("experiment=efficiency", f"peft={m}")["trainable"] for m in ("lime_lora", "moe_dora")}
    assert counts == {m: SPEC_05B_LM[m] for m in counts}
    one = count_params("model=llava_ov_0.5b", "peft=lime_prompt")
    assert (one["trainable"], one["base_total"]) == (22_401, 893_675_552)


def test_paper_grids_of_the_balance_and_layer_sweeps():
    """Fig. 9: α = β at every point; Fig. 8b: 4 ... 24 wrapped blocks, 20 included (the paper's optimum 20-24)."""
    balance = [OmegaConf.to_container(compose_config(job), resolve=True)["trainer"]["balance"]
               for job in sweep_jobs("ablation_balance") if "seed=0" in job]
    assert [(b["importance"], b["kl"], b["scale"]) for b in balance] == [(c, c, 1.0) for c in
                                                                        (0.0, 0.001, 0.01, 0.1, 1.0)]
    layers = [OmegaConf.to_container(compose_config(job), resolve=True)["peft"]["layer_indices"]
              for job in sweep_jobs("ablation_layers") if "seed=0" in job]
    assert [24 if indices is None else len(indices) for indices in layers] == [4, 8, 12, 16, 20, 24]
    assert all(indices is None or indices[-1] == 23 for indices in layers)  # always the last blocks


COMMITTED = [e for e in EXPERIMENTS if SMALL_SCALE.completed_runs(e)]


@pytest.mark.parametrize("experiment", COMMITTED)
def test_committed_small_scale_tables_are_what_the_committed_runs_give(experiment, tmp_path, monkeypatch):
    """Every committed table (CSV and Markdown) is rebuilt byte for byte from the committed run directories: the
    reports are the runs' numbers, not edited ones. (`small_scale.py --check` reruns a run itself.)"""
    make_tables = load_script("make_tables")
    committed = ROOT / "experiments" / experiment / "small_scale"
    monkeypatch.chdir(ROOT)  # the tables name their runs relative to the working directory
    for script, *arguments in SMALL_SCALE.report_commands(experiment, committed / "runs", tmp_path):
        if script == "make_tables.py":
            make_tables.main(arguments)
    rebuilt = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".csv", ".md"))
    assert rebuilt and all((committed / name).read_text() == (tmp_path / name).read_text() for name in rebuilt)
