"""Evaluation: batched greedy generation with the KV cache, scored per task, aggregated per category.

Every test split is generated in batches (left-padded prompts); the predictions are scored by the strict scorer
and, for comparison with the released code, by the lenient one (docs/method.md §6). A batch whose generation fails
is either an error naming its split and sample indices (`on_error: raise`) or a counted failure whose samples
score as wrong (`on_error: count`): never silently dropped. Files: `predictions/<split>.jsonl`,
`results.json`, `results.csv`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import ProcessorMixin

from lime import answer_loss, scoring
from lime.data.collate import Collator, GenerationBatch
from lime.data.dataset import MMTDataset, SkipLog
from lime.data.mmt47 import Taxonomy
from lime.mocle import BATCH_KEY as INSTRUCTION_CLUSTER
from lime.mocle import generation_clusters
from lime.results import write_predictions, write_results

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """Generation failed for a batch; the message names the split and the sample indices."""


def generate_split(
    model: nn.Module, processor: ProcessorMixin, dataset: MMTDataset, batch_size: int, max_new_tokens: int,
    on_error: str = "raise", skip_log: SkipLog | None = None, max_length: int | None = None,
    truncation: str = "error",
) -> list[dict[str, Any]]:
    """One row per sample: id, question, answer, prediction (None where generation failed), error. A prompt
    longer than `max_length` (data.max_length) is an error or, with truncation="skip", a counted skip."""
    collator = Collator(processor, mode="generate", max_length=max_length, truncation=truncation, skip_log=skip_log,
                        instruction_clusters=getattr(model, "lime_clusters", None))  # MoCLE's clustering
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    tokenizer = processor.tokenizer
    rows = []
    for batch in loader:
        batch: GenerationBatch
        if batch.inputs is None:
            continue  # every sample was a counted skip (data.on_error=skip)
        try:
            predictions = _generate(model, tokenizer, batch, max_new_tokens)
            error = None
        except Exception as exc:  # noqa: BLE001 - any failure of one batch is reported with its samples
            ids = ", ".join(str(i) for i in batch.ids)
            if on_error == "raise":
                raise GenerationError(f"generation failed for {ids}: {type(exc).__name__}: {exc}") from exc
            logger.error("generation failed for %s: %s", ids, exc)
            predictions, error = [None] * len(batch.ids), f"{type(exc).__name__}: {exc}"
        for sample_id, question, answer, prediction in zip(
            batch.ids, batch.questions, batch.references, predictions, strict=True
        ):
            rows.append({"id": str(sample_id), "question": question, "answer": answer,
                         "prediction": prediction, "error": error})
    return rows


@torch.no_grad()
def _generate(model: nn.Module, tokenizer: Any, batch: GenerationBatch, max_new_tokens: int) -> list[str]:
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()}
    with generation_clusters(model, inputs.pop(INSTRUCTION_CLUSTER, None)):  # MoCLE's ids (lime.mocle)
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        )
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def evaluate(
    model: nn.Module, processor: ProcessorMixin, splits: Mapping[str, MMTDataset], taxonomy: Taxonomy,
    run_dir: Path, batch_size: int, max_new_tokens: int, scorer: str = "strict", on_error: str = "raise",
    max_length: int | None = None, truncation: str = "error", skip_log: SkipLog | None = None,
) -> dict[str, Any]:
    """Generate, score with both scorers, write predictions and results; return the results dict.

    Skipped test samples (`skip_log`, which may already hold those left out before training) are listed in
    results.json under "skipped_samples"."""
    model.eval()
    other = "lenient" if scorer == "strict" else "strict"
    scores: dict[str, dict] = {scorer: {}, other: {}}
    counts: dict[str, int] = {}
    skip_log = SkipLog() if skip_log is None else skip_log
    for split, dataset in splits.items():
        task = taxonomy.split_info(split).task
        rows = generate_split(model, processor, dataset, batch_size, max_new_tokens, on_error, skip_log,
                              max_length, truncation)
        if not rows:
            raise GenerationError(f"{split}: no sample could be evaluated ({skip_log.summary()})")
        metric = taxonomy.metric(task)
        predictions, answers = [r["prediction"] for r in rows], [r["answer"] for r in rows]
        for name in (scorer, other):
            scores[name][task] = {**scoring.score_split(predictions, answers, metric, scorer=name), "split": split}
        correct = scores[scorer][task].get("correct")
        write_predictions(run_dir, split, [
            {**r, "correct": bool(correct[i]) if correct else None} for i, r in enumerate(rows)])
        counts[task] = len(rows)
        logger.info("%s: %s %.2f over %d samples", split, scorer, scores[scorer][task]["score"], len(rows))
    if len(skip_log):
        logger.warning("evaluation skipped %d samples: %s", len(skip_log), skip_log.summary())
    # Categories with no evaluated task (a data subset) are left out; a partly evaluated one stays incomplete.
    categories = {name: list(tasks) for name, tasks in taxonomy.categories.items()
                  if any(task in scores[scorer] for task in tasks)}
    results = write_results(run_dir, scores[scorer], categories, scorer, counts,
                            other_scorers={other: scores[other]})
    results["skipped_samples"] = skip_log.as_list()
    # The teacher-forced loss of the gold answers, a continuous score beside accuracy (lime/answer_loss.py).
    return answer_loss.add_to_results(model, processor, splits, taxonomy, run_dir, results, batch_size)


def format_table(results: Mapping[str, Any]) -> str:
    """The per-task and per-category scores as a plain-text table for the console."""
    lines = [f"{'task':28s} {'category':26s} {'score':>7s} {'n':>5s}"]
    for task, entry in results["tasks"].items():
        score = entry["score"]
        lines.append(f"{task:28s} {str(entry.get('category', '')):26s} "
                     f"{'-' if score is None else f'{score:7.2f}':>7s} {entry.get('samples', 0):5d}")
    lines.append("")
    for category, entry in results["categories"].items():
        score = entry.get("score")
        lines.append(f"{category:55s} {'incomplete' if score is None else f'{score:7.2f}':>7s}")
    overall = results.get("overall", {})
    for key in ("mean_of_categories", "mean_of_tasks"):
        if overall.get(key) is not None:
            lines.append(f"{'overall (' + key.replace('_', ' ') + ')':55s} {overall[key]:7.2f}")
    lines.append(f"scorer: {results['scorer']}")
    return "\n".join(lines)
