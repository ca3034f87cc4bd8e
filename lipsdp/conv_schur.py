"""Schur-complement pieces of SDPs whose variables enter by congruence (docs/math.md §7.4.1).

A variable enters a PSD block as ``sum_t s_t G_t^T V G_t`` (``V`` symmetric, small ``G_t``), as diagonal
multipliers ``sym(L^T diag(v) R)``, or through explicit matrices.  :func:`pair_schur` gives the block of
``H_ij = tr(F_i X F_j Z)`` between two such entries from products of small matrices, never from the
constraint matrices one by one.  Used by :mod:`lipsdp.conv_ipm`; imports nothing of lipsdp.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np


@dataclass
class Var:
    """One variable of the SDP: a symmetric matrix (``kind="sym"``, its upper triangle, row by row), a
    nonnegative vector (``"vec"``) or a scalar; ``group`` and ``local`` place it in the Schur complement."""

    name: str
    kind: str
    size: int
    group: int = 0
    local: int = 0
    offset: int = 0
    tri: tuple = field(default=(), repr=False)

    @property
    def dim(self) -> int:
        return self.size * (self.size + 1) // 2 if self.kind == "sym" else self.size


@dataclass
class Entry:
    """How ``var`` enters one block: ``cong`` (list of ``(sign, G)``: ``sum sign G^T V G``), ``qc``
    (``(L, R)``: ``sym(L^T diag(v) R)``) or ``basis`` (``(n*n, dim)`` columns ``vec F_j``)."""

    var: Var
    kind: str
    data: object


def triangle(r: int):
    ia, ib = np.triu_indices(r)
    return ia, ib, np.where(ia == ib, 0.5, 1.0)


def unpack(v: np.ndarray, var: Var) -> np.ndarray:
    """The symmetric matrix of ``var`` from its upper triangle ``v``."""
    ia, ib, _ = var.tri
    V = np.zeros((var.size, var.size))
    V[ia, ib] = v
    V[ib, ia] = v
    return V


def apply_entry(e: Entry, v: np.ndarray, n: int) -> np.ndarray:
    """``sum_j v_j F_j`` of one entry."""
    if e.kind == "cong":
        V = unpack(v, e.var)
        return sum(s * (G.T @ V @ G) for s, G in e.data)
    if e.kind == "qc":
        L, R = e.data
        Q = L.T @ (v[:, None] * R)
        return 0.5 * (Q + Q.T)
    return (e.data @ v).reshape(n, n)


def adjoint_entry(e: Entry, G: np.ndarray) -> np.ndarray:
    """``(<F_j, G>)_j`` of one entry, ``G`` symmetric."""
    if e.kind == "cong":
        ia, ib, w = e.var.tri
        M = sum(s * (K @ G @ K.T) for s, K in e.data)
        return M[ia, ib] * (2.0 * w)
    if e.kind == "qc":
        L, R = e.data
        return np.einsum("ij,ij->i", L @ G, R)
    return e.data.T @ G.reshape(-1)


#: ``r1 r2`` up to which :func:`skron` forms ``N`` whole and reads it through cached indices.
SMALL = 1024


@lru_cache(maxsize=64)
def _gather(r1: int, r2: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of ``N[(b, c), (a, d)]`` and ``N[(b, d), (a, c)]`` at the two triangles' pairs."""
    ia, ib, _ = triangle(r1)
    ic, id_, _ = triangle(r2)
    n = r1 * r2
    rows, cols = ib[:, None] * r2, ia[:, None] * r2
    return ((rows + ic) * n + cols + id_).astype(np.int32), ((rows + id_) * n + cols + ic).astype(np.int32)


def skron(pairs, t1, t2) -> np.ndarray:
    """``sum_k c_k tr(E_i A_k E_j A2_k^T)`` over the symmetric bases of two triangles (docs/math.md §7.4.1).

    ``pairs``: ``(c_k, A_k, A2_k)``, each ``r1 x r2``; ``t1``, ``t2``: :func:`triangle` of ``r1`` and ``r2``
    (upper triangles row by row).  With ``Q = [c_k A2_k; c_k A_k]`` and ``R = [A_k; A2_k]`` stacked over
    ``j``, ``N[a, b, c, d] = sum_j Q_j[a, d] R_j[b, c]`` and ``h = w_ab w_cd (N[a, b, c, d] + N[a, b, d, c])``:
    the four terms of the symmetric basis.  For each row ``a`` of the first triangle, ``N[a, b >= a]`` is one
    BLAS-3 product (inner dimension ``2 K``) laid out ``(b, c, d)``, read at the second triangle both ways.
    """
    ia, ib, wa = t1
    ic, id_, wc = t2
    r1, r2 = pairs[0][1].shape
    Q = np.empty((2 * len(pairs), r1, r2))
    R = np.empty((2 * len(pairs), r1, r2))
    for k, (c, A, A2) in enumerate(pairs):
        np.multiply(A2, c, out=Q[2 * k])
        np.multiply(A, c, out=Q[2 * k + 1])
        R[2 * k], R[2 * k + 1] = A, A2
    if r1 * r2 <= SMALL:  # one product, read through cached indices (the loop below costs more in calls)
        N = R.reshape(len(R), r1 * r2).T @ Q.reshape(len(Q), r1 * r2)  # (b, c), (a, d)
        first, second = _gather(r1, r2)
        h = np.take(N, first)
        h += np.take(N, second)
        h *= wa[:, None]
        h *= wc[None, :]
        return h
    cd, dc = ic * r2 + id_, id_ * r2 + ic
    h = np.empty((len(ia), len(ic)))
    row = 0
    for a in range(r1):  # rows (a, a), (a, a + 1), ... (a, r1 - 1) of the triangle, in order
        nb = r1 - a
        W = (R[:, a:, :].reshape(len(R), nb * r2).T @ Q[:, a, :]).reshape(nb, r2 * r2)  # (b, c), d -> b, (c, d)
        block = h[row:row + nb]
        np.take(W, cd, axis=1, out=block)
        block += np.take(W, dc, axis=1)
        row += nb
    h *= wa[:, None]
    h *= wc[None, :]
    return h


def pair_schur(e1: Entry, e2: Entry, X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """``h_ij = tr(F_i X F_j Z)`` for ``F_i`` of ``e1`` and ``F_j`` of ``e2`` (``dim1 x dim2``)."""
    if e2.kind == "basis" and e1.kind != "basis":
        return pair_schur(e2, e1, X, Z).T
    if e1.kind == "basis":
        n = X.shape[0]
        F = e1.data.T.reshape(-1, n, n)
        XFZ = X @ F @ Z  # tr(F_b X F_j Z) = <F_j, sym(X F_b Z)>
        return np.stack([adjoint_entry(e2, 0.5 * (M + M.T)) for M in XFZ])
    if e1.kind == "qc" and e2.kind == "cong":
        return pair_schur(e2, e1, X, Z).T
    if e1.kind == "cong" and e2.kind == "cong":
        pairs = [(s * t, G @ X @ K.T, G @ Z @ K.T) for s, G in e1.data for t, K in e2.data]
        return skron(pairs, e1.var.tri, e2.var.tri)
    if e1.kind == "cong":  # e2: qc, sym(l_i r_i^T) for each multiplier i
        L, R = e2.data
        ia, ib, w = e1.var.tri
        h = 0.0
        for s, G in e1.data:
            U, V, U2, V2 = G @ X @ L.T, G @ Z @ R.T, G @ X @ R.T, G @ Z @ L.T
            h = h + s * (U[ia] * V[ib] + U[ib] * V[ia] + U2[ia] * V2[ib] + U2[ib] * V2[ia])
        return h * (0.5 * w)[:, None]
    (L1, R1), (L2, R2) = e1.data, e2.data
    return 0.25 * ((R1 @ X @ L2.T) * (L1 @ Z @ R2.T) + (R1 @ X @ R2.T) * (L1 @ Z @ L2.T)
                   + (L1 @ X @ L2.T) * (R1 @ Z @ R2.T) + (L1 @ X @ R2.T) * (R1 @ Z @ L2.T))
