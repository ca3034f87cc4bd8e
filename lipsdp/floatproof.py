"""Floating-point proofs of positive definiteness: the one shifted-Cholesky test (docs/math.md §10).

A float Cholesky factor ``R`` of ``H - c I`` satisfies ``R^T R = fl(H - c I) + E`` with
``|E| <= gamma_{n+1} |R^T| |R|`` (Higham, *Accuracy and Stability of Numerical Algorithms*, Thm 10.3), so
``lambda_min`` of the exact matrix is positive when the shift ``c`` exceeds the error terms.  Every proof of
negative or positive definiteness in lipsdp (the unrolled LMI, the structured CNN blocks, proven spectral
norms) ends in :func:`dense_shifted_cholesky`.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla

#: Unit roundoff of float64.
UNIT_ROUNDOFF = 2.0 ** -53
#: Factor on every error term (the bounds are not tight, but rounding in computing them must not matter).
SAFETY = 2.0


def gamma(k: int) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``: the relative error of a sum or product chain of ``k`` roundings."""
    return k * UNIT_ROUNDOFF / (1.0 - k * UNIT_ROUNDOFF)


def dense_shifted_cholesky(H: np.ndarray, delta_f: float, c: float) -> bool:
    """Whether ``H`` (float, within ``||Delta||_F <= delta_f`` of an exact symmetric matrix) is proved to be
    within that distance of a positive definite matrix: a float Cholesky of ``H - c I`` succeeds and
    ``c > 2 (gamma_{n+1} ||R||_F^2 + delta_f + 4u (max H_ii + c))`` (docs/math.md §10)."""
    n = H.shape[0]
    Hs = H.copy()
    Hs[np.diag_indices(n)] -= c
    try:
        Rf = sla.cholesky(Hs, lower=False, check_finite=False)
    except sla.LinAlgError:
        return False
    rhs = gamma(n + 1) * float(np.sum(Rf * Rf)) + delta_f + 4.0 * UNIT_ROUNDOFF * (float(np.abs(np.diag(H)).max()) + c)
    return bool(c > rhs * SAFETY)


def proven_positive_definite(H: np.ndarray) -> bool:
    """Whether the symmetric float matrix ``H``, taken as exact, is provably positive definite: the test above
    with no construction error and the shift ``4 gamma_{n+1} sum |H_ii|``."""
    n = len(H)
    c = 4.0 * gamma(n + 1) * float(np.abs(np.diag(H)).sum()) + np.finfo(float).tiny
    return dense_shifted_cholesky(H, 0.0, c)
