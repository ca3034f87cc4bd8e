"""The completion method's cheaper iteration (docs/math.md §8.8): each shortcut equals what it replaces.

- the Schur complement added into ``H`` block by block (lower blocks, mirrored) is ``K^T h K`` of
  :func:`lipsdp.interior.term_schur`, for every way the terms' multipliers can be laid out;
- :func:`lipsdp.interior.factor_schur` factors in place and, when a regularisation fails, retries
  on the restored matrix;
- the forward sweep that skips the zero blocks of ``R^T`` gives ``S^{-1} R^T``;
- the corrector's ``A*(C)`` from column dot products is the ``r x r`` product it replaces.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from lipsdp.chain import BlockChain
from lipsdp.interior import factor_schur, term_schur
from lipsdp.solvers.completion_ import PatternChain, _Completion

from test_completion import _dense, _solved_lmi


def _state(norm="l2", function="leaky_relu", params=None):
    lmi = _solved_lmi((5, 7, 7, 7, 6, 3), function=function, params=params or {"alpha": 0.1}, norm=norm)
    chain = PatternChain(BlockChain(lmi))
    return lmi, chain, _Completion(lmi, chain, 1e-7, None, 0.0, False, 10, 0.95)


def _relabel(state, var, m):
    """The state with the terms' multipliers renamed ``var`` (``m`` of them)."""
    state.var, state.m = np.asarray(var), m
    state.KT = sp.csr_matrix((state.coef, (np.arange(len(var)), state.var)), shape=(len(var), m)).T.tocsr()
    state.into, state.H = state.collapse(), None
    return state


@pytest.mark.parametrize("layout", ["as built", "spread", "merged", "descending"])
def test_schur_blocks_add_up_to_term_schur(layout):
    lmi, chain, state = _state()
    assert state.runs is not None
    var, m = state.var, state.m
    if layout == "spread":  # ascending within runs, not consecutive: fancy indices into H
        state = _relabel(state, 3 * var + 1, 3 * m + 2)
        assert any(not isinstance(v, slice) for _, v, _ in state.into)
    elif layout == "merged":  # several terms per multiplier within runs: rows summed by reduceat
        state = _relabel(state, var // 3, m // 3 + 1)
        assert any(s is not None for _, _, s in state.into)
    elif layout == "descending":  # not ascending: H = K^T h K through the sparse products
        state = _relabel(state, var.max() - var, m)
        assert state.into is None
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((2, chain.r, chain.r + 3))
    GX, GZ = A @ A.T, B @ B.T + np.eye(chain.r)
    want = term_schur(GX, GZ, state.iu, state.iw, state.KT)
    for _ in range(2):  # the second call reuses the buffer of the first
        H = state.schur(GX, GZ)
        np.testing.assert_allclose(H, want, rtol=1e-11, atol=1e-12 * np.abs(want).max())
    if state.into is not None:
        np.testing.assert_array_equal(H, H.T)  # exactly: factor_schur(symmetric=True) relies on it


def test_factor_schur_in_place_and_after_a_failed_regularisation():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((60, 60))
    H = A @ A.T + np.diag(10.0 ** rng.uniform(-6, 6, 60))
    b = rng.standard_normal(60)
    for symmetric in (False, True):
        x = factor_schur(H.copy(), symmetric=symmetric)(b)
        np.testing.assert_allclose(H @ x, b, rtol=0, atol=1e-9 * np.linalg.norm(b))
    # Indefinite by 1e-12 after scaling: 1e-14 fails, 1e-11 must then factor the restored matrix.
    H = np.array([[1.0, 1.0, 0.0], [1.0, 1.0 - 1e-12, 0.0], [0.0, 0.0, 4.0]])
    b = np.array([1.0, 2.0, 3.0])
    x = factor_schur(H.copy())(b)
    # (condition number ~1e11: the residual is ~1e-5; a factor of the overwritten triangle is off by O(1))
    np.testing.assert_allclose((H + 1e-11 * np.diag(np.diag(H))) @ x, b, rtol=0, atol=1e-4)
    assert factor_schur(-np.eye(4)) is None


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_forward_sweep_skips_the_zero_blocks_of_R(norm):
    lmi, chain, state = _state(norm)
    assert chain.active is not None
    st, R = chain.starts, lmi.factors[0].toarray()
    for k in range(chain.nb):  # the claim: columns past active[k] of R^T vanish in blocks 0..k
        assert not np.any(R[chain.active[k]:, :st[k + 1]])
    y, fac = state.start()
    Z = np.linalg.inv(_dense(chain, chain.assemble(y)))
    np.testing.assert_allclose(chain.solve(fac, chain.Rt.copy(), chain.active), Z @ R.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_corrector_terms_by_column_dots(norm):
    """``(R dX F Z R^T)[u, w] = U[:, u] . V[:, w]``, ``U = dX R^T``, ``V = F Z R^T``, ``F = R^T K R`` the
    direction on the pattern: the identity that replaces the corrector's ``r x r`` product."""
    lmi, chain, state = _state(norm)
    y, fac = state.start()
    rng = np.random.default_rng(4)
    dy = rng.standard_normal(state.m)
    F = _dense(chain, chain.direction(dy))
    R = lmi.factors[0].toarray()
    kap = state.coef * dy[state.var]
    K = np.zeros((chain.r, chain.r))
    np.add.at(K, (state.iu, state.iw), kap)
    np.add.at(K, (state.iw, state.iu), kap)
    np.testing.assert_allclose(R.T @ K @ R, F, atol=1e-12 * np.abs(F).max())
    A = rng.standard_normal((lmi.n, lmi.n))
    dX = A + A.T
    Z = np.linalg.inv(_dense(chain, chain.assemble(y)))
    U, V = dX @ R.T, chain.pattern_times(chain.direction(dy), Z @ R.T)
    old = R @ U @ K @ (R @ Z @ R.T)  # RUK G_S, as the corrector formed it before
    new = U.T @ V
    for a, b in ((state.iu, state.iw), (state.iw, state.iu)):
        np.testing.assert_allclose(new[a, b], old[a, b], rtol=1e-8, atol=1e-10 * np.abs(old).max())


def test_many_runs_go_through_term_schur_and_are_averaged(monkeypatch):
    """Beyond ``most_runs`` the Schur complement is term_schur's, not exactly symmetric: factor_schur must
    average it (``into`` None tells the iteration so)."""
    monkeypatch.setattr(_Completion, "most_runs", 1)
    lmi, chain, state = _state()
    assert len(state.runs) > 1 and state.into is None
    rng = np.random.default_rng(5)
    A, B = rng.standard_normal((2, chain.r, chain.r + 3))
    GX, GZ = A @ A.T, B @ B.T + np.eye(chain.r)
    np.testing.assert_array_equal(state.schur(GX, GZ), term_schur(GX, GZ, state.iu, state.iw, state.KT))
