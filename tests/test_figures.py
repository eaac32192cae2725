"""What the figures show, read off the matplotlib objects of figures built from synthetic runs (tests/test_report.py
writes the run directories): colour scales, titles, notes, legends and visible lines.

The runs here are the small-scale kind: mmt_mini task names (configs/data/taxonomy/mmt_mini.yaml), whose
correlation task is `similarity`, and tasks that can score identically (a tiny model answering alike).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.container import ErrorbarContainer

from lime.report import efficiency_plots
from lime.report.ablations import PANELS, collect, sweep_figure, usage_figure
from lime.report.runs import load_runs
from lime.results import write_results
from tests.test_report import LAYERS, make_run

MINI = {"Commonsense": ["compare", "word_group", "arithmetic"], "GLUE": ["sentiment", "paraphrase", "similarity"]}
METRIC = {"similarity": "pearson"}  # the rest: accuracy


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def mini_run(path, *, n: int, seed: int = 0, scores: dict[str, float], usage: list[float] | None = None,
             categories: dict = MINI, metric: dict = METRIC):
    """An ablation_ngram run on mmt_mini: results.json with each task's metric, per-layer usage when given."""
    metrics = None
    if usage is not None:
        metrics = [{"step": 10, "routing/usage": usage, "routing/entropy": 1.0,
                    **{f"routing/layers/{name}/usage": usage for name in LAYERS}}]
    make_run(path, seed=seed, experiment="ablation_ngram", overrides=[f"routing.n_gram={n}"], scores=None,
             config={"data": {"name": "mmt_mini"}}, metrics=metrics)
    per_task = {t: {"score": s, "samples": 30, "metric": metric.get(t, "accuracy")} for t, s in scores.items()}
    write_results(path, per_task, categories, "strict")
    return path


def ngram_points(root):
    return collect(load_runs([root]), PANELS["ablation_ngram"])


def distinct_scores(n: int, seed: int) -> dict[str, float]:
    return {t: 40.0 + 5 * i + n + seed for i, t in enumerate(sum(MINI.values(), []))}


def legend_entries(ax) -> list[tuple[str, object]]:
    """(label, the drawn artist it stands for) for every entry of the axes' legend."""
    handles, labels = ax.get_legend_handles_labels()
    shown = {t.get_text() for t in ax.get_legend().get_texts()}
    entries = []
    for handle, label in zip(handles, labels, strict=True):
        if label in shown:
            entries.append((label, handle.lines[0] if isinstance(handle, ErrorbarContainer) else handle))
    return entries


def rendered(fig) -> np.ndarray:
    """The figure's pixels, RGB in 0..1, row 0 at the top."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0


def colour_in_axes(pixels: np.ndarray, ax, rgb, tolerance: float = 0.04) -> bool:
    """Whether a pixel of that colour is rendered inside the axes (the legend sits outside them)."""
    box = ax.get_window_extent()
    height = pixels.shape[0]
    inside = pixels[int(height - box.y1) + 2:int(height - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2]
    return bool((np.abs(inside - np.asarray(rgb)).max(axis=-1) < tolerance).any())


# --------------------------------------------------------------------------------------------------------
# (a) the usage heatmap's colours follow the data
# --------------------------------------------------------------------------------------------------------


def test_usage_heatmap_colours_span_the_data_and_cells_are_annotated(tmp_path):
    skewed, uniform = [0.255, 0.25, 0.25, 0.245], [0.25] * 4
    for n, usage in ((1, skewed), (2, uniform)):
        mini_run(tmp_path / str(n), n=n, scores=distinct_scores(n, 0), usage=usage)
    fig = usage_figure(ngram_points(tmp_path), PANELS["ablation_ngram"])
    image = fig.axes[0].images[0]
    # Centred on uniform usage 1/E = 0.25 and reaching the largest deviation (0.005), not 0 .. max.
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((0.245, 0.255))
    colours = image.to_rgba(image.get_array())  # layers x experts x RGBA
    # Expert 1 (0.255) and expert 2 (0.25) differ by 0.005: visibly different colours (0 .. 0.255 gave ~0.02).
    assert np.abs(colours[0, 0, :3] - colours[0, 1, :3]).max() > 0.4
    assert fig.axes[1].images[0].norm is image.norm  # one scale for every panel, so that they compare
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == image.get_array().size and texts[:4] == ["0.255", "0.250", "0.250", "0.245"]


# --------------------------------------------------------------------------------------------------------
# (b) seed counts in titles come from the runs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seeds", [1, 3])
def test_titles_state_the_seed_count_of_the_data(tmp_path, seeds):
    for n in (1, 2):
        for seed in range(seeds):
            mini_run(tmp_path / f"{n}-{seed}", n=n, seed=seed, scores=distinct_scores(n, seed),
                     usage=[0.4, 0.2, 0.2, 0.2])
    points, panel = ngram_points(tmp_path), PANELS["ablation_ngram"]
    usage_title = usage_figure(points, panel).get_suptitle()
    sweep_title = sweep_figure(points, panel).get_suptitle()
    if seeds == 1:
        assert "(final logged step, 1 seed)" in usage_title and "1 seed per point (no error bars)" in sweep_title
        assert "mean" not in usage_title
    else:
        assert "(final logged step, mean of 3 seeds)" in usage_title
        assert "mean of 3 seeds per point, error bars ± std" in sweep_title


# --------------------------------------------------------------------------------------------------------
# (c) --paper with nothing to overlay says so, and draws no "paper" legend entry
# --------------------------------------------------------------------------------------------------------


def test_paper_overlay_with_no_matching_values_is_reported(tmp_path, capsys):
    for n in (1, 2):
        mini_run(tmp_path / str(n), n=n, scores=distinct_scores(n, 0))
    fig = sweep_figure(ngram_points(tmp_path), PANELS["ablation_ngram"], paper=True)
    printed = capsys.readouterr().out
    assert "ablation_ngram: --paper: no paper values drawn: the paper's Fig. 7a, Fig. 7b share no task" in printed
    assert "similarity" in printed  # our tasks named, so the user sees why none matched
    assert "paper: no values comparable to these runs" in fig.get_suptitle()
    labels = [label for ax in fig.axes for label, _ in legend_entries(ax)]
    assert labels and not any("paper" in label for label in labels)


def test_efficiency_paper_overlay_for_methods_fig2_lacks_is_reported(tmp_path, capsys, monkeypatch):
    figures = []
    monkeypatch.setattr(efficiency_plots, "save_figure", lambda fig, out, name: figures.append((name, fig)) or [])
    monkeypatch.setattr(efficiency_plots, "write_efficiency_table", lambda *args: [])
    for method in ("lora", "dora"):  # on Fig. 2's model, but Fig. 2 has neither method
        make_run(tmp_path / method, method=method, experiment="efficiency", scores=None)
    efficiency_plots.plot_efficiency(load_runs([tmp_path]), tmp_path / "out", paper=True)
    printed = capsys.readouterr().out
    assert "efficiency: --paper: no paper values drawn: Fig. 2 has none of these methods (lora, dora)" in printed
    assert {name for name, _ in figures} == {"efficiency_time_throughput", "efficiency_memory", "efficiency_params"}
    for _, fig in figures:
        labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        assert labels and not any("paper" in label for label in labels)
        assert not any("paper:" in ax.get_xlabel() for ax in fig.axes)  # no "(paper: PIXEL)" axis tag either


def test_efficiency_on_another_model_says_the_paper_is_drawn_relative_only(tmp_path, capsys, monkeypatch):
    figures = {}
    monkeypatch.setattr(efficiency_plots, "save_figure", lambda fig, out, name: figures.update({name: fig}) or [])
    monkeypatch.setattr(efficiency_plots, "write_efficiency_table", lambda *args: [])
    for method in ("lime_lora", "moe_lora"):  # both in Fig. 2, but trained on the tiny model
        make_run(tmp_path / method, method=method, experiment="efficiency", scores=None,
                 info={"model": "tiny_llava_ov"})
    efficiency_plots.plot_efficiency(load_runs([tmp_path]), tmp_path / "out", paper=True)
    assert ("Fig. 2's absolute values are for llava_ov_0.5b, these runs for tiny_llava_ov: the paper is drawn in "
            "the relative figure only") in capsys.readouterr().out
    for name, fig in figures.items():
        labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        assert ("paper (Fig. 2)" in labels) == (name == "efficiency_relative"), name


# --------------------------------------------------------------------------------------------------------
# (d) a legend entry for every line that can be seen, and only for those
# --------------------------------------------------------------------------------------------------------


def test_every_legend_entry_is_a_visible_line_with_data(tmp_path):
    """The committed small-scale n-gram panel: compare, word_group and arithmetic scored alike at every n (and so
    equal to their category mean); the legend listed three tasks and the figure showed none of them."""
    for n in (1, 2, 3):
        for seed in (0, 1):
            common = 90.0 + seed
            scores = {"compare": common, "word_group": common, "arithmetic": common,
                      "sentiment": 100.0, "paraphrase": 70.0 + n, "similarity": 90.5}
            mini_run(tmp_path / f"{n}-{seed}", n=n, seed=seed, scores=scores)
    fig = sweep_figure(ngram_points(tmp_path), PANELS["ablation_ngram"])
    commonsense, glue = fig.axes
    assert [label for label, _ in legend_entries(commonsense)] == [
        "compare = word_group = arithmetic", "category mean (ours)"]
    assert [label for label, _ in legend_entries(glue)] == [
        "sentiment", "paraphrase", "similarity", "category mean (ours)"]
    pixels = rendered(fig)
    for ax in fig.axes:
        for label, line in legend_entries(ax):
            ys = np.asarray(line.get_ydata(), dtype=float)
            assert ys.size and np.isfinite(ys).all(), label
            assert colour_in_axes(pixels, ax, to_rgb(line.get_color())), f"{label}: listed but not visible"
    tasks, mean = (line for _, line in legend_entries(commonsense))
    assert list(tasks.get_ydata()) == list(mean.get_ydata()) == [90.5, 90.5, 90.5]


def test_a_sweep_to_null_is_a_point_not_a_baseline(tmp_path):
    """ablation_layers on the tiny model: layer_indices=null wraps both of its blocks: x = 2, not None."""
    for job, value in enumerate(("[1]", "null")):
        make_run(tmp_path / str(job), experiment="ablation_layers", overrides=[f"peft.layer_indices={value}"],
                 categories=MINI, scores=distinct_scores(job, 0),
                 config={"model": {"name": "tiny_llava_ov", "tiny": {"text": {"num_hidden_layers": 2}}}})
    points = collect(load_runs([tmp_path]), PANELS["ablation_layers"])
    assert sorted(p.x for p in points) == [1, 2]
    fig = sweep_figure(points, PANELS["ablation_layers"])
    assert not any("baseline" in label for ax in fig.axes for label, _ in legend_entries(ax))


# --------------------------------------------------------------------------------------------------------
# (e) the score note names the runs' own tasks
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "expected"), [
    (METRIC, "score: accuracy %, similarity Pearson × 100"),
    ({}, "score: accuracy %"),
])
def test_score_note_is_read_from_the_runs_metrics(tmp_path, metric, expected):
    for n in (1, 2):
        mini_run(tmp_path / str(n), n=n, scores=distinct_scores(n, 0), metric=metric)
    title = sweep_figure(ngram_points(tmp_path), PANELS["ablation_ngram"]).get_suptitle()
    assert title.endswith(f"; {expected}") and "STS-B" not in title
