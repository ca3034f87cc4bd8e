"""lipsdp's interior-point method on the clique chain (``--solver chordal``, docs/math.md §8.1).

The clique form must be the same LMI (the ``Y_k`` cancel), its Schur complement
and block solve must be the dense ones, and its bounds must match the dense
ipm's and lie in the sandwich.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.io import loadmat

import lipsdp
from lipsdp.chain import BlockChain
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.solvers import get_backend
from lipsdp.solvers.chordal_ import ChordalIPM, _CliqueChain, estimate_cost

from conftest import assert_sandwich, torch_lower_bound


def _net(sizes, function="relu", params=None, seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    return Network.sequential(weights, activation=function, params=params or {})


def _chain(sizes=(3, 5, 4, 6, 2), function="relu", params=None, norm="l2"):
    omap = np.array([[1.0, -1.0]]) if norm == "linf" else None
    lmi = build_lmi(lift(_net(sizes, function, params)), output_map=omap, norm=norm)
    chain = BlockChain(lmi)
    return lmi, _CliqueChain(chain, _CliqueChain.layout(chain))


def _embed(lmi, blocks):
    """``sum_k E_k^T B_k E_k``: clique ``k`` (blocks ``k-1, k``) placed back into the full matrix."""
    M = np.zeros((lmi.n, lmi.n))
    for k, B in enumerate(blocks):
        a = lmi.blocks[k].start
        M[a:a + B.shape[0], a:a + B.shape[0]] += B
    return M


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("function,params", [("relu", None), ("tanh", None), ("leaky_relu", {"negative_slope": 0.2})])
def test_cliques_sum_to_the_lmi(function, params, norm):
    """Any split Y_k: the clique matrices add up to M(y) exactly."""
    lmi, chain = _chain(function=function, params=params, norm=norm)
    rng = np.random.default_rng(1)
    y = rng.uniform(0.5, 2.0, chain.m)  # Y entries included: they must cancel
    Z = [F0 + F for F0, F in zip(chain.F0s, chain.linear(y))]
    np.testing.assert_allclose(_embed(lmi, Z), lmi.matrix(y[chain.position]), atol=1e-12)
    # The adjoint is the transpose of the linear map.
    G = [(lambda A: A + A.T)(rng.standard_normal((s, s))) for s in chain.sizes]
    lhs = sum(float(np.sum(Gk * Fk)) for Gk, Fk in zip(G, chain.linear(y)))
    assert lhs == pytest.approx(float(chain.adjoint(G) @ y), rel=1e-12)


def test_schur_and_block_solve_match_dense():
    lmi, chain = _chain()
    rng = np.random.default_rng(2)
    Xs, Zs = [], []
    for s in chain.sizes:
        A = rng.standard_normal((s, s))
        Xs.append(A @ A.T + s * np.eye(s))
        B = rng.standard_normal((s, s))
        Zs.append(B @ B.T + s * np.eye(s))
    # Dense H_ij = sum_k tr(F_i X_k F_j Z_k) from unit vectors through the linear map.
    m = chain.m
    units = [chain.linear(e) for e in np.eye(m)]
    H = np.array([[sum(np.trace(Fi[k] @ Xs[k] @ Fj[k] @ Zs[k]) for k in range(len(Xs)))
                   for Fj in units] for Fi in units])
    N = np.flatnonzero(chain.nonneg)
    lp = rng.uniform(0.1, 1.0, len(N))
    H[N, N] += lp
    solve = chain.newton(Xs, Zs, N, lp)
    rhs = rng.standard_normal(m)
    np.testing.assert_allclose(solve(rhs), np.linalg.solve(H, rhs), rtol=1e-8, atol=1e-10)


def test_layout_needs_a_chain():
    assert ChordalIPM.applies(build_lmi(lift(_net((3, 5, 4, 2)))))
    assert not ChordalIPM.applies(build_lmi(lift(_net((3, 5, 2)))))  # one hidden layer: one clique
    cert = lipsdp.certify(_net((3, 5, 2)), solver="chordal", lower_bound_samples=0)
    assert not cert.verified and "layer chain" in cert.message


@pytest.mark.parametrize("function,params", [("relu", None), ("tanh", None), ("sigmoid", None),
                                             ("leaky_relu", {"negative_slope": 0.1})])
def test_matches_ipm_and_sandwich(function, params):
    pytest.importorskip("torch")
    from models import mlp

    model = mlp([5, 12, 10, 8, 3], activation=function, seed=11)
    chordal = lipsdp.certify(model, solver="chordal", input_shape=(5,), lower_bound_samples=0)
    ipm = lipsdp.certify(model, solver="ipm", input_shape=(5,), lower_bound_samples=0)
    assert chordal.verified and chordal.solver == "chordal", chordal.message
    assert chordal.bound == pytest.approx(ipm.bound, rel=1e-6)
    assert_sandwich(chordal, torch_lower_bound(model, 5))
    assert chordal.bound < chordal.trivial_bound
    # Its dual value bounds the same optimum from below.
    assert chordal.solver_dual_objective * (1 - 1e-6) <= chordal.bound


def test_published_anchor_and_linf(anchors):
    weights = [np.asarray(w, dtype=np.float64)
               for w in loadmat(anchors / "lipsdp_random_weights.mat")["weights"][0]]
    net = Network.sequential(weights)
    cert = lipsdp.certify(net, solver="chordal", lower_bound_samples=0)
    assert cert.verified and cert.solver_status == "optimal", cert.message
    assert cert.bound == pytest.approx(36.482, rel=2e-5)
    for norm in ("linf",):
        a = lipsdp.certify(net, solver="chordal", norm=norm, lower_bound_samples=0)
        b = lipsdp.certify(net, solver="ipm", norm=norm, lower_bound_samples=0)
        assert a.verified and a.bound == pytest.approx(b.bound, rel=1e-5)


def test_deep_net_matches_ipm():
    """12 narrow layers: the optimum is decades below the preconditioned start, as in the benchmark."""
    net = _net((6,) + (8,) * 12 + (3,), seed=4)
    chordal = lipsdp.certify(net, solver="chordal", lower_bound_samples=64)
    ipm = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
    assert chordal.verified, chordal.message
    assert chordal.bound == pytest.approx(ipm.bound, rel=1e-4)
    assert chordal.lower_bound <= chordal.bound < chordal.trivial_bound


def test_auto_weighs_chordal_against_the_dense_ipm():
    deep = build_lmi(lift(_net((16,) + (32,) * 40 + (4,))).reduce_input())
    shallow = build_lmi(lift(_net((16, 32, 32, 4))).reduce_input())
    chordal, dense = estimate_cost(deep)
    assert chordal < dense
    chordal, dense = estimate_cost(shallow)
    assert chordal > dense
    if get_backend("auto").name != "mosek":
        assert get_backend("auto", n=deep.n, factored=True, lmi=deep).name == "chordal"
        assert get_backend("auto", n=shallow.n, factored=True, lmi=shallow).name == "ipm"
    assert estimate_cost(build_lmi(lift(_net((3, 5, 2))))) is None


def test_time_limit():
    cert = lipsdp.certify(_net((4, 10, 10, 10, 2)), solver="chordal", time_limit=1e-4, lower_bound_samples=0)
    assert cert.solver_status == "time_limit"
