"""Reading run directories (the layout train.py writes; README "A run directory").

    runs = load_runs(["multirun/2025-01-01/12-00-00"])
    usable, excluded = split_runs(runs)          # excluded: failed, running, missing or incomplete results
    usable, duplicates = dedupe_runs(usable)     # one adapter (a training run, its eval and resumed runs) once
    report_excluded(excluded + duplicates, out_dir)   # printed and written; never averaged silently

A run directory is any directory holding ``run_info.json`` or ``.hydra/config.yaml``. Everything here reads
files only, so reports can be rebuilt on any machine from copied run directories.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

# Override keys that never define what a sweep varies: seeds become the ± of a table, not an axis.
NON_SWEEP_KEYS = frozenset({"seed", "experiment", "checkpoint", "mode"})
# Config groups an eval run takes from the adapter it loads (run_info "adapter_config"), not from its command line.
ADAPTER_GROUPS = ("peft", "routing")
ADAPTER_WEIGHTS = Path("adapter") / "adapter_model.safetensors"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_config(path: Path) -> dict:
    """Hydra's saved config, with ${...} interpolations resolved where they can be (Hydra saves them as
    written, e.g. peft.targets: ${model.targets}); ones that need Hydra's runtime (${hydra:...}) stay text."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return yaml.safe_load(path.read_text()) or {}
    cfg = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # one unresolvable value: resolve the others one by one
        return _resolve_each(cfg, OmegaConf.to_container(cfg, resolve=False), "")


def _resolve_each(cfg: Any, node: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    if isinstance(node, dict):
        return {k: _resolve_each(cfg, v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, str) and "${" in node:
        try:
            value = OmegaConf.select(cfg, key)
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception:
            return node
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """"routing.n_gram=3" -> ("routing.n_gram", 3); "+peft.shared=false" -> ("peft.shared", False)."""
    key, _, value = text.partition("=")
    key = key.lstrip("+~")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def dotted_get(mapping: Mapping | None, key: str, default: Any = None) -> Any:
    """mapping["a"]["b"] for "a.b"; `default` when any level is missing."""
    node: Any = mapping
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


_MISSING = object()


@dataclass
class Run:
    """One run directory: its config, overrides, run_info and results; metrics are read on first use."""

    path: Path
    config: dict = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    results: dict | None = None
    load_errors: list[str] = field(default_factory=list)

    # ---- config -------------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """A dotted config key; falls back to the overrides, then to run_info for method/model/seed. An eval
        run's method and peft / routing settings are those of the adapter it evaluated (`adapter_value`)."""
        value = self.adapter_value(key)
        if value is not _MISSING:
            return value
        value = dotted_get(self.config, key, _MISSING)
        if value is not _MISSING:
            return value
        if key in self.override_dict:
            return self.override_dict[key]
        fallback = {"peft.name": "method", "model.name": "model", "seed": "seed"}.get(key)
        return self.info.get(fallback, default) if fallback else default

    def adapter_value(self, key: str) -> Any:
        """For an eval run (run_info holds the evaluated adapter's config): peft.name is the adapter's method,
        peft.* and routing.* its settings, whatever the command line said. _MISSING otherwise."""
        adapter = self.info.get("adapter_config")
        group, _, rest = key.partition(".")
        if not isinstance(adapter, Mapping) or group not in ADAPTER_GROUPS:
            return _MISSING
        if key == "peft.name":
            return self.info.get("method", _MISSING)
        return dotted_get(adapter if group == "peft" else adapter.get("routing"), rest, _MISSING)

    @cached_property
    def adapter_sha256(self) -> str | None:
        """The identity of the adapter whose scores this run holds: the sha256 an eval run recorded, else that
        of the weights file the run saved or (an eval run from before that record) of the checkpoint it names;
        None when none of these can be read."""
        recorded = self.info.get("adapter_sha256")
        if recorded:
            return str(recorded)
        source = Path(str(self.get("checkpoint"))) if self.is_eval and self.get("checkpoint") else self.path
        for weights in (source / ADAPTER_WEIGHTS, source / ADAPTER_WEIGHTS.name):
            if weights.is_file():
                return hashlib.sha256(weights.read_bytes()).hexdigest()
        return None

    @property
    def is_eval(self) -> bool:
        return self.info.get("mode", self.get("mode")) == "eval"

    @cached_property
    def override_dict(self) -> dict[str, Any]:
        return dict(parse_override(o) for o in self.overrides)

    @property
    def method(self) -> str:
        return str(self.get("peft.name", "unknown"))

    @property
    def seed(self) -> Any:
        return self.get("seed")

    @property
    def experiment(self) -> str | None:
        """The experiment name: the config's `experiment` key, else an `experiment=` override."""
        name = self.get("experiment")
        if isinstance(name, Mapping):  # an experiment group composed without a name key
            name = name.get("name")
        if name in (None, "", "null"):
            name = self.override_dict.get("experiment") or self.info.get("experiment")
        return None if name in (None, "", "null") else str(name)

    # ---- results ------------------------------------------------------------------------------------

    def scores(self, scorer: str | None = None) -> dict | None:
        """The results block of a scorer (the primary one by default): {"tasks", "categories", "overall"}."""
        if self.results is None:
            return None
        if scorer in (None, self.results.get("scorer")):
            return self.results
        return (self.results.get("other_scorers") or {}).get(scorer)

    def category_scores(self, scorer: str | None = None) -> dict[str, float]:
        """{category: score} for complete categories, and for categories whose only missing tasks were left
        out on purpose by the data subset (data.tasks / data.categories): the mean of the evaluated tasks."""
        block = self.scores(scorer) or {}
        scores = {}
        for name, cat in block.get("categories", {}).items():
            if cat.get("score") is not None:
                scores[name] = cat["score"]
            elif not self.unexpected_missing(cat) and cat.get("mean_of_present_tasks") is not None:
                scores[name] = cat["mean_of_present_tasks"]
        return scores

    def selected_tasks(self) -> set[str] | None:
        """The tasks the data config selected (data.tasks plus the tasks of data.categories); None: all."""
        tasks, categories = self.get("data.tasks"), self.get("data.categories")
        if not tasks and not categories:
            return None
        listed = {name: c.get("tasks", []) for name, c in ((self.results or {}).get("categories") or {}).items()}
        return set(tasks or []) | {t for c in (categories or []) for t in listed.get(c, [])}

    def unexpected_missing(self, category: Mapping) -> list[str]:
        """A category's missing tasks that the data config selected (an evaluation that did not happen);
        tasks outside a deliberate data subset are not counted."""
        selected = self.selected_tasks()
        return [t for t in category.get("missing", []) if selected is None or t in selected]

    def task_scores(self, scorer: str | None = None) -> dict[str, float]:
        block = self.scores(scorer) or {}
        return {name: t["score"] for name, t in block.get("tasks", {}).items()}

    def category_tasks(self, scorer: str | None = None) -> dict[str, list[str]]:
        block = self.scores(scorer) or {}
        return {name: list(c.get("tasks", [])) for name, c in block.get("categories", {}).items()}

    # ---- metrics ------------------------------------------------------------------------------------

    @cached_property
    def metrics(self) -> list[dict]:
        """metrics.jsonl as a list of dicts. A torn last line (a run killed mid-write) is skipped."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def final_metrics(self) -> dict:
        """The line marked "final": true, else the last line ({} without metrics)."""
        rows = self.metrics
        return next((r for r in reversed(rows) if r.get("final")), rows[-1] if rows else {})

    def last_metric(self, key: str) -> Any:
        """The latest logged value of a key (the final line first)."""
        final = self.final_metrics()
        if key in final:
            return final[key]
        return next((r[key] for r in reversed(self.metrics) if key in r), None)

    def layer_usage(self) -> dict[str, list[float]]:
        """Per-layer expert usage {module name: [E floats]} from the latest line that has any."""
        prefix, suffix = "routing/layers/", "/usage"
        for row in [self.final_metrics(), *reversed(self.metrics)]:
            usage = {k[len(prefix):-len(suffix)]: v for k, v in row.items()
                     if k.startswith(prefix) and k.endswith(suffix)}
            if usage:
                return usage
        return {}

    # ---- status -------------------------------------------------------------------------------------

    def problems(self, scorer: str | None = None, needs_scores: bool = True) -> list[str]:
        """Why this run cannot be averaged (empty when it can). `needs_scores=False` (the efficiency figure,
        which reads only run_info) accepts a completed run without results.json."""
        problems = list(self.load_errors)
        status = self.info.get("status")
        if not self.info and not any("run_info" in p for p in problems):
            problems.append("run_info.json missing")
        elif self.info and status != "completed":
            error = self.info.get("error")
            problems.append(f"status {status!r}" + (f": {error}" if error else ""))
        if not needs_scores:
            return problems
        if self.results is None:
            if not any("results.json" in p for p in problems):
                problems.append("results.json missing")
            return problems
        block = self.scores(scorer)
        if block is None:
            problems.append(f"no {scorer!r} scores in results.json")
            return problems
        for name, cat in block.get("categories", {}).items():
            if cat.get("score") is None and (self.unexpected_missing(cat) or not cat.get("missing")):
                missing = ", ".join(self.unexpected_missing(cat)) or "?"
                problems.append(f"category {name!r} incomplete (missing: {missing})")
        if not block.get("categories"):
            problems.append("results.json has no categories")
        return problems


def is_run_dir(path: Path) -> bool:
    return (path / "run_info.json").is_file() or (path / ".hydra" / "config.yaml").is_file()


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run directory at or below the given paths, sorted, without duplicates. Does not descend
    into a run directory (its adapter/ and predictions/ hold no runs) or into hidden directories."""
    found: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"no such run or sweep directory: {root}")
        for dirpath, dirnames, _ in os.walk(root):
            here = Path(dirpath)
            if is_run_dir(here):
                found.add(here.resolve())
                dirnames.clear()
            else:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list:
    """Sort multirun job folders 0, 1, 2, ..., 10 numerically, not as text."""
    return [int(p) if p.isdigit() else p for p in path.parts]


def load_run(path: str | Path) -> Run:
    """Read one run directory; unreadable files become `load_errors` rather than exceptions."""
    path = Path(path)
    run = Run(path=path)
    readers = {
        ".hydra/config.yaml": lambda p: setattr(run, "config", _read_config(p) or {}),
        ".hydra/overrides.yaml": lambda p: setattr(run, "overrides", list(yaml.safe_load(p.read_text()) or [])),
        "run_info.json": lambda p: setattr(run, "info", _read_json(p)),
        "results.json": lambda p: setattr(run, "results", _read_json(p)),
    }
    for name, read in readers.items():
        file = path / name
        if not file.exists():
            continue
        try:
            read(file)
        except Exception as err:  # a torn or hand-edited file: report it, keep going with the others
            run.load_errors.append(f"{name} unreadable ({type(err).__name__}: {err})")
    return run


def shown_path(path: Path) -> str:
    """A run's path as reports print it: relative to the working directory when inside it (a report rebuilt
    on another machine then reads the same), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    return [load_run(p) for p in find_run_dirs(paths)]


def split_runs(
    runs: Sequence[Run], scorer: str | None = None, needs_scores: Callable[[Run], bool] = lambda run: True
) -> tuple[list[Run], list[tuple[Run, list[str]]]]:
    """(usable runs, [(excluded run, its problems)]). `needs_scores(run)`: whether the run must have complete
    results (False for runs used only for their run_info, e.g. the efficiency figure)."""
    usable, excluded = [], []
    for run in runs:
        problems = run.problems(scorer, needs_scores(run))
        if problems:
            excluded.append((run, problems))
        else:
            usable.append(run)
    return usable, excluded


def dedupe_runs(runs: Sequence[Run]) -> tuple[list[Run], list[tuple[Run, list[str]]]]:
    """(runs with one per adapter, [(dropped run, [why])]). A training run, an eval run of its adapter and a
    resumed run that ends in the same adapter are one seed: the run that trained it from the start is kept
    (then a resumed one, then an eval run; the first in path order among equals); runs without an adapter
    identity are all kept."""
    by_adapter: dict[str, list[Run]] = {}
    for run in runs:
        if run.adapter_sha256 is not None:
            by_adapter.setdefault(run.adapter_sha256, []).append(run)
    dropped: dict[int, tuple[Run, list[str]]] = {}
    for sha, copies in by_adapter.items():
        keep, *others = sorted(copies, key=lambda r: (r.is_eval, bool(r.get("trainer.resume")), _natural_key(r.path)))
        for run in others:
            dropped[id(run)] = (run, [f"same adapter as {shown_path(keep.path)} (sha256 {sha[:12]}): "
                                      "one seed, counted once"])
    return [r for r in runs if id(r) not in dropped], list(dropped.values())


def choose_scorer(runs: Sequence[Run], requested: str | None = None) -> str | None:
    """The scorer to tabulate: the requested one, else the runs' common primary scorer, else "strict"
    (runs written with different primary scorers must not be averaged together)."""
    if requested:
        return requested
    primaries = {r.results.get("scorer") for r in runs if r.results}
    return primaries.pop() if len(primaries) == 1 else ("strict" if primaries else None)


def usable_runs(paths: Sequence[str | Path], out_dir: str | Path, scorer: str | None = None,
                needs_scores: Callable[[Run], bool] = lambda run: True,
                ) -> tuple[list[Run], list[tuple[Run, list[str]]], str | None]:
    """Where every report starts: (usable runs, excluded runs with their problems, the scorer to use). The
    excluded runs are printed and written to `out_dir` (`report_excluded`); no usable run is said."""
    runs = load_runs(paths)
    scorer = choose_scorer(runs, scorer)
    usable, excluded = split_runs(runs, scorer, needs_scores)
    usable, duplicates = dedupe_runs(usable)
    if duplicates:
        print(f"DEDUPLICATED {len(duplicates)} run(s): the same adapter as a run already counted (a seed counts "
              "once); listed below and in excluded_runs.md")
    excluded += duplicates
    report_excluded(excluded, out_dir)
    if not usable:
        print(f"No usable runs among {len(runs)} found under {', '.join(map(str, paths))}.", file=sys.stderr)
    return usable, excluded, scorer


def report_excluded(excluded: Sequence[tuple[Run, list[str]]], out_dir: str | Path | None = None,
                    echo: bool = True) -> list[Path]:
    """Print the excluded runs and write them to ``excluded_runs.md`` / ``.csv`` in `out_dir`.
    Writes the (empty) files also when nothing was excluded, so a stale list never survives a rebuild."""
    rows = [{"run": shown_path(run.path), "method": run.method, "seed": run.seed, "experiment": run.experiment,
             "status": run.info.get("status"), "reasons": "; ".join(problems)} for run, problems in excluded]
    if echo:
        if rows:
            print(f"EXCLUDED {len(rows)} run(s) (failed, unfinished, incomplete or a duplicate; not averaged):")
            for row in rows:
                print(f"  {row['run']}  [{row['method']} seed={row['seed']}]  {row['reasons']}")
        else:
            print("No runs excluded.")
    if out_dir is None:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "excluded_runs.md", out / "excluded_runs.csv"
    lines = ["# Excluded runs", "",
             "Runs left out of every mean: failed or unfinished, results.json missing, a category "
             "missing task scores, or the same adapter as a run already counted.", ""]
    if rows:
        lines += ["| run | method | seed | status | reasons |", "|---|---|---|---|---|"]
        lines += [f"| `{r['run']}` | {r['method']} | {r['seed']} | {r['status']} | {r['reasons']} |" for r in rows]
    else:
        lines.append("None.")
    md.write_text("\n".join(lines) + "\n")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "method", "seed", "experiment", "status", "reasons"])
        writer.writeheader()
        writer.writerows(rows)
    return [md, csv_path]


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value differs between the runs (seeds and bookkeeping keys left out), in the
    order they first appear on the command lines."""
    values: dict[str, set[str]] = {}
    for run in runs:
        for key, value in run.override_dict.items():
            # an eval run's peft= / routing.* on the command line do not define it: its adapter does
            overruled = "adapter_config" in run.info and key.partition(".")[0] in ADAPTER_GROUPS
            if key in NON_SWEEP_KEYS or key.startswith("hydra.") or overruled:
                continue
            values.setdefault(key, set()).add(json.dumps(value, sort_keys=True, default=str))
    return [key for key, vals in values.items() if len(vals) > 1]


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
