"""The completion method through the dense inverses (:mod:`lipsdp.solvers.completion_dense`,
:mod:`lipsdp.solvers.row_basis`).

- the block recursion gives ``S^{-1}`` and the band product ``P(sym(A B))`` exactly as dense algebra does;
- every factor row of a slope-restricted chain is a coordinate plus one pre-activation row (``RowBasis``
  rebuilds ``R`` from them), and :func:`fits` says so without building the chain;
- each product of an iteration (adjoints, Schur complement, directions, Mehrotra's term) equals the
  factor-row kernel's, with one worker and with two;
- whole solves take the same iterates as the factor-row kernel, and a torch model certified through it lands
  between its sampled Jacobian norm and the product of its norms.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import lipsdp
from lipsdp.chain import BlockChain
from lipsdp.solvers import completion_dense as dense
from lipsdp.solvers.completion_ import CompletionIPM, PatternChain, RowKernel, _Completion
from lipsdp.solvers.row_basis import RowBasis, fits

from test_completion import _dense, _flat, _solved_lmi

CASES = [((5, 7, 7, 7, 6, 3), "leaky_relu", {"alpha": 0.1}, "l2"),
         ((6, 9, 9, 9, 9, 4), "relu", None, "l2"),
         ((4, 8, 8, 8, 8, 3), "tanh", None, "l2"),
         ((6, 8, 8, 8, 8, 4), "leaky_relu", {"alpha": 0.05}, "linf")]


def _state(lmi):
    chain = PatternChain(BlockChain(lmi))
    state = _Completion(lmi, chain, CompletionIPM.default_tol, None, 0.0, False, CompletionIPM.max_iters,
                        CompletionIPM.step_fraction)
    return chain, state


def _point(chain, state, seed=0):
    """A strictly feasible S, a generic primal X on the pattern (positive definite cliques)."""
    y, fac = state.start()
    S = chain.assemble(y)
    rng = np.random.default_rng(seed)
    X = state.start_X(fac, S)
    A = rng.standard_normal((chain.starts[-1],) * 2) * 1e-3
    Xd = _dense(chain, X) + (A @ A.T) * np.mean(np.diag(_dense(chain, X)))
    return y, fac, _flat(chain, Xd)


def test_dense_inverse_and_band_are_the_dense_algebra():
    lmi = _solved_lmi((5, 7, 7, 7, 6, 3), function="leaky_relu", params={"alpha": 0.1})
    chain, state = _state(lmi)
    y, fac = state.start()
    S = _dense(chain, chain.assemble(y))
    Z = dense.dense_inverse(chain, fac)
    np.testing.assert_allclose(Z, np.linalg.inv(S), rtol=0, atol=1e-10 * np.abs(Z).max())
    assert np.array_equal(Z, Z.T) and Z.flags.c_contiguous
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal(S.shape), rng.standard_normal(S.shape)
    AB = A @ B
    for threads in (1, 2):  # the pattern of (AB + (AB)^T) / 2
        got = _dense(chain, dense.band(chain, A, B, threads=threads))
        mask = _dense(chain, np.ones(chain.length)) != 0
        want = np.where(mask, (AB + AB.T) / 2, 0.0)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(AB).max())


@pytest.mark.parametrize("sizes, function, params, norm", CASES)
def test_rows_are_a_coordinate_plus_one_preactivation_row(sizes, function, params, norm):
    lmi = _solved_lmi(sizes, function=function, params=params, norm=norm)
    chain, _ = _state(lmi)
    basis = RowBasis(chain, lmi)
    assert basis.ok and fits(lmi)
    # R rebuilt row by row from (c, j, d, pi) through the terms: both rows of each term share j and pi.
    assert np.all((basis.jt >= 0) | (basis.pt >= 0))
    for k, P in basis.P.items():
        assert P.shape[1] == chain.sizes[k] and np.allclose(np.max(np.abs(P), axis=1), 1.0)


def test_fits_is_false_for_rows_across_blocks():
    lmi = _solved_lmi((5, 7, 7, 7, 6, 3), function="leaky_relu", params={"alpha": 0.1})
    R = lmi.factors[0].tolil(copy=True)
    R[3, lmi.n - 1] = 1.0  # a row reaching the last block
    assert not fits(replace(lmi, factors=(R.tocsr(),) + tuple(lmi.factors[1:])))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sizes, function, params, norm", CASES)
def test_each_product_equals_the_factor_row_kernel(sizes, function, params, norm, workers):
    lmi = _solved_lmi(sizes, function=function, params=params, norm=norm)
    chain, state = _state(lmi)
    y, fac, X = _point(chain, state)
    W, _ = chain.completion_inverse(X)
    wfac = chain.factor(W)
    rows, kernel = RowKernel(state, chain), dense.DenseKernel.make(state, chain, lmi)
    assert kernel is not None
    rows.par = kernel.par = workers

    def close(a, b):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-10 * max(np.abs(a).max(), 1e-300))

    for a, b in zip(rows.begin(fac, wfac), kernel.begin(fac, wfac)):
        close(a, b)
    close(rows.schur().copy(), kernel.schur().copy())
    dy = np.random.default_rng(3).standard_normal(len(y)) * y
    D = chain.direction(dy)
    close(rows.pattern(dy, D, keep=True), kernel.pattern(dy, D, keep=True))
    c_rows, c_dense = rows.corrector(dy, D), kernel.corrector(dy, D)
    close(c_rows[1], c_dense[1])
    dy2 = dy[::-1].copy()
    D2 = chain.direction(dy2)
    close(rows.pattern(dy2, D2, c_rows), kernel.pattern(dy2, D2, c_dense))


@pytest.mark.parametrize("sizes, function, params, norm", CASES[:2] + CASES[3:])
def test_solve_takes_the_factor_row_kernels_iterates(sizes, function, params, norm, monkeypatch):
    lmi = _solved_lmi(sizes, function=function, params=params, norm=norm)
    out = {}
    for products in ("rows", "dense"):
        monkeypatch.setattr(_Completion, "products", products)
        chain, state = _state(lmi)
        status, _ = state.run()
        assert status == "optimal"
        out[products] = (float(lmi.objective @ state.y), state.iterations)
    assert out["dense"][1] == out["rows"][1]
    assert out["dense"][0] == pytest.approx(out["rows"][0], rel=1e-7)


def test_a_deep_torch_model_certifies_through_the_dense_inverses(monkeypatch):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(20, 12), torch.nn.LeakyReLU(0.02)]
    for _ in range(7):
        layers += [torch.nn.Linear(12, 12), torch.nn.LeakyReLU(0.02)]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(12, 3)).double()
    made = []
    real = dense.DenseKernel.make.__func__

    def spy(cls, state, chain, lmi):
        made.append(real(cls, state, chain, lmi))
        return made[-1]

    monkeypatch.setattr(dense.DenseKernel, "make", classmethod(spy))
    cert = lipsdp.certify(model, solver="completion", input_shape=(20,), lower_bound_samples=0)
    assert made and made[-1] is not None
    assert cert.verified and cert.solver == "completion", cert.message
    # The sandwich: sampled Jacobian norms (autograd on the model) <= bound <= product of norms times slopes.
    x = torch.randn(400, 20, dtype=torch.float64, requires_grad=True)
    lower = max(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(model, xi), ord=2).item()
                for xi in x[:60])
    upper = np.prod([torch.linalg.matrix_norm(m.weight.detach(), ord=2).item() for m in model
                     if isinstance(m, torch.nn.Linear)])
    assert lower <= cert.bound <= upper
    monkeypatch.setattr(_Completion, "products", "rows")
    rows = lipsdp.certify(model, solver="completion", input_shape=(20,), lower_bound_samples=0)
    assert rows.bound == pytest.approx(cert.bound, rel=1e-6)


def test_solves_with_the_blocks_inverses_are_the_triangular_solves():
    """The column halves of the predictor's ``X^ M`` go through the diagonal blocks' inverses (matmul releases
    the GIL, scipy's trsm wrapper does not): the same solve to rounding, on a slice as on the whole."""
    lmi = _solved_lmi((5, 7, 7, 7, 6, 3), function="leaky_relu", params={"alpha": 0.1})
    chain, state = _state(lmi)
    _, fac = state.start()
    n = int(chain.starts[-1])
    B = np.random.default_rng(3).standard_normal((n, 2 * n))
    ref = B.copy()
    chain.solve(fac, ref)
    np.testing.assert_allclose(ref, np.linalg.solve(_dense(chain, chain.assemble(state.start()[0])), B),
                               rtol=0, atol=1e-9 * np.abs(ref).max())
    out, inv = B.copy(), chain.inverses(fac)
    chain.solve(fac, out[:, :n], inverses=inv)
    chain.solve(fac, out[:, n:], inverses=inv)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
