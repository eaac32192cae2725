"""A pretrained tiny backbone for the offline default run.

LiME adapts a *pretrained* model. A randomly initialised tiny LLaVA-OneVision gives adapters of a few thousand
parameters nothing to modulate, so the tiny model configs carry a `pretrain` block: the whole tiny model is
first trained on mmt_mini's *pretraining mixture* (lime/data/mmt_mini.py), drawn with another generator
seed: captions of every scene kind the benchmark's visual tasks show ("Describe the video." -> "a red circle
moves left") and generic sentences to continue. It teaches perception and language, not the benchmark's
questions or answer formats, so the backbone alone scores near zero on the benchmark and what an adapter
learns decides the score. The model is saved with `save_pretrained` next to its processor and cached; the PEFT
run loads it through the same `from_pretrained` path as a hub checkpoint, freezes it and adapts it, as in the
paper. Built once per (architecture, pretraining recipe, image and video sizes), reused after.

Next to the weights, `benchmark-<key of the benchmark's generator settings>/backbone_results.json` (and
`backbone_eval/`: results.csv, predictions/) holds the backbone's own scores on that benchmark's test splits
before any adaptation, computed once per benchmark copy: the honest baseline the adapted model is compared
with ("backbone alone" vs "after LiME").
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from lime import evaluation, models
from lime.checkpoint import atomic_directory
from lime.data import dataset as data
from lime.data import mmt_mini
from lime.data.collate import Collator
from lime.data.mmt47 import TRAIN_SPLIT, Taxonomy

logger = logging.getLogger(__name__)
COMPLETE = "pretrained.json"
BASELINE = "backbone_results.json"
# Bump when what is trained or recorded changes: it is part of the cache key.
PRETRAIN_VERSION = 3


def backbone_dir(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> Path:
    """The cached weights: one per architecture, pretraining recipe and media sizes (not the benchmark's size)."""
    params = mmt_mini.generator_params(data_cfg["generate"])
    recipe = {"tiny": model_cfg["tiny"], "family": model_cfg["family"], "seed": model_cfg.get("seed", 0),
              "pretrain": {k: v for k, v in model_cfg["pretrain"].items() if k != "cache_dir"},
              "media": {k: params[k] for k in ("image_size", "video_size")}, "version": PRETRAIN_VERSION,
              "mixture_version": mmt_mini.GENERATOR_VERSION,
              # how video frames are sampled changes what the backbone is trained on
              "frames": [data_cfg.get("num_frames", 8), data_cfg.get("frame_sampling", "floor"),
                         data_cfg.get("pad_short_clips", "eval")]}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = Path(str(model_cfg["pretrain"].get("cache_dir") or "~/.cache/lime/backbones")).expanduser()
    return root / f"{model_cfg['name']}-{key}"


def baseline_dir(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> Path:
    """The backbone alone scored on one benchmark copy (its generator settings): beside the weights."""
    key = mmt_mini.cache_key(mmt_mini.generator_params(data_cfg["generate"]))
    return backbone_dir(model_cfg, data_cfg) / f"benchmark-{key}"


def pretraining_data(data_cfg: Mapping[str, Any], recipe: Mapping[str, Any]) -> data.MMTDataset:
    """The pretraining mixture of `recipe` (data_seed, samples) at the benchmark's image and video sizes."""
    root = mmt_mini.ensure_pretraining(data_cfg, int(recipe["data_seed"]), int(recipe["samples"]))
    rows = datasets.load_from_disk(str(root / mmt_mini.DATASET_DIR))[TRAIN_SPLIT]
    return data.MMTDataset(rows, "pretrain", root / mmt_mini.MEDIA_DIR, int(data_cfg.get("num_frames", 8)))


def benchmark_tests(data_cfg: Mapping[str, Any]) -> dict[str, data.MMTDataset]:
    """Every test split of the benchmark the backbone's cache key names (all tasks, all samples): the same
    generated copy the PEFT run evaluates on, whatever subset that run selects."""
    cfg = {**data_cfg, "path": None, "media_root": None, "categories": None, "tasks": None,
           "max_train_samples": 1, "max_eval_samples": None}
    splits = data.build(cfg)
    splits.pop(TRAIN_SPLIT, None)
    return splits


def evaluate_backbone(model: torch.nn.Module, processor: Any, data_cfg: Mapping[str, Any],
                      out_dir: Path) -> dict[str, Any]:
    """The backbone alone (no adapter) on the benchmark's test splits, scored as a run scores them."""
    return evaluation.evaluate(model, processor, benchmark_tests(data_cfg), Taxonomy.from_config(data_cfg["taxonomy"]),
                               out_dir, batch_size=32, max_new_tokens=8)


class _Decoded(torch.utils.data.Dataset):
    """A split decoded once: pretraining makes several passes, and decoding the videos is most of a step."""

    def __init__(self, dataset: data.MMTDataset):
        self.samples = [dataset[i] for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Any:
        return self.samples[i]


def pretrain(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train every parameter of the tiny model on the pretraining split; save model + processor."""
    recipe = model_cfg["pretrain"]
    if int(recipe["data_seed"]) == int(data_cfg["generate"]["seed"]):
        raise ValueError("model.pretrain.data_seed must differ from data.generate.seed: the backbone must not "
                         "see the benchmark's samples")
    threads = recipe.get("threads")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        # A forked RNG: the run that builds the backbone and a later run that finds it cached then draw the same
        # adapter initialisation and routing jitter, and so give the same results.
        with torch.random.fork_rng(devices=[]):
            return _pretrain(model_cfg, data_cfg, out_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any], out_dir: Path) -> dict[str, Any]:
    recipe = model_cfg["pretrain"]
    model, processor = models.build({**model_cfg, "pretrain": None})
    start = time.perf_counter()
    dataset = _Decoded(pretraining_data(data_cfg, recipe))
    data_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(int(model_cfg.get("seed", 0)))
    loader = DataLoader(dataset, batch_size=int(recipe["batch_size"]), shuffle=True, generator=generator,
                        collate_fn=Collator(processor, "train", max_length=data_cfg.get("max_length")))
    steps = int(recipe["steps"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(recipe["lr"]), weight_decay=0.01)
    # Warmup over the first 10% of the steps, then cosine annealing to ~0.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=float(recipe["lr"]), total_steps=steps,
                                                   pct_start=0.1)
    model.train()
    start, step, losses = time.perf_counter(), 0, []
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0 or step == steps:
                recent = losses[-50:]
                logger.info("pretraining the tiny backbone: step %d/%d, loss %.3f (mean of the last %d)",
                            step, steps, sum(recent) / len(recent), len(recent))
            if step == steps:
                break
    train_seconds = time.perf_counter() - start
    tail = losses[-min(50, len(losses)):]
    epochs = round(steps * int(recipe["batch_size"]) / len(dataset), 2)
    info = {"steps": steps, "samples": len(dataset), "epochs": epochs,
            "first_loss": losses[0], "final_loss": losses[-1], "final_loss_mean_last_50": sum(tail) / len(tail),
            "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
            "threads": torch.get_num_threads(),
            "recipe": dict(recipe), "version": PRETRAIN_VERSION}
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / COMPLETE).write_text(json.dumps(info, indent=2, default=str))
    return info


def score_backbone(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Score the cached backbone alone on the data config's benchmark copy, once; its results.json dict."""
    out_dir = baseline_dir(model_cfg, data_cfg)
    with torch.random.fork_rng(devices=[]):  # as in `pretrain`: the run's own draws stay the same
        model, processor = models.build({**model_cfg, "name_or_path": str(out_dir.parent), "tiny": None,
                                         "pretrain": None})
        start = time.perf_counter()
        with atomic_directory(out_dir) as tmp:
            results = evaluate_backbone(model, processor, data_cfg, tmp / "backbone_eval")
            results["eval_seconds"] = round(time.perf_counter() - start, 1)
            (tmp / BASELINE).write_text(json.dumps(results, indent=2) + "\n")
    logger.info("the tiny backbone alone (before adaptation), on the benchmark's test splits:\n%s",
                evaluation.format_table(results))
    return results


def backbone_results(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cached scores of the pretrained backbone alone (results.json format), or None without one."""
    if not model_cfg.get("pretrain") or not model_cfg.get("tiny") or data_cfg.get("generate") is None:
        return None
    path = baseline_dir(model_cfg, data_cfg) / BASELINE
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_backbone(model_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The model config to build: unchanged without `pretrain`, else one that loads the cached backbone."""
    if not model_cfg.get("pretrain"):
        return dict(model_cfg)
    if not model_cfg.get("tiny"):
        raise ValueError("model.pretrain is for tiny models built from config; real checkpoints are pretrained")
    if data_cfg.get("generate") is None:
        raise ValueError("model.pretrain draws its pretraining split from the mmt_mini generator: use a data "
                         "config with a `generate` block (data=mmt_mini), or set model.pretrain=null")
    out_dir = backbone_dir(model_cfg, data_cfg)
    if not (out_dir / COMPLETE).is_file():
        logger.info("pretraining the tiny backbone once (cached in %s)", out_dir)
        info = pretrain(model_cfg, data_cfg, out_dir)
        logger.info("tiny backbone: loss %.3f -> %.3f in %ss (+ %ss decoding)", info["first_loss"],
                    info["final_loss_mean_last_50"], info["train_seconds"], info["data_seconds"])
    baseline = backbone_results(model_cfg, data_cfg) or score_backbone(model_cfg, data_cfg)
    logger.info("pretrained tiny backbone %s; alone it scores %.2f (mean of tasks, %s)", out_dir,
                float(baseline.get("overall", {}).get("mean_of_tasks", float("nan"))), baseline.get("scorer"))
    return {**model_cfg, "name_or_path": str(out_dir), "tiny": None, "pretrain": None}


def comparison_table(baseline: Mapping[str, Any], results: Mapping[str, Any],
                     taxonomy: Taxonomy | None = None) -> str:
    """Per category (and overall): chance (with a taxonomy that has `chance` levels), the backbone alone and the
    adapted model, for the categories `results` has. Both results dicts are results.json-shaped."""
    def chance(tasks) -> float | None:
        if taxonomy is None:
            return None
        levels = [taxonomy.metric(task).get("chance") for task in tasks]
        return None if any(level is None for level in levels) else 100 * sum(levels) / len(levels)

    def cell(value: float | None, width: int) -> str:
        return f"{'-':>{width}s}" if value is None else f"{value:{width}.2f}"

    def comparable(tasks) -> bool:
        """The backbone was scored on whole test splits: a run that drew fewer samples (data.max_eval_samples)
        or evaluated other tasks has no backbone score to stand beside it."""
        return all(baseline.get("tasks", {}).get(task, {}).get("samples") == results["tasks"][task].get("samples")
                   for task in tasks)

    lines = [f"{'':40s} {'chance':>7s} {'backbone alone':>15s} {'adapted':>8s}"]
    for category, entry in results["categories"].items():
        alone = baseline.get("categories", {}).get(category, {}).get("score")
        alone = alone if comparable(entry.get("tasks", [])) else None
        lines.append(f"{category:40s} {cell(chance(entry.get('tasks', [])), 7)} {cell(alone, 15)} "
                     f"{cell(entry.get('score'), 8)}")
    tasks = list(results["tasks"])
    categories = [entry.get("tasks", []) for entry in results["categories"].values()]
    chances = {"mean_of_tasks": chance(tasks),
               "mean_of_categories": None if taxonomy is None or not categories or None in map(chance, categories)
               else sum(map(chance, categories)) / len(categories)}
    for key in ("mean_of_categories", "mean_of_tasks"):
        # The backbone's overall is over every task; comparable only when the run evaluated every task too.
        every_task = set(tasks) == set(baseline.get("tasks", {})) and comparable(tasks)
        alone = baseline.get("overall", {}).get(key) if every_task else None
        lines.append(f"{'overall (' + key.replace('_', ' ') + ')':40s} {cell(chances[key], 7)} {cell(alone, 15)} "
                     f"{cell(results.get('overall', {}).get(key), 8)}")
    if not comparable(tasks):
        lines.append("backbone alone: '-' where this run scored other samples than the whole test splits the "
                     "backbone was scored on (data.max_eval_samples)")
    return "\n".join(lines)
