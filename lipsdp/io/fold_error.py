"""Bounds on the rounding of linear chains folded at load, carried into the proof (docs/math.md §10.3).

The builder (:mod:`lipsdp.io.builder`) composes a chain of linear maps (Linear -> BatchNorm -> Linear,
scalings, sums of maps of one node) into one float64 matrix ``W`` while loading.  The network's exact
map is the exact product ``W*`` of the stored factors, and ``fl`` of it differs: each composition below
returns, with the float result, an entrywise bound ``E >= |W* - W|`` (Higham, *Accuracy and Stability
of Numerical Algorithms*, §3.5: ``|fl(AB) - AB| <= gamma_k |A| |B|``), which the Affine node carries
as ``weight_err`` and the lifting adds to its own rounding bound (:class:`lipsdp.lifting.FloatRows`).
The bounds themselves are computed in float64 and raised by a relative ``2^-40`` (the rounding of
``gamma_k |A| |B|``, a few ``u`` relative, is far below it).  Underflow is not modelled: weights
below ``1e-290`` are not the concern of a Lipschitz bound.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_U = 2.0 ** -53
_RAISE = 1.0 + 2.0 ** -40


def gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``, ``u = 2^-53``."""
    return k * _U / (1.0 - k * _U)


def _abs(M):
    return abs(M).tocsr() if sp.issparse(M) else np.abs(np.asarray(M, dtype=np.float64))


def _dense_or_csr(M):
    return sp.csr_matrix(M) if sp.issparse(M) else np.asarray(M)


def _inner_size(A, B) -> int:
    """At most this many products are summed into one entry of ``A @ B``: the densest row of ``A`` or the
    densest column of ``B``, whichever is smaller (a selection ``B`` gives single products)."""
    def densest(M, axis):
        if sp.issparse(M):
            return int(np.diff(sp.csr_matrix(M).indptr if axis == 1 else sp.csc_matrix(M).indptr).max(initial=0))
        return int(np.count_nonzero(M, axis=axis).max(initial=0)) if np.ndim(M) == 2 else 1
    return min(densest(A, 1), densest(B, 0))


def product_error(A, B, err_a=None, err_b=None):
    """A bound on ``|A* B* - fl(A @ B)|`` entrywise, where ``|A* - A| <= err_a`` and ``|B* - B| <= err_b``
    (None: exact), or None when the product is exact.

    ``|A*B* - fl(AB)| <= gamma_k |A||B| + |A| err_b + err_a |B| + err_a err_b``, ``k`` the longest inner
    sum.  A single term per entry (diagonal scalings, selections) is rounded once (``gamma_1``), and not
    at all when one factor holds only 0 and powers of two (a selection, a sign change, a halving)."""
    k = _inner_size(A, B)
    absA, absB = _abs(A), _abs(B)
    terms = []
    if k > 1 or not (_is_powers_of_two(A) or _is_powers_of_two(B)):
        terms.append(gamma(max(k, 1)) * (absA @ absB))
    if err_b is not None:
        terms.append(absA @ err_b)
    if err_a is not None:
        terms.append(err_a @ (absB + err_b) if err_b is not None else err_a @ absB)
    return _total(terms)


def sum_error(terms, errors):
    """A bound on ``|sum T_i* - fl(sum T_i)|`` for the float summands ``terms`` (bounds ``errors``, None:
    exact): ``gamma_{n-1} sum |T_i|`` plus the summands' bounds (Higham, §4.2)."""
    parts = [e for e in errors if e is not None]
    if len(terms) > 1:
        parts.append(gamma(len(terms) - 1) * sum((_abs(t) for t in terms[1:]), _abs(terms[0])))
    return _total(parts)


def scale_error(factor: float, M, err=None, rel: float = 0.0):
    """A bound on ``|c M* - fl(factor M)|``: one rounding per entry, none for a power of two; ``rel`` bounds
    ``|c - factor| / |factor|`` where the factor itself was rounded (``1 / b`` for a division by ``b``)."""
    parts = [] if _power_of_two(factor) and not rel else [(_U + rel * (1.0 + _U)) * abs(factor) * _abs(M)]
    if err is not None:
        parts.append(abs(factor) * (1.0 + rel) * err)
    return _total(parts)


def reciprocal_error(c) -> float:
    """The relative error of ``fl(1 / b)`` (one correctly rounded division), ``0`` where every ``b`` is a
    power of two (exact)."""
    return 0.0 if _is_powers_of_two(c) else gamma(1)


def rows_error(err, index):
    """The error bound of the rows ``index`` of a matrix (selection and permutation are exact)."""
    return None if err is None else _dense_or_csr(err)[index]


def _power_of_two(x: float) -> bool:
    return x != 0 and _is_powers_of_two(np.array([x]))


def _is_powers_of_two(M) -> bool:
    """Every entry 0 or +-2^e (products with it are exact, barring underflow and overflow)."""
    data = np.asarray(M.data if sp.issparse(M) else M, dtype=np.float64).ravel()
    m, _ = np.frexp(data)
    return bool(np.all((data == 0) | (np.abs(m) == 0.5)))


def _total(parts):
    """The sum of the error parts, raised relatively by ``2^-40``; None when there is none or all are zero."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if any(not sp.issparse(p) for p in parts):
        total = sum(p.toarray() if sp.issparse(p) else np.asarray(p) for p in parts) * _RAISE
        return total if np.any(total) else None
    total = (sum(parts[1:], parts[0]) * _RAISE).tocsr()
    total.eliminate_zeros()
    return total if total.nnz else None


def batch_norm_scale_error(scale):
    """A bound on the error of ``fl(weight / sqrt(var + eps))`` (four correctly rounded operations:
    add, sqrt, divide, multiply; the sqrt halves its input's relative error): ``gamma_4 |scale|``."""
    return gamma(4) * np.abs(np.asarray(scale, dtype=np.float64)) * _RAISE


def stacked_error(blocks, errors, perm):
    """The error bound of ``vstack(blocks)[perm]`` (stacking and permuting are exact): the blocks' own."""
    if all(e is None for e in errors):
        return None
    full = [np.zeros(b.shape) if e is None else (e.toarray() if sp.issparse(e) else np.asarray(e))
            for b, e in zip(blocks, errors)]
    return np.vstack(full)[perm]


__all__ = ["batch_norm_scale_error", "gamma", "product_error", "reciprocal_error", "rows_error", "scale_error",
           "stacked_error", "sum_error"]
