"""Norm gains of activation nodes, and upward rounding that keeps exact results exact.

Two pieces :mod:`lipsdp.bounds` composes into the trivial bound (docs/math.md §2.5):

- :func:`activation_gain`: an incremental Lipschitz constant of an activation node in the
  norm asked for.  In l2 it is the family's own (:meth:`QuadraticConstraint.lipschitz`).  In
  l_inf, elementwise activations keep their largest absolute slope and sorting keeps 1 (every
  order statistic is 1-Lipschitz in l_inf), but a Householder reflection does not: its l_inf gain
  is ``|cos theta| + |sin theta|``, up to ``sqrt 2``.
- :func:`up_product`, :func:`up_sum`, :func:`up_row_sum`: a float proven to be at least the exact
  product, sum, largest absolute row sum.  Where the float result is exact (``1 * 1``, a row
  holding one 1), it is returned as it is, so a composition of exact gains stays exact and an
  l_inf-distance layer certifies at exactly 1.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import scipy.sparse as sp

from lipsdp.constraints import GroupSort, Householder, SlopeRestricted, get_constraint

_U = 2.0 ** -53  # unit roundoff of float64
#: Rows whose row sum is re-added exactly by :func:`up_row_sum` at most (more: the a-priori error bound).
EXACT_ROWS = 20000


def next_up(value: float) -> float:
    """The next float above ``value``."""
    return float(np.nextafter(value, np.inf))


def up_product(a: float, b: float) -> float:
    """``a * b`` rounded up: the float product where it is exact or above the exact one, else the next float."""
    p = a * b
    if not math.isfinite(p):
        return p
    return p if Fraction(p) >= Fraction(a) * Fraction(b) else next_up(p)


def up_sum(values) -> float:
    """``sum(values)`` rounded up (``math.fsum`` rounds the exact sum to nearest; one step up where it fell below)."""
    values = [float(v) for v in values]
    s = math.fsum(values)
    if not math.isfinite(s):
        return s
    return s if Fraction(s) >= sum((Fraction(v) for v in values), Fraction(0)) else next_up(s)


def _up_fsum(row: np.ndarray) -> float:
    """The exact sum of the non-negative floats ``row``, rounded up (``fsum`` of the row and minus its value
    is zero exactly when the value is exact, negative when it lies above)."""
    s = math.fsum(row)
    return s if math.fsum(np.append(row, -s)) <= 0.0 else next_up(s)


def up_row_sum(W) -> float:
    """``max_i sum_j |W_ij|`` rounded up.

    A float sum of ``k`` terms lies within ``gamma_k`` of the exact one, so only rows whose float
    sum is within ``4 gamma_k`` of the largest can hold the maximum; those are summed again exactly
    (:func:`_up_fsum`).  With more than :data:`EXACT_ROWS` of them the a-priori bound is used.
    """
    W = sp.csr_matrix(abs(W)) if sp.issparse(W) else np.abs(np.asarray(W, dtype=np.float64))
    k = W.shape[1]
    gamma = 2.0 * k * _U / (1.0 - k * _U)
    sums = np.asarray(W.sum(axis=1)).ravel()
    top = float(sums.max(initial=0.0))
    if top == 0.0 or not math.isfinite(top):
        return top
    rows = np.flatnonzero(sums >= top * (1.0 - 4.0 * gamma))
    if len(rows) > EXACT_ROWS:
        return next_up(top * (1.0 + gamma))
    if sp.issparse(W):
        return max(_up_fsum(W.data[W.indptr[i]:W.indptr[i + 1]]) for i in rows)
    return max(_up_fsum(W[i]) for i in rows)


def householder_linf_gain(op) -> float:
    """The l_inf gain of a Householder node: ``max(1, |cos theta| + |sin theta|)`` over its pairs, rounded up.

    On each pair the map is the identity or the reflection ``[[cos, sin], [sin, -cos]]``, continuous
    and piecewise linear, so its Lipschitz constant is the largest induced l_inf norm of the two pieces.
    """
    theta = get_constraint(op.function).theta(op)
    worst = float(np.max(np.abs(np.cos(theta)) + np.abs(np.sin(theta)), initial=1.0))
    return next_up(max(1.0, worst) * (1.0 + 8.0 * _U))


def activation_gain(op, norm: str = "l2") -> float:
    """An incremental Lipschitz constant of the activation node ``op`` from and to the norm ``norm``.

    ``"linf"``: elementwise activations (a slope sector) their largest absolute slope, GroupSort 1,
    Householder :func:`householder_linf_gain`; any other family ``inf`` (no claim is made for it).
    """
    constraint = get_constraint(op.function)
    if norm == "l2":
        return constraint.lipschitz(op)
    if isinstance(constraint, Householder):
        return householder_linf_gain(op)
    if isinstance(constraint, (SlopeRestricted, GroupSort)):
        return constraint.lipschitz(op)
    return float("inf")


__all__ = ["EXACT_ROWS", "activation_gain", "householder_linf_gain", "next_up", "up_product", "up_row_sum", "up_sum"]
