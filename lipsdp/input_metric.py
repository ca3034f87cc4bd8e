"""The l2 LMI on the first layer's pre-activations: no ``p_i p_i^T`` terms of width cubed in the first layer.

A slope QC with sector ``[alpha, beta]``, ``alpha beta != 0`` (LeakyReLU, GELU, SiLU, ...) adds
``-2 alpha beta t_i p_i p_i^T`` per neuron, ``nnz(p_i)^2`` entries: for a first layer that reads a
784-pixel input through ``m`` neurons, ``m 784^2`` entries (``m^3`` on the restriction of
:meth:`~lipsdp.lifting.Lifting.span_input`).  In the coordinates ``v = A x0`` of the first layer's
pre-activations (``A`` its exact input rows, ``m x n0``, ``m < n0``) every ``p_i`` is a unit vector.

Soundness (docs/math.md §10.4).  The network reads ``x0`` only through ``v = A x0`` (only block 1
reads the input, exactly).  The LMI of the network ``g(v)`` (the same layers after ``A``) with input
block ``-rho H`` instead of ``-rho I`` proves, as LipSDP does,
``||g(v) - g(v')||^2 <= rho (v - v')^T H (v - v')``.  If ``A^T H A <= I`` then
``(v - v')^T H (v - v') = dx^T A^T H A dx <= ||dx||^2``, so ``sqrt(rho)`` bounds the network's l2
Lipschitz constant.  ``H`` is a float matrix taken as exact data, ``(1 - eta) fl(G^{-1})`` for
``G = A A^T``, and ``I - A^T H A >= 0`` is *proven* by the shifted Cholesky test of
:mod:`lipsdp.floatproof` on ``fl(A^T fl(H A))`` with its entrywise rounding bound; ``eta`` (1e-9 ..
1e-6) is the margin the proof needs: the optimum is ``1/sqrt(1 - eta)`` times that of the network as
given, the same to ``eta``.  With ``A`` of full row rank, ``A^T G^{-1} A`` is the projection on ``A``'s
row space, so nothing else is lost.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp.constraints import get_constraint
from lipsdp.floatproof import SAFETY, UNIT_ROUNDOFF, dense_shifted_cholesky, gamma
from lipsdp.lifting import Block, InputSpan, Lifting

#: Margins ``eta`` tried, smallest first (each a ``1/sqrt(1 - eta)`` looser bound).
MARGINS = (1e-9, 1e-8, 1e-7, 1e-6)
#: COO entries of the first layer's ``p_i p_i^T`` terms (on the input rows where those apply) from which the
#: pre-activation block is taken; below it the LMI on the input rows, as before (its bounds pinned by tests).
MIN_TERMS = 2 ** 22


def has_square_terms(lifting: Lifting, min_terms: int | None = None) -> bool:
    """Whether the first activation's QC has ``p_i p_i^T`` terms (a slope sector with ``alpha beta != 0``),
    at least ``min_terms`` (default :data:`MIN_TERMS`) entries of them: ``m k^2`` for ``m`` neurons reading
    ``k`` input coordinates (``k = m`` on the input rows, :meth:`~lipsdp.lifting.Lifting.span_input`)."""
    if len(lifting.blocks) < 2:
        return False
    m, n0 = lifting.blocks[1].size, lifting.input_dim
    k = m if 2 * m <= n0 else n0
    if m * k * k < (MIN_TERMS if min_terms is None else min_terms):
        return False
    op = lifting.network.op(lifting.blocks[1].node)
    qc = get_constraint(op.function)
    if not hasattr(qc, "sector"):
        return False
    lo, hi = qc.sector(op)
    return bool(np.any(np.asarray(lo, dtype=np.float64) * np.asarray(hi, dtype=np.float64) != 0))


def proven_contraction(A: sp.csr_matrix, H: np.ndarray) -> bool:
    """Whether ``I - A^T H A`` (exact ``A`` and ``H``) is proven positive definite.

    ``Y = fl(H A)`` is within ``gamma_m |H||A|`` of ``H A`` and ``X = fl(A^T Y)`` within ``gamma_m |A|^T |Y|``
    of ``A^T Y``, so ``|X - A^T H A| <= gamma_m (|A|^T |Y| + |A|^T |H| |A|)`` entrywise, in any summation
    order; the bound is itself a sum of nonnegative terms, computed within ``gamma_{2m+2}``, covered by
    taking ``gamma_{2m+4}``.  Then :func:`~lipsdp.floatproof.dense_shifted_cholesky` on the symmetric
    ``I - X`` (its upper triangle) with that Frobenius error.
    """
    A = sp.csr_matrix(A)
    m, n0 = A.shape
    H = np.asarray(H, dtype=np.float64)
    AT = A.T.tocsr()
    Y = np.asarray((AT @ H.T).T)  # fl(H A), m x n0 (H symmetric)
    X = np.asarray(AT @ Y)
    absA, absAT = abs(A), abs(AT)
    bound = np.asarray(absAT @ np.abs(Y)) + np.asarray(absAT @ np.asarray(absAT @ np.abs(H)).T)
    bound = np.maximum(bound, bound.T)  # the symmetric I - X below takes each pair's upper entry
    upper = np.triu(X)
    K = -(upper + np.triu(upper, 1).T)
    diag = np.diag_indices(n0)
    # 1 - X_ii is rounded (by at most u |1 - X_ii| <= u (1 + |X_ii|)): that too is construction error.
    delta_f = (gamma(2 * m + 4) * float(np.linalg.norm(bound)) +
               UNIT_ROUNDOFF * float(np.linalg.norm(1.0 + np.abs(K[diag])))) * SAFETY
    K[diag] += 1.0
    if not np.all(np.isfinite(K)):
        return False
    # The shift the test needs (K's trace for ||R||_F^2), with room; it must stay below lambda_min(K) ~ eta.
    c = 3.0 * (gamma(n0 + 1) * float(np.abs(K[diag]).sum()) + delta_f +
               4.0 * UNIT_ROUNDOFF * (float(np.abs(K[diag]).max()) + 1.0)) + np.finfo(float).tiny
    return dense_shifted_cholesky(K, delta_f, c)


def preactivation_span(lifting: Lifting, max_condition: float = 1e8) -> InputSpan | None:
    """The lifting on ``v = A x0`` with input metric ``H`` proven to satisfy ``A^T H A <= I``, or None.

    Applies when only block 1 reads the input, through exact rows ``A`` with ``m < n0`` and ``A A^T``
    conditioned within ``max_condition``.  Block 1's pre-activation rows become ``[I 0]`` (exact);
    :attr:`InputSpan.metric` is ``H`` (exact data: its error bound is zero).
    """
    n0 = lifting.input_dim
    if len(lifting.blocks) < 2 or not lifting.pre:
        return None
    P0 = sp.csr_matrix(lifting.pre[0])
    A = P0[:, :n0].tocsr()
    m = A.shape[0]
    others = [P[:, :n0] for P in lifting.pre[1:]] + [lifting.output[:, :n0]] + \
        [E[:, :n0] for E in lifting.pre_err[1:]] + \
        ([lifting.output_err[:, :n0]] if lifting.output_err is not None else [])
    if m >= n0 or P0[:, n0:].nnz or any(X.nnz for X in others) or (lifting.pre_err and lifting.pre_err[0].nnz):
        return None
    G = (A @ A.T).toarray()
    G = np.triu(G) + np.triu(G, 1).T
    evals, evecs = np.linalg.eigh(G)
    if not evals[0] > max(evals[-1], 0.0) / max_condition:
        return None
    Ginv = (evecs / evals) @ evecs.T
    Ginv = np.triu(Ginv) + np.triu(Ginv, 1).T
    for eta in MARGINS:
        H = Ginv * (1.0 - eta)
        if proven_contraction(A, H):
            break
    else:
        return None
    shift = n0 - m
    rest = lifting.n - n0

    def widen(X):  # the columns past the input, behind ``m`` zero input columns
        return sp.hstack([sp.csr_matrix((X.shape[0], m)), X[:, n0:]]).tocsr()

    pre = [sp.hstack([sp.identity(m, format="csr"), sp.csr_matrix((m, rest))]).tocsr()] + \
        [widen(P) for P in lifting.pre[1:]]
    pre_err = [sp.csr_matrix((m, m + rest))] + [widen(E) for E in lifting.pre_err[1:]]
    out_err = sp.csr_matrix((lifting.output.shape[0], m + rest)) if lifting.output_err is None else \
        widen(lifting.output_err)
    blocks = [Block("input", 0, 0, m)] + [Block(b.name, b.node, b.start - shift, b.size) for b in lifting.blocks[1:]]
    floor = (1.0 - eta) / float(evals[-1])  # about lambda_min(H): a scale for the verifier, not a proof
    return InputSpan(Lifting(lifting.network, blocks, pre, widen(lifting.output), pre_err, out_err), H,
                     np.zeros((m, m)), floor)
