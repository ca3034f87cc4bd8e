"""Local Lipschitz bounds (lipsdp.local; docs/math.md §6).

* the sandwich for several centers and radii: sampled local lower bound (largest Jacobian norm over
  points of the region, torch autograd on the real model) <= local bound <= global bound, for ReLU,
  LeakyReLU and tanh MLPs (l2 and l_inf regions) and one CNN;
* as the radius shrinks at a center away from kinks the local bound approaches the Jacobian norm at
  the center (within 1% at r = 1e-4 on a ReLU MLP);
* the certificate carries ``region`` and ``global_bound`` (JSON and table), the command line takes
  ``--center --radius --region-norm`` and refuses bad regions with one line and exit code 2;
* ``robustness --method local`` certifies at least as many samples as ``global`` at every radius, and every
  sample it certifies survives PGD at that radius (l2 and l_inf).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from digits_classifier import digits_classifier, save_model_and_data
from models import mlp
from test_robustness_cli import _pgd

import lipsdp
from lipsdp.cli import main
from lipsdp.dataset import check_data
from lipsdp.io import network_from_module
from lipsdp.local import localize
from lipsdp.network import Network
from lipsdp.parallel import evaluate_dataset

torch.set_num_threads(1)


def _autograd_lower(model, center, radius, norm, lip_norm, n=256, seed=0, shape=None):
    """Largest Jacobian norm (autograd, float64) at the center and random points of the region."""
    rng = np.random.default_rng(seed)
    d = center.size
    if norm == "l2":
        u = rng.normal(size=(n, d))
        u *= radius * rng.uniform(0, 1, (n, 1)) ** (1 / d) / np.linalg.norm(u, axis=1, keepdims=True)
    else:
        u = radius * rng.uniform(-1, 1, (n, d))
    model = model.double()
    best = 0.0
    for x in np.vstack([center, center + u]):
        xt = torch.as_tensor(x.reshape(shape or (d,)), dtype=torch.float64)[None]
        J = torch.autograd.functional.jacobian(lambda z: model(z)[0], xt).reshape(-1, d).numpy()
        value = np.linalg.norm(J, 2) if lip_norm == "l2" else np.abs(J).sum(axis=1).max()
        best = max(best, float(value))
    model.float()
    return best


def _check_sandwich(model, center, radius, region_norm, lip_norm="l2", shape=None):
    cert = lipsdp.certify(model, center=center, radius=radius, region_norm=region_norm, norm=lip_norm,
                          input_shape=shape, lower_bound_samples=64)
    assert cert.verified and cert.global_bound is not None
    lower = _autograd_lower(model, center, radius, region_norm, lip_norm, shape=shape)
    assert lower <= cert.bound * (1 + 1e-9), (lower, cert.bound)
    assert cert.lower_bound <= cert.bound * (1 + 1e-9)
    assert cert.bound <= cert.global_bound
    assert cert.region["radius"] == radius and cert.region["norm"] == region_norm
    return cert, lower


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh"])
def test_sandwich_mlps(act):
    model = mlp([4, 10, 10, 3], activation=act, seed=1)
    rng = np.random.default_rng(0)
    tight = []
    for radius, region_norm in ((0.05, "l2"), (0.5, "l2"), (0.1, "linf")):
        center = rng.normal(size=4)
        cert, lower = _check_sandwich(model, center, radius, region_norm)
        tight.append(cert.bound < cert.global_bound)
    assert any(tight)  # small regions give strictly smaller bounds than the global one


@pytest.mark.slow
def test_sandwich_linf_lipschitz_norm():
    model = mlp([4, 8, 8, 3], activation="relu", seed=2)
    _check_sandwich(model, np.random.default_rng(1).normal(size=4), 0.1, "linf", lip_norm="linf")


def test_sandwich_cnn():
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 3, 3))
    center = np.random.default_rng(2).uniform(0, 1, 25)
    cert, _ = _check_sandwich(cnn, center, 0.05, "l2", shape=(1, 5, 5))
    assert cert.bound < cert.global_bound


@pytest.mark.parametrize("lip_norm", ["linf", "l2"])
def test_the_clarke_jacobian_bound_is_used_where_it_is_smaller(lip_norm):
    """Both local methods run on a region; the certificate holds the smaller proven bound and names it
    (docs/math.md §6.3), and the sandwich holds either way."""
    model = mlp([4, 8, 8, 3], activation="relu", seed=2)
    center = np.random.default_rng(1).normal(size=4)
    cert, _ = _check_sandwich(model, center, 0.05, "linf", lip_norm=lip_norm)
    jac = cert.region["jacobian_bound"]
    assert isinstance(jac, float) and cert.bound <= jac * (1 + 1e-12)
    assert cert.region["bound_from"] == ("clarke-jacobian" if jac < (cert.region["local_bound"] or np.inf)
                                         and jac < cert.global_bound else cert.region["bound_from"])
    if cert.region["bound_from"] == "clarke-jacobian":
        assert cert.verification["method"] == "clarke-jacobian" and cert.bound == jac


def test_small_radius_reaches_jacobian_norm():
    model = mlp([4, 16, 16, 3], activation="relu", seed=3)
    center = np.random.default_rng(4).normal(size=4)
    network = network_from_module(model)
    _, stats = localize(network, center, 1e-4)
    assert stats["stable"] == stats["neurons"]  # away from kinks: every neuron has one slope
    cert = lipsdp.certify(model, center=center, radius=1e-4, lower_bound_samples=16)
    jac = _autograd_lower(model, center, 0.0, "l2", "l2", n=0)
    assert jac <= cert.bound <= 1.01 * jac, (cert.bound, jac)
    assert cert.global_bound > 1.05 * cert.bound


def test_stable_neurons_eliminated_exactly():
    """The rewritten graph computes the model's values on the region, and the bound is at most the one with
    the stable neurons' equality QCs kept (which solvers reach only as the multiplier grows without end)."""
    model = mlp([4, 12, 12, 3], activation="leaky_relu", seed=6)
    network = network_from_module(model).validate()
    rng = np.random.default_rng(6)
    center, radius = rng.normal(size=4), 0.2
    split, stats = localize(network, center, radius)
    kept, _ = localize(network, center, radius, eliminate=False)
    assert 0 < stats["stable"] < stats["neurons"]
    X = _ball_points(rng, center, radius, 500)
    assert np.allclose(split.numpy_forward(X), network.numpy_forward(X), rtol=1e-12, atol=1e-12)
    a = lipsdp.certify(split, lower_bound_samples=0, solver="ipm")
    b = lipsdp.certify(kept, lower_bound_samples=0, solver="ipm")
    assert a.verified and b.verified and a.bound <= b.bound * (1 + 1e-6)
    assert _autograd_lower(model, center, radius, "l2", "l2") <= a.bound


def _ball_points(rng, center, radius, n):
    u = rng.normal(size=(n, center.size))
    return center + u * (radius * rng.uniform(0, 1, (n, 1)) ** (1 / center.size)
                         / np.linalg.norm(u, axis=1, keepdims=True))


def test_certificate_json_table_and_cli(tmp_path, capsys):
    model = mlp([4, 8, 3], activation="relu", seed=5)
    torch.save(model, tmp_path / "m.pt")
    np.save(tmp_path / "c.npy", np.random.default_rng(5).normal(size=4))
    args = ["certify", str(tmp_path / "m.pt"), "--trust-pickle", "--samples", "16"]
    assert main(args + ["--center", str(tmp_path / "c.npy"), "--radius", "0.1", "--json"], own_process=False) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["region"]["radius"] == 0.1 and d["region"]["norm"] == "l2" and len(d["region"]["center_sha256"]) == 64
    assert d["bound"] <= d["global_bound"] and d["lower_bound"] <= d["bound"]
    assert main(args + ["--center", str(tmp_path / "c.npy"), "--radius", "0.1", "--region-norm", "inf"],
                own_process=False) == 0
    out = capsys.readouterr().out
    assert "global bound" in out and "linf ball, radius 0.1" in out
    np.save(tmp_path / "bad.npy", np.zeros(5))
    for extra, message in ((["--radius", "0.1"], "both --center"),
                           (["--center", str(tmp_path / "c.npy"), "--radius", "-1"], "radius"),
                           (["--center", str(tmp_path / "bad.npy"), "--radius", "0.1"], "4 inputs"),
                           (["--center", str(tmp_path / "none.npy"), "--radius", "0.1"], "not a readable")):
        assert main(args + extra, own_process=False) == 2, extra
        assert message in capsys.readouterr().err, extra


@pytest.fixture(scope="module")
def digits():
    model, x, y, _ = digits_classifier()
    network = network_from_module(model).validate()
    xf, yf = check_data(x[:12], y[:12], (64,), 5)
    return model, network, xf, yf


@pytest.mark.parametrize("norm,region", [("l2", 0.2), ("linf", 0.01)])
def test_robustness_local_beats_global_and_survives_pgd(digits, norm, region):
    model, network, x, y = digits
    glob = evaluate_dataset(network, x, y, method="global", norm=norm)
    loc = evaluate_dataset(network, x, y, method="local", norm=norm, region_radii=[0.5 * region, region])
    assert np.all(loc.radii >= glob.radii)
    improved = loc.radii > glob.radii
    assert np.all(loc.radii[improved] <= region * (1 + 1e-6))  # a local radius is capped at the region
    for i in np.flatnonzero(improved):
        assert loc.local_bounds[i] is not None
    assert loc.clean_accuracy == glob.clean_accuracy
    for r in (0.25 * region, 0.5 * region, region):
        assert loc.certified_accuracy(r) >= glob.certified_accuracy(r)
        assert loc.certified_accuracy(r) <= loc.clean_accuracy
        certified = loc.radii > r
        if certified.any():
            assert not _pgd(model, x[certified], y[certified], r, norm).any(), (norm, r)


def test_robustness_cli_local(tmp_path, capsys):
    model_path, data_path = save_model_and_data(tmp_path)
    x = np.load(data_path)["x"][:6]
    y = np.load(data_path)["y"][:6]
    np.savez(tmp_path / "few.npz", x=x, y=y)
    code = main(["robustness", str(model_path), "--trust-pickle", "--data", str(tmp_path / "few.npz"),
                 "--method", "local", "--radii", "0.05,0.3", "--json"], own_process=False)
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "local" and len(report["local_bounds"]) == 6
    assert any(b is not None for b in report["local_bounds"])  # some sample needed its local bound
    assert all(b is None or b >= 0 for b in report["local_bounds"])


def _exact_local_constant(ws, bs, center, radius, lip_norm):
    """The exact local constant of a 2-hidden-layer ReLU net on the l_inf ball: the largest Jacobian norm
    over the activation patterns whose region meets the ball's interior (an LP per pattern)."""
    from itertools import product

    from scipy.optimize import linprog

    (W1, W2, W3), (b1, b2, _) = ws, bs
    d, h1, h2 = W1.shape[1], W1.shape[0], W2.shape[0]
    best = 0.0
    for p1 in product((0.0, 1.0), repeat=h1):
        s1 = 2 * np.array(p1) - 1
        A2, c2 = W2 @ np.diag(p1) @ W1, W2 @ np.diag(p1) @ b1 + b2
        for p2 in product((0.0, 1.0), repeat=h2):
            s2 = 2 * np.array(p2) - 1
            # maximise t with sign * pre-activation >= t for every neuron, x in the ball
            A = np.vstack([-s1[:, None] * W1, -s2[:, None] * A2])
            rhs = np.concatenate([s1 * b1, s2 * c2])
            res = linprog(np.r_[np.zeros(d), -1.0], A_ub=np.hstack([A, np.ones((len(A), 1))]), b_ub=rhs,
                          bounds=[(c - radius, c + radius) for c in center] + [(None, 1.0)], method="highs")
            if res.status != 0 or -res.fun <= 1e-9:
                continue
            J = W3 @ np.diag(p2) @ W2 @ np.diag(p1) @ W1
            best = max(best, np.linalg.norm(J, 2) if lip_norm == "l2" else np.abs(J).sum(axis=1).max())
    return best


@pytest.mark.parametrize("lip_norm", [pytest.param("l2", marks=pytest.mark.slow), "linf"])
def test_tiny_relu_nets_against_the_exact_local_constant(lip_norm):
    rng = np.random.default_rng(7)
    ratios = []
    for trial in range(3):
        d, h1, h2 = 2 + trial, 4, 4
        ws = [rng.normal(size=(h1, d)), rng.normal(size=(h2, h1)), rng.normal(size=(2, h2))]
        bs = [rng.normal(size=h1), rng.normal(size=h2), np.zeros(2)]
        net = Network.sequential(ws, activation="relu", biases=bs)
        center = rng.normal(size=d)
        for radius in (0.1, 0.5):
            exact = _exact_local_constant(ws, bs, center, radius, lip_norm)
            cert = lipsdp.certify(net, center=center, radius=radius, region_norm="linf", norm=lip_norm,
                                  lower_bound_samples=0)
            assert cert.verified and cert.bound >= exact * (1 - 1e-9), (trial, radius, cert.bound, exact)
            ratios.append(cert.bound / exact if exact > 0 else 1.0)
    print(f"local bound / exact local constant ({lip_norm}): min {min(ratios):.4f}, max {max(ratios):.4f}")
    assert min(ratios) >= 1 - 1e-9
