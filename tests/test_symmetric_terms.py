"""``outer_terms(A, A, ...)`` stores ``2 c a a^T`` once per place (half the entries of the general path).

The matrices assembled from the entries equal the dense definition to rounding, the entries are symmetric,
and LMIs of LeakyReLU / GELU nets (``alpha beta != 0``: the ``p p^T`` terms) certify the same bound, inside
the sandwich sampled lower bound <= bound <= product of norms.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import lipsdp
from lipsdp.constraints import base as constraints_base
from lipsdp.constraints import outer_terms
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network


def _dense(rows, cols, vals, mult, n, j):
    M = np.zeros((n, n))
    keep = mult == j
    np.add.at(M, (rows[keep], cols[keep]), vals[keep])
    return M


@pytest.mark.parametrize("ragged", [False, True])
def test_same_rows_give_twice_the_outer_product_once(ragged):
    rng = np.random.default_rng(1)
    D = rng.standard_normal((5, 9))
    if ragged:
        D[rng.random(D.shape) < 0.4] = 0.0
        D[3] = 0.0  # an empty row adds nothing
    A = sp.csr_matrix(D)
    coef = rng.standard_normal(5)
    coef[1] = 0.0
    mult = np.array([0, 1, 1, 2, 0])
    rows, cols, vals, m = outer_terms(A, A, coef, mult)
    assert len(rows) == sum(np.count_nonzero(D[i]) ** 2 for i in range(5) if coef[i] != 0)
    # The general path (a copy is another object) stores each place twice; both assemble the same matrices.
    r2, c2, v2, m2 = outer_terms(A, A.copy(), coef, mult)
    assert len(r2) == 2 * len(rows)
    for j in range(3):
        want = sum(2 * coef[i] * np.outer(D[i], D[i]) for i in range(5) if mult[i] == j)
        got = _dense(rows, cols, vals, m, 9, j)
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-14)
        np.testing.assert_array_equal(got, got.T)  # symmetric bit for bit
        np.testing.assert_allclose(_dense(r2, c2, v2, m2, 9, j), got, rtol=1e-14, atol=1e-14)


def _net(act, widths, seed=0, **params):
    rng = np.random.default_rng(seed)
    Ws = [rng.standard_normal((b, a)) / np.sqrt(a) for a, b in zip(widths[:-1], widths[1:])]
    return Network.sequential(Ws, activation=act, params=params)


@pytest.mark.parametrize("act,params", [("leaky_relu", {"negative_slope": 0.01}), ("gelu", {}), ("silu", {})])
def test_bound_unchanged_and_sandwiched(act, params):
    net = _net(act, [12, 16, 16, 3], **params)
    lifting = lift(net)
    lmi = build_lmi(lifting)
    # Every place of a neuron's term has one entry (the p p^T part had two): no (row, col, var) repeats.
    key = (lmi.rows * lmi.n + lmi.cols) * lmi.n_var + lmi.var
    assert len(np.unique(key)) == len(key)
    cert = lipsdp.certify_network(net, lower_bound_samples=200)
    assert cert.verified
    assert cert.lower_bound <= cert.bound * (1 + 1e-9)
    assert cert.bound <= cert.trivial_bound * (1 + 1e-9)


def test_joined_terms_are_the_parts_concatenated():
    rng = np.random.default_rng(2)
    P = sp.csr_matrix(rng.standard_normal((6, 10)))
    D = rng.standard_normal((6, 10))
    D[rng.random(D.shape) < 0.5] = 0.0
    Pr = sp.csr_matrix(D)  # ragged rows: the general path
    Q = sp.csr_matrix((np.ones(6), (np.arange(6), 10 + np.arange(6))), shape=(6, 16))
    P, Pr = (sp.hstack([X, sp.csr_matrix((6, 6))]).tocsr() for X in (P, Pr))
    coef, mult = rng.standard_normal(6), np.arange(6)
    specs = [(P, Q, coef, mult), (Q, Q, -np.ones(6), mult), (P, P, -coef, mult), (Pr, Q, coef, mult),
             (Pr, Pr, coef, mult)]
    joined = constraints_base.joined_outer_terms(specs)
    parts = [outer_terms(*s) for s in specs]
    for got, want in zip(joined, zip(*parts)):
        np.testing.assert_array_equal(got, np.concatenate(want))
    n = sum(len(p[0]) for p in parts)
    assert len(joined[0]) == n == 2 * 6 * 10 + 6 + 6 * 100 + 2 * Pr.nnz + sum(np.diff(Pr.indptr) ** 2)


def test_merged_lifting_error_bounds_the_two_pieces():
    """A dense first layer's rounding bound ``|hi| - |lo|`` as one piece, rounded up: never below the sum of the
    two pieces it replaces, and equal to it up to that rounding."""
    from lipsdp.constraints import get_constraint
    from lipsdp.lmi import _constraint_error

    net = _net("gelu", [40, 6, 5, 2])
    lifting = lift(net)
    span = lifting.span_input()
    assert span is not None  # a first layer narrower than half the input: the restricted, rounded LMI
    lmi = build_lmi(lifting, span=span)
    assert lmi.lift_err is not None
    L = span.lifting
    op = L.network.op(L.blocks[1].node)
    qc, P, E, Q = get_constraint(op.function), L.pre[0], L.pre_err[0], L.selector(1)
    merged = _constraint_error(qc, op, P, E, Q, "neuron", 1)
    assert len(merged) == 1
    hi, lo = qc.terms(op, abs(P) + E, abs(Q)), qc.terms(op, abs(P), abs(Q))
    x = np.abs(np.random.default_rng(3).standard_normal(lmi.n_var)) + 0.1
    r, c, v, m = merged[0]
    n = lmi.n
    got = np.bincount(r * n + c, weights=v * x[m], minlength=n * n)
    want = np.bincount(np.concatenate([hi.rows, lo.rows]) * n + np.concatenate([hi.cols, lo.cols]),
                       weights=np.concatenate([np.abs(hi.vals), -np.abs(lo.vals)]) * x[1 + np.concatenate(
                           [hi.mult, lo.mult])], minlength=n * n)
    # The two pieces' sum cancels |hi| against |lo| (each ~1e13 times their difference): it is off by up to
    # gamma_K sum(|hi| + |lo|) x; the one piece differs from it by no more than that (each difference is exact,
    # Sterbenz, then rounded up).
    size = np.bincount(np.concatenate([hi.rows, lo.rows]) * n + np.concatenate([hi.cols, lo.cols]),
                       weights=np.concatenate([np.abs(hi.vals), np.abs(lo.vals)]) * x[1 + np.concatenate(
                           [hi.mult, lo.mult])], minlength=n * n)
    K = int(np.bincount(np.concatenate([hi.rows, lo.rows]) * n + np.concatenate([hi.cols, lo.cols])).max())
    gamma = 2 * K * 2.0 ** -53 / (1 - 2 * K * 2.0 ** -53)
    assert np.all(np.abs(got - want) <= gamma * size)
    assert np.all(got >= 0) and np.any(got > 0)


@pytest.mark.parametrize("act,params", [("leaky_relu", {"negative_slope": 0.01}), ("gelu", {}), ("relu", {})])
def test_entry_count_is_what_terms_store(act, params):
    """The up-front memory check (``check_lmi_memory``) counts the entries the slope QC will store."""
    from lipsdp.constraints import get_constraint
    from lipsdp.reductions import expected_entries

    lifting = lift(_net(act, [12, 16, 16, 3], **params))
    total = 0
    for k, P in enumerate(lifting.pre, start=1):
        op = lifting.network.op(lifting.blocks[k].node)
        qc = get_constraint(op.function)
        stored = len(qc.terms(op, P, lifting.selector(k)).rows)
        assert qc.entry_count(op, P, lifting.selector(k)) == stored
        total += stored
    assert expected_entries(lifting) == total


def test_whole_lmi_refused_up_front(monkeypatch):
    import lipsdp.constraints.base as base
    from lipsdp.errors import ResourceError

    net = _net("leaky_relu", [30, 20, 20, 20, 2], negative_slope=0.1)
    need = base.BYTES_PER_ENTRY * sum(20 * (20 + 1) ** 2 for _ in range(3))  # 2 nnz(p) + 1 + nnz(p)^2 per neuron
    monkeypatch.setattr(base, "available_memory", lambda: int(need / base.MEMORY_SHARE) - 4096)
    with pytest.raises(ResourceError, match="building the LMI needs about"):
        from lipsdp.reductions import Query
        Query.build(lift(net), "neuron", "l2", None)
