"""MMT-47 (SPEC section 6): schema, split names, task taxonomy, loading and subsets.

A dataset in this format is a `DatasetDict` with a `train` split and test splits named
`{text|image|video|glue}_test_{task}`; every split has the columns `source_type` (text / image / video),
`media_path` (relative to a media root), `question` and `answer`. The built-in benchmark (`mmt_mini`) has
the same format and is read by the same `load`.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
from omegaconf import OmegaConf

logger = logging.getLogger(__name__)

TRAIN_SPLIT = "train"
SOURCE_TYPES = ("text", "image", "video")
MODALITIES = ("text", "image", "video", "glue")
REQUIRED_COLUMNS = ("source_type", "media_path", "question", "answer")
TAXONOMY_DIR = Path(__file__).resolve().parents[2] / "configs" / "data" / "taxonomy"


class SchemaError(ValueError):
    """The dataset does not have MMT-47's format; the message names the split and the column."""


class SplitInfo(NamedTuple):
    modality: str
    task: str
    category: str


@dataclass(frozen=True)
class Taxonomy:
    """Which task belongs to which category, and how each task is scored (configs/data/taxonomy/)."""

    categories: dict[str, tuple[str, ...]]
    modalities: dict[str, str]
    inferred: frozenset[str]
    metrics: dict[str, dict[str, Any]]
    default_metric: str = "exact"

    @classmethod
    def from_config(cls, cfg: Mapping) -> Taxonomy:
        cfg = _plain(cfg)
        categories = {name: tuple(group["tasks"]) for name, group in cfg["categories"].items()}
        modalities = {name: group["modality"] for name, group in cfg["categories"].items()}
        for name, modality in modalities.items():
            if modality not in MODALITIES:
                raise SchemaError(f"taxonomy category {name!r}: unknown modality {modality!r}")
        tasks = [task for group in categories.values() for task in group]
        if len(set(tasks)) != len(tasks):
            raise SchemaError("taxonomy: a task is listed in more than one category")
        inferred = frozenset(name for name, group in cfg["categories"].items() if group.get("inferred"))
        return cls(categories, modalities, inferred, dict(cfg.get("metrics") or {}),
                   cfg.get("default_metric", "exact"))

    @classmethod
    def named(cls, name: str) -> Taxonomy:
        """The taxonomy shipped in configs/data/taxonomy/{name}.yaml (e.g. "mmt47", "mmt_mini")."""
        return cls.from_config(OmegaConf.load(TAXONOMY_DIR / f"{name}.yaml"))

    @property
    def tasks(self) -> list[str]:
        return [task for group in self.categories.values() for task in group]

    def category_of(self, task: str) -> str:
        for category, tasks in self.categories.items():
            if task in tasks:
                return category
        raise SchemaError(f"unknown task {task!r}")

    def split_name(self, task: str) -> str:
        return f"{self.modalities[self.category_of(task)]}_test_{task}"

    def split_info(self, split: str) -> SplitInfo:
        """`glue_test_sst2` -> SplitInfo("glue", "sst2", "GLUE"); anything else is a SchemaError."""
        modality, sep, task = split.partition("_test_")
        if not sep or modality not in MODALITIES:
            raise SchemaError(f"split {split!r}: not 'train' and not named {{text|image|video|glue}}_test_{{task}}")
        try:
            category = self.category_of(task)
        except SchemaError:
            raise SchemaError(f"split {split!r}: task {task!r} is in no category of the taxonomy") from None
        if self.modalities[category] != modality:
            raise SchemaError(f"split {split!r}: task {task!r} is a {self.modalities[category]} task "
                              f"(category {category!r}), not {modality}")
        return SplitInfo(modality, task, category)

    def metric(self, task: str) -> dict[str, Any]:
        """Scoring spec of a task, e.g. {"metric": "pearson"}; unlisted tasks use the default metric."""
        return dict(self.metrics.get(task) or {"metric": self.default_metric})

    def select(self, categories: Iterable[str] | None = None, tasks: Iterable[str] | None = None) -> set[str]:
        """Tasks in any of `categories` or in `tasks` (both None: all); unknown names are errors."""
        if categories is None and tasks is None:
            return set(self.tasks)
        chosen = set()
        for category in categories or ():
            if category not in self.categories:
                raise SchemaError(f"data.categories: unknown category {category!r}; "
                                  f"known: {sorted(self.categories)}")
            chosen.update(self.categories[category])
        for task in tasks or ():
            self.category_of(task)  # raises for an unknown task
            chosen.add(task)
        return chosen


def split_info(split: str, taxonomy: Taxonomy | None = None) -> SplitInfo:
    """(modality, task, category) of a test split name, by default in MMT-47's taxonomy."""
    return (taxonomy or Taxonomy.named("mmt47")).split_info(split)


def validate(dataset: datasets.DatasetDict, taxonomy: Taxonomy, on_error: str = "raise") -> None:
    """Check split names, columns and `source_type` values.

    Unknown `source_type` values are an error with on_error="raise"; with "skip" they are counted here
    and the rows are skipped (and counted again) when read.
    """
    for split, rows in dataset.items():
        if split != TRAIN_SPLIT:
            taxonomy.split_info(split)
        missing = [column for column in REQUIRED_COLUMNS if column not in rows.column_names]
        if missing:
            raise SchemaError(f"split {split!r}: missing column(s) {missing}; has {rows.column_names}")
        if not len(rows):
            raise SchemaError(f"split {split!r} is empty (0 rows)")
        unknown = set(rows.unique("source_type")) - set(SOURCE_TYPES)
        if not unknown:
            continue
        values = rows["source_type"]
        bad = [i for i, value in enumerate(values) if value not in SOURCE_TYPES]
        message = (f"split {split!r}, column 'source_type': unknown value(s) {sorted(map(repr, unknown))} "
                   f"in {len(bad)} row(s), first at index {bad[0]}; expected one of {SOURCE_TYPES}")
        if on_error == "raise":
            raise SchemaError(message)
        logger.warning("%s; these rows will be skipped", message)


def select(dataset: datasets.DatasetDict, taxonomy: Taxonomy, categories: Iterable[str] | None = None,
           tasks: Iterable[str] | None = None, max_train_samples: int | None = None,
           max_eval_samples: int | None = None, seed: int = 0) -> datasets.DatasetDict:
    """Subset by category / task and sample at most N rows per split (random with `seed`).

    Every split gets a `row_index` column: the row's position in the split as stored, so a failure can be
    traced back to the original data after subsetting.
    """
    chosen = taxonomy.select(categories, tasks)
    restricted = chosen != set(taxonomy.tasks)
    out = {}
    for split, rows in dataset.items():
        rows = _with_row_index(rows)
        if split == TRAIN_SPLIT:
            if restricted:
                rows = _filter_train(rows, chosen)
            out[split] = _sample(rows, max_train_samples, seed, split)
        elif taxonomy.split_info(split).task in chosen:
            out[split] = _sample(rows, max_eval_samples, seed, split)
    return datasets.DatasetDict(out)


def paths(cfg: Mapping) -> tuple[str, Path | None]:
    """(dataset path or hub id, media root) of a data config; generates mmt_mini first when needed."""
    if cfg.get("path") is None and cfg.get("generate") is not None:
        from lime.data import mmt_mini  # the generator uses this module's schema

        root = mmt_mini.ensure(cfg)
        return str(root / mmt_mini.DATASET_DIR), root / mmt_mini.MEDIA_DIR
    if cfg.get("path") is None:
        raise SchemaError("data.path is not set (a save_to_disk directory or a hub dataset id)")
    media_root = cfg.get("media_root")
    return str(cfg["path"]), None if media_root is None else Path(str(media_root)).expanduser()


def load(cfg: Mapping) -> datasets.DatasetDict:
    """The validated, subset `DatasetDict` of a data config (data=mmt47 or data=mmt_mini)."""
    taxonomy = Taxonomy.from_config(cfg["taxonomy"])
    path, media_root = paths(cfg)
    on_error = cfg.get("on_error", "raise")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    dataset = read(path)
    validate(dataset, taxonomy, on_error)
    dataset = select(dataset, taxonomy, _list(cfg.get("categories")), _list(cfg.get("tasks")),
                     cfg.get("max_train_samples"), cfg.get("max_eval_samples"), cfg.get("seed", 0))
    check_media_root(dataset, media_root, on_error)
    logger.info("loaded %s: %s", path, {split: len(rows) for split, rows in dataset.items()})
    return dataset


def read(path: str) -> datasets.DatasetDict:
    """A `save_to_disk` directory if `path` is one, else the hub dataset `path`."""
    local = Path(path).expanduser()
    if local.exists():
        try:
            dataset = datasets.load_from_disk(str(local))
        except IndexError as err:  # `datasets` fails this way on a split saved with no rows
            empty = [split.name for split in sorted(local.iterdir()) if (split / "state.json").is_file()
                     and not json.loads((split / "state.json").read_text()).get("_data_files")]
            raise SchemaError(f"data.path {path!r}: split {', '.join(map(repr, empty)) or '?'} is empty "
                              "(saved with 0 rows)") from err
    else:
        try:
            dataset = datasets.load_dataset(path)
        except Exception as err:  # offline, unknown id, ...: name the config key, keep the cause
            raise SchemaError(f"data.path {path!r} is not a local directory and could not be loaded "
                              f"from the hub ({type(err).__name__}: {err})") from err
    if not isinstance(dataset, datasets.DatasetDict):
        raise SchemaError(f"data.path {path!r} holds a single split, not a DatasetDict of splits")
    return dataset


def check_media_root(dataset: datasets.DatasetDict, media_root: Path | None, on_error: str) -> None:
    """Fail early on a wrong media root: the first media file of each split must exist."""
    for split, rows in dataset.items():
        media_rows = np.flatnonzero(np.isin(np.asarray(rows["source_type"]), ["image", "video"]))
        if not len(media_rows):
            continue
        first = rows[int(media_rows[0])]
        if not first["media_path"]:
            continue  # reported for that row when it is read
        if media_root is None:
            raise SchemaError(f"split {split!r} has {first['source_type']} rows but data.media_root is not set")
        path = media_root / first["media_path"]
        if not path.exists():
            message = (f"split {split!r}, row {first['row_index']}: media file {path} does not exist; "
                       f"is data.media_root ({media_root}) right?")
            if on_error == "raise":
                raise SchemaError(message)
            logger.warning(message)


def _with_row_index(rows: datasets.Dataset) -> datasets.Dataset:
    if "row_index" in rows.column_names:  # a column of the data file is not trusted to hold the positions
        rows = rows.remove_columns("row_index")
    return rows.add_column("row_index", np.arange(len(rows)))


def _filter_train(rows: datasets.Dataset, chosen: set[str]) -> datasets.Dataset:
    if "task" not in rows.column_names:
        logger.warning("split 'train' has no 'task' column, so it cannot be subset by category/task: "
                       "training on all of it (only the test splits are subset)")
        return rows
    keep = np.flatnonzero(np.isin(np.asarray(rows["task"]), sorted(chosen)))
    return rows.select(keep)


def _sample(rows: datasets.Dataset, n: int | None, seed: int, split: str) -> datasets.Dataset:
    """At most n random rows (in their stored order); each split gets its own stream from `seed`."""
    if n is None or n >= len(rows):
        return rows
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return rows.select(np.sort(rng.choice(len(rows), size=n, replace=False)))


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _list(value: Any) -> list[str] | None:
    """A config list, also accepting a single name or a comma-separated string from the command line."""
    if value is None:
        return None
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)
