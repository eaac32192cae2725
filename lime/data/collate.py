"""Batches for LLaVA-OneVision and Qwen2-VL processors: chat template, media, label masks (docs/method.md §6).

Training text is the generation prompt (the chat template with `add_generation_prompt=True`) followed by
the answer and the template's end-of-turn text, so the model is trained on exactly the prompt it sees at
evaluation. Labels are -100 everywhere except the answer tokens and the end-of-turn token: never the
prompt, the media tokens or the padding. Nothing is truncated: a sample longer than `max_length` is an
error or, with truncation="skip", a counted skip, because cutting it would drop the answer or part of
the media tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin

from lime.data.dataset import DataError, MMTDataset, Sample, SampleId, Skip, SkipLog

IGNORE_INDEX = -100
_SENTINEL = "LIME_ANSWER_SENTINEL"


@dataclass
class GenerationBatch:
    """Model inputs for `generate` (left-padded prompts ending with the assistant header), with the
    references kept aside and the ids of the samples in the batch, so failures can be named."""

    inputs: BatchFeature | None  # None when every sample of the batch was skipped
    ids: list[SampleId]
    references: list[str]
    questions: list[str]
    skipped: list[Skip]


class Collator:
    """`Collator(processor, mode="train")(samples)` -> the processor's batch dict plus `labels`;
    mode="generate" -> a `GenerationBatch`. Skipped samples are kept in `skip_log`."""

    def __init__(self, processor: ProcessorMixin, mode: str = "train", max_length: int | None = None,
                 truncation: str = "error", skip_log: SkipLog | None = None, instruction_clusters: Any = None):
        if mode not in ("train", "generate"):
            raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")
        if truncation not in ("error", "skip"):
            raise ValueError(f"truncation must be 'error' or 'skip', got {truncation!r}")
        self.processor, self.mode, self.max_length, self.truncation = processor, mode, max_length, truncation
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self.instruction_clusters = instruction_clusters  # MoCLE (lime.mocle): adds each sample's cluster id
        self.end_of_turn = end_of_turn(processor)
        self._end_of_turn_ids = self._token_ids(self.end_of_turn)

    def __call__(self, items: Sequence[Sample | Skip]) -> dict[str, torch.Tensor] | GenerationBatch:
        skipped = [item for item in items if isinstance(item, Skip)]
        samples = [item for item in items if isinstance(item, Sample)]
        batch, too_long = self._process(samples)
        if too_long:  # re-process without them: media tensors of one sample cannot be sliced out generically
            skipped += too_long
            samples = [s for s in samples if s.id not in {skip.id for skip in too_long}]
            batch, _ = self._process(samples)
        for skip in skipped:
            self.skip_log.add(skip)
        if self.instruction_clusters is not None and batch is not None:
            batch["instruction_cluster"] = self.instruction_clusters.predict([s.question for s in samples])
        if self.mode == "generate":
            return GenerationBatch(batch, [s.id for s in samples], [s.answer for s in samples],
                                   [s.question for s in samples], skipped)
        if batch is None:
            raise RuntimeError(f"every sample of a training batch was skipped: {[str(s) for s in skipped]}")
        batch["labels"] = self._labels(batch, samples)
        return dict(batch)

    def text(self, sample: Sample) -> str:
        """The chat-template text of a sample: prompt, plus answer and end of turn when training."""
        prompt = self.processor.apply_chat_template(sample.messages(), add_generation_prompt=True)
        return prompt if self.mode == "generate" else prompt + sample.answer + self.end_of_turn

    def _process(self, samples: list[Sample]) -> tuple[BatchFeature | None, list[Skip]]:
        if not samples:
            return None, []
        images = [s.image for s in samples if s.source_type == "image"]
        videos = [s.video for s in samples if s.source_type == "video"]
        batch = self.processor(
            text=[self.text(s) for s in samples], images=images or None, videos=videos or None,
            padding=True, padding_side="left" if self.mode == "generate" else "right", return_tensors="pt")
        return batch, self._too_long(batch, samples)

    def _too_long(self, batch: BatchFeature, samples: list[Sample]) -> list[Skip]:
        if self.max_length is None:
            return []
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        skips = [Skip(s.id, "too_long", f"{n} tokens > data.max_length={self.max_length}", s.media_path)
                 for s, n in zip(samples, lengths, strict=True) if n > self.max_length]
        if skips and self.truncation == "error":
            raise DataError(skips[0])
        return skips

    def _labels(self, batch: BatchFeature, samples: list[Sample]) -> torch.Tensor:
        input_ids = batch["input_ids"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, sample in enumerate(samples):
            answer = self._token_ids(sample.answer)
            target = answer + self._end_of_turn_ids
            end = int(batch["attention_mask"][row].sum())  # right padding: real tokens come first
            start = end - len(target)
            if input_ids[row, start:end].tolist() != target:
                raise ValueError(f"{sample.id}: the answer {sample.answer!r} is not tokenized the same alone "
                                 "and in context; labels cannot be placed (tokenizer/chat template mismatch)")
            # The answer and the end-of-turn token: the model learns what to say and when to stop.
            stop = start + len(answer) + 1
            labels[row, start:stop] = input_ids[row, start:stop]
        return labels

    def _token_ids(self, text: str) -> list[int]:
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def check_lengths(dataset: MMTDataset, processor: ProcessorMixin, max_length: int | None, truncation: str,
                  skip_log: SkipLog | None = None) -> int:
    """data.max_length applied to every split before any training: a question whose text alone is longer is an
    error (truncation=error) or left out of the split (skip; with `skip_log`, counted there at once). Media
    tokens only add to the length, so this is a lower bound; the collator checks each full sample when it is
    drawn. Returns the number of samples left out."""
    if max_length is None or not len(dataset):
        return 0
    questions = dataset.questions()
    lengths = [len(ids) for ids in processor.tokenizer(questions, add_special_tokens=False)["input_ids"]]
    excluded = 0
    for position, n in enumerate(lengths):
        if n <= max_length:
            continue
        skip = Skip(dataset.row_id(position), "too_long", f"the question alone is {n} tokens > data.max_length="
                    f"{max_length}")
        if truncation == "error":
            raise DataError(skip)
        dataset.exclude(position, skip)
        if skip_log is not None:
            skip_log.add(skip)
        excluded += 1
    return excluded


def end_of_turn(processor: ProcessorMixin) -> str:
    """What the chat template writes after an assistant answer (e.g. "<|im_end|>\\n"); it must start
    with a special token, the one the model learns to emit to stop."""
    conversation = [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}]
    rendered = processor.apply_chat_template(conversation)
    if _SENTINEL not in rendered:
        raise ValueError("the processor's chat template does not render the assistant's answer")
    suffix = rendered.split(_SENTINEL, 1)[1]
    tokenizer = processor.tokenizer
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] not in tokenizer.all_special_ids:
        raise ValueError(f"the chat template's end of turn {suffix!r} does not start with a special token")
    return suffix

