"""lipsdp's completion method (``--solver completion``): both iterates on the block-tridiagonal pattern.

Its pieces must be the dense quantities they stand for (the slack, its selected
inverse, the inverse of the max-det completion, the Gram products and the
pattern products); with one block it is the dense ipm, Mehrotra corrector and
all; on chains its bounds must match the dense ipm's and lie in the sandwich.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.io import loadmat

import lipsdp
from lipsdp.chain import BlockChain
from lipsdp.interior import term_schur
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.pipeline import _scales
from lipsdp.solvers import get_backend
from lipsdp.solvers.chordal_ import estimate_cost as chordal_estimate
from lipsdp.solvers.completion_ import CompletionIPM, PatternChain, _Completion, estimate_cost

from conftest import assert_sandwich, torch_lower_bound


def _net(sizes, function="relu", params=None, seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    return Network.sequential(weights, activation=function, params=params or {})


def _solved_lmi(sizes, function="relu", params=None, norm="l2", seed=0):
    """The LMI that certify hands a backend: input-reduced (l2), preconditioned, with its start."""
    from lipsdp.bounds import node_lipschitz

    net = _net(sizes, function, params, seed)
    lifting = lift(net)
    lifting = lifting.reduce_input() if norm == "l2" else lifting
    omap = np.array([[1.0, -1.0] + [0.0] * (sizes[-1] - 2)]) if norm == "linf" else None
    lmi = build_lmi(lifting, output_map=omap, norm=norm)
    lips = node_lipschitz(net)
    scales, total, start = _scales(lmi, np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]]),
                                   lips[net.output])
    return replace(lmi, start=start).preconditioned(scales, total)[0]


def _dense(chain, flat):
    n = chain.starts[-1]
    A = np.zeros((n, n))
    st = chain.starts
    for k in range(chain.nb):
        A[st[k]:st[k + 1], st[k]:st[k + 1]] = chain.diag(flat, k)
        if k:
            A[st[k]:st[k + 1], st[k - 1]:st[k]] = chain.sub(flat, k)
            A[st[k - 1]:st[k], st[k]:st[k + 1]] = chain.sub(flat, k).T
    return A


def _flat(chain, A):
    """The lower blocks of a dense symmetric ``A``."""
    flat = np.zeros(chain.length)
    st = chain.starts
    for k in range(chain.nb):
        chain.diag(flat, k)[:] = A[st[k]:st[k + 1], st[k]:st[k + 1]]
        if k:
            chain.sub(flat, k)[:] = A[st[k]:st[k + 1], st[k - 1]:st[k]]
    return flat


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pattern_algebra_matches_dense(norm):
    lmi = _solved_lmi((4, 6, 5, 7, 3), norm=norm)
    chain = PatternChain(BlockChain(lmi))
    assert chain.nb == len(lmi.blocks) >= 4
    state = _Completion(lmi, chain, 1e-7, None, 0.0, False, 10, 0.95)
    y, fac = state.start()
    S = _dense(chain, chain.assemble(y))
    np.testing.assert_array_equal(S, -lmi.matrix(y))
    assert fac[2] == pytest.approx(np.linalg.slogdet(S)[1], rel=1e-12)
    Z = np.linalg.inv(S)
    mask = _dense(chain, np.ones(chain.length)) != 0
    np.testing.assert_allclose(_dense(chain, chain.selected_inverse(fac))[mask], Z[mask], rtol=1e-9, atol=1e-12)
    R = lmi.factors[0].toarray()
    np.testing.assert_allclose(chain.solve(fac, chain.Rt.copy()), Z @ R.T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(chain.gram_of(Z @ R.T), R @ Z @ R.T, rtol=1e-9, atol=1e-12)
    # The max-det completion of P(Z) is Z itself: its inverse is S, which has the pattern.
    W, _ = chain.completion_inverse(chain.selected_inverse(fac))
    np.testing.assert_allclose(_dense(chain, W), S, rtol=1e-8, atol=1e-10)
    # A generic pattern X: the completion agrees with X on the pattern and its inverse has the pattern.
    rng = np.random.default_rng(3)
    A = rng.standard_normal((lmi.n, lmi.n))
    Xp = _flat(chain, A @ A.T + np.eye(lmi.n))  # the pattern of a PD matrix: completable
    W, _ = chain.completion_inverse(Xp)
    Xhat = np.linalg.inv(_dense(chain, W))
    np.testing.assert_allclose(Xhat[mask], _dense(chain, Xp)[mask], rtol=1e-8, atol=1e-10)
    # Pattern products are the projections of the dense products.
    Q, Y = rng.standard_normal((lmi.n, 5)), rng.standard_normal((lmi.n, 5))
    full = (Q @ Y.T + Y @ Q.T) / 2
    np.testing.assert_allclose(_dense(chain, chain.pattern_product(Q, Y))[mask], full[mask], atol=1e-12)
    np.testing.assert_allclose(chain.pattern_times(chain.assemble(y), Q), S @ Q, atol=1e-12)
    assert chain.inner(Xp, chain.assemble(y)) == pytest.approx(float(np.sum(_dense(chain, Xp) * S)), rel=1e-12)
    # Not completable: a clique with a negative eigenvalue.
    assert chain.completion_inverse(Xp - 10.0 * lmi.n * chain.identity()) is None


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_slab_assembly_and_symmetric_gram_match_dense(norm):
    """S(y) from the factor slabs (docs/math.md §8.6) is -M(y) of the LMI's entries, and the symmetric
    half Gram product R Z R^T equals the dense formula entry by entry."""
    lmi = _solved_lmi((4, 6, 5, 7, 3), "leaky_relu", {"negative_slope": 0.01}, norm=norm)
    chain = PatternChain(BlockChain(lmi))
    assert chain.plan is not None and chain.ordered
    rng = np.random.default_rng(1)
    y = rng.random(lmi.n_var)
    M = lmi.matrix(y)
    np.testing.assert_allclose(_dense(chain, chain.assemble(y)), -M, rtol=0, atol=1e-13 * np.abs(M).max())
    dy = rng.standard_normal(lmi.n_var)
    lin = lmi.matrix(dy) - lmi.matrix(np.zeros(lmi.n_var))
    np.testing.assert_allclose(_dense(chain, chain.direction(dy)), lin, rtol=0, atol=1e-13 * np.abs(lin).max())
    # The entries' scatter (the fallback where the slabs do not cover every term) gives the same.
    rows, cols = np.asarray(lmi.rows), np.asarray(lmi.cols)
    pos = chain.scatter(rows, cols)
    keep = pos >= 0
    old = np.bincount(pos[keep], weights=np.asarray(lmi.vals)[keep] * y[np.asarray(lmi.var)[keep]],
                      minlength=chain.length)
    np.testing.assert_allclose(chain.linear(y), old, rtol=0, atol=1e-13 * np.abs(old).max())
    S = _dense(chain, chain.assemble(y)) + 10.0 * np.eye(lmi.n)
    Z = np.linalg.inv(S)
    R = lmi.factors[0].toarray()
    dense = R @ Z @ R.T
    # K's products by runs of consecutive terms equal the sparse product.
    state = _Completion(lmi, chain, 1e-7, None, 0.0, False, 10, 0.95)
    assert state.runs is not None and sum(b - a for a, b, _, _ in state.runs) == len(state.iu)
    kap = state.coef * dy[state.var]
    Kd = np.zeros((chain.r, chain.r))
    np.add.at(Kd, (state.iu, state.iw), kap)
    np.add.at(Kd, (state.iw, state.iu), kap)
    Y = rng.standard_normal((lmi.n, chain.r))
    out = np.zeros_like(Y)
    for t0, t1, u0, w0 in state.runs:
        out[:, w0:w0 + t1 - t0] += Y[:, u0:u0 + t1 - t0] * kap[t0:t1]
        out[:, u0:u0 + t1 - t0] += Y[:, w0:w0 + t1 - t0] * kap[t0:t1]
    np.testing.assert_allclose(out, Y @ Kd, rtol=1e-13, atol=1e-13)
    # The Schur complement by blocks of runs is term_schur's formula, entry by entry.
    GA, GB = Y[:, :chain.r].T @ Y[:, :chain.r], Kd @ Kd.T + np.eye(chain.r)
    np.testing.assert_allclose(state.schur(GA, GB), term_schur(GA, GB, state.iu, state.iw, state.KT),
                               rtol=1e-12, atol=1e-12 * np.abs(GA).max() * np.abs(GB).max())
    G = chain.gram_of(Z @ R.T, np.full((chain.r, chain.r), np.nan), symmetric=True)
    np.testing.assert_allclose(G, dense, rtol=1e-10, atol=1e-12 * np.abs(dense).max())
    np.testing.assert_allclose(chain.gram_of(Z @ R.T), dense, rtol=1e-10, atol=1e-12 * np.abs(dense).max())


#: Bounds certified by the completion method before the slab assembly and the symmetric Gram products
#: (commit 00a218f), LeakyReLU(0.1) MLPs of ``models.mlp``.
BEFORE_SLABS = [((40, 8, 8, 8, 8, 8, 8, 3), 0, 0.07184764581996106),
                ((30, 12, 12, 12, 12, 4), 1, 0.2163371560397423),
                ((24, 6, 6, 6, 6, 6, 6, 6, 6, 2), 2, 0.014397463390333463)]


@pytest.mark.parametrize("sizes, seed, before", BEFORE_SLABS)
def test_bounds_as_before_the_slab_assembly(sizes, seed, before):
    pytest.importorskip("torch")
    from models import mlp

    model = mlp(list(sizes), activation="leaky_relu", seed=seed)
    cert = lipsdp.certify(model, solver="completion", input_shape=(sizes[0],), lower_bound_samples=0)
    assert cert.verified and cert.solver == "completion" and cert.solver_status == "optimal", cert.message
    assert cert.bound == pytest.approx(before, rel=1e-6)
    assert_sandwich(cert, torch_lower_bound(model, sizes[0]))


def test_one_block_is_the_dense_ipm():
    """Without the chain (one block) the completion is X itself: same iterations as the dense ipm,
    the Mehrotra corrector included (it would take about 1.6x as many without)."""
    lmi = _solved_lmi((16,) + (32,) * 4 + (4,))
    dense = replace(lmi, blocks=[])
    one = CompletionIPM().solve(dense)
    ipm = get_backend("ipm").solve(lmi)
    assert one.status == "optimal" and one.extras["blocks"] == 1
    assert one.objective == pytest.approx(ipm.objective, rel=1e-6)
    assert one.iterations <= ipm.iterations + 2


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("function,params", [("relu", None), ("tanh", None), ("sigmoid", None),
                                             ("leaky_relu", {"negative_slope": 0.1})])
def test_matches_ipm(function, params, norm):
    lmi = _solved_lmi((5, 12, 10, 8, 3), function, params, norm, seed=11)
    comp = CompletionIPM().solve(lmi)
    ipm = get_backend("ipm").solve(lmi)
    assert comp.status == "optimal", comp.message
    assert comp.objective == pytest.approx(ipm.objective, rel=1e-6)
    assert comp.extras["dual_objective"] <= comp.objective * (1 + 1e-9)
    assert comp.extras["blocks"] == len(lmi.blocks)


@pytest.mark.parametrize("function,params", [("relu", None), ("elu", None)])
def test_certify_sandwich(function, params):
    pytest.importorskip("torch")
    from models import mlp

    model = mlp([5, 12, 10, 8, 3], activation=function, seed=11)
    comp = lipsdp.certify(model, solver="completion", input_shape=(5,), lower_bound_samples=0)
    ipm = lipsdp.certify(model, solver="ipm", input_shape=(5,), lower_bound_samples=0)
    assert comp.verified and comp.solver == "completion", comp.message
    assert comp.bound == pytest.approx(ipm.bound, rel=1e-6)
    assert_sandwich(comp, torch_lower_bound(model, 5))
    assert comp.solver_dual_objective * (1 - 1e-6) <= comp.bound < comp.trivial_bound


def test_deep_net_matches_chordal():
    """12 narrow layers, the optimum decades below the layer-by-layer start."""
    net = _net((6,) + (8,) * 12 + (3,), seed=4)
    comp = lipsdp.certify(net, solver="completion", lower_bound_samples=64)
    chordal = lipsdp.certify(net, solver="chordal", lower_bound_samples=0)
    assert comp.verified and comp.solver_status == "optimal", comp.message
    assert comp.bound == pytest.approx(chordal.bound, rel=1e-5)
    assert comp.lower_bound <= comp.bound < comp.trivial_bound


def test_published_anchor(anchors):
    weights = [np.asarray(w, dtype=np.float64)
               for w in loadmat(anchors / "lipsdp_random_weights.mat")["weights"][0]]
    cert = lipsdp.certify(Network.sequential(weights), solver="completion", lower_bound_samples=0)
    assert cert.verified and cert.solver_status == "optimal", cert.message
    assert cert.bound == pytest.approx(36.482, rel=2e-5)


def test_without_a_start_the_dense_ipm_solves():
    """A skip connection: no layer chain, no layer-by-layer start; the dense ipm takes over."""
    pytest.importorskip("torch")
    from models import residual_mlp

    model = residual_mlp()
    cert = lipsdp.certify(model, solver="completion", input_shape=(4,), lower_bound_samples=0)
    ipm = lipsdp.certify(model, solver="ipm", input_shape=(4,), lower_bound_samples=0)
    assert cert.verified, cert.message
    assert cert.bound == pytest.approx(ipm.bound, rel=1e-6)


@pytest.mark.slow  # about 11 s
def test_auto_uses_it_on_chains_with_a_start():
    if get_backend("auto").name == "mosek":
        pytest.skip("a licensed MOSEK comes first")
    lmi = _solved_lmi((16,) + (32,) * 8 + (4,))
    assert lmi.start is not None and estimate_cost(lmi) <= CompletionIPM.max_auto_cost
    assert get_backend("auto", n=lmi.n, factored=True, lmi=lmi, single_input=True).name == "completion"
    # 784-1024x4-10 costs about 3e12 an iteration: fo's regime.
    wide = _solved_lmi((784,) + (1024,) * 4 + (10,))
    assert estimate_cost(wide) > CompletionIPM.max_auto_cost
    assert get_backend("auto", n=wide.n, factored=True, lmi=wide, single_input=True).name == "fo"
    # Shallow and wide: through the dense inverses (completion_dense) an iteration costs about the dense ipm's;
    # measured 6.0 s against the ipm's 6.7 s (docs/performance.md), so auto takes it here too.
    shallow = _solved_lmi((784, 256, 256, 10))
    assert get_backend("auto", n=shallow.n, factored=True, lmi=shallow, single_input=True).name == "completion"
    # 50 layers of width 32: from the factor rows its r x r Grams outgrew chordal's linear-in-depth iteration;
    # through the dense inverses it is the faster (measured 7.3 s against chordal's 18.8 s on one thread).
    deep = _solved_lmi((16,) + (32,) * 50 + (4,))
    assert CompletionIPM.preference(deep) is not None and estimate_cost(deep) < chordal_estimate(deep)[0]
    assert get_backend("auto", n=deep.n, factored=True, lmi=deep, single_input=True).name == "completion"
    # ... and 64 layers of width 16 stay chordal's (measured 2.6 s against the completion method's 3.5 s).
    narrow = _solved_lmi((16,) + (16,) * 64 + (4,))
    assert get_backend("auto", n=narrow.n, factored=True, lmi=narrow, single_input=True).name == "chordal"
    cert = lipsdp.certify(_net((4, 8, 8, 8, 2)), lower_bound_samples=0)
    assert cert.verified and cert.solver == "completion", cert.message


def test_time_limit():
    lmi = _solved_lmi((4,) + (10,) * 6 + (2,))
    res = CompletionIPM().solve(lmi, time_limit=1e-6)
    assert res.status == "time_limit"
