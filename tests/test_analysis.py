"""lime.report.analysis against naive references and known values; scripts/analyze.py on a tiny run."""

import numpy as np
import pytest
import torch

from lime.report import analysis


def _rng(seed=0):
    return np.random.default_rng(seed)


def naive_cka(x, y):
    """HSIC form with the centring matrix H: tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = XXᵀ, L = YYᵀ."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_linear_cka_known_values_and_invariances():
    x = _rng().normal(size=(40, 6))
    y = x @ _rng(1).normal(size=(6, 3)) + 0.5 * _rng(2).normal(size=(40, 3))
    assert analysis.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert analysis.linear_cka(x, y) == pytest.approx(naive_cka(x, y), abs=1e-10)
    rotation, _ = np.linalg.qr(_rng(3).normal(size=(6, 6)))
    assert analysis.linear_cka(x @ rotation * 7.5 + 3.0, y) == pytest.approx(analysis.linear_cka(x, y), abs=1e-10)
    assert 0.0 < analysis.linear_cka(x, y) < 1.0
    # independent representations of many samples: near 0
    assert analysis.linear_cka(_rng(4).normal(size=(2000, 3)), _rng(5).normal(size=(2000, 3))) < 0.01


def test_pca_matches_torch_svd():
    x = _rng().normal(size=(30, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    result = analysis.pca(x, 3)
    u, s, vh = torch.linalg.svd(torch.from_numpy(x - x.mean(0)), full_matrices=False)
    for k in range(3):  # the same directions up to sign, the same scores
        sign = np.sign(result.components[k] @ vh[k].numpy())
        np.testing.assert_allclose(result.components[k], sign * vh[k].numpy(), atol=1e-10)
        np.testing.assert_allclose(result.scores[:, k], sign * (u[:, k] * s[k]).numpy(), atol=1e-10)
    np.testing.assert_allclose(result.explained_variance_ratio, (s[:3] ** 2 / (s**2).sum()).numpy(), atol=1e-12)


def test_conditional_probabilities_reach_the_perplexity():
    x = _rng().normal(size=(25, 4))
    p = analysis.conditional_probabilities(x, perplexity=5.0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(np.diag(p) == 0)
    entropy = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=1)
    np.testing.assert_allclose(np.exp(entropy), 5.0, rtol=1e-3)


def test_tsne_keeps_separated_clusters_apart_and_lowers_kl():
    centers = np.array([[0.0] * 5, [10.0] * 5, [-10.0, 10.0, -10.0, 10.0, 0.0]])
    labels = np.repeat(np.arange(3), 12)
    x = centers[labels] + _rng().normal(size=(36, 5))
    y = analysis.tsne(x, perplexity=8, iterations=400, seed=0)
    assert y.shape == (36, 2)
    d = ((y[:, None] - y[None]) ** 2).sum(-1) + np.diag(np.full(36, np.inf))
    assert np.all(labels[d.argmin(axis=1)] == labels)  # every point's nearest neighbour is of its cluster
    start = _rng(9).normal(0, 1e-4, size=(36, 2))
    assert analysis.tsne_kl(x, y, 8) < 0.5 * analysis.tsne_kl(x, start, 8)
    np.testing.assert_array_equal(y, analysis.tsne(x, perplexity=8, iterations=400, seed=0))  # seeded


def test_probe_separable_data_is_perfect_and_noise_is_chance():
    labels = np.repeat(np.arange(4), 15)
    x = _rng().normal(size=(60, 8))
    x[np.arange(60), labels] += 6.0  # class c is shifted along feature c
    assert analysis.probe_accuracy(x, labels, folds=5) == 1.0
    noise_accuracy = analysis.probe_accuracy(_rng(1).normal(size=(60, 8)), labels, folds=5)
    assert noise_accuracy < 0.5  # chance is 0.25


def test_probe_reaches_the_optimum_of_its_loss():
    labels = np.repeat(np.arange(3), 10)
    x = _rng().normal(size=(30, 4)) + labels[:, None] * 0.7
    probe = analysis.fit_probe(x, labels, l2=1e-2)
    weight = torch.tensor(probe.weight, requires_grad=True)
    bias = torch.tensor(probe.bias, requires_grad=True)
    features = torch.from_numpy((x - probe.mean) / probe.scale)
    analysis.probe_loss(features, torch.from_numpy(labels), weight, bias, 1e-2).backward()
    assert weight.grad.abs().max() < 1e-6 and bias.grad.abs().max() < 1e-6


def test_folds_are_stratified_and_cover_every_sample_once():
    labels = np.repeat(np.arange(3), [5, 10, 15])
    folds = analysis.fold_indices(labels, 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(30))
    for fold in folds:
        assert np.bincount(labels[fold], minlength=3).tolist() == [1, 2, 3]


# --------------------------------------------------------------------------------------------------------
# scripts/analyze.py end to end on two tiny runs
# --------------------------------------------------------------------------------------------------------

def read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tiny_run(run_dir, *overrides):
    """A 2-step run of train.py's `run` with its composed config where Hydra would write it."""
    from omegaconf import OmegaConf

    from lime.run import run
    from tests.test_train import SMALL, compose_config

    cfg = compose_config(*SMALL, "trainer.max_steps=2", "trainer.evaluate=false", *overrides)
    run(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.mark.slow
def test_analyze_script_writes_every_artifact(tmp_path):
    import json

    from tests.scripts import load_script

    lime_run = _tiny_run(tmp_path / "lime", "routing.n_gram=2")
    lora_run = _tiny_run(tmp_path / "lora", "peft=lora")
    analyze = load_script("analyze")
    argv = [str(lime_run), str(lora_run), "--out", str(tmp_path / "out"), "--folds", "2",
            "--tsne-iterations", "300", "--perplexity", "5", "--modules", r"layers\.1\."]
    paths = analyze.main(argv)
    out = tmp_path / "out"
    for run in ("lime", "lora"):
        for name in ("probe_by_position", "pca", "tsne"):
            assert (out / run / f"{name}.png").is_file() and (out / run / f"{name}.pdf").is_file()
            assert (out / run / f"{name}.csv").is_file()
    assert (out / "cka.png").is_file() and out / "cka.csv" in paths
    routing = read_csv(out / "lime" / "tsne_routing.csv")
    assert len(routing) == 32 * 4  # every (sample, LiME layer) pair: q, k, v, o of block 1
    assert {r["dominant_expert"] for r in routing} <= {"0", "1", "2", "3"}
    assert not (out / "lora" / "tsne_routing.csv").exists()  # no routing without experts

    probe = read_csv(out / "lime" / "probe_by_position.csv")
    recorded = list(dict.fromkeys(r["module"] for r in routing))  # in module order
    assert len(recorded) == 4 and all(".layers.1.self_attn." in m for m in recorded)  # q, k, v, o of block 1
    assert sorted(recorded) == sorted(r["module"] for r in read_csv(out / "cka.csv"))
    # probes, PCA and t-SNE: the first, middle and last recorded layers
    assert {r["module"] for r in probe} == {recorded[0], recorded[2], recorded[3]}
    # LiME: routing and representation probes at positions 1..2 of the bigram window, 16 tasks x 2 samples
    assert {(r["feature"], r["position"]) for r in probe} == {(f, p) for f in ("routing", "representation")
                                                             for p in ("1", "2")}
    assert all(r["samples"] == "32" and r["tasks"] == "16" and 0 <= float(r["accuracy"]) <= 1 for r in probe)
    lora_probe = read_csv(out / "lora" / "probe_by_position.csv")
    assert {r["feature"] for r in lora_probe} == {"representation"}  # plain LoRA has no routing weights

    pca_rows = read_csv(out / "lime" / "pca.csv")
    assert len({r["sample"] for r in pca_rows}) == 32
    ratios = json.loads((out / "lime" / "pca.json").read_text())
    assert all(0 < sum(v["explained_variance_ratio"]) <= 1 for v in ratios.values())

    cka = read_csv(out / "cka.csv")
    assert all(r["samples"] == "32" for r in cka) and len(cka) == 4
    assert all(0 < float(r["cka"]) <= 1 for r in cka)
