"""The LMI to solve, built from the LMI to verify: one assembly of the hidden layers' terms.

For l2 on a net that reads a wide input through a narrow first layer, two LMIs of the same
size are in play: the one verified, restricted to the first layer's input rows (input block
``-rho A A^T``, docs/math.md §10.1), and the one solved, on an orthonormal basis ``U`` of the
same row space (input block ``-rho I``, first-layer rows ``A U``;
:meth:`~lipsdp.lifting.Lifting.reduce_input`).  Only the input block and the first layer's terms
differ: every later layer reads hidden blocks only, whose columns are the same in both.  On deep
wide nets those later layers hold almost all terms (``width^3`` COO entries per LeakyReLU layer),
so :func:`solve_lmi` assembles only the first layer anew and shares the rest with the verified LMI:
the same ``rows``, ``cols`` and ``var`` arrays (the input block is laid out ``m x m`` in both, the
solved one's off-diagonal entries exact zeros) and the later layers' values and factors.

Only the solved LMI is built this way; nothing here is a bound.  Where the layouts do not line up
(a first layer whose rows have other nonzeros in one of the two forms, a rounded lifting) it returns
None and the caller builds the LMI in full, as before.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from lipsdp.constraints import get_constraint
from lipsdp.lifting import Lifting
from lipsdp.lmi import LMIProblem


def solve_lmi(given: LMIProblem, reduced: Lifting, formulation: str) -> LMIProblem | None:
    """The l2 LMI of ``reduced`` (the input-reduced lifting) sharing ``given``'s later layers, or None.

    Parameters
    ----------
    given : LMIProblem
        The l2 LMI restricted to the input rows (``input_metric`` set), with factored terms.
    reduced : Lifting
        ``lifting.reduce_input()`` of the same lifting: same blocks past the input, input block of
        the same size as ``given``'s.
    formulation : str

    Returns
    -------
    LMIProblem or None
        Equal, term for term, to ``build_lmi(reduced, formulation)`` up to the order of the terms
        and exact zeros in the input block; None where the shared layout does not apply.
    """
    m, n = given.input_dim, given.n
    if (given.input_metric is None or given.factors is None or given.norm != "l2" or not reduced.exact
            or reduced.input_dim != m or reduced.n != n or len(given.blocks) < 3
            or [b.size for b in reduced.blocks] != [b.size for b in given.blocks]):
        return None
    head = _first_layer(reduced, m, n, formulation)
    if head is None:
        return None
    rows, cols, vals, var, factors = head
    cut = len(rows)
    if (cut >= len(given.rows) or given.var[cut] <= var.max()
            or not (np.array_equal(given.rows[:cut], rows) and np.array_equal(given.cols[:cut], cols)
                    and np.array_equal(given.var[:cut], var))):
        return None
    shared = given.vals.copy()
    shared[:cut] = vals
    return replace(given, vals=shared, factors=_join_factors(factors, given.factors, int(var.max())),
                   lift_err=None, blocks=list(reduced.blocks), input_metric=None, input_floor=1.0, start=None)


def _first_layer(reduced: Lifting, m: int, n: int, formulation: str):
    """COO ``(rows, cols, vals, var)`` and factors of ``-rho I`` (laid out ``m x m``) and the first
    layer's constraint terms of ``reduced``, in the order :func:`lipsdp.lmi.build_lmi` lays them out."""
    r, c = (i.ravel() for i in np.indices((m, m)))
    op = reduced.network.op(reduced.blocks[1].node)
    P = sp.csr_matrix(reduced.pre[0]).sorted_indices()
    if not P.has_canonical_format:
        return None
    t = get_constraint(op.function).terms(op, P, reduced.selector(1), formulation)
    if not t.factors:
        return None
    rows = np.concatenate([r, t.rows]).astype(np.int64)
    cols = np.concatenate([c, t.cols]).astype(np.int64)
    vals = np.concatenate([-np.eye(m).ravel(), t.vals])
    var = np.concatenate([np.zeros(m * m, np.int64), np.asarray(t.mult, np.int64) + 1])
    E0 = sp.eye(m, n, format="csr")
    factors = [(E0, E0, np.full(m, -0.5), np.zeros(m, np.int64))]
    factors += [(A, B, coef, np.asarray(mult, np.int64) + 1) for A, B, coef, mult in t.factors]
    return rows, cols, vals, var, factors


def _join_factors(head: list, given: tuple, last_var: int) -> tuple:
    """``(R, iu, iw, coef, var)``: the head's factor rows, then ``given``'s terms of the variables past
    ``last_var`` (with the rows they use, renumbered)."""
    R, iu, iw, coef, fvar = given
    keep = fvar > last_var
    used, inv = np.unique(np.concatenate([iu[keep], iw[keep]]), return_inverse=True)
    mats, at, hu, hw, hc, hv = [], 0, [], [], [], []
    for A, B, cf, mult in head:
        k = A.shape[0]
        cf = np.broadcast_to(np.asarray(cf, dtype=np.float64), (k,))
        nz = cf != 0
        ia, mats = at, mats + [sp.csr_matrix(A)]
        ib = at + k if B is not A else at
        if B is not A:
            mats.append(sp.csr_matrix(B))
        at = ib + k
        hu.append(ia + np.arange(k)[nz])
        hw.append(ib + np.arange(k)[nz])
        hc.append(cf[nz])
        hv.append(np.broadcast_to(np.asarray(mult, np.int64), (k,))[nz])
    nk = int(keep.sum())
    rows = sp.vstack(mats + [sp.csr_matrix(R)[used]], format="csr")
    return (rows, np.concatenate(hu + [at + inv[:nk]]), np.concatenate(hw + [at + inv[nk:]]),
            np.concatenate(hc + [coef[keep]]), np.concatenate(hv + [fvar[keep]]))
