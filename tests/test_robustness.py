"""Certified radii from Lipschitz bounds (lipsdp.robustness, docs/math.md §9).

The checks:

* pairwise radii are at least the global ones, pointwise, in both norms;
* empirical soundness: no perturbation inside a certified ball changes the label. This covers
  random samples (inside the ball and on its boundary), a targeted step along the gradient of the
  binding margin, and a projected-gradient attack on the smallest margin (torch autograd, float64);
* tightness on a linear classifier, where the pairwise radius is exact, so a step just past it
  flips the label;
* the bookkeeping: misclassified points get 0, certified accuracy at 0 is the clean accuracy,
  a pair that fails to verify raises.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
import lipsdp.pipeline
from lipsdp.certificate import UNVERIFIED, Certificate
from lipsdp.io import network_from_module
from lipsdp.robustness import certified_radii, global_lipschitz, pairwise_lipschitz

torch.set_num_threads(1)
NORMS = ("l2", "linf")
RTOL = 1e-6  # solver tolerance: sqrt(2) L and L_yj come from different SDPs


def _blobs(n: int, seed: int):
    """Three overlapping Gaussian classes in 4-D (some points are misclassified)."""
    gen = np.random.default_rng(seed)
    centres = np.array([[1.5, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 1.5, 0.5]])
    y = gen.integers(0, 3, n)
    return centres[y] + 0.8 * gen.standard_normal((n, 4)), y


@pytest.fixture(scope="module")
def classifier():
    """A 4-16-16-3 ReLU net trained for a moment, its Network, test data and both kinds of bounds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = _blobs(300, seed=0)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    network = network_from_module(model)
    X, Y = _blobs(60, seed=1)
    bounds = {norm: (pairwise_lipschitz(network, norm=norm), global_lipschitz(network, norm=norm))
              for norm in NORMS}
    return {"model": model.double(), "network": network, "X": X, "Y": Y, "bounds": bounds}


def _logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float64)).numpy()


def test_pairwise_matrix(classifier):
    for norm in NORMS:
        L, Lg = classifier["bounds"][norm]
        assert L.shape == (3, 3) and np.array_equal(L, L.T) and np.all(np.diag(L) == 0)
        off = L[~np.eye(3, dtype=bool)]
        assert np.all(np.isfinite(off)) and np.all(off > 0)
        factor = math.sqrt(2) if norm == "l2" else 2.0
        assert np.all(off <= factor * Lg * (1 + RTOL)), (norm, off, Lg)


def test_pairwise_bounds_are_sound(classifier):
    """L_yj is at least the sampled gradient norm of f_y - f_j (dual norm: l2 -> 2, linf -> 1)."""
    model = classifier["model"]
    x = torch.tensor(np.random.default_rng(2).normal(size=(400, 4)) * 2, dtype=torch.float64, requires_grad=True)
    out = model(x)
    for y, j in [(0, 1), (0, 2), (1, 2)]:
        (g,) = torch.autograd.grad((out[:, y] - out[:, j]).sum(), x, retain_graph=True)
        for norm, p in (("l2", 2), ("linf", 1)):
            lower = float(torch.linalg.vector_norm(g, ord=p, dim=1).max())
            assert lower <= classifier["bounds"][norm][0][y, j] * (1 + 1e-9)


@pytest.mark.parametrize("norm", NORMS)
def test_pairwise_radii_dominate_global(classifier, norm):
    L, Lg = classifier["bounds"][norm]
    pair = certified_radii(classifier["network"], classifier["X"], classifier["Y"], L=L, norm=norm)
    glob = certified_radii(classifier["network"], classifier["X"], classifier["Y"], L=Lg, norm=norm)
    assert pair.method == "pairwise" and glob.method == "global"
    assert np.all(pair.radii >= glob.radii * (1 - RTOL))
    assert np.any(pair.radii > glob.radii * 1.01), "pairwise should beat global somewhere on this net"
    # The global radius is exactly the docs/math.md §9 formula (f_y - max_{j!=y} f_j) / (factor L).
    factor = math.sqrt(2) if norm == "l2" else 2.0
    top2 = np.sort(glob.logits, axis=1)[:, -2:]
    expected = np.where(glob.correct, (top2[:, 1] - top2[:, 0]) / (factor * Lg), 0.0)
    np.testing.assert_allclose(glob.radii, expected, rtol=1e-12)
    for eps in (0.0, 0.05, 0.2, 0.5):
        assert pair.certified_accuracy(eps) >= glob.certified_accuracy(eps)


def test_bookkeeping(classifier):
    network, X, Y = classifier["network"], classifier["X"], classifier["Y"]
    L = classifier["bounds"]["l2"][0]
    res = certified_radii(network, X, Y, L=L)
    logits = _logits(classifier["model"], X)
    np.testing.assert_allclose(res.logits, logits, rtol=1e-10, atol=1e-10)
    assert np.array_equal(res.predictions, logits.argmax(1))
    assert 0 < res.correct.sum() < len(Y), "the blobs overlap: some but not all points are correct"
    assert np.all(res.radii[~res.correct] == 0) and np.all(res.radii[res.correct] > 0)
    assert np.all(res.binding[~res.correct] == -1)
    assert res.certified_accuracy(0.0) == pytest.approx(res.clean_accuracy) == pytest.approx(np.mean(Y == res.predictions))
    curve = res.certified_accuracy(np.array([0.0, 0.1, 1.0, 1e9]))
    assert curve.shape == (4,) and np.all(np.diff(curve) <= 0) and curve[-1] == 0
    # Without labels every point is certified for its own prediction.
    free = certified_radii(network, torch.tensor(X), L=L)
    assert free.labels is None and np.all(free.radii > 0)
    np.testing.assert_array_equal(free.radii[res.correct], res.radii[res.correct])
    # A Certificate from lipsdp.certify is a global bound; a wrong norm is refused.
    cert = lipsdp.certify(network, lower_bound_samples=0)
    via_cert = certified_radii(network, X, Y, L=cert)
    np.testing.assert_allclose(via_cert.radii, certified_radii(network, X, Y, L=cert.bound).radii)
    with pytest.raises(lipsdp.LipSDPError, match="norm"):
        certified_radii(network, X, Y, L=cert, norm="linf")
    with pytest.raises(lipsdp.LipSDPError, match="shape"):
        certified_radii(network, X, Y, L=np.ones((2, 2)))
    with pytest.raises(lipsdp.LipSDPError, match="unknown norm"):
        pairwise_lipschitz(network, norm="l1")


def test_subset_of_pairs_and_unverified(classifier, monkeypatch):
    network = classifier["network"]
    L = pairwise_lipschitz(network, pairs=[(2, 0)])
    assert L[0, 2] == L[2, 0] == pytest.approx(classifier["bounds"]["l2"][0][0, 2], rel=1e-6)
    assert np.isinf(L[0, 1]) and np.isinf(L[1, 2])
    res = certified_radii(network, classifier["X"], classifier["Y"], L=L)
    assert np.all(res.radii == 0), "every radius depends on an unknown pair when K = 3"
    with pytest.raises(lipsdp.LipSDPError, match="out of range"):
        pairwise_lipschitz(network, pairs=[(0, 3)])

    monkeypatch.setattr(lipsdp.pipeline, "certify_network",
                        lambda *a, **k: Certificate(None, UNVERIFIED, message="fake failure"))
    with pytest.raises(lipsdp.LipSDPError, match="did not verify"):
        pairwise_lipschitz(network)


def _project(delta, radius, norm):
    """Project each row of ``delta`` into the closed ball of ``radius`` (a column)."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, radius), -radius)
    n = torch.linalg.vector_norm(delta, dim=1, keepdim=True).clamp_min(1e-300)
    return delta * torch.clamp(radius / n, max=1.0)


def _min_margin(model, x, y):
    out = model(x)
    top = out.gather(1, y[:, None])
    others = out.masked_fill(nn.functional.one_hot(y, out.shape[1]).bool(), -float("inf"))
    return (top - others).min(dim=1).values  # > 0 iff the label is still y (ties count as a change)


@pytest.mark.parametrize("norm", NORMS)
def test_no_label_change_inside_certified_ball(classifier, norm):
    model, network = classifier["model"], classifier["network"]
    res = certified_radii(network, classifier["X"], classifier["Y"], L=classifier["bounds"][norm][0], norm=norm)
    keep = res.radii > 0
    X, y, r = classifier["X"][keep], res.predictions[keep], res.radii[keep]
    shrink = 1 - 1e-6  # strictly inside the open ball, also after float rounding
    gen = np.random.default_rng(3)
    n, d, samples = len(X), X.shape[1], 2000

    # 1. Random samples: uniform in the ball, and on its boundary (where a violation would show first).
    if norm == "l2":
        u = gen.standard_normal((n, samples, d))
        u /= np.linalg.norm(u, axis=2, keepdims=True)
        scale = np.concatenate([gen.uniform(size=(n, samples // 2, 1)) ** (1 / d),
                                np.ones((n, samples - samples // 2, 1))], axis=1)
        delta = u * scale
    else:
        delta = gen.uniform(-1, 1, (n, samples, d))
        delta[:, samples // 2:] = np.sign(delta[:, samples // 2:])  # the box's vertices
    delta *= (shrink * r)[:, None, None]
    logits = network.numpy_forward((X[:, None, :] + delta).reshape(-1, d)).reshape(n, samples, -1)
    assert np.all(logits.argmax(axis=2) == y[:, None]), "a random perturbation inside the certified ball flipped a label"

    # 2. Targeted: one step of size r against the gradient of the binding margin f_y - f_j.
    xt = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    yt, jt = torch.tensor(y), torch.tensor(res.binding[keep])
    out = model(xt)
    (g,) = torch.autograd.grad((out.gather(1, yt[:, None]) - out.gather(1, jt[:, None])).sum(), xt)
    rt = torch.tensor(shrink * r, dtype=torch.float64)[:, None]
    step = g / torch.linalg.vector_norm(g, dim=1, keepdim=True) if norm == "l2" else torch.sign(g)
    x_adv = xt.detach() - rt * step
    with torch.no_grad():
        assert torch.all(_min_margin(model, x_adv, yt) > 0), "the gradient step inside the ball flipped a label"
    assert np.all(network.numpy_forward(x_adv.numpy()).argmax(1) == y)

    # 3. Projected gradient descent on the smallest margin, 40 steps inside the ball.
    delta = torch.zeros_like(xt)
    for _ in range(40):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(_min_margin(model, xt.detach() + delta, yt).sum(), delta)
        direction = g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-300) if norm == "l2" \
            else torch.sign(g)
        delta = _project(delta.detach() - 0.1 * rt * direction, rt, norm)
    with torch.no_grad():
        margin = _min_margin(model, xt.detach() + delta, yt)
    assert torch.all(margin > 0), "projected gradient descent inside the certified ball flipped a label"


@pytest.mark.parametrize("norm", NORMS)
def test_linear_classifier_radius_is_exact(norm):
    """Without hidden layers, f_y - f_j is linear: the pairwise radius is exact, so just past it the label flips."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4)).double().eval()
    network = network_from_module(model)
    W = model[0].weight.detach().numpy()
    L = pairwise_lipschitz(network, norm=norm)
    dual = 2 if norm == "l2" else 1
    for y in range(4):
        for j in range(4):
            if y != j:
                exact = np.linalg.norm(W[y] - W[j], ord=dual)
                assert exact <= L[y, j] <= exact * (1 + 1e-6)
    X = np.random.default_rng(4).normal(size=(50, 5))
    res = certified_radii(network, X, L=L, norm=norm)
    w = W[res.predictions] - W[res.binding]  # gradient of the binding margin
    step = w / np.linalg.norm(w, axis=1, keepdims=True) if norm == "l2" else np.sign(w)
    inside = network.numpy_forward(X - (1 - 1e-6) * res.radii[:, None] * step).argmax(1)
    beyond = network.numpy_forward(X - (1 + 1e-4) * res.radii[:, None] * step).argmax(1)
    assert np.all(inside == res.predictions)
    assert np.all(beyond != res.predictions)
