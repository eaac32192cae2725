"""Capacity sanity checks of the small-scale benchmark itself (docs/mmt_mini.md), at small size: on a backbone
pretrained on the captions + text mixture, training an adapter beats the backbone alone, and a higher-rank LoRA
beats rank 1, both beyond the paired-bootstrap 95% interval over the test samples (lime/report/stats.py).

A benchmark on which these fail cannot rank methods. Small size: two tasks that share their images (shape,
object_color: the same scenes, two questions), a short pretraining, a short training."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lime import pretrain
from lime.report.runs import Run, load_run
from lime.report.stats import paired_bootstrap, pooled_correctness
from lime.run import run

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["shape", "object_color"]
CATEGORY_OF = {"shape": "Image Classification", "object_color": "Image Classification"}


def config(tmp_path: Path, rank: int):
    overrides = [
        "peft=lora", f"peft.rank={rank}", f"data.tasks=[{','.join(TASKS)}]",
        "data.generate.train_per_task=40", "data.generate.test_per_task=200", f"data.cache_dir={tmp_path / 'data'}",
        "model.pretrain.steps=200", "model.pretrain.samples=512", f"model.pretrain.cache_dir={tmp_path / 'bb'}",
        "trainer.max_steps=150", "trainer.batch_size=4", "trainer.max_new_tokens=4", "trainer.progress_bar=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)


def interval(better: Run, worse: Run) -> tuple[float, float, float]:
    delta, low, high, _, tasks = paired_bootstrap(pooled_correctness([better]), pooled_correctness([worse]),
                                                  CATEGORY_OF, resamples=1000)
    assert tasks == len(TASKS)
    return delta, low, high


@pytest.mark.slow
def test_training_beats_the_backbone_and_rank_8_beats_rank_1(tmp_path):
    runs = {}
    for rank in (1, 8):
        cfg = config(tmp_path, rank)
        run(cfg, tmp_path / f"rank{rank}")
        runs[rank] = load_run(tmp_path / f"rank{rank}")
    alone = Run(path=pretrain.baseline_dir(cfg["model"], cfg["data"]) / "backbone_eval",
                results=pretrain.backbone_results(cfg["model"], cfg["data"]))
    trained = interval(runs[1], alone)
    assert trained[1] > 0, f"rank 1 vs the backbone alone: {trained}"
    capacity = interval(runs[8], runs[1])
    assert capacity[1] > 0, f"rank 8 vs rank 1: {capacity}"
