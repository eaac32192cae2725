"""Representation analyses of trained runs: linear probes by n-gram position, PCA, t-SNE, CKA between runs.

    python scripts/analyze.py outputs/2025-01-01/12-00-00                      # -> <run>/analysis/
    python scripts/analyze.py RUN_LIME RUN_LORA --out analysis/ --max-samples 50 --modules 'layers\\.(20|23)\\.'

Each run's adapter is loaded onto the model its .hydra/config.yaml names, the prompts of its test splits are
run through it, and forward hooks pool each adapted language-model layer's output (and a LiME layer's routing
weights) per sample (lime.report.representations). Written per run, as figures (PNG + PDF) and their data:

    probe_by_position.csv|png   held-out accuracy of a linear probe predicting the task from the routing weights
                                and from the modulated representation at each position of the n-gram window
    pca.csv|json|png            the first principal components of the modulated representation, by task
    tsne.csv|png                t-SNE of the same representation, by task
    tsne_routing.csv|png        t-SNE of the routing weights of every (sample, LiME layer) pair, coloured by the
                                dominant expert (Fig. 11; at most --tsne-max-points, a seeded subsample)
and, with two or more runs, in --out:
    cka.csv|png                 linear CKA between the runs' representations at each layer they share

The math is lime.report.analysis. Probes, PCA and t-SNE by task cover a few layers (--plot-modules, default the
first, middle and last recorded; a probe is k fits per position and feature); CKA and Fig. 11 cover every
recorded layer (--modules).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from omegaconf import OmegaConf

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import lime  # noqa: E402
from lime import run as lime_run  # noqa: E402
from lime.checkpoint import config_from_meta, read_adapter_config  # noqa: E402
from lime.data import dataset as data  # noqa: E402
from lime.data.mmt47 import Taxonomy  # noqa: E402
from lime.report import analysis  # noqa: E402
from lime.report.plotting import save_figure  # noqa: E402
from lime.report.representations import Representations, record  # noqa: E402
from lime.report.tables import write_csv  # noqa: E402
from lime.settings import plain, settings  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with .hydra/config.yaml and adapter/)")
    parser.add_argument("--out", type=Path, help="output directory (default: <run>/analysis for one run, "
                        "else <first run>/../analysis); runs get subdirectories when there are several")
    parser.add_argument("--max-samples", type=int, default=None, help="test samples per split (seeded)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--modules", default=None, help="regex on the adapted layers' names to record")
    parser.add_argument("--plot-modules", default=None, help="regex of the layers to plot (default: first, "
                        "middle and last recorded)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds of the probes")
    parser.add_argument("--perplexity", type=float, default=30.0)
    parser.add_argument("--tsne-iterations", type=int, default=1000)
    parser.add_argument("--tsne-max-points", type=int, default=2000, help="exact t-SNE is O(N^2)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def load_run(run_dir: Path, device: str, max_samples: int | None):
    """(config, model with the run's adapter, processor, test splits, split -> task) of a run directory."""
    config_path = run_dir / ".hydra" / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not a run directory of train.py (no .hydra/config.yaml)")
    cfg = plain(OmegaConf.load(config_path))
    cfg["trainer"]["device"] = device
    if max_samples is not None:
        cfg["data"]["max_eval_samples"] = max_samples
    adapter = lime_run.adapter_dir(run_dir)
    checked = settings(cfg)
    checked.lime = config_from_meta(read_adapter_config(adapter))
    model, processor = lime_run.build_model(checked)
    lime.load_adapter(model, adapter)
    model.eval()
    splits = data.build(checked.data)
    splits.pop("train", None)
    taxonomy = Taxonomy.from_config(cfg["data"]["taxonomy"])
    return cfg, model, processor, splits, {split: taxonomy.split_info(split).task for split in splits}


def represent(run_dir: Path, args: argparse.Namespace) -> Representations:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, model, processor, splits, tasks = load_run(run_dir, device, args.max_samples)
    n_gram = model.lime_config.routing.n_gram
    reps = record(model, processor, splits, tasks, n_gram, args.batch_size, args.modules)
    del model
    return reps


def plotted_modules(names: Sequence[str], pattern: str | None) -> list[str]:
    if pattern:
        import re

        chosen = [name for name in names if re.search(pattern, name)]
        if not chosen:
            raise ValueError(f"--plot-modules {pattern!r} matches none of the recorded layers {list(names)}")
        return chosen
    return list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))


def task_codes(tasks: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    names = sorted(set(tasks))
    return np.array([names.index(task) for task in tasks]), names


def probes(reps: Representations, modules: list[str], folds: int, seed: int) -> list[dict]:
    """Held-out probe accuracy per layer of `modules`, feature and n-gram position."""
    labels, names = task_codes(reps.tasks)
    rows = []
    features = {"representation": reps.output_by_position, "routing": reps.routing_by_position}
    for feature, arrays in features.items():
        for module in (m for m in modules if m in arrays):
            values = arrays[module]
            for position in range(reps.n_gram):
                accuracy = analysis.probe_accuracy(values[:, position], labels, folds, seed)
                rows.append({"module": module, "feature": feature, "position": position + 1,
                             "accuracy": round(accuracy, 4), "chance": round(1 / len(names), 4),
                             "samples": len(labels), "tasks": len(names)})
    return rows


def plot_probes(rows: list[dict], modules: list[str], out: Path) -> list[Path]:
    features = sorted({row["feature"] for row in rows})
    fig, axes = plt.subplots(1, len(features), figsize=(5 * len(features), 4), squeeze=False)
    for ax, feature in zip(axes[0], features, strict=True):
        for module in modules:
            points = [(r["position"], r["accuracy"]) for r in rows if r["module"] == module and r["feature"] == feature]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=module)
        ax.axhline(rows[0]["chance"], color="grey", linestyle=":", label="chance")
        ax.set(title=f"probe on the {feature}", xlabel="position in the n-gram window", ylabel="task accuracy",
               ylim=(0, 1.05), xticks=sorted({r["position"] for r in rows}))  # positions are whole numbers
        ax.legend(fontsize=7)
    return save_figure(fig, out, "probe_by_position")


def scatter(coords: dict[str, np.ndarray], tasks: Sequence[str], title: str, out: Path, name: str) -> list[Path]:
    labels, names = task_codes(tasks)
    fig, axes = plt.subplots(1, len(coords), figsize=(5 * len(coords), 4.5), squeeze=False)
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for ax, (module, xy) in zip(axes[0], coords.items(), strict=True):
        for code, task in enumerate(names):
            points = xy[labels == code]
            ax.scatter(points[:, 0], points[:, 1], s=10, color=colours(code % colours.N), label=task)
        ax.set(title=f"{title}: {module}", xticks=[], yticks=[])
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 + len(names) // 25)
    return save_figure(fig, out, name)


def embeddings(reps: Representations, modules: list[str], args: argparse.Namespace, out: Path) -> list[Path]:
    """PCA and t-SNE of the pooled layer outputs: CSV of coordinates, explained variance, figures."""
    pcas = {module: analysis.pca(reps.output[module], 2) for module in modules}
    tsnes = {module: analysis.tsne(reps.output[module], 2, args.perplexity, args.tsne_iterations, args.seed)
             for module in modules}
    for kind, coords in (("pca", {m: p.scores for m, p in pcas.items()}), ("tsne", tsnes)):
        records = [{"module": module, "sample": sample, "task": task, "x": float(xy[0]), "y": float(xy[1])}
                   for module, points in coords.items()
                   for sample, task, xy in zip(reps.ids, reps.tasks, points, strict=True)]
        write_csv(out / f"{kind}.csv", ["module", "sample", "task", "x", "y"], records)
    (out / "pca.json").write_text(json.dumps(
        {m: {"explained_variance_ratio": p.explained_variance_ratio.round(6).tolist()} for m, p in pcas.items()},
        indent=2) + "\n")
    return [*scatter({m: p.scores for m, p in pcas.items()}, reps.tasks, "PCA", out, "pca"),
            *scatter(tsnes, reps.tasks, "t-SNE", out, "tsne")]


def routing_tsne(reps: Representations, args: argparse.Namespace, out: Path) -> list[Path]:
    """Fig. 11: each point one sample's mean routing weights at one LiME layer, coloured by its dominant expert."""
    if not reps.routing_by_position:
        return []
    names = list(reps.routing_by_position)
    weights = np.concatenate([reps.routing_by_position[m].mean(axis=1) for m in names])  # (layers * N, E)
    layer = np.repeat(names, len(reps.ids))
    sample = np.tile(reps.ids, len(names))
    keep = np.arange(len(weights))
    if len(keep) > args.tsne_max_points:
        keep = np.sort(np.random.default_rng(args.seed).choice(len(keep), args.tsne_max_points, replace=False))
    xy = analysis.tsne(weights[keep], 2, args.perplexity, args.tsne_iterations, args.seed)
    dominant = weights[keep].argmax(axis=1)
    records = [{"module": layer[i], "sample": sample[i], "dominant_expert": int(e), "x": float(p[0]),
                "y": float(p[1])} for i, e, p in zip(keep, dominant, xy, strict=True)]
    write_csv(out / "tsne_routing.csv", list(records[0]), records)
    experts = [f"expert {e}" for e in dominant]
    return [out / "tsne_routing.csv",
            *scatter({f"{len(names)} layers": xy}, experts, "t-SNE of routing weights", out, "tsne_routing")]


def analyze_run(reps: Representations, args: argparse.Namespace, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    modules = plotted_modules(list(reps.output), args.plot_modules)
    rows = probes(reps, modules, args.folds, args.seed)
    write_csv(out / "probe_by_position.csv", list(rows[0]), rows)
    paths = [out / "probe_by_position.csv", *plot_probes(rows, modules, out)]
    paths += [out / "pca.csv", out / "pca.json", out / "tsne.csv", *embeddings(reps, modules, args, out)]
    return paths + routing_tsne(reps, args, out)


def cka_rows(runs: dict[str, Representations]) -> list[dict]:
    """Linear CKA of every pair of runs at every layer both recorded, over the samples both saw."""
    rows = []
    for (name_a, a), (name_b, b) in itertools.combinations(runs.items(), 2):
        shared = [sample for sample in a.ids if sample in set(b.ids)]
        if len(shared) < 2:
            raise ValueError(f"runs {name_a} and {name_b} share {len(shared)} test samples: nothing to compare")
        a_s, b_s = a.aligned(shared), b.aligned(shared)
        for module in (m for m in a.output if m in b.output):
            rows.append({"run_a": name_a, "run_b": name_b, "module": module, "samples": len(shared),
                         "cka": round(analysis.linear_cka(a_s.output[module], b_s.output[module]), 6)})
    return rows


def plot_cka(rows: list[dict], out: Path) -> list[Path]:
    pairs = list(dict.fromkeys(f"{r['run_a']} vs {r['run_b']}" for r in rows))
    modules = list(dict.fromkeys(r["module"] for r in rows))
    grid = np.full((len(pairs), len(modules)), np.nan)
    for r in rows:
        grid[pairs.index(f"{r['run_a']} vs {r['run_b']}"), modules.index(r["module"])] = r["cka"]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(modules) + 3), 0.5 * len(pairs) + 2.5))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(modules)), modules, rotation=90, fontsize=6)
    ax.set_yticks(range(len(pairs)), pairs, fontsize=8)
    ax.set_title("linear CKA between runs")
    fig.colorbar(image, ax=ax)
    return save_figure(fig, out, "cka")


def run_names(runs: Sequence[Path]) -> list[str]:
    """Each run's directory name, with its parent's where two would clash."""
    names = [run.resolve().name for run in runs]
    if len(set(names)) < len(names):
        names = [f"{run.resolve().parent.name}_{run.resolve().name}" for run in runs]
    if len(set(names)) < len(names):
        names = [f"{i}_{name}" for i, name in enumerate(names)]
    return names


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    names = run_names(args.runs)
    single = len(args.runs) == 1
    out = args.out or (args.runs[0] / "analysis" if single else args.runs[0].resolve().parent / "analysis")
    reps, paths = {}, []
    for name, run_dir in zip(names, args.runs, strict=True):
        reps[name] = represent(run_dir, args)
        paths += analyze_run(reps[name], args, out if single else out / name)
    if not single:
        rows = cka_rows(reps)
        write_csv(out / "cka.csv", ["run_a", "run_b", "module", "samples", "cka"], rows)
        paths += [out / "cka.csv", *plot_cka(rows, out)]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
