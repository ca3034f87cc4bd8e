"""lipsdp's first-order backend (``--solver fo``): L-BFGS on the smoothed exact ``rho(T)``.

Its gradient is assembled by hand from the block elimination, so it is checked
against finite differences; its answers must be certificates (verified, never
below the SDP optimum) and close to the interior-point optimum; and the torch
path must compute the same numbers as numpy.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import lipsdp
from lipsdp.io import network_from_module
from lipsdp.solvers import SolveResult, get_backend
from lipsdp.solvers.firstorder_ import FirstOrder, _chain_groups, _Descent
from lipsdp.verify import input_schur

from conftest import assert_sandwich, torch_lower_bound
from models import mlp, residual_mlp


def _prepared_lmi(network):
    """The preconditioned, input-reduced LMI the pipeline hands to a backend."""
    from lipsdp import solvers

    captured = {}

    class Capture(FirstOrder):
        name = "capture"

        def solve(self, lmi, **kwargs):
            captured["lmi"] = lmi
            return SolveResult("solver_error", None, None, 0.0, message="captured, not solved")

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(solvers.BACKENDS, "capture", Capture)
        lipsdp.certify(network, solver="capture", lower_bound_samples=0)
    return captured["lmi"]


def _net(sizes, seed=0, activation="relu"):
    model = mlp(sizes, activation=activation, seed=seed)
    return model, network_from_module(model, input_shape=(sizes[0],))


def _assert_finite_differences(d, theta, beta, grad, f, count):
    """``grad`` (of ``f_beta`` at ``theta``) against central differences, in about ``count`` coordinates."""
    h = 1e-6
    for j in range(0, d.m - 1, max(1, (d.m - 1) // count)):
        e = np.zeros_like(theta)
        e[j] = h
        fd = (d.evaluate(theta + e, beta)[0] - d.evaluate(theta - e, beta)[0]) / (2 * h)
        assert grad[j] == pytest.approx(fd, rel=1e-4, abs=1e-9 * abs(f))


@pytest.mark.parametrize("sizes,activation", [((5, 12, 12, 3), "relu"), ((4, 9, 7, 8, 2), "tanh"),
                                              ((6, 10, 4), "leaky_relu")])
def test_gradient_matches_finite_differences(sizes, activation):
    _, net = _net(sizes, seed=3, activation=activation)
    lmi = _prepared_lmi(net)
    d = _Descent(lmi, None, time.perf_counter(), False)
    assert d.start() is not None
    noise = 0.2 * np.random.default_rng(0).standard_normal(d.m - 1)
    beta = 20.0 / d.best_rho
    # A generic point near the start, inside the feasible set (the start may lie close to its edge).
    while d.evaluate(d.best_theta + noise, beta) is None:
        noise /= 2
    theta = d.best_theta + noise
    f, rho, grad = d.evaluate(theta, beta)
    assert f >= rho
    _assert_finite_differences(d, theta, beta, grad, f, 7)


def test_block_elimination_matches_the_dense_schur_complement():
    """rho(T) by the backward recursion of docs/math.md §1.4 equals lambda_max(P - Q R^-1 Q^T)."""
    _, net = _net((5, 8, 8, 8, 3), seed=1)
    lmi = _prepared_lmi(net)
    assert len(_chain_groups(lmi)) == 4  # input + 3 hidden blocks: a chain
    d = _Descent(lmi, None, time.perf_counter(), False)
    d.start()
    theta = d.best_theta + 0.1 + 0.05 * np.random.default_rng(2).standard_normal(d.m - 1)  # not uniform
    rho = d.evaluate(theta)[1]
    dense = np.linalg.eigvalsh(input_schur(lmi, np.exp(theta)))[-1]
    assert rho == pytest.approx(dense, rel=1e-10)


def _small_cnn(seed=0):
    """A ReLU CNN whose first conv layer (4 x 6 x 6 = 144) is wider than the input (64) and the
    next layer (3 x 3 x 3 = 27): :func:`_early_blocks` eliminates it first, with sparse products."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=1, padding=0), nn.ReLU(), nn.Conv2d(4, 3, 2, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(27, 12), nn.ReLU(), nn.Linear(12, 3)).double().eval()
    return model, network_from_module(model, input_shape=(1, 8, 8))


@pytest.mark.parametrize("case,early", [
    ("cnn", {1: True}),
    ((20, 400, 50, 5), {1: False}),                  # wide then narrow: dense products
    ((16, 120, 24, 120, 24, 3), {1: False, 3: False}),  # two wide blocks, eliminated side by side
    ((16, 16, 16, 16, 4), {}),                       # equal widths: the plain recursion is cheaper
    ((6, 40, 10, 3), {}),                            # too few flops saved to pay for the extra calls
    pytest.param((20, 400, 50, 5, "leaky_relu"), {}, marks=pytest.mark.slow),  # alpha > 0: M_kk not diagonal
])
def test_early_blocks_give_the_same_rho_and_gradient(case, early):
    """Eliminating the wide diagonal blocks first (:meth:`_Descent.eliminate`) computes the same
    ``f_beta``, ``rho(T)`` and gradient as the plain backward recursion, and ``rho`` is the dense
    ``lambda_max(P - Q R^-1 Q^T)``; the gradient matches finite differences."""
    if case == "cnn":
        _, net = _small_cnn()
    else:
        activation = case[-1] if isinstance(case[-1], str) else "relu"
        _, net = _net(tuple(x for x in case if not isinstance(x, str)), seed=4, activation=activation)
    lmi = _prepared_lmi(net)
    d = _Descent(lmi, None, time.perf_counter(), False)
    assert d.early == early
    assert d.start() is not None
    theta = d.best_theta + 0.1 * np.random.default_rng(1).standard_normal(d.m - 1)
    while d.evaluate(theta) is None:
        theta = (theta + d.best_theta) / 2
    beta = 30.0 / d.best_rho
    f, rho, grad = d.evaluate(theta, beta)
    assert rho == pytest.approx(np.linalg.eigvalsh(input_schur(lmi, d.unpack(theta)))[-1], rel=1e-9)
    plain = _Descent(lmi, None, time.perf_counter(), False, early=False)
    assert plain.early == {}
    f0, rho0, grad0 = plain.evaluate(theta, beta)
    assert f == pytest.approx(f0, rel=1e-10) and rho == pytest.approx(rho0, rel=1e-10)
    np.testing.assert_allclose(grad, grad0, rtol=1e-7, atol=1e-10 * np.abs(grad0).max())
    _assert_finite_differences(d, theta, beta, grad, f, 5)
    # Multipliers that leave a pivot not negative definite are refused in both orders.
    bad = theta.copy()
    bad[d.var_block == 1] -= 30.0
    assert d.evaluate(bad) is None and plain.evaluate(bad) is None


def test_windowed_spectrum_gives_the_full_spectrums_values_and_gradient():
    """Only the eigenvalues within ``WINDOW / beta`` of the largest enter ``f_beta`` (LAPACK's subset
    driver); ``f``, ``rho`` and the gradient equal the whole spectrum's, also when the window holds more
    eigenvalues than were asked for (the whole spectrum is then computed)."""
    _, net = _net((256, 300, 20, 5), seed=7)
    lmi = _prepared_lmi(net)
    d = _Descent(lmi, None, time.perf_counter(), False)
    d.SUBSET_MIN = 256  # 256 inputs: the subset driver is used (1024 and more by default)
    full = _Descent(lmi, None, time.perf_counter(), False)
    assert d.start() is not None
    n0 = d.groups[0][1]
    theta = d.best_theta + 0.05 * np.random.default_rng(4).standard_normal(d.m - 1)
    windows = []
    for b in (1e1, 1e2, 1e3, 1e4):
        beta = b / d.best_rho
        for window in (0, d.window):  # asked for 16 (too few at small b), then for what the window held
            d.window, full.window = window, 10 ** 9
            f, rho, grad = d.evaluate(theta, beta)
            f0, rho0, grad0 = full.evaluate(theta, beta)
            assert f == pytest.approx(f0, rel=1e-12) and rho == pytest.approx(rho0, rel=1e-12)
            np.testing.assert_allclose(grad, grad0, rtol=1e-9, atol=1e-12 * np.abs(grad0).max())
        windows.append(d.window)
    assert max(windows) > 16 and 2 * min(windows) + 16 <= n0 // 4  # both paths were taken
    assert d.evaluate(theta)[1] == pytest.approx(full.evaluate(theta)[1], rel=1e-12)  # the largest alone


def test_cnn_certificate_with_early_elimination_is_sound():
    model, net = _small_cnn(seed=2)
    exact = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
    fo = lipsdp.certify(net, solver="fo", lower_bound_samples=0)
    assert_sandwich(fo, torch_lower_bound(model, 64, shape=(1, 8, 8)))
    assert fo.bound >= exact.solver_dual_objective * (1 - 1e-7)
    assert fo.bound <= exact.bound * (1 + 1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_close_to_the_sdp_optimum_and_sound(seed):
    model, net = _net((8, 24, 24, 24, 4), seed=seed)
    exact = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
    fo = lipsdp.certify(net, solver="fo", lower_bound_samples=0)
    assert fo.solver == "fo" and fo.solver_status in ("optimal_inaccurate", "time_limit")
    assert_sandwich(fo, torch_lower_bound(model, 8))
    # A certificate: never below the SDP optimum (its dual value); close to it.
    assert fo.bound >= exact.solver_dual_objective * (1 - 1e-7)
    assert fo.bound <= exact.bound * (1 + 1e-4)


@pytest.mark.parametrize("sizes,activation,seed", [((8, 24, 24, 24, 4), "relu", 0), ((6, 16, 12, 3), "tanh", 1),
                                                   ((6, 16, 12, 3), "leaky_relu", 2)])
def test_dual_bound_brackets_the_optimum(sizes, activation, seed):
    """fo's dual value is a lower bound on the SDP optimum (below the ipm's *verified* bound, which is
    above it), close to it (within 1e-2 here; 1e-4 to 1e-3 on most nets), and below fo's own bound."""
    _, net = _net(sizes, seed=seed, activation=activation)
    exact = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
    fo = lipsdp.certify(net, solver="fo", lower_bound_samples=0)
    dual = fo.solver_dual_objective
    assert dual is not None
    assert dual <= exact.bound and dual <= fo.bound
    assert dual >= exact.bound * (1 - 1e-2)
    assert "SDP dual value" in str(fo)
    # A valid but near-zero dual (deep nets) is called weak, not given as a relative gap of 1e21.
    from dataclasses import replace

    rows = dict(replace(fo, solver_dual_objective=fo.bound * 1e-21).summary_rows())
    assert rows["SDP dual value (gap of the bound)"].endswith("(weak: the bound is 1e+21x it)")
    assert "weak" not in dict(fo.summary_rows())["SDP dual value (gap of the bound)"]


def test_dual_bound_is_valid_at_any_point():
    """Far from stationary (the start), the repaired X is still dual feasible: a weaker, valid bound;
    and the mid-slope increments satisfy every slope constraint (<F_j, v v^T> >= 0)."""
    _, net = _net((6, 14, 14, 3), seed=5)
    lmi = _prepared_lmi(net)
    exact = get_backend("ipm").solve(lmi)
    d = _Descent(lmi, None, time.perf_counter(), False)
    assert d.start() is not None
    V = d.midslope_directions()
    assert V is not None and np.all(d.quadratic_forms(V)[1:] >= 0)
    assert np.all(d.quadratic_forms(V)[1:].reshape(-1) > 0)
    for b in (1.0, 1e2, 1e4):
        value = d.dual_bound([(b / d.best_rho, d.best_theta)])
        assert np.isnan(value) or value <= exact.objective * (1 + 1e-9)
    # A converged smoothed level (from the start here; a solve starts it from its best point).
    d.minimise(1e2, d.evals + 300, tight=True)
    value = d.dual_bound(d.level_ends)
    assert exact.objective * (1 - 1e-2) <= value <= exact.objective * (1 + 1e-9)


def test_deep_net_starts_layer_by_layer(monkeypatch):
    """Scaled by composed norm bounds, no uniform multiplier makes every pivot of this 16-layer net
    negative definite: fo starts with one scale per layer, from the last layer back.  Scaled by the
    layer-by-layer point (the default), it starts at that point.  Either way it certifies."""
    from lipsdp import pipeline

    model, net = _net((4,) + (10,) * 16 + (2,), seed=1)
    with monkeypatch.context() as mp:
        mp.setattr(pipeline, "_scales", lambda lmi, block_scale, trivial, **kw: (block_scale, trivial, None))
        lmi = _prepared_lmi(net)
    d = _Descent(lmi, None, time.perf_counter(), False)
    assert all(d.evaluate(np.full(d.m - 1, k * np.log(2.0))) is None for k in range(-4, 31))
    assert d.start() == "per layer" and np.isfinite(d.best_rho)
    hinted = _Descent(_prepared_lmi(net), None, time.perf_counter(), False)
    assert hinted.start() == "hint" and np.isfinite(hinted.best_rho)
    exact = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
    fo = lipsdp.certify(net, solver="fo", lower_bound_samples=0)
    assert_sandwich(fo, torch_lower_bound(model, 4))
    assert fo.bound >= exact.solver_dual_objective * (1 - 1e-7)


def test_residual_net_uses_one_hidden_block():
    """Skip connections couple distant blocks: fo falls back to the dense Schur complement."""
    model = residual_mlp(dim=4, hidden=8, n_out=3, seed=2)
    net = network_from_module(model, input_shape=(4,))
    lmi = _prepared_lmi(net)
    assert len(_chain_groups(lmi)) == 2
    exact = lipsdp.certify(net, solver="cvxopt", lower_bound_samples=0)
    fo = lipsdp.certify(net, solver="fo", lower_bound_samples=0)
    assert_sandwich(fo, torch_lower_bound(model, 4))
    assert exact.bound * (1 - 1e-7) <= fo.bound <= exact.bound * (1 + 1e-3)


def test_groupsort_free_multipliers_end_cleanly():
    """GroupSort's free multipliers: fo's uniform start may not be feasible; it says so, no number."""
    from lipsdp.network import Network

    rng = np.random.default_rng(4)
    ws = [rng.standard_normal((6, 4)), rng.standard_normal((6, 6)), rng.standard_normal((2, 6))]
    net = Network.sequential(ws, activation="groupsort", params={"group_size": 2})
    exact = lipsdp.certify(net, solver="sdpa", lower_bound_samples=0)
    fo = lipsdp.certify(net, solver="fo", lower_bound_samples=0)
    if fo.verified:
        assert fo.bound >= exact.bound * (1 - 1e-6)
    else:
        assert fo.bound is None and fo.solver_status == "infeasible"
    # auto never sends free multipliers to fo
    assert get_backend("auto", n=10_000, free_multipliers=True, single_input=True).name != "fo"


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_torch_path_computes_the_same(monkeypatch, case):
    """The torch path (CUDA's code, here on the CPU) gives numpy's numbers, with early blocks too (cnn)."""
    pytest.importorskip("torch")
    _, net = _net((5, 10, 10, 3), seed=5) if case == "mlp" else _small_cnn(seed=1)
    lmi = _prepared_lmi(net)
    monkeypatch.setenv("LIPSDP_DEVICE", "numpy")
    d_np = _Descent(lmi, None, time.perf_counter(), False)
    monkeypatch.setenv("LIPSDP_DEVICE", "torch")
    d_t = _Descent(lmi, None, time.perf_counter(), False)
    assert d_np.device == "numpy" and d_t.device == "torch"
    assert d_np.early == d_t.early == ({} if case == "mlp" else {1: True})
    d_np.start()
    theta = d_np.best_theta + 0.05 * (1 + np.random.default_rng(3).random(d_np.m - 1))
    beta = 50.0 / d_np.best_rho
    f1, r1, g1 = d_np.evaluate(theta, beta)
    f2, r2, g2 = d_t.evaluate(theta, beta)
    assert f1 == pytest.approx(f2, rel=1e-12) and r1 == pytest.approx(r2, rel=1e-12)
    np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-12 * np.abs(g1).max())


def test_time_limit_is_honoured():
    _, net = _net((20, 60, 60, 60, 5), seed=6)
    t0 = time.perf_counter()
    cert = lipsdp.certify(net, solver="fo", lower_bound_samples=0, time_limit=0.3)
    assert time.perf_counter() - t0 < 5.0
    # Whatever it had reached is still a verified certificate.
    assert cert.verified and cert.solver_status in ("time_limit", "optimal_inaccurate")


def test_auto_picks_fo_beyond_the_interior_point_range():
    from lipsdp.solvers import ipm_

    big = ipm_.LowRankIPM.max_auto_size + 1
    assert get_backend("auto", n=big, factored=True, single_input=True).name in ("fo", "mosek")
    # l_inf LMIs have one input variable per input: fo does not apply.
    assert get_backend("auto", n=big, factored=True, single_input=False).name != "fo"
    assert get_backend("auto", n=100, factored=True, single_input=True).name in ("ipm", "mosek")


def test_linf_is_refused_cleanly():
    _, net = _net((4, 6, 2), seed=7)
    cert = lipsdp.certify(net, solver="fo", norm="linf", output_index=0, lower_bound_samples=0)
    assert not cert.verified and "l2" in cert.message
