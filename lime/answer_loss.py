"""The teacher-forced loss of the gold answer: a continuous score beside accuracy.

For a test sample with prompt x and gold answer tokens y_1..y_T (the answer, then the end-of-turn token:
exactly the tokens a training step is scored on, lime/data/collate.py),

    loss(x, y) = -(1/T) * sum_t log p(y_t | x, y_<t)        (nats per token)

A task's loss is the mean over its samples, a category's the mean of its tasks' losses, and the overall
values the mean over tasks and over categories, as for the scores. Accuracy moves in steps of one sample and
saturates; the loss keeps moving as a model grows surer of the right answer, so it separates methods whose
accuracies tie. `evaluate` adds the block below to results.json:

    "answer_loss": {"unit": "nats per answer token", "tasks": {task: {"loss", "samples", "category"}},
                    "categories": {category: loss}, "overall": {"mean_of_tasks", "mean_of_categories"}}
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import ProcessorMixin

from lime.data.collate import IGNORE_INDEX, Collator
from lime.data.dataset import MMTDataset, Sample, SkipLog
from lime.data.mmt47 import Taxonomy

UNIT = "nats per answer token"


@torch.no_grad()
def sample_losses(model: nn.Module, processor: ProcessorMixin, dataset: MMTDataset,
                  batch_size: int) -> list[float]:
    """The answer loss of every sample of a split (skipped samples, with data.on_error=skip, left out)."""
    collator = Collator(processor, mode="train", skip_log=SkipLog(),
                        instruction_clusters=getattr(model, "lime_clusters", None))  # MoCLE's clustering

    def collate(items: list) -> dict | None:  # a batch of skipped samples only has no loss
        return collator(items) if any(isinstance(item, Sample) for item in items) else None

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    losses: list[float] = []
    for batch in filter(None, loader):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                 reduction="none")
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        losses += (token_loss.sum(dim=1) / counts).tolist()
    return losses


def summarize(per_task: Mapping[str, list[float]], taxonomy: Taxonomy) -> dict[str, Any]:
    """The results.json block from per-sample losses; categories with no evaluated task are left out."""
    tasks = {task: {"loss": statistics.fmean(losses), "samples": len(losses), "category": taxonomy.category_of(task)}
             for task, losses in per_task.items() if losses}
    categories = {}
    for category, members in taxonomy.categories.items():
        values = [tasks[t]["loss"] for t in members if t in tasks]
        if values:
            categories[category] = statistics.fmean(values)
    overall = {"mean_of_tasks": statistics.fmean(t["loss"] for t in tasks.values()) if tasks else None,
               "mean_of_categories": statistics.fmean(categories.values()) if categories else None}
    return {"unit": UNIT, "tasks": tasks, "categories": categories, "overall": overall}


def add_to_results(model: nn.Module, processor: ProcessorMixin, splits: Mapping[str, MMTDataset],
                   taxonomy: Taxonomy, run_dir: Path, results: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Compute the answer loss of every test split, add it to `results` and rewrite run_dir/results.json."""
    was_training = model.training
    model.eval()
    try:
        per_task = {taxonomy.split_info(split).task: sample_losses(model, processor, dataset, batch_size)
                    for split, dataset in splits.items()}
    finally:
        model.train(was_training)
    results["answer_loss"] = summarize(per_task, taxonomy)
    (Path(run_dir) / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    return results
