"""lipsdp's structure-exploiting interior-point method (``--solver ipm``).

Its Schur complement is built from the factored terms of the LMI, so the
factored form must be the same matrices as the COO entries that verification
uses; and its answers must match the general-purpose interior-point solvers.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.io import loadmat

import lipsdp
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.solvers import get_backend
from lipsdp.solvers.ipm_ import LowRankIPM

from conftest import assert_sandwich, torch_lower_bound


def _factored_matrix(lmi, j):
    R, iu, iw, coef, var = lmi.factors
    R = R.toarray()
    F = np.zeros((lmi.n, lmi.n))
    for t in np.flatnonzero(var == j):
        F += coef[t] * (np.outer(R[iu[t]], R[iw[t]]) + np.outer(R[iw[t]], R[iu[t]]))
    return F


def _random_net(function, params=None, seed=0, sizes=(3, 6, 6, 2)):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((o, i)) for i, o in zip(sizes[:-1], sizes[1:])]
    return Network.sequential(weights, activation=function, params=params or {})


FAMILIES = [("relu", None), ("leaky_relu", {"negative_slope": 0.1}), ("tanh", None), ("sigmoid", None),
            ("gelu", None), ("groupsort", {"group_size": 2}), ("groupsort", {}),
            ("householder", {"theta": np.array([0.3, 1.1, 2.0]), "pairing": "halves"})]


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("formulation", ["neuron", "layer"])
@pytest.mark.parametrize("function,params", FAMILIES)
def test_factors_are_the_coo_matrices(function, params, formulation, norm):
    net = _random_net(function, params)
    omap = np.array([[1.0, -1.0]]) if norm == "linf" else None
    lmi = build_lmi(lift(net), formulation, output_map=omap, norm=norm)
    assert lmi.factors is not None
    for j in range(lmi.n_var):
        x = np.zeros(lmi.n_var)
        x[j] = 1.0
        np.testing.assert_allclose(_factored_matrix(lmi, j), lmi.matrix(x) - lmi.const.toarray(), atol=1e-12)
    # The congruence used before solving scales the factors consistently.
    pre, _ = lmi.preconditioned(np.array([1.0, 4.0, 0.25]), 8.0)
    for j in range(pre.n_var):
        x = np.zeros(pre.n_var)
        x[j] = 1.0
        np.testing.assert_allclose(_factored_matrix(pre, j), pre.matrix(x) - pre.const.toarray(), atol=1e-10)


def test_published_anchors(anchors):
    for name, published in (("lipsdp_random_weights.mat", 36.482), ("lipsdp_mnist_weights.mat", 24.366)):
        weights = [np.asarray(w, dtype=np.float64) for w in loadmat(anchors / name)["weights"][0]]
        net = Network.sequential(weights)
        cert = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
        assert cert.verified and cert.solver == "ipm", cert.message
        assert cert.solver_status == "optimal"
        assert cert.bound == pytest.approx(published, rel=2e-5)
        ref = lipsdp.certify(net, solver="cvxopt", lower_bound_samples=0)
        assert cert.bound == pytest.approx(ref.bound, rel=1e-6)
        # The dual value brackets the SDP optimum from below (up to its ~1e-8 dual residual):
        # the verified bound is within 1e-5 of it.
        assert ref.solver_dual_objective is None
        dual = cert.solver_dual_objective
        assert dual * (1 - 1e-6) <= cert.bound < dual * (1 + 1e-5)
        assert "SDP dual value" in str(cert)


@pytest.mark.parametrize("function,params", FAMILIES[:5])
def test_matches_cvxopt_and_sandwich(function, params):
    pytest.importorskip("torch")
    from models import mlp

    model = mlp([5, 12, 10, 3], activation=function, seed=7)
    ipm = lipsdp.certify(model, solver="ipm", input_shape=(5,), lower_bound_samples=0)
    ref = lipsdp.certify(model, solver="cvxopt", input_shape=(5,), lower_bound_samples=0)
    assert ipm.bound == pytest.approx(ref.bound, rel=1e-5)
    assert_sandwich(ipm, torch_lower_bound(model, 5))
    assert ipm.bound < ipm.trivial_bound


def test_residual_and_linf():
    pytest.importorskip("torch")
    from models import residual_mlp

    model = residual_mlp(4, 8, 3, seed=3)
    for norm in ("l2", "linf"):
        ipm = lipsdp.certify(model, solver="ipm", norm=norm, input_shape=(4,), lower_bound_samples=64)
        ref = lipsdp.certify(model, solver="sdpa", norm=norm, input_shape=(4,), lower_bound_samples=0)
        assert ipm.verified, ipm.message
        assert ipm.bound == pytest.approx(ref.bound, rel=1e-5)
        assert ipm.lower_bound <= ipm.bound <= ipm.trivial_bound


def test_free_multipliers_stay_sound():
    """GroupSort's free S, P multipliers: auto avoids ipm there, an explicit ipm stays sound."""
    net = _random_net("groupsort", {"group_size": 2}, seed=5, sizes=(4, 6, 6, 3))
    ref = lipsdp.certify(net, solver="sdpa", lower_bound_samples=0)
    ipm = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
    assert ipm.verified
    assert ipm.bound >= ref.bound * (1 - 1e-6)
    assert ipm.bound == pytest.approx(ref.bound, rel=1e-3)
    assert lipsdp.certify(net, lower_bound_samples=0).solver != "ipm"


def test_auto_prefers_ipm_for_slope_nets():
    """Without a layer chain's start (here: none passed) the ipm; certify's chain LMIs have one and
    go to ``completion`` (tests/test_completion.py)."""
    lmi = build_lmi(lift(_random_net("relu")))
    assert get_backend("auto", n=lmi.n, factored=True).name == "ipm" or \
        get_backend("auto", n=lmi.n).name == "mosek"
    assert lipsdp.certify(_random_net("tanh"), lower_bound_samples=0).solver in ("completion", "mosek")


def test_time_limit_and_no_factors():
    rng = np.random.default_rng(0)
    net = Network.sequential([rng.standard_normal((40, 30)), rng.standard_normal((40, 40)),
                              rng.standard_normal((5, 40))])
    cert = lipsdp.certify(net, solver="ipm", time_limit=1e-4, lower_bound_samples=0)
    assert cert.solver_status == "time_limit"
    full = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
    assert cert.bound is None or cert.bound >= full.bound * (1 - 1e-9)
    lmi = build_lmi(lift(net))
    from dataclasses import replace

    result = LowRankIPM().solve(replace(lmi, factors=None))
    assert result.status == "solver_error" and "factored" in result.message
