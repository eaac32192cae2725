"""One split of an MMT-47-format dataset as a torch Dataset of decoded samples (media + chat messages).

A row that cannot be used (missing / corrupt media, empty answer, unknown source type) is an error naming
split, index and path, or with on_error="skip" a `Skip` record that the collator counts and reports.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from lime.data import mmt47
from lime.data.media import FRAME_SAMPLING, MediaError, load_image, load_video
from lime.settings import DataSettings, plain, section

logger = logging.getLogger(__name__)

PAD_SHORT_CLIPS = ("eval", "always")


@dataclass(frozen=True)
class SampleId:
    """Where a sample comes from: its split and its row in the split as stored (before subsetting)."""

    split: str
    index: int

    def __str__(self) -> str:
        return f"{self.split}[{self.index}]"


@dataclass
class Sample:
    id: SampleId
    source_type: str
    question: str
    answer: str
    media_path: str | None = None  # absolute path of the image / video, None for text
    image: Image.Image | None = None
    video: np.ndarray | None = None  # (num_frames, H, W, 3) uint8

    def messages(self) -> list[dict[str, Any]]:
        """The user turn: media placeholder first, then the question (docs/method.md §6)."""
        content = [] if self.source_type == "text" else [{"type": self.source_type}]
        content.append({"type": "text", "text": self.question})
        return [{"role": "user", "content": content}]


@dataclass(frozen=True)
class Skip:
    """A sample left out, with why: kind is e.g. missing_image, corrupt_video, empty_answer, too_long."""

    id: SampleId
    kind: str
    reason: str
    path: str | None = None

    def __str__(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"{self.id}{where}: {self.reason}"


class DataError(ValueError):
    """A bad sample with data.on_error=raise; the message names split, index and path."""

    def __init__(self, skip: Skip):
        super().__init__(f"bad sample {skip}")
        self.skip = skip


@dataclass
class SkipLog:
    """Samples skipped during a run, reported at the end (never dropped silently). A sample drawn again (the next
    epoch) is counted once."""

    items: list[Skip] = field(default_factory=list)
    seen: set[SampleId] = field(default_factory=set)

    def add(self, skip: Skip) -> None:
        if skip.id in self.seen:
            return
        self.seen.add(skip.id)
        self.items.append(skip)
        logger.warning("skipped %s", skip)

    def as_list(self) -> list[dict[str, Any]]:
        """One entry per skipped sample (results.json)."""
        return [{"id": str(s.id), "kind": s.kind, "reason": s.reason, "path": s.path} for s in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, int]:
        return dict(Counter(skip.kind for skip in self.items))

    def summary(self) -> str:
        if not self.items:
            return "no samples skipped"
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts().items()))
        return f"{len(self.items)} sample(s) skipped ({kinds}); first: {self.items[0]}"


class MMTDataset(torch.utils.data.Dataset):
    """Rows of one split -> `Sample` (decoded media) or, with on_error="skip", `Skip`."""

    def __init__(self, rows: datasets.Dataset, split: str, media_root: str | Path | None,
                 num_frames: int = 8, on_error: str = "raise", frame_sampling: str = "floor",
                 pad_short_clips: str = "eval"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if frame_sampling not in FRAME_SAMPLING:
            raise ValueError(f"data.frame_sampling must be one of {FRAME_SAMPLING}, got {frame_sampling!r}")
        if pad_short_clips not in PAD_SHORT_CLIPS:
            raise ValueError(f"data.pad_short_clips must be one of {PAD_SHORT_CLIPS}, got {pad_short_clips!r}")
        self.rows, self.split, self.num_frames, self.on_error = rows, split, num_frames, on_error
        self.frame_sampling = frame_sampling
        # The released code pads a short clip to num_frames in evaluation only; its training loader keeps the
        # clip's own frames ("eval"). "always" pads in training too.
        self.pad_videos = pad_short_clips == "always" or split != mmt47.TRAIN_SPLIT
        self.media_root = None if media_root is None else Path(media_root)
        self.excluded: dict[int, Skip] = {}  # position -> why (too long: lime.data.collate.check_lengths)

    def __len__(self) -> int:
        return len(self.rows)

    def row_id(self, i: int) -> SampleId:
        """The id of position i: its row in the split as stored (mmt47.load numbers the rows)."""
        if "row_index" not in self.rows.column_names:
            return SampleId(self.split, i)
        return SampleId(self.split, int(self.rows.select_columns(["row_index"])[i]["row_index"]))

    def exclude(self, position: int, skip: Skip) -> None:
        """Leave out the sample at `position` (a counted skip each time it is drawn)."""
        self.excluded[position] = skip

    def questions(self) -> list[str]:
        """Every question of the split as text ("" for a missing one); a row whose text is not UTF-8 is an
        error naming it, or with on_error="skip" excluded (and its question read as "")."""
        try:
            return [question or "" for question in self.rows["question"]]
        except UnicodeDecodeError:
            return [self._question(i) for i in range(len(self))]

    def _question(self, i: int) -> str:
        item = self[i]
        if isinstance(item, Skip):
            self.exclude(i, item)
            return ""
        return item.question

    def __getitem__(self, i: int) -> Sample | Skip:
        if i in self.excluded:
            return self.excluded[i]
        try:
            row = self.rows[i]
            sample_id = SampleId(self.split, int(row.get("row_index", i)))
            return self._decode(row, sample_id)
        except UnicodeDecodeError as err:  # bytes in a text column that are not UTF-8
            skip = Skip(self.row_id(i), "bad_text", f"a text field is not valid UTF-8 ({err.reason} at byte "
                        f"{err.start})", None)
            if self.on_error == "raise":
                raise DataError(skip) from err
            return skip
        except DataError as err:
            if self.on_error == "raise":
                raise
            return err.skip

    def _decode(self, row: Mapping[str, Any], sample_id: SampleId) -> Sample:
        source_type, answer, question = row["source_type"], row["answer"], row["question"]
        if source_type not in mmt47.SOURCE_TYPES:
            raise DataError(Skip(sample_id, "unknown_source_type",
                                 f"unknown source_type {source_type!r}, expected one of {mmt47.SOURCE_TYPES}"))
        try:
            answer = mmt47.answer_value(answer)  # a string, or a list of accepted strings (first = target)
        except mmt47.AnswerError as err:
            raise DataError(Skip(sample_id, err.kind, str(err))) from None
        if question is None:
            raise DataError(Skip(sample_id, "empty_question", "question is missing"))
        sample = Sample(sample_id, source_type, str(question), answer)
        if source_type != "text":
            self._load_media(sample, row["media_path"])
        return sample

    def _load_media(self, sample: Sample, media_path: str | None) -> None:
        if not media_path:
            raise DataError(Skip(sample.id, f"missing_{sample.source_type}", "media_path is empty"))
        if self.media_root is None:
            raise DataError(Skip(sample.id, f"missing_{sample.source_type}", "data.media_root is not set",
                                 media_path))
        sample.media_path = str(self.media_root / media_path)
        try:
            if sample.source_type == "image":
                sample.image = load_image(sample.media_path)
            else:
                sample.video = load_video(sample.media_path, self.num_frames, self.frame_sampling, self.pad_videos)
        except MediaError as err:
            raise DataError(Skip(sample.id, f"{err.kind}_{sample.source_type}", err.reason, err.path)) from err


def build(settings: DataSettings | Mapping[str, Any]) -> dict[str, MMTDataset]:
    """Every split of the data settings (a plain `data` config section is checked into them first), loaded,
    validated and subset by `mmt47.load`, as an MMTDataset."""
    if not isinstance(settings, DataSettings):
        settings = section(DataSettings, plain(settings), "data")
    cfg = settings.as_dict()
    dataset = mmt47.load(cfg)
    _, media_root = mmt47.paths(cfg)
    return {split: MMTDataset(rows, split, media_root, settings.num_frames, settings.on_error,
                              settings.frame_sampling, settings.pad_short_clips)
            for split, rows in dataset.items()}
