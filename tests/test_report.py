"""Tables and figures from run directories (lime/report, scripts/make_tables.py, scripts/make_figures.py).

The fixture run directories are written the way train.py writes them: .hydra/config.yaml and overrides.yaml,
run_info.json, metrics.jsonl and results.json / results.csv through lime.results.write_results.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml

from lime.report import paper as paper_numbers
from lime.report.runs import find_run_dirs, load_runs, split_runs, swept_keys
from lime.report.tables import build_rows, format_params
from lime.results import write_results
from tests.scripts import load_script

# The 7 categories as the data config names them (configs/data/taxonomy/mmt47.yaml), two tasks each.
CATEGORIES = {
    "Vision Benchmark": ["chartqa", "okvqa"],
    "Image Classification": ["eurosat", "svhn"],
    "Commonsense": ["boolq", "piqa"],
    "GLUE": ["sst2", "stsb"],
    "Action Understanding": ["action_count", "action_sequence"],
    "Object Motion & Spatial": ["moving_count", "state_change"],
    "High-Level Reasoning": ["scene_transition", "character_order"],
}
ABLATION_CATEGORIES = {"GLUE": ["sst2", "qnli", "cola"], "Vision Benchmark": ["chartqa", "okvqa"]}
METHODS = {"lime_lora": 3_490_000, "moe_lora": 10_790_000, "lora": 1_740_000}
TRAIN_TIME_S = {"lime_lora": 1890.0, "moe_lora": 2460.0, "lime_dora": 2130.0, "lora": 1700.0}
LAYERS = [f"model.language_model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]


make_tables = load_script("make_tables")
make_figures = load_script("make_figures")


def score(method: str, seed: int, task: str) -> float:
    """A deterministic, distinct score for every (method, seed, task)."""
    base = {"lime_lora": 80.0, "moe_lora": 78.0, "lora": 75.0}.get(method, 70.0)
    return base + 3.0 * seed + (sum(map(ord, task)) % 11) * 0.7


def make_run(path: Path, *, method: str = "lime_lora", seed: int = 0, experiment: str | None = "table2",
             overrides: list[str] = (), categories: dict | None = None, scores: dict | None = None,
             status: str = "completed", config: dict | None = None, metrics: list[dict] | None = None,
             info: dict | None = None) -> Path:
    """One run directory in train.py's layout. `scores` None: no results.json (a failed run)."""
    cfg = {
        "model": {"name": "llava_ov_0.5b", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
                  "architecture": {"text_config": {"num_hidden_layers": 24}}},
        "peft": {"name": method, "method": method.split("_")[0], "variant": "lora", "num_experts": 4, "rank": 2,
                 "shared": True, "targets": "${model.targets}", "layer_indices": None, "expert_init_sigma": 0.1},
        "routing": {"router": "zero_param", "gamma_routing": 0.7, "temperature": 0.5, "n_gram": 1,
                    "selection": "auto", "top_k": 2, "channels": "leading"},
        "trainer": {"balance": {"scale": 1.0, "importance": 0.1, "kl": 0.01}},
        "data": {"name": "mmt47"}, "seed": seed, "experiment": experiment,
    }
    for override in overrides:  # what Hydra does: a key's value lands in the composed config
        key, _, value = override.partition("=")
        if "." not in key:
            continue  # a config group choice ("peft=lora"): its name is already in cfg
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    for key, value in (config or {}).items():
        cfg[key] = value
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    seconds = TRAIN_TIME_S.get(method, 1800.0) + 60 * seed
    run_info = {
        "status": status, "error": None if status == "completed" else "CUDA out of memory", "method": method,
        "model": "llava_ov_0.5b", "seed": seed, "trainable_params": METHODS.get(method, 500_000),
        "total_params": 893_675_552 + METHODS.get(method, 500_000), "train_time_s": seconds,
        "train_samples": 7000, "train_samples_per_s": 7000 / seconds,
        "peak_memory_bytes": int((3.9 + seconds / 1e5) * 2**30), "device": "NVIDIA H100", "versions": {"torch": "2.5"},
        "started": "2025-01-01T00:00:00", "finished": "2025-01-01T00:30:00", **(info or {}),
    }
    (path / "run_info.json").write_text(json.dumps(run_info))
    if metrics is not None:
        (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if scores is not None:
        per_task = {t: {"score": s, "samples": 50, "failures": 0} for t, s in scores.items()}
        write_results(path, per_task, categories or CATEGORIES, scorer="strict")
    return path


def all_scores(method: str, seed: int, categories: dict) -> dict[str, float]:
    return {t: score(method, seed, t) for tasks in categories.values() for t in tasks}


def usage_metrics(skew: float) -> list[dict]:
    """Two logging steps; the final one with per-layer usage (skewed towards expert 1 by `skew`)."""
    usage = [0.25 + 0.75 * skew, *([0.25 - 0.25 * skew] * 3)]
    line = {"step": 10, "epoch": 1.0, "loss": 1.2, "lr": 1e-4, "balance_loss": 0.01, "routing/entropy": 1.2 - skew,
            "routing/experts_per_token": 1.5, "routing/usage": usage, "routing/load": usage}
    layers = {f"routing/layers/{name}/usage": usage for name in LAYERS}
    return [{**line, "step": 5, "loss": 2.0}, {**line, **layers, "final": True}]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    table = root / "multirun" / "2025-01-01" / "10-00-00"
    job = 0
    for method in METHODS:
        for seed in (0, 1):
            make_run(table / str(job), method=method, seed=seed, overrides=[f"peft={method}"],
                     scores=all_scores(method, seed, CATEGORIES))
            job += 1
    # A failed run and a run whose Commonsense category lacks a task: both reported, neither averaged.
    make_run(table / str(job), method="lime_lora", seed=2, status="failed", scores=None)
    scores = all_scores("lime_lora", 3, CATEGORIES)
    scores.pop("piqa")
    make_run(table / str(job + 1), method="lime_lora", seed=3, scores={t: 0.0 for t in scores})

    efficiency = root / "multirun" / "2025-01-02" / "10-00-00"
    for job, (method, seed) in enumerate((m, s) for m in ("lime_lora", "moe_lora", "lime_dora") for s in (0, 1)):
        make_run(efficiency / str(job), method=method, seed=seed, experiment="efficiency", scores=None)

    ngram = root / "multirun" / "2025-01-03" / "10-00-00"
    for job, (n, seed) in enumerate((n, s) for n in (1, 2, 3) for s in (0, 1)):
        scores = {t: score("lime_lora", seed, t) + n for t in sum(ABLATION_CATEGORIES.values(), [])}
        make_run(ngram / str(job), seed=seed, experiment="ablation_ngram", overrides=[f"routing.n_gram={n}"],
                 categories=ABLATION_CATEGORIES, scores=scores, metrics=usage_metrics(0.2 * n))

    # No experiment name: the panel comes from the swept override key.
    temperature = root / "multirun" / "2025-01-04" / "10-00-00"
    for job, t in enumerate((0.25, 0.5, 1.0)):
        make_run(temperature / str(job), experiment=None, overrides=[f"routing.temperature={t}"],
                 categories=ABLATION_CATEGORIES, scores=all_scores("lime_lora", job, ABLATION_CATEGORIES),
                 metrics=usage_metrics(t / 2))
    return {"root": root, "table": table, "efficiency": efficiency, "ngram": ngram, "temperature": temperature}


# --------------------------------------------------------------------------------------------------------
# Reading run directories
# --------------------------------------------------------------------------------------------------------


def test_find_and_classify_runs(sweeps):
    dirs = find_run_dirs([sweeps["table"]])
    assert [d.name for d in dirs] == [str(i) for i in range(8)]  # numeric job order, .hydra not a run
    runs = load_runs([sweeps["table"]])
    usable, excluded = split_runs(runs)
    assert len(usable) == 6
    reasons = {run.path.name: " ".join(problems) for run, problems in excluded}
    assert set(reasons) == {"6", "7"}
    assert "failed" in reasons["6"] and "results.json missing" in reasons["6"]
    assert "Commonsense" in reasons["7"] and "piqa" in reasons["7"]
    run = usable[0]
    assert run.get("peft.targets") == ["q_proj", "k_proj", "v_proj", "o_proj"]  # ${model.targets} resolved
    assert run.experiment == "table2" and run.seed == 0


def test_metrics_and_swept_keys(sweeps, tmp_path):
    runs = load_runs([sweeps["ngram"]])
    assert swept_keys(runs) == ["routing.n_gram"]
    assert set(runs[0].layer_usage()) == set(LAYERS)
    assert runs[0].final_metrics()["final"] is True
    # A run killed mid-write leaves a torn last line: it is skipped, the rest is read.
    torn = make_run(tmp_path / "torn", metrics=usage_metrics(0.1), scores=None)
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "loss"')
    assert len(load_runs([torn])[0].metrics) == 2


def test_category_order_and_names():
    ours = ["High-Level Reasoning", "GLUE", "Zeta", "Commonsense", "Vision Benchmark", "Alpha"]
    assert paper_numbers.order_categories(ours) == [
        "Vision Benchmark", "Commonsense", "GLUE", "High-Level Reasoning", "Alpha", "Zeta"]
    assert paper_numbers.match_name("vizwiz_vqa", ["OK-VQA", "VizWiz"]) == "VizWiz"
    assert paper_numbers.match_name("stsb", ["STS-B", "SST-2"]) == "STS-B"
    assert paper_numbers.method_label("lime_lora_fa") == "LiMELoRAFA"


# --------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------


def _expected(method: str, category: str) -> tuple[float, float]:
    values = [statistics.fmean(score(method, seed, t) for t in CATEGORIES[category]) for seed in (0, 1)]
    return statistics.fmean(values), statistics.stdev(values)


def _markdown_table(text: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("|---")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [re.sub(r"[*]", "", c).strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return header, rows


def test_tables_means_stds_and_exclusions(sweeps, tmp_path, capsys):
    out = tmp_path / "tables"
    make_tables.main([str(sweeps["table"]), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "EXCLUDED 2 run(s)" in printed and str(sweeps["table"] / "6") in printed
    excluded = (out / "excluded_runs.md").read_text()
    assert str(sweeps["table"] / "6") in excluded and str(sweeps["table"] / "7") in excluded

    with open(out / "table2.csv") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(METHODS)
    header, md_rows = _markdown_table((out / "table2.md").read_text())
    assert header[:4] == ["Method", "n", "#TTP", "Vision Benchmark"]
    assert header[5] == "Commonsense" and header[7] == "High-Level Reasoning"  # paper column order
    latex = (out / "table2.tex").read_text()
    for method in METHODS:
        row = rows[method]
        assert row["n"] == "2"  # the incomplete and failed lime_lora seeds are not averaged
        label = paper_numbers.method_label(method)
        for category in CATEGORIES:
            mean, std = _expected(method, category)
            assert float(row[f"{category} mean"]) == pytest.approx(mean)
            assert float(row[f"{category} std"]) == pytest.approx(std)
            assert md_rows[label][header.index(category)] == f"{mean:.2f} ± {std:.2f}"
            assert f"{mean:.2f} \\pm {std:.2f}" in latex
    assert md_rows["LiMELoRA"][2] == "3.49M"
    assert r"Object Motion \& Spatial" in latex and r"\toprule" in latex
    with open(out / "table2_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_tables_paper_rows(sweeps, tmp_path):
    out = tmp_path / "paper"
    make_tables.main([str(sweeps["table"]), "--out", str(out), "--paper"])
    header, rows = _markdown_table((out / "table2.md").read_text())
    paper_row = rows["LiMELoRA (paper)"]
    assert paper_row[header.index("Commonsense")] == "84.98 ± 0.86"  # "Commonsense Reasoning" in the paper
    assert paper_row[header.index("High-Level Reasoning")] == "45.00 ± 1.86"
    assert paper_row[2] == "3.49M"
    labels = list(rows)
    assert labels.index("LiMELoRA (paper)") == labels.index("LiMELoRA") + 1  # beside ours
    assert "MoCLE (paper)" not in rows  # only the methods we ran
    with open(out / "table2.csv") as f:
        sources = {(r["group"], r["source"]): r for r in csv.DictReader(f)}
    assert float(sources[("moe_lora", "paper")]["GLUE mean"]) == 91.21
    assert r"\textit{LiMELoRA (paper)}" in (out / "table2.tex").read_text()


@pytest.mark.parametrize("group_by", [[], ["--group-by", "peft.name,routing.n_gram"]])
def test_group_by_sweep_key(sweeps, tmp_path, group_by):
    """An explicit second key, or the swept key added automatically: n-gram settings are never pooled."""
    make_tables.main([str(sweeps["ngram"]), "--out", str(tmp_path), *group_by])
    with open(tmp_path / "table2.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["group"] for r in rows] == ["lime_lora,1", "lime_lora,2", "lime_lora,3"]
    assert [r["n"] for r in rows] == ["2", "2", "2"]
    assert rows[0]["method"] == "LiMELoRA, n_gram=1"


def test_a_list_valued_sweep_key_groups_and_labels_its_values(tmp_path):
    """ablation_layers / ablation_targets sweep lists (peft.layer_indices, peft.targets)."""
    for job, (value, seed) in enumerate((v, s) for v in ("[20,21]", "null") for s in (0, 1)):
        make_run(tmp_path / "runs" / str(job), seed=seed, experiment="ablation_layers",
                 overrides=[f"peft.layer_indices={value}"], scores=all_scores("lime_lora", seed, CATEGORIES))
    make_tables.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    with open(tmp_path / "out" / "table2.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["n"]) for r in rows] == [
        ("LiMELoRA, layer_indices=[20, 21]", "2"), ("LiMELoRA, layer_indices=None", "2")]


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def low_dpi(monkeypatch):
    """Smaller PNGs: the tests check that files are written, not their resolution."""
    from lime.report import plotting

    monkeypatch.setattr(plotting, "PNG_DPI", 60)


@pytest.mark.slow
def test_figures_for_each_panel(sweeps, tmp_path, low_dpi):
    out = tmp_path / "figures"
    paths = make_figures.main([str(sweeps["root"]), "--out", str(out), "--paper"])
    expected = {
        "efficiency_time_throughput", "efficiency_memory", "efficiency_params",  # no results.json needed
        "efficiency_relative", "efficiency",  # efficiency.md / .csv: the plotted numbers
        "ablation_ngram", "ablation_ngram_entropy", "ablation_ngram_usage",
        "ablation_temperature", "ablation_temperature_entropy", "ablation_temperature_usage",
    }
    assert {p.stem for p in paths} == expected
    assert "| LiMELoRA | 2 | " in (out / "efficiency.md").read_text()
    for stem in expected - {"efficiency"}:
        png, pdf = out / f"{stem}.png", out / f"{stem}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert "6" in (out / "excluded_runs.md").read_text()  # the failed table2 run is still reported


def test_layer_matrix_groups_modules_by_block():
    from lime.report.ablations import layer_matrix

    usage = {name: [1.0, 0.0] if ".1." in name else [0.0, 1.0] for name in LAYERS}
    usage["model.vision_tower.encoder.layers.0.self_attn.out_proj"] = [0.5, 0.5]
    labels, matrix = layer_matrix(usage)
    assert labels == ["LM 0", "LM 1", "LM 2", "LM 3", "vision 0"]
    assert matrix.shape == (5, 2) and matrix[1].tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------------------------------------
# The paper numbers file
# --------------------------------------------------------------------------------------------------------

# Table 2 exactly as in docs/paper_numbers.md (bold / underline marks removed).
TABLE2 = """
PromptTuning | 0.07M | 72.63±2.24 | 50.22±0.96 | 77.50±1.53 | 71.91±1.35 | 15.86±2.29 | 14.51±2.64 | 15.86±2.42
LoRA | 1.74M | 77.02±1.59 | 93.92±0.56 | 83.80±1.27 | 90.64±0.97 | 43.23±1.88 | 62.85±2.19 | 50.99±1.96
DoRA | 2.09M | 76.35±1.62 | 93.35±0.68 | 83.53±1.01 | 90.37±0.99 | 42.56±1.88 | 62.14±2.13 | 50.41±2.07
LoRA-FA | 0.70M | 76.31±1.62 | 93.50±0.55 | 83.45±1.11 | 90.31±0.81 | 42.47±1.94 | 61.97±2.17 | 50.30±2.07
SliceFine | 1.74M | 77.06±1.53 | 93.98±0.53 | 83.84±1.22 | 90.54±0.97 | 43.30±1.86 | 62.91±2.12 | 51.06±1.94
MoCLE | 5.92M | 77.59±1.39 | 94.25±0.42 | 84.18±1.03 | 90.66±0.85 | 43.78±1.87 | 63.43±2.10 | 51.53±1.94
MoELoRA | 10.79M | 77.27±1.41 | 93.97±0.57 | 84.08±1.06 | 91.21±0.87 | 43.84±1.89 | 63.07±1.95 | 51.13±2.00
MixLoRA | 3.83M | 77.08±1.30 | 93.25±0.60 | 83.27±0.99 | 90.50±0.86 | 43.86±1.91 | 63.54±2.04 | 51.70±1.88
HydraLoRA | 5.92M | 78.11±1.45 | 94.58±0.52 | 84.43±1.03 | 91.05±0.88 | 45.79±1.92 | 64.95±2.07 | 53.28±2.01
MoLA | 9.04M | 77.10±1.48 | 94.74±0.54 | 84.07±0.96 | 90.88±0.94 | 42.97±1.90 | 62.74±2.08 | 50.97±1.99
MoRe | 3.59M | 77.98±1.30 | 93.84±0.57 | 84.44±1.09 | 90.74±0.97 | 45.58±1.95 | 64.95±2.06 | 53.48±1.98
MoEDoRA | 12.19M | 78.07±1.43 | 94.72±0.71 | 84.11±0.98 | 90.98±0.97 | 45.92±1.90 | 65.16±2.06 | 52.54±2.01
LiMEPromptTuning | 0.09M | 73.48±1.91 | 51.07±0.75 | 78.38±1.28 | 72.68±1.12 | 16.73±2.04 | 15.39±2.33 | 16.95±2.17
LiMELoRA | 3.49M | 78.01±1.31 | 94.47±0.53 | 84.98±0.86 | 91.02±0.84 | 45.00±1.86 | 65.05±2.08 | 53.19±1.93
LiMEDoRA | 3.84M | 78.12±1.48 | 94.50±0.52 | 84.76±0.88 | 91.11±0.92 | 45.65±1.88 | 65.41±2.14 | 53.39±1.97
LiMELoRAFA | 2.44M | 77.77±1.47 | 94.61±0.67 | 84.49±0.84 | 91.14±0.87 | 44.91±1.99 | 64.89±2.12 | 53.01±1.94
LiMESliceFine | 2.44M | 77.77±1.41 | 94.34±0.52 | 84.50±0.96 | 91.19±0.82 | 45.34±1.84 | 65.14±2.03 | 52.73±1.90
"""


def test_paper_numbers_table2_exact():
    data = json.loads(paper_numbers.PAPER_NUMBERS.read_text())
    table = data["table2"]
    assert table["tag"] == "EXACT-img"
    assert table["categories"] == list(paper_numbers.PAPER_CATEGORIES)
    lines = [ln.split(" | ") for ln in TABLE2.strip().splitlines()]
    assert list(table["methods"]) == [ln[0] for ln in lines]  # 17 methods in the paper's row order
    for name, ttp, *cells in lines:
        row = table["methods"][name]
        assert row["ttp"] == ttp
        for category, text in zip(table["categories"], cells, strict=True):
            mean, std = map(float, text.split("±"))
            assert row["scores"][category] == {"mean": mean, "std": std}
    assert table["bold_best"]["Commonsense Reasoning"] == "LiMELoRA"
    assert table["underlined_second"]["GLUE"] == "LiMELoRAFA"


def test_paper_numbers_figures_and_ablations():
    data = paper_numbers.load()
    eff = data["figure2"]
    assert eff["methods"]["LiMEDoRA"]["train_time_min"] == 35.5 and eff["methods"]["MoEDoRA"]["train_time_min"] == 50.2
    assert eff["methods"]["LiMEPromptTuning"]["throughput"] == 4.52
    assert eff["columns"]["trainable_params_m"]["tag"] == "EXACT-img" and eff["columns"]["throughput"]["tag"] == "PIXEL"
    panels = data["ablations"]
    assert {p["figure"] for p in panels.values()} >= {"Fig. 4a", "Fig. 4b", "Fig. 4c", "Fig. 4d", "Fig. 7a",
                                                      "Fig. 7b", "Fig. 7c", "Fig. 7d", "Fig. 6a"}
    for panel in panels.values():
        assert panel["tag"] in data["tags"]
        for values in panel.get("series", {}).values():
            assert len(values) == len(panel["x"])
    assert panels["fig4c"]["series"]["QQP"][5] is None  # "–": hidden marker
    assert panels["fig7a"]["series"]["CoLA"][0] == 80.8 and "back-solved" in panels["fig7a"]["approximate"]["CoLA"]["1"]
    assert panels["fig7d"]["best"]["STS-B"] == 5
    assert [p["figure"] for p in paper_numbers.ablation_panels("ablation_ngram")] == ["Fig. 7a", "Fig. 7b"]
    fig9 = next(c for c in data["claims"] if c["figure"] == "Fig. 9")
    assert fig9["entropy_no_balancing"] == 1.127 and math.isclose(fig9["entropy_uniform"], math.log(4), abs_tol=1e-3)


@pytest.fixture(scope="module")
def more_panels(tmp_path_factory) -> Path:
    """Experts (two methods as two lines), top-k (fixed k and an Auto Top-K baseline), shared on/off
    (categorical) and balance (a symlog axis with 0) sweeps, one seed each."""
    root = tmp_path_factory.mktemp("panels")
    tasks = sum(ABLATION_CATEGORIES.values(), [])

    def run(sweep: str, job: int, experiment: str, overrides: list[str], offset: float, method: str = "lime_lora",
            skew: float | None = None) -> None:
        scores = {t: score(method, 0, t) + offset for t in tasks}
        make_run(root / sweep / str(job), method=method, experiment=experiment, overrides=overrides,
                 categories=ABLATION_CATEGORIES, scores=scores,
                 metrics=None if skew is None else usage_metrics(skew))

    for job, (method, e) in enumerate((m, e) for m in ("lime_lora", "moe_lora") for e in (2, 4, 8)):
        run("experts", job, "ablation_experts", [f"peft={method}", f"peft.num_experts={e}"], -abs(e - 4) / 2, method)
    for job, k in enumerate((1, 2, 3)):
        run("topk", job, "ablation_topk", ["routing.selection=topk", f"routing.top_k={k}"], k / 2, skew=0.1 * k)
    run("topk", 3, "ablation_topk", [], 1.0, skew=0.05)
    for job, shared in enumerate(("false", "true")):
        run("shared", job, "ablation_shared", [f"peft.shared={shared}"], job)
    for job, c in enumerate((0.0, 0.01, 0.1, 1.0)):
        run("balance", job, "ablation_balance", [f"trainer.balance.scale={c}"], -c, skew=0.6 - 0.5 * c ** 0.25)
    return root


@pytest.mark.slow
def test_figures_series_baseline_and_categorical_panels(more_panels, tmp_path, low_dpi):
    paths = make_figures.main([str(more_panels), "--out", str(tmp_path), "--paper"])
    stems = {p.stem for p in paths}
    assert stems == {"ablation_experts", "ablation_topk", "ablation_topk_entropy", "ablation_topk_usage",
                     "ablation_shared", "ablation_balance", "ablation_balance_entropy", "ablation_balance_usage"}
    assert all(p.stat().st_size > 1000 for p in paths)


def test_panel_points(more_panels):
    from lime.report.ablations import PANELS, collect, x_order

    runs = load_runs([more_panels / "topk"])
    points = collect(runs, PANELS["ablation_topk"])
    assert [p.baseline for p in points] == [False, False, False, True]  # selection=auto: the reference line
    assert x_order(points, PANELS["ablation_topk"]) == [1, 2, 3]
    shared = collect(load_runs([more_panels / "shared"]), PANELS["ablation_shared"])
    assert x_order(shared, PANELS["ablation_shared"]) == ["off", "on"]
    experts = collect(load_runs([more_panels / "experts"]), PANELS["ablation_experts"])
    assert {p.series for p in experts} == {"LiMELoRA", "MoELoRA"}


def test_config_with_hydra_runtime_interpolation(tmp_path):
    """${hydra:...} cannot be resolved outside Hydra; every other interpolation still is."""
    run_dir = make_run(tmp_path / "run", scores=None, config={"output_dir": "${hydra:runtime.output_dir}"})
    run = load_runs([run_dir])[0]
    assert run.get("peft.targets") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert run.get("output_dir") == "${hydra:runtime.output_dir}"


def test_lenient_scorer_column(tmp_path):
    """--scorer lenient tabulates results.json's other_scorers block; a run without it is excluded."""
    for seed in (0, 1):
        path = make_run(tmp_path / "runs" / str(seed), seed=seed, categories=ABLATION_CATEGORIES,
                        scores=all_scores("lime_lora", seed, ABLATION_CATEGORIES))
        strict = {t: {"score": s, "samples": 50} for t, s in all_scores("lime_lora", seed, ABLATION_CATEGORIES).items()}
        lenient = {t: {"score": 100.0, "samples": 50} for t in strict}
        write_results(path, strict, ABLATION_CATEGORIES, "strict", other_scorers={"lenient": lenient} if seed else None)
    make_tables.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--scorer", "lenient"])
    with open(tmp_path / "out" / "table2.csv") as f:
        (row,) = csv.DictReader(f)
    assert row["n"] == "1" and float(row["GLUE mean"]) == 100.0
    assert "no 'lenient' scores" in (tmp_path / "out" / "excluded_runs.md").read_text()


def test_deliberate_data_subset_is_not_incomplete(tmp_path):
    """Ablations evaluate 6 of the 8 Vision Benchmark tasks (data.tasks): the category's other tasks are
    missing on purpose, and the category score is the mean of the evaluated ones. A selected task with no
    score is still a failure."""
    chosen = ["sst2", "qnli", "chartqa"]
    scores = {t: score("lime_lora", 0, t) for t in chosen}
    data = {"name": "mmt47", "tasks": chosen, "categories": None}
    make_run(tmp_path / "runs" / "0", categories=ABLATION_CATEGORIES, scores=scores, config={"data": data})
    broken = {**data, "tasks": [*chosen, "cola"]}
    make_run(tmp_path / "runs" / "1", categories=ABLATION_CATEGORIES, scores=scores, config={"data": broken})
    usable, excluded = split_runs(load_runs([tmp_path / "runs"]))
    assert [r.path.name for r in usable] == ["0"]
    assert usable[0].category_scores()["GLUE"] == pytest.approx(statistics.fmean(scores[t] for t in chosen[:2]))
    assert "cola" in excluded[0][1][0] and "okvqa" not in excluded[0][1][0]


def test_params_column_is_the_papers_style_and_exact_when_every_row_is_tiny(tmp_path):
    assert (format_params(1_740_800), format_params(70_000), format_params(None)) == ("1.74M", "0.07M", "–")
    for trainable, expected in ((217_888, {"217,888", "9,984"}), (1_740_800, {"1.74M", "0.01M"})):
        for method, count in (("lora", trainable), ("moe_lora", 9984)):
            make_run(tmp_path / str(trainable) / method, method=method, scores=all_scores(method, 0, CATEGORIES),
                     info={"trainable_params": count})
        _, rows = build_rows(load_runs([tmp_path / str(trainable)]))
        assert {row.params_text for row in rows} == expected


def test_efficiency_ratios_compare_across_models_and_minutes_only_on_the_papers_model(tmp_path):
    from lime.report import efficiency

    seconds = {"lime_dora": (40.0, 44.0), "moe_dora": (60.0, 62.0), "lora": (30.0, 30.0)}  # seeds 0 and 1
    for method, times in seconds.items():
        for seed, time_s in enumerate(times):
            make_run(tmp_path / f"{method}-{seed}", method=method, seed=seed, experiment="efficiency", scores=None,
                     info={"train_time_s": time_s})
    runs = load_runs([tmp_path])
    reference, ours, paper = efficiency.relative_efficiency(efficiency.efficiency_stats(runs))
    assert reference == "moe_dora"
    assert ours["lime_dora"]["train_time"] == pytest.approx(42.0 / 61.0)
    assert paper["lime_dora"]["train_time"] == pytest.approx(35.5 / 50.2)  # the paper's "29 % less time"
    assert ours["moe_dora"] == dict.fromkeys(efficiency.RELATIVE_FIELDS, 1.0)
    assert ours["lora"]["train_time"] is not None and paper["lora"]["train_time"] is None  # not in Fig. 2
    assert efficiency.same_model_as_paper(runs, None)  # make_run's runs are on llava_ov_0.5b, as Fig. 2
    for run in runs:
        run.info["model"] = "tiny_llava_ov"
    assert not efficiency.same_model_as_paper(runs, None)


def test_reports_name_runs_relative_to_the_working_directory(tmp_path, monkeypatch):
    from lime.report.runs import shown_path

    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "multirun" / "x" / "0") == "multirun/x/0"  # the same text on any machine
    assert shown_path(Path("/elsewhere/run")) == "/elsewhere/run"


# --------------------------------------------------------------------------------------------------------
# One seed counted once: a training run, its eval run and its resumed run are one adapter
# --------------------------------------------------------------------------------------------------------


def save_adapter_bytes(run_dir: Path, data: bytes) -> str:
    """A stand-in for the adapter a training run saves (reports hash its bytes, never load it)."""
    (run_dir / "adapter").mkdir(parents=True, exist_ok=True)
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def eval_run(path: Path, trained: Path, sha: str, seed: int, cli_method: str) -> Path:
    """What train.py mode=eval records: the command line's peft= in .hydra, the adapter's method in run_info."""
    info = {"mode": "eval", "method": "lime_lora", "checkpoint": str(trained / "adapter"), "adapter_sha256": sha,
            "adapter_config": {"method": "lime", "variant": "lora", "rank": 2, "routing": {"n_gram": 1}},
            "trainable_params": METHODS["lime_lora"], "total_params": 893_675_552 + METHODS["lime_lora"]}
    overrides = [f"peft={cli_method}", "mode=eval", f"checkpoint={trained}"]
    return make_run(path, method=cli_method, seed=seed, overrides=overrides, info=info,
                    scores=all_scores("lime_lora", seed, CATEGORIES))


def test_a_seed_is_counted_once_and_eval_runs_carry_their_adapters_method(tmp_path, capsys):
    root = tmp_path / "runs"
    trained = {}
    for seed in (0, 1):
        trained[seed] = make_run(root / "train" / str(seed), seed=seed, overrides=["peft=lime_lora"],
                                 scores=all_scores("lime_lora", seed, CATEGORIES))
        save_adapter_bytes(trained[seed], f"lime seed {seed}".encode())
    moe = make_run(root / "train" / "2", method="moe_lora", overrides=["peft=moe_lora"],
                   scores=all_scores("moe_lora", 0, CATEGORIES))
    save_adapter_bytes(moe, b"moe seed 0")
    sha0 = hashlib.sha256(b"lime seed 0").hexdigest()
    # Seed 0 evaluated again with peft=moe_lora on the command line; seed 1 resumed into another directory.
    eval_run(root / "eval" / "0", trained[0], sha0, seed=0, cli_method="moe_lora")
    resumed = make_run(root / "resumed" / "1", seed=1, overrides=["peft=lime_lora", f"trainer.resume={trained[1]}"],
                       scores=all_scores("lime_lora", 1, CATEGORIES))
    save_adapter_bytes(resumed, b"lime seed 1")
    # An eval run written before run_info recorded the adapter: found through the checkpoint it names.
    make_run(root / "eval" / "1", seed=1, overrides=["peft=lime_lora", "mode=eval", f"checkpoint={trained[1]}"],
             config={"mode": "eval", "checkpoint": str(trained[1])}, scores=all_scores("lime_lora", 1, CATEGORIES))

    out = tmp_path / "out"
    make_tables.main([str(root), "--out", str(out)])
    printed = capsys.readouterr().out
    with open(out / "table2.csv") as f:
        rows = {r["group"]: r for r in csv.DictReader(f)}
    assert (rows["lime_lora"]["n"], rows["moe_lora"]["n"]) == ("2", "1")  # 6 runs, 3 adapters
    assert float(rows["moe_lora"]["trainable_params"]) == METHODS["moe_lora"]
    mean, std = _expected("lime_lora", "GLUE")
    assert float(rows["lime_lora"]["GLUE mean"]) == pytest.approx(mean)
    assert float(rows["lime_lora"]["GLUE std"]) == pytest.approx(std)  # not ± 0.00 from copies
    assert "DEDUPLICATED 3 run(s)" in printed
    excluded = (out / "excluded_runs.md").read_text()
    copies = {root / "eval" / "0": trained[0], root / "eval" / "1": trained[1], root / "resumed" / "1": trained[1]}
    for copy, original in copies.items():
        line = next(ln for ln in excluded.splitlines() if str(copy) in ln)
        assert f"same adapter as {original}" in line
    with open(out / "table2_runs.csv") as f:
        assert sorted(r["run"] for r in csv.DictReader(f)) == sorted(map(str, (trained[0], trained[1], moe)))


def test_an_eval_run_alone_is_a_row_of_its_adapters_method(tmp_path):
    trained = tmp_path / "elsewhere"  # the training run is not among the runs tabulated
    run_dir = eval_run(tmp_path / "runs" / "eval", trained, "ab" * 32, seed=0, cli_method="moe_lora")
    run = load_runs([run_dir])[0]
    assert run.method == "lime_lora" and run.get("peft.rank") == 2 and run.get("routing.n_gram") == 1
    assert run.get("peft.name") == "lime_lora" and run.config["peft"]["name"] == "moe_lora"
    categories, rows = build_rows([run])
    assert [(r.group, r.n, r.trainable_params) for r in rows] == [("lime_lora", 1, METHODS["lime_lora"])]
    assert swept_keys([run, load_runs([make_run(tmp_path / "train", overrides=["peft=lime_lora"])])[0]]) == []
