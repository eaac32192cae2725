"""Every experiment composes, its sweep expands to the expected jobs, and the #params column is docs/method.md §5."""

import functools
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import lime
from lime import models
from lime.config import LiMEConfig
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


def test_small_scale_runs_three_seeds_of_every_sweep_and_one_timing_run():
    args = SMALL_SCALE.parse_args([])
    assert args.experiments == SMALL_SCALE.EXPERIMENTS and sorted(args.experiments) == EXPERIMENTS
    units = {e: SMALL_SCALE.seeds(e, args) for e in args.experiments}
    assert units.pop("efficiency") == ["0"] and all(seeds == ["0", "1", "2"] for seeds in units.values())
    command = SMALL_SCALE.command("ablation_layers", "1", args)
    assert command[2:4] == ["-m", "experiment=ablation_layers"] and "seed=1" in command
    assert command[-1] == f"hydra.sweep.dir={args.runs / 'ablation_layers' / 'seed1'}"
    with pytest.raises(SystemExit):
        SMALL_SCALE.parse_args(["ablation_nope"])


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
