"""Statistics of the reports (lime/report/stats.py): the paired bootstrap against a naive loop, the Δ column and
the backbone-alone row in the tables written by make_tables.py."""

from __future__ import annotations

import csv
import json
import statistics
import zlib

import numpy as np
import pytest

from lime.report.runs import load_runs
from lime.report.stats import BACKBONE_LABEL, paired_bootstrap, pooled_correctness
from lime.results import write_predictions
from tests.scripts import load_script
from tests.test_report import _markdown_table, make_run, make_tables

CATEGORIES = {"GLUE": ["sst2", "cola"], "Vision Benchmark": ["okvqa"]}
SPLITS = {"sst2": "glue_test_sst2", "cola": "glue_test_cola", "okvqa": "image_test_okvqa"}
N = 40  # test samples per task


def correctness(method: str, seed: int, task: str) -> list[int]:
    """Per-sample 0/1 of a (method, seed, task): LoRA right on the first 20 samples, LiME on 30 of 40."""
    right = {"lora": 20, "lime_lora": 30, "prompt": 21}[method] + (seed if method == "prompt" else 0)
    shift = zlib.crc32(task.encode()) % 5
    return [int((i + shift) % N < right) for i in range(N)]


def naive_bootstrap(a, b, category_of, resamples, seed=0):
    """The definition, loop by loop: per resample, per task, the mean difference of the drawn samples."""
    tasks = sorted(a)
    draws = {t: np.random.default_rng([seed, zlib.crc32(t.encode())]).integers(0, len(a[t]), (resamples, len(a[t])))
             for t in tasks}
    ids = {t: sorted(a[t]) for t in tasks}
    values = []
    for r in range(resamples):
        per_category = {}
        for t in tasks:
            diffs = [100 * (a[t][ids[t][j]] - b[t][ids[t][j]]) for j in draws[t][r]]
            per_category.setdefault(category_of[t], []).append(sum(diffs) / len(diffs))
        values.append(statistics.fmean(statistics.fmean(v) for v in per_category.values()))
    return np.percentile(values, [2.5, 97.5])


def test_paired_bootstrap_matches_the_naive_loop_and_the_difference_of_means():
    rng = np.random.default_rng(1)
    category_of = {"t1": "X", "t2": "X", "t3": "Y"}
    a = {t: {str(i): float(rng.random() < 0.7) for i in range(25)} for t in category_of}
    b = {t: {str(i): float(rng.random() < 0.5) for i in range(25)} for t in category_of}
    delta, low, high, samples, tasks = paired_bootstrap(a, b, category_of, resamples=300)
    mean = {name: statistics.fmean(statistics.fmean(statistics.fmean(m[t].values()) for t in ts)
                                   for ts in (["t1", "t2"], ["t3"])) for name, m in (("a", a), ("b", b))}
    assert delta == pytest.approx(100 * (mean["a"] - mean["b"]))
    assert (low, high) == pytest.approx(tuple(naive_bootstrap(a, b, category_of, 300)))
    assert (samples, tasks) == (75, 3) and low < delta < high
    # A row against itself: no difference and no spread.
    assert paired_bootstrap(a, a, category_of, resamples=50)[:3] == (0.0, 0.0, 0.0)


def test_seeds_are_pooled_per_sample(tmp_path):
    for seed in (0, 1):
        run = make_run(tmp_path / f"p{seed}", method="prompt", seed=seed, categories=CATEGORIES,
                       scores={t: 50.0 for ts in CATEGORIES.values() for t in ts})
        _predictions(run, "prompt", seed)
    pooled = pooled_correctness(load_runs([tmp_path]))
    seed0, seed1 = correctness("prompt", 0, "sst2"), correctness("prompt", 1, "sst2")
    expected = [(x + y) / 2 for x, y in zip(seed0, seed1, strict=True)]
    assert [pooled["sst2"][f"{SPLITS['sst2']}[{i}]"] for i in range(N)] == expected


def _predictions(run_dir, method, seed):
    for task, split in SPLITS.items():
        write_predictions(run_dir, split, [{"id": f"{split}[{i}]", "question": "q", "answer": "a", "prediction": "a",
                                            "correct": bool(c)} for i, c in enumerate(correctness(method, seed, task))])
    results = json.loads((run_dir / "results.json").read_text())
    for task, entry in results["tasks"].items():
        entry["split"] = SPLITS[task]
    (run_dir / "results.json").write_text(json.dumps(results))


def test_tables_print_the_backbone_row_and_intervals_against_lora(tmp_path):
    job = 0
    for method in ("lora", "lime_lora", "prompt"):
        for seed in (0, 1, 2):
            scores = {t: 100 * statistics.fmean(correctness(method, seed, t)) for ts in CATEGORIES.values() for t in ts}
            run = make_run(tmp_path / "runs" / str(job), method=method, seed=seed, categories=CATEGORIES, scores=scores)
            _predictions(run, method, seed)
            backbone = {"tasks": {}, "overall": {}, "scorer": "strict",
                        "categories": {"GLUE": {"score": 10.0, "tasks": ["sst2", "cola"]},
                                       "Vision Benchmark": {"score": 20.0, "tasks": ["okvqa"]}}}
            (run / "backbone_results.json").write_text(json.dumps(backbone))
            job += 1
    out = tmp_path / "report"
    make_tables.main([str(tmp_path / "runs"), "--out", str(out), "--pair=lime_lora=lora", "--pair=prompt=lime_lora"])
    header, rows = _markdown_table((out / "table2.md").read_text())
    assert header[-1] == "Δ Mean vs LoRA [95% CI]"
    with open(out / "table2_pairs.csv") as f:  # the pairs: the Δ column's numbers, either way round
        pairs = list(csv.DictReader(f))
    assert [(p["row"], p["reference"], p["beyond noise"]) for p in pairs] == [
        ("LiMELoRA", "LoRA", "True"), ("PromptTuning", "LiMELoRA", "True")]
    assert float(pairs[0]["delta"]) == pytest.approx(25.0)
    assert float(pairs[1]["delta"]) == pytest.approx(100 * 2 / 40 - 25.0)
    with pytest.raises(ValueError, match="not in the table: \\['mola'\\]"):
        make_tables.main([str(tmp_path / "runs"), "--out", str(out), "--pair=mola=lora"])
    assert list(rows)[0] == BACKBONE_LABEL and rows[BACKBONE_LABEL][header.index("Mean")] == "15.00"
    assert rows["LoRA"][-1] == "–"
    # LiME: right on 30 of 40 samples, a superset of LoRA's 20, on every task and seed: +25 points.
    assert rows["LiMELoRA"][-1].startswith("+25.00 [+")
    with open(out / "table2.csv") as f:
        csv_rows = {r["group"]: r for r in csv.DictReader(f)}
    lime = csv_rows["lime_lora"]
    assert float(lime["delta"]) == pytest.approx(25.0) and lime["delta vs"] == "LoRA"
    assert float(lime["delta low"]) > 15 and float(lime["delta high"]) < 35
    # Prompt: 21, 22, 23 right of 40 over the seeds, pooled: +2.5 points on average.
    assert float(csv_rows["prompt"]["delta"]) == pytest.approx(100 * 2 / 40)
    assert "paired bootstrap 95% interval" in (out / "table2.md").read_text()
    assert "Δ Mean vs LoRA" in (out / "table2.tex").read_text()


SMALL_SCALE = load_script("small_scale")


def test_small_scale_compares_against_lora_and_each_ablations_default():
    assert SMALL_SCALE.reference("table2") == ["peft.name=lora"]
    assert SMALL_SCALE.reference("ablation_ngram") == ["routing.n_gram=1"]
    assert SMALL_SCALE.reference("ablation_topk") == ['routing.selection="auto"']
    assert SMALL_SCALE.reference("ablation_experts") == ['peft.name="lime_lora"', "peft.num_experts=4"]


def test_check_accepts_only_the_committed_numbers_and_weights_exactly(tmp_path):
    results = {"categories": {"GLUE": {"score": 100 / 3}, "Vision Benchmark": {"score": 12.5}},
               "overall": {"mean_of_categories": (100 / 3 + 12.5) / 2}, "answer_loss": {"tasks": {"sst2": 0.5}}}
    tensors = {"tensors": {"lora_A": {"dtype": "F32", "shape": [2, 4], "sha256": "ab12"}}}
    for name in ("committed", "rerun"):
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        (tmp_path / name / "adapter" / "adapter_config.json").write_text(json.dumps(tensors))
    committed, rerun = tmp_path / "committed", tmp_path / "rerun"
    assert SMALL_SCALE.mismatches(committed, rerun) == []
    results["categories"]["GLUE"]["score"] = float(np.nextafter(100 / 3, 100.0))  # one unit in the last place
    del results["categories"]["Vision Benchmark"]
    (rerun / "results.json").write_text(json.dumps(results))
    tensors["tensors"]["lora_A"]["sha256"] = "cd34"
    (rerun / "adapter" / "adapter_config.json").write_text(json.dumps(tensors))
    assert SMALL_SCALE.mismatches(committed, rerun) == [
        f"results.json categories.GLUE.score: committed {100 / 3!r}, rerun {float(np.nextafter(100 / 3, 100.0))!r}",
        "results.json categories.Vision Benchmark.score: committed 12.5, rerun '(absent)'",
        "adapter/adapter_config.json lora_A.sha256: committed 'ab12', rerun 'cd34'"]


def test_compacted_runs_give_the_same_tables_as_the_runs_they_were(tmp_path):
    """A committed run keeps gzipped predictions and a copy of the backbone's own (backbone_eval/): the
    intervals, the backbone row's included, are those of the uncompacted runs."""
    from lime.results import compress_predictions

    runs = tmp_path / "runs"
    for job, (method, seed) in enumerate([(m, s) for m in ("lora", "lime_lora") for s in (0, 1)]):
        scores = {t: 100 * statistics.fmean(correctness(method, seed, t)) for ts in CATEGORIES.values() for t in ts}
        run = make_run(runs / str(job), method=method, seed=seed, categories=CATEGORIES, scores=scores)
        _predictions(run, method, seed)
        backbone = {"tasks": {t: {"score": 100 / 3, "split": SPLITS[t]} for t in SPLITS}, "scorer": "strict",
                    "categories": {c: {"score": 100 / 3, "tasks": ts} for c, ts in CATEGORIES.items()}}
        (run / "backbone_results.json").write_text(json.dumps(backbone))
        for split in SPLITS.values():  # the backbone right on a third of the samples
            write_predictions(run / "backbone_eval", split, [
                {"id": f"{split}[{i}]", "question": "q", "answer": "a", "prediction": "b", "correct": i % 3 == 0}
                for i in range(N)])
    plain = [statistics_of(r) for r in load_runs([runs])]
    for run in runs.iterdir():
        compress_predictions(run / "predictions")
        compress_predictions(run / "backbone_eval" / "predictions")
    assert not list(runs.glob("*/predictions/*.jsonl")) and list(runs.glob("*/backbone_eval/predictions/*.gz"))
    assert [statistics_of(r) for r in load_runs([runs])] == plain
    out = tmp_path / "report"
    make_tables.main([str(runs), "--out", str(out)])
    header, rows = _markdown_table((out / "table2.md").read_text())
    assert rows[BACKBONE_LABEL][-1].startswith(("+", "-"))  # Δ vs LoRA from the copied per-sample predictions


def statistics_of(run):
    from lime.report.stats import sample_correctness

    return sample_correctness(run)
