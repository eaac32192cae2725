"""The math of the representation analyses (scripts/analyze.py): linear probes, PCA, t-SNE, linear CKA.

Pure functions of arrays (rows = samples), no model and no plotting:

    probe:       multinomial logistic regression  p(y | x) = softmax(W x̄ + b),  x̄ = (x − μ) / σ,
                 fitted by L-BFGS on  mean_i −log p(y_i | x_i) + λ ‖W‖²;  accuracy on held-out folds
    pca:         X_c = X − mean(X) = U S Vᵀ;  scores U S,  components Vᵀ,  explained variance S² / Σ S²
    tsne:        exact t-SNE (van der Maaten & Hinton 2008): p_{j|i} ∝ exp(−‖x_i − x_j‖² / 2σ_i²), σ_i set by the
                 perplexity, P = (P_{j|i} + P_{i|j}) / 2N,  q_ij ∝ (1 + ‖y_i − y_j‖²)⁻¹,  gradient descent on KL(P‖Q)
    linear_cka:  CKA(X, Y) = ‖Y_cᵀ X_c‖²_F / (‖X_cᵀ X_c‖_F ‖Y_cᵀ Y_c‖_F)  (Kornblith et al. 2019)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _centered(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"expected a (samples, features) array with at least 2 samples, got shape {x.shape}")
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two representations of the same samples (rows), in [0, 1]."""
    xc, yc = _centered(x), _centered(y)
    if len(xc) != len(yc):
        raise ValueError(f"linear_cka: {len(xc)} samples in x but {len(yc)} in y")
    cross = np.linalg.norm(yc.T @ xc) ** 2
    norms = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    return float(cross / norms) if norms > 0 else 0.0


@dataclass(frozen=True)
class PCA:
    scores: np.ndarray  # (N, k) coordinates of the samples
    components: np.ndarray  # (k, D) unit directions
    explained_variance_ratio: np.ndarray  # (k,)


def pca(x: np.ndarray, k: int = 2) -> PCA:
    """The first k principal components; each component's sign makes its largest-magnitude entry positive."""
    xc = _centered(x)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    k = min(k, len(s))
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
    signs[signs == 0] = 1.0
    total = float((s**2).sum())
    ratio = (s[:k] ** 2) / total if total > 0 else np.zeros(k)
    return PCA(u[:, :k] * s[:k] * signs, vt[:k] * signs[:, None], ratio)


def _squared_distances(x: np.ndarray) -> np.ndarray:
    sq = (x**2).sum(axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)


def conditional_probabilities(x: np.ndarray, perplexity: float, tol: float = 1e-5,
                              max_steps: int = 100) -> np.ndarray:
    """p_{j|i} (rows sum to 1, zero diagonal), each row's precision found by bisection so that its entropy is
    log(perplexity)."""
    d = _squared_distances(np.asarray(x, dtype=np.float64))
    n = len(d)
    target = np.log(perplexity)
    p = np.zeros((n, n))
    for i in range(n):
        others = np.delete(d[i], i)
        beta, low, high = 1.0, 0.0, np.inf
        for _ in range(max_steps):
            logits = -(others - others.min()) * beta
            row = np.exp(logits)
            row /= row.sum()
            entropy = -(row * np.log(np.maximum(row, 1e-300))).sum()
            if abs(entropy - target) < tol:
                break
            if entropy > target:  # too flat: sharpen
                low = beta
                beta = beta * 2 if high == np.inf else (beta + high) / 2
            else:
                high = beta
                beta = (beta + low) / 2
        p[i, np.arange(n) != i] = row
    return p


def tsne(x: np.ndarray, dims: int = 2, perplexity: float = 30.0, iterations: int = 1000, seed: int = 0,
         learning_rate: float | None = None) -> np.ndarray:
    """Exact t-SNE embedding (N, dims), O(N²) memory: for the few thousand points of an analysis.

    The perplexity is capped at (N − 1) / 3 so that small sets still have a well-posed P. Early exaggeration
    (×12, first 250 steps), momentum 0.5 → 0.8 and per-coordinate gains, as in the reference implementation;
    the learning rate defaults to max(N / 48, 50) (scikit-learn's "auto"): 200 overshoots on small sets.
    """
    x = _centered(x)
    n = len(x)
    learning_rate = learning_rate or max(n / 48.0, 50.0)
    p = conditional_probabilities(x, min(perplexity, max((n - 1) / 3.0, 1.0)))
    p = np.maximum((p + p.T) / (2.0 * n), 1e-12)
    y = np.random.default_rng(seed).normal(0.0, 1e-4, size=(n, dims))
    velocity, gains = np.zeros_like(y), np.ones_like(y)
    for step in range(iterations):
        exaggeration = 12.0 if step < 250 else 1.0
        kernel = 1.0 / (1.0 + _squared_distances(y))
        np.fill_diagonal(kernel, 0.0)
        q = np.maximum(kernel / kernel.sum(), 1e-12)
        force = (exaggeration * p - q) * kernel
        grad = 4.0 * (np.diag(force.sum(axis=1)) - force) @ y
        momentum = 0.5 if step < 250 else 0.8
        same_sign = np.sign(grad) == np.sign(velocity)
        gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
        velocity = momentum * velocity - learning_rate * gains * grad
        y = y + velocity
        y -= y.mean(axis=0, keepdims=True)
    return y


def tsne_kl(x: np.ndarray, y: np.ndarray, perplexity: float = 30.0) -> float:
    """KL(P‖Q) of an embedding y of x: the quantity `tsne` minimises."""
    n = len(x)
    p = conditional_probabilities(_centered(x), min(perplexity, max((n - 1) / 3.0, 1.0)))
    p = np.maximum((p + p.T) / (2.0 * n), 1e-12)
    kernel = 1.0 / (1.0 + _squared_distances(np.asarray(y, dtype=np.float64)))
    np.fill_diagonal(kernel, 0.0)
    q = np.maximum(kernel / kernel.sum(), 1e-12)
    off = ~np.eye(n, dtype=bool)
    return float((p[off] * np.log(p[off] / q[off])).sum())


@dataclass(frozen=True)
class Probe:
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # (classes, D) on standardised features
    bias: np.ndarray  # (classes,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1)


def fit_probe(x: np.ndarray, y: np.ndarray, num_classes: int | None = None, l2: float = 1e-2,
              max_iter: int = 100) -> Probe:
    """A multinomial logistic-regression probe (labels 0..C−1) on standardised features, fitted by L-BFGS."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    num_classes = num_classes or int(y.max()) + 1
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant features stay 0 after standardising
    features = torch.from_numpy((x - mean) / scale)
    labels = torch.from_numpy(y)
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = probe_loss(features, labels, weight, bias, l2)
        loss.backward()
        return loss

    optimizer.step(closure)
    return Probe(mean, scale, weight.detach().numpy(), bias.detach().numpy())


def probe_loss(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               l2: float) -> torch.Tensor:
    """Mean cross-entropy of the probe plus λ ‖W‖² (the bias is not penalised)."""
    logits = features @ weight.T + bias
    return torch.nn.functional.cross_entropy(logits, labels) + l2 * (weight**2).sum()


def fold_indices(labels: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Stratified folds: each class's samples (shuffled with `seed`) dealt round-robin over the folds."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        assignment[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return [np.flatnonzero(assignment == k) for k in range(folds)]


def probe_accuracy(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, l2: float = 1e-2) -> float:
    """Held-out accuracy of the probe, averaged over stratified folds (every sample is tested once)."""
    y = np.asarray(y)
    folds = min(folds, len(y))
    if folds < 2:
        raise ValueError(f"probe_accuracy needs at least 2 samples, got {len(y)}")
    num_classes = int(y.max()) + 1
    correct = 0
    for test in fold_indices(y, folds, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        probe = fit_probe(x[train], y[train], num_classes, l2)
        correct += int((probe.predict(x[test]) == y[test]).sum())
    return correct / len(y)
