"""MMT-47 (docs/method.md §6): schema, split names, task taxonomy, loading and subsets.

A dataset in this format is a `DatasetDict` with a `train` split and test splits named
`{text|image|video|glue}_test_{task}`; every split has the columns `source_type` (text / image / video),
`media_path` (relative to a media root), `question` and `answer`. The built-in benchmark (`mmt_mini`) has
the same format and is read by the same `load`.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import numpy as np
from omegaconf import OmegaConf

from lime.scoring import AcceptedAnswers
from lime.settings import plain

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
        cfg = plain(cfg)
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


class AnswerError(ValueError):
    """A row's answer is not a string or a list of strings; `kind` is "empty_answer" or "bad_answer"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def answer_value(value: Any) -> str:
    """A row's `answer` as the sample's answer: a string, or a list of accepted strings.

    A string is stripped (the model is trained and scored on the answer, not on stray whitespace). A list of
    strings becomes `AcceptedAnswers`: the training target is its FIRST element, and a prediction matching any
    element is scored right; a one-element list is just that string. Anything else (None, empty strings, a
    number, a dict, a list holding a non-string) is an AnswerError; the caller names the row.
    """
    if isinstance(value, str):
        if not value.strip():
            raise AnswerError("empty_answer", "empty answer")
        return value.strip()
    if isinstance(value, list | tuple):
        if not value:
            raise AnswerError("empty_answer", "empty list of answers")
        bad = [a for a in value if not isinstance(a, str) or not a.strip()]
        if bad:
            raise AnswerError("bad_answer", f"answer list {value!r} holds {bad[0]!r}: every accepted answer must be "
                                            "a non-empty string")
        accepted = tuple(dict.fromkeys(a.strip() for a in value))
        return accepted[0] if len(accepted) == 1 else AcceptedAnswers(accepted)
    if value is None:
        raise AnswerError("empty_answer", "empty answer")
    raise AnswerError("bad_answer", f"answer must be a string or a list of strings, got {type(value).__name__} "
                                    f"{value!r}")


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


UNKNOWN_SPLITS = ("raise", "skip")


def load(cfg: Mapping) -> datasets.DatasetDict:
    """The validated, subset `DatasetDict` of a data config (data=mmt47 or data=mmt_mini)."""
    taxonomy = Taxonomy.from_config(cfg["taxonomy"])
    path, media_root = paths(cfg)
    on_error = cfg.get("on_error", "raise")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
    dataset = drop_unknown_splits(read(path), taxonomy, cfg.get("unknown_splits", "raise"))
    validate(dataset, taxonomy, on_error)
    dataset = with_train_tasks(dataset, cfg["taxonomy"])
    dataset = select(dataset, taxonomy, _list(cfg.get("categories")), _list(cfg.get("tasks")),
                     cfg.get("max_train_samples"), cfg.get("max_eval_samples"), cfg.get("seed", 0))
    check_media_root(dataset, media_root, on_error)
    logger.info("loaded %s: %s", path, {split: len(rows) for split, rows in dataset.items()})
    return dataset


def unknown_splits(names: Iterable[str], taxonomy: Taxonomy) -> list[str]:
    """Splits that are neither `train` nor `{modality}_test_{task}` for a task of the taxonomy (e.g. `validation`).

    A known task under the wrong modality is not "unknown": `validate` reports it as a schema error.
    """
    known = set(taxonomy.tasks)
    unknown = []
    for split in names:
        modality, sep, task = split.partition("_test_")
        if split != TRAIN_SPLIT and not (sep and modality in MODALITIES and task in known):
            unknown.append(split)
    return unknown


def drop_unknown_splits(dataset: datasets.DatasetDict, taxonomy: Taxonomy, policy: str) -> datasets.DatasetDict:
    """data.unknown_splits: "raise" (an error naming them) or "skip" (dropped, with a warning naming them)."""
    if policy not in UNKNOWN_SPLITS:
        raise ValueError(f"data.unknown_splits must be one of {UNKNOWN_SPLITS}, got {policy!r}")
    unknown = sorted(unknown_splits(dataset, taxonomy))
    if not unknown:
        return dataset
    message = (f"split(s) {unknown} are neither 'train' nor {{text|image|video|glue}}_test_{{task}} for a task of "
               "the taxonomy")
    if policy == "raise":
        raise SchemaError(f"{message}; set data.unknown_splits=skip to leave them out")
    logger.warning("%s: skipped (data.unknown_splits=skip)", message)
    return datasets.DatasetDict({split: rows for split, rows in dataset.items() if split not in unknown})


def read(path: str) -> datasets.DatasetDict:
    """Every split of a dataset in any of the forms a user can have:

    * a `DatasetDict.save_to_disk` directory (`dataset_dict.json` inside), as the released code reads it;
    * a local copy of the hub dataset (`hf download Kowsher/MMT-47 --repo-type dataset --local-dir DIR`):
      parquet files named `data/<split>-00000-of-00001.parquet`, `<split>.parquet` or `<split>/0000.parquet`;
    * a hub dataset id (`Kowsher/MMT-47`), loaded with `datasets.load_dataset`.
    """
    local = Path(path).expanduser()
    shards = parquet_splits(local) if local.is_dir() else {}
    if local.is_dir() and (local / "dataset_dict.json").is_file():
        try:
            dataset = datasets.load_from_disk(str(local))
        except IndexError as err:  # `datasets` fails this way on a split saved with no rows
            empty = [split.name for split in sorted(local.iterdir()) if (split / "state.json").is_file()
                     and not json.loads((split / "state.json").read_text()).get("_data_files")]
            raise SchemaError(f"data.path {path!r}: split {', '.join(map(repr, empty)) or '?'} is empty "
                              "(saved with 0 rows)") from err
    elif shards:
        files = {split: [str(file) for file in files] for split, files in shards.items()}
        dataset = datasets.load_dataset("parquet", data_files=files)
    elif local.exists():
        raise SchemaError(f"data.path {path!r} is neither a save_to_disk directory (no dataset_dict.json) nor a "
                          "folder of parquet files (a local copy of the hub dataset)")
    else:
        try:
            dataset = datasets.load_dataset(path)
        except Exception as err:  # offline, unknown id, ...: name the config key, keep the cause
            raise SchemaError(f"data.path {path!r} is not a local directory and could not be loaded "
                              f"from the hub ({type(err).__name__}: {err})") from err
    if not isinstance(dataset, datasets.DatasetDict):
        raise SchemaError(f"data.path {path!r} holds a single split, not a DatasetDict of splits")
    return dataset


_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")


def parquet_splits(root: Path) -> dict[str, list[Path]]:
    """split -> its parquet shards under `root` (hidden folders, e.g. `.cache/huggingface`, left out).

    The split is the file name before `-NNNNN-of-NNNNN` (the hub's layout), else the parent folder of a numbered
    file (`<split>/0000.parquet`, the hub's parquet conversion), else the file name itself.
    """
    found: dict[str, list[Path]] = {}
    for file in sorted(root.rglob("*.parquet")):
        if any(part.startswith(".") for part in file.relative_to(root).parts):
            continue
        shard = _SHARD.match(file.stem)
        if shard:
            split = shard.group("split")
        elif file.stem.isdigit() and file.parent != root:
            split = file.parent.name
        else:
            split = file.stem
        found.setdefault(split, []).append(file)
    return found


class TaskRules:
    """How to tell a training row's task when the train split has no `task` column (the released MMT-47's has
    none): `train_tasks` of a taxonomy config, per task a list of rules, each a mapping column -> regex.

        train_tasks:
          sst2: [{question: "^Classify the sentiment"}]
          okvqa: [{source_type: "^image$", media_path: "^images/okvqa/"}]

    A row matches a rule when every regex of the rule is found in its column (`re.search`), and a task when it
    matches any of the task's rules. Every training row must match exactly one task (`assign_tasks`).
    """

    def __init__(self, rules: Mapping[str, Iterable[Mapping[str, str]]], taxonomy: Taxonomy) -> None:
        self.rules: dict[str, list[dict[str, re.Pattern]]] = {}
        for task, task_rules in rules.items():
            if task not in taxonomy.tasks:
                raise SchemaError(f"taxonomy.train_tasks: {task!r} is not a task of the taxonomy")
            self.rules[task] = [self._compile(task, rule) for rule in task_rules]

    @staticmethod
    def _compile(task: str, rule: Mapping[str, str]) -> dict[str, re.Pattern]:
        if not rule:
            raise SchemaError(f"taxonomy.train_tasks.{task}: an empty rule would match every row")
        compiled = {}
        for column, pattern in rule.items():
            if column not in REQUIRED_COLUMNS:
                raise SchemaError(f"taxonomy.train_tasks.{task}: {column!r} is not one of the columns "
                                  f"{REQUIRED_COLUMNS}")
            try:
                compiled[column] = re.compile(str(pattern))
            except re.error as err:
                raise SchemaError(f"taxonomy.train_tasks.{task}.{column}: bad regex {pattern!r} ({err})") from err
        return compiled

    @classmethod
    def from_config(cls, taxonomy_cfg: Mapping) -> TaskRules | None:
        cfg = plain(taxonomy_cfg)
        rules = cfg.get("train_tasks")
        return cls(rules, Taxonomy.from_config(cfg)) if rules else None

    def matches(self, row: Mapping[str, Any]) -> list[str]:
        return [task for task, rules in self.rules.items()
                if any(all(p.search(str(row[c] or "")) for c, p in rule.items()) for rule in rules)]


def assign_tasks(rows: datasets.Dataset, rules: TaskRules, split: str = TRAIN_SPLIT) -> list[str]:
    """The task of every row; a SchemaError naming the rows (their `row_index`) that match no task or several."""
    columns = sorted({column for task_rules in rules.rules.values() for rule in task_rules for column in rule})
    values = {column: rows[column] for column in columns}
    indices = rows["row_index"] if "row_index" in rows.column_names else range(len(rows))
    tasks, unmatched, ambiguous = [], [], []
    for i, index in enumerate(indices):
        row = {column: values[column][i] for column in columns}
        found = rules.matches(row)
        if len(found) == 1:
            tasks.append(found[0])
            continue
        (unmatched if not found else ambiguous).append((index, found, row))
        tasks.append("")
    if unmatched or ambiguous:
        def examples(bad):
            return "; ".join(f"row {index} {found or ''} {row}" for index, found, row in bad[:3])
        problems = []
        if unmatched:
            problems.append(f"{len(unmatched)} row(s) match no task (e.g. {examples(unmatched)})")
        if ambiguous:
            problems.append(f"{len(ambiguous)} row(s) match several tasks (e.g. {examples(ambiguous)})")
        raise SchemaError(f"split {split!r}: taxonomy.train_tasks must give every row exactly one task: "
                          + "; ".join(problems))
    return tasks


def with_train_tasks(dataset: datasets.DatasetDict, taxonomy_cfg: Mapping) -> datasets.DatasetDict:
    """Add a `task` column to a train split that has none, from the taxonomy's `train_tasks` rules (if any);
    prints and logs the number of rows per task."""
    rules = TaskRules.from_config(taxonomy_cfg)
    train = dataset.get(TRAIN_SPLIT)
    if rules is None or train is None or "task" in train.column_names:
        return dataset
    tasks = assign_tasks(train, rules)
    counts = train_task_counts(tasks)
    message = f"train split: tasks assigned from taxonomy.train_tasks, rows per task: {counts}"
    print(message)
    logger.info(message)
    return datasets.DatasetDict({**dataset, TRAIN_SPLIT: train.add_column("task", tasks)})


def train_task_counts(tasks: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task] = counts.get(task, 0) + 1
    return dict(sorted(counts.items()))


def write_train_tasks(rows: datasets.Dataset, run_dir: Path) -> Path | None:
    """<run_dir>/train_tasks.json: rows per task of the training split as used (after subsetting/sampling)."""
    if "task" not in rows.column_names:
        return None
    path = Path(run_dir) / "train_tasks.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(train_task_counts(rows["task"]), indent=2) + "\n")
    return path


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
    """The training rows of the chosen tasks; a subset that cannot be honoured is refused, never ignored."""
    if "task" not in rows.column_names:
        raise SchemaError("data.categories / data.tasks: the train split has no 'task' column and the taxonomy "
                          "has no train_tasks rules to assign one, so it cannot be subset; add rules to "
                          "data.taxonomy.train_tasks (see configs/data/taxonomy/mmt_mini.yaml) or train on all tasks")
    keep = np.flatnonzero(np.isin(np.asarray(rows["task"]), sorted(chosen)))
    missing = sorted(set(chosen) - set(np.asarray(rows["task"])[keep].tolist()))
    if missing:
        raise SchemaError(f"data.categories / data.tasks: task(s) {missing} have no training rows")
    return rows.select(keep)


def _sample(rows: datasets.Dataset, n: int | None, seed: int, split: str) -> datasets.Dataset:
    """At most n random rows (in their stored order); each split gets its own stream from `seed`."""
    if n is None or n >= len(rows):
        return rows
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return rows.select(np.sort(rng.choice(len(rows), size=n, replace=False)))


def _list(value: Any) -> list[str] | None:
    """A config list, also accepting a single name or a comma-separated string from the command line."""
    if value is None:
        return None
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)
