"""Preconditioning scales read off a layer-by-layer feasible point (``lipsdp/scaling.py``).

The point behind the scales must be feasible for the LMI (it reproduces
ECLipsE-Fast on ReLU nets, so its bound lies above the SDP's), the scales must
leave the certified bound unchanged, and the interior-point path must rescue a
final point that verification cannot use.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla

import lipsdp
from lipsdp import checking, pipeline
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.scaling import _top_generalized, chain_scales
from lipsdp.solvers import usable

from conftest import assert_sandwich


def _weights(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]


def _eclipse_fast(weights) -> float:
    """ECLipsE-Fast for a ReLU net, written from the paper's recursion (Xu and Sivaranjani, 2024)."""
    X = np.eye(weights[0].shape[1])
    for W in weights[:-1]:
        A = W @ np.linalg.solve(X, W.T)
        lam = 1.0 / np.linalg.eigvalsh((A + A.T) / 2)[-1]
        X = 2 * lam * np.eye(len(A)) - lam * lam * A
    W = weights[-1]
    return float(np.sqrt(np.linalg.eigvalsh(W @ np.linalg.solve(X, W.T))[-1]))


@pytest.mark.parametrize("sizes,seed", [((5, 8, 8, 3), 0), ((16,) + (12,) * 10 + (4,), 1), ((3, 20, 2), 2)])
def test_reproduces_eclipse_fast_and_is_feasible(sizes, seed):
    weights = _weights(sizes, seed)
    net = Network.sequential(weights, activation="relu")
    lmi = build_lmi(lift(net))
    point = chain_scales(lmi)
    assert point is not None
    assert point.total == pytest.approx(_eclipse_fast(weights), rel=1e-9)
    assert point.x[0] == pytest.approx(point.total ** 2, rel=1e-12)
    # Feasible: M <= 0 at the point (up to rounding), and strictly so once rho is raised a little.
    x = point.x.copy()
    x[0] *= 1 + 1e-6
    top = sla.eigvalsh(lmi.matrix(x))[-1]
    assert top <= 1e-9 * np.abs(lmi.matrix(x)).max()
    # So its bound lies above the SDP's, which lies above the sampled lower bound.
    cert = lipsdp.certify(net, solver="ipm")
    assert cert.bound <= point.total * (1 + 1e-7)


@pytest.mark.parametrize("function,params", [("tanh", None), ("leaky_relu", {"negative_slope": 0.1}),
                                             ("sigmoid", None)])
def test_other_sectors_and_linf_give_feasible_points(function, params):
    """Read off the LMI, not the weights: any sector with alpha * beta >= 0 and the l_inf input block."""
    net = Network.sequential(_weights((4, 7, 7, 2), 3), activation=function, params=params or {})
    for norm, omap in (("l2", None), ("linf", np.array([[1.0, 0.0]]))):
        lmi = build_lmi(lift(net), output_map=omap, norm=norm)
        point = chain_scales(lmi)
        assert point is not None
        x = point.x.copy()
        x[: lmi.n_in] *= 1 + 1e-6
        assert sla.eigvalsh(lmi.matrix(x))[-1] <= 1e-9 * np.abs(lmi.matrix(x)).max()


def test_declines_non_chains():
    """A skip connection couples blocks two apart: composed norm bounds stay the scales."""
    import torch
    from torch import nn

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.out(h + torch.relu(self.c(torch.relu(self.b(h)))))

    torch.manual_seed(0)
    net, _ = pipeline.load_model(Skip().eval(), input_shape=(3,))
    assert chain_scales(build_lmi(lift(net))) is None
    assert_sandwich(lipsdp.certify(net, solver="ipm"), 0.0)


def test_deep_net_same_bound_fewer_iterations():
    """Depth 12 at width 10: the bound is the SDP's (SDPA on the same LMI), and the scaled start saves
    interior-point iterations over composed norm bounds."""
    net = Network.sequential(_weights((6,) + (10,) * 12 + (3,), 5), activation="relu")
    scaled = lipsdp.certify(net, solver="ipm")
    reference = lipsdp.certify(net, solver="sdpa") if "sdpa" in usable() else scaled
    assert scaled.bound == pytest.approx(reference.bound, rel=1e-5)
    original = pipeline._scales
    try:
        pipeline._scales = lambda lmi, block_scale, trivial, **kw: (block_scale, trivial, None)
        composed = lipsdp.certify(net, solver="ipm")
    finally:
        pipeline._scales = original
    assert composed.bound == pytest.approx(scaled.bound, rel=1e-5)
    assert scaled.solver_iterations < composed.solver_iterations
    # Certificates proven under either congruence re-check (lipsdp verify tries both, and a balanced one).
    for cert in (scaled, composed):
        assert checking.check_certificate(cert, net).verified


def test_path_rescues_an_unusable_final_point(monkeypatch):
    """When the final iterate cannot be verified, an earlier one on the path gives the bound."""
    from lipsdp.solvers.ipm_ import LowRankIPM

    solve = LowRankIPM.solve

    def broken_final(self, lmi, **kw):
        result = solve(self, lmi, **kw)
        assert len(result.extras["path"]) >= 2
        result.x = np.full_like(result.x, np.nan)
        return result

    net = Network.sequential(_weights((5, 9, 9, 2), 6), activation="relu")
    good = lipsdp.certify(net, solver="ipm")
    monkeypatch.setattr(LowRankIPM, "solve", broken_final)
    rescued = lipsdp.certify(net, solver="ipm")
    assert rescued.verified
    assert good.bound <= rescued.bound <= good.bound * (1 + 1e-4)


@pytest.mark.parametrize("m,n,diagonal", [(30, 80, True), (80, 30, True), (40, 40, False), (50, 20, False)])
def test_top_of_the_pencil_from_the_smaller_gram_matrix(m, n, diagonal):
    """``lambda_max(Z^T Z, R)`` from ``Y = Z L^{-T}``'s smaller Gram matrix equals the pencil's (scipy),
    for diagonal ``R`` (ReLU layers) and dense ones; an ``R`` not positive definite raises as the pencil does."""
    rng = np.random.default_rng(m + n)
    Z = rng.standard_normal((m, n))
    A = rng.standard_normal((n, n))
    R = np.diag(rng.random(n) + 0.1) if diagonal else A @ A.T + 0.5 * np.eye(n)
    assert _top_generalized(Z, R) == pytest.approx(sla.eigh(Z.T @ Z, R, eigvals_only=True)[-1], rel=1e-12)
    w, V = np.linalg.eigh(R)
    indefinite = np.diag(np.r_[np.ones(n - 1), 0.0]) if diagonal else (V * np.r_[-w[0], w[1:]]) @ V.T
    for bad in (indefinite, -R):
        with pytest.raises(sla.LinAlgError):
            sla.eigh(Z.T @ Z, bad, eigvals_only=True)
        with pytest.raises(sla.LinAlgError):
            _top_generalized(Z, bad)
