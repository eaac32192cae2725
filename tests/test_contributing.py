"""CONTRIBUTING.md's worked examples are the code the tests run: its Python blocks are tests/toy_methods.py
(registered in every session, run by tests/test_methods.py), and its experiment block composes into valid jobs."""

import re
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import lime
from lime.config import LiMEConfig
from lime.report.ablations import PANELS, panel_for_key
from tests.test_experiments import compose_config, meta_model, sweep_jobs

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "CONTRIBUTING.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE, flags=re.S)


def test_python_examples_are_the_tested_toys():
    toys = (ROOT / "tests" / "toy_methods.py").read_text()
    examples = blocks("python")
    assert len(examples) == 5
    for example in examples:
        assert example.rstrip("\n") in toys, example[:80]  # word for word, indentation included


@pytest.mark.slow
def test_experiment_example_composes_into_valid_jobs(tmp_path):
    (example,) = blocks("yaml")
    name = re.search(r"configs/experiment/(\w+)\.yaml", example)[1]
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    (configs / "experiment" / f"{name}.yaml").write_text(example)
    assert yaml.safe_load(example)["hydra"]["sweeper"]["params"]["peft.rank"] == "1,2,4,8"
    jobs = [job for job in sweep_jobs(name, configs=configs) if "seed=0" in job]
    assert len(jobs) == 4
    ranks = set()
    for job in jobs:
        cfg = OmegaConf.to_container(compose_config(job, configs=configs), resolve=True)
        config = LiMEConfig.from_groups(cfg["peft"], cfg["routing"])
        lime.validate(meta_model(cfg["model"]["name"]), config)
        assert (cfg["model"]["name"], cfg["trainer"]["name"]) == ("llava_ov_0.5b", "paper")
        ranks.add(config.rank)
    assert ranks == {1, 2, 4, 8}
    assert name not in PANELS and panel_for_key("peft.rank").keys == ("peft.rank",)  # the generic panel
