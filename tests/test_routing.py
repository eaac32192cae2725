"""Routing against a naive per-token re-implementation written here (docs/method.md §2)."""

import math

import pytest
import torch

from lime.config import ConfigError, RoutingConfig
from lime.routing import Router, channel_indices, select_experts, window_anchors, zero_param_logits

E = 4


def naive_logits(z, z_hat, gamma, tau, norm, norm_mask=None):
    """Per-token loops over python floats."""
    B, T, _ = z.shape
    if norm == "global":
        rows = [(b, t) for b in range(B) for t in range(T) if norm_mask is None or norm_mask[b, t]]
        gz = max(max(abs(float(v)) for v in z[b, t]) for b, t in rows)
        gzh = max(max(abs(float(v)) for v in z_hat[b, t]) for b, t in rows)
    out = torch.zeros(B, T, E)
    for b in range(B):
        for t in range(T):
            nz = max(abs(float(v)) for v in z[b, t]) if norm == "token" else gz
            nzh = max(abs(float(v)) for v in z_hat[b, t]) if norm == "token" else gzh
            nz, nzh = max(nz, 1e-6), max(nzh, 1e-6)
            for e in range(E):
                out[b, t, e] = ((1 - gamma) * z[b, t, e] / nz + gamma * z_hat[b, t, e] / nzh) / tau
    return out


def naive_select(w, mode, theta=0.5, k=2, sharp=0.5):
    """One token: returns renormalised weights as a python list."""
    w = [float(v) for v in w]
    if mode == "dense":
        return w
    t = theta * max(w) if mode in ("auto", "soft_auto") else sorted(w, reverse=True)[k - 1]
    if mode == "auto":
        kept = [v if v >= t else 0.0 for v in w]
    elif mode == "topk":
        order = sorted(range(len(w)), key=lambda i: -w[i])[:k]
        kept = [w[i] if i in order else 0.0 for i in range(len(w))]
    else:
        kept = [v / (1 + math.exp(-(v - t) / sharp)) for v in w]
    s = sum(kept)
    return [v / s for v in kept]


@pytest.mark.parametrize("norm", ["token", "global"])
def test_logits_match_naive(norm):
    torch.manual_seed(0)
    z, z_hat = torch.randn(2, 5, E), torch.randn(2, 5, E) * 0.01
    z_hat[0, 1] = 0.0  # exercises the 1e-6 floor
    mask = torch.rand(2, 5) > 0.3
    for norm_mask in (None, mask):
        got = zero_param_logits(z, z_hat, 0.7, 0.5, norm, norm_mask)
        want = naive_logits(z, z_hat, 0.7, 0.5, norm, norm_mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["auto", "topk", "soft_auto", "soft_topk", "dense"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_selection_matches_naive(mode, k):
    torch.manual_seed(1)
    weights = torch.randn(3, 7, E).softmax(-1)
    cfg = RoutingConfig(selection=mode, top_k=k, threshold=0.6)
    got, selected = select_experts(weights, cfg)
    for b in range(3):
        for t in range(7):
            want = naive_select(weights[b, t], mode, theta=0.6, k=k)
            torch.testing.assert_close(got[b, t], torch.tensor(want), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, 7))
    if mode in ("auto", "topk"):  # hard selection: unselected experts get exactly 0
        assert torch.equal(got == 0, ~selected)
    if mode == "topk":
        assert (selected.sum(-1) == k).all()


def test_auto_keeps_experts_above_threshold_of_max():
    w = torch.tensor([[0.5, 0.26, 0.24, 0.0]])
    got, selected = select_experts(w, RoutingConfig(selection="auto", threshold=0.5))
    assert selected.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(got, torch.tensor([[0.5 / 0.76, 0.26 / 0.76, 0.0, 0.0]]))


def test_channel_sets():
    assert channel_indices(10, 4, "leading").tolist() == [0, 1, 2, 3]
    assert channel_indices(10, 4, "trailing").tolist() == [6, 7, 8, 9]
    assert channel_indices(10, 4, "central").tolist() == [3, 4, 5, 6]
    random = channel_indices(10, 4, "random", seed=3)
    assert random.tolist() == channel_indices(10, 4, "random", seed=3).tolist()
    assert len(set(random.tolist())) == 4 and random.tolist() == sorted(random.tolist())


def naive_anchor_positions(valid, n, anchor):
    """For each position, the position of its window's anchor (own position for pads)."""
    B, T = valid.shape
    out = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        real = [t for t in range(T) if valid[b, t]]
        for t in range(T):
            if not valid[b, t]:
                out[b, t] = t
                continue
            k = real.index(t)
            start = (k // n) * n
            out[b, t] = real[start] if anchor == "first" else real[min(start + n - 1, len(real) - 1)]
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("anchor", ["first", "last"])
def test_window_anchors_match_naive(n, anchor):
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    valid[2, 6:] = False  # right padding
    valid[3, [0, 4]] = False  # holes
    assert torch.equal(window_anchors(valid, 9, n, anchor), naive_anchor_positions(valid, n, anchor))


def test_window_anchors_in_decoding_point_to_the_past():
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    # the 7th token of row 0 has index 6: window [6, 9) opens at itself; row 1 has index 4: window [3, 6),
    # opened by the token at position 5
    assert window_anchors(valid, 1, 3, "first").tolist() == [[6], [5]]
    # two new tokens (a verification step of assisted decoding): the same anchors as the full sequence's
    assert torch.equal(window_anchors(valid, 2, 3, "first"), naive_anchor_positions(valid, 3, "first")[:, -2:])


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("anchor", ["first", "last"])
def test_window_anchors_of_packed_sequences(n, anchor):
    """Several sequences packed on one row (Qwen2-VL's vision tower): windows restart at each sequence."""
    lengths = torch.tensor([5, 3, 4])
    ends = lengths.cumsum(0)
    image = torch.repeat_interleave(torch.arange(3), lengths)
    bounds = ((ends - lengths)[image].unsqueeze(0), (ends - 1)[image].unsqueeze(0))
    packed = window_anchors(torch.ones(1, 12, dtype=torch.bool), 12, n, anchor, bounds)
    start = 0
    for length in lengths.tolist():
        alone = naive_anchor_positions(torch.ones(1, length, dtype=torch.bool), n, anchor)
        assert torch.equal(packed[:, start : start + length], alone + start)
        start += length


@pytest.mark.parametrize("norm", ["token", "global"])
def test_router_shares_anchor_weights_in_windows(norm):
    torch.manual_seed(0)
    router = Router(8, 8, E, RoutingConfig(n_gram=3, norm=norm)).eval()
    z, z_hat = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    weights, _, _ = router(z, z, z_hat, valid)
    anchors = naive_anchor_positions(valid, 3, "first")
    norm_mask = torch.zeros(2, 7, dtype=torch.bool)
    for b in range(2):
        for t in range(7):
            if valid[b, t]:
                norm_mask[b, anchors[b, t]] = True
    own = naive_logits(z[..., :E], z_hat[..., :E], 0.7, 0.5, norm, norm_mask).softmax(-1)
    for b in range(2):
        for t in range(7):
            if valid[b, t]:
                torch.testing.assert_close(weights[b, t], own[b, anchors[b, t]], atol=1e-6, rtol=1e-6)


def test_jitter_only_in_training():
    torch.manual_seed(0)
    router = Router(8, 8, E, RoutingConfig(jitter=0.1))
    z = torch.randn(1, 5, 8)
    valid = torch.ones(1, 5, dtype=torch.bool)
    router.train()
    a, _, _ = router(z, z, z, valid)
    b, _, _ = router(z, z, z, valid)
    assert not torch.equal(a, b)
    router.eval()
    a, _, _ = router(z, z, z, valid)
    b, _, _ = router(z, z, z, valid)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, key", [(dict(n_gram=2, anchor="last"), "anchor='last'"),
                                         (dict(norm="global"), "norm='global'")])
def test_settings_that_cannot_decode_with_a_cache_are_refused(kwargs, key):
    router = Router(8, 8, E, RoutingConfig(**kwargs)).eval()
    z = torch.randn(1, 1, 8)
    router(z, z, z, torch.ones(1, 1, dtype=torch.bool))  # a full forward (or a prefill) is fine
    with pytest.raises(RuntimeError, match=f"{key}.*cached generation"):
        router(z, z, z, torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(threshold=0.0), "routing.threshold"),
        (dict(threshold=1.5), "routing.threshold"),
        (dict(n_gram=0), "routing.n_gram"),
        (dict(selection="top2"), "routing.selection"),
        (dict(temperature=0.0), "routing.temperature"),
        (dict(norm="layer"), "routing.norm"),
        (dict(anchor="middle"), "routing.anchor"),
    ],
)
def test_bad_routing_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        RoutingConfig(**kwargs)
