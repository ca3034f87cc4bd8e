"""Scales for preconditioning a layer-chain LMI, from a feasible layer-by-layer point.

:meth:`~lipsdp.lmi.LMIProblem.preconditioned` needs, for every block ``k``, a
gain ``d_k`` (how much block ``k`` moves per unit input move) and an overall
gain: the multipliers of block ``k`` then enter in units of ``g / d_k^2`` and
``rho`` in units of ``g``.  Composed norm bounds (``prod ||W_j||``) serve for any
graph, but on deep nets they overshoot the SDP's own per-layer scale
geometrically, most in the first layers, and an interior-point method spends
about one iteration per decade descending.

On a chain LMI (block-tridiagonal, each multiplier inside two neighbouring
blocks: :class:`lipsdp.chain.BlockChain`) a feasible point with one
multiplier per layer follows from the block recursion of ``N = -M``
(docs/math.md §8.4), ``rho = 1`` and ``T_0 = N_00``:

.. math::

    T_k(\\lambda) = \\lambda R_k - \\lambda^2 Q_k^T T_{k-1}^{-1} Q_k ,
    \\qquad \\lambda_k = \\frac{1}{2\\, \\lambda_{\\max}(Q_k^T T_{k-1}^{-1} Q_k,\\ R_k)} ,

where ``[[P_k, Q_k], [Q_k^T, R_k]]`` is ``-sum_{j in layer k} M_j`` on blocks
``(k-1, k)`` (unit multipliers); ``lambda_k`` maximises the smallest
generalised eigenvalue of ``T_k`` relative to ``R_k`` (``1 / (4 lambda_max)``),
and ``P_k`` (zero for ReLU) only adds a term that is positive semidefinite for
sectors with ``alpha beta >= 0``: it is left out, which keeps the point
feasible there.  With the output term ``K = M_c`` on the last block,
``rho_E = lambda_max(K, T_l)`` makes ``(rho_E, rho_E lambda)`` feasible.  For
slope-restricted ReLU nets this is ECLipsE-Fast (Xu and Sivaranjani, NeurIPS
2024), whose bounds it reproduces; here it is read off the LMI itself, so any
sector and the l_inf input block work alike.

The scales are ``d_k = 1 / sqrt(lambda_k)`` and ``sqrt(rho_E)``: the point is
then ``(1, 1, ..., 1)`` in scaled units, and the SDP's optimum lies within a
few decades of it, evenly across layers.  They only precondition (powers of
two, an exact congruence); no bound is taken from them.  On deep nets
:mod:`lipsdp.layer_sweep` then moves the point, per neuron, much closer to the optimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

from lipsdp.chain import BlockChain

#: Largest block for which the recursion's dense ``O(w^3)`` steps are taken.
MAX_BLOCK = 4096


@dataclass
class LayerPoint:
    """A feasible point of a chain LMI with one multiplier per layer, and the scales it gives.

    Attributes
    ----------
    block_scale : ndarray, shape (len(lmi.blocks),)
        ``1`` for the input block, ``1 / sqrt(lambda_k)`` for block ``k``.
    total : float
        ``sqrt(rho_E)``: ECLipsE-Fast's bound for ReLU nets (a scale here, not a result).
    x : ndarray, shape (lmi.n_var,)
        The point itself: ``rho_E`` on the input variables, ``rho_E lambda_k`` on the
        sign-constrained multipliers of layer ``k``, 0 on free ones.  ``M(x) <= 0`` up to
        rounding, on the boundary (``rho_E`` is the smallest for these multipliers), for sectors
        with ``alpha beta >= 0``; otherwise only a guess (a backend starting there checks it).
    """

    block_scale: np.ndarray
    total: float
    x: np.ndarray


def chain_scales(lmi) -> LayerPoint | None:
    """The layer-by-layer point of ``lmi`` and its scales for
    :meth:`~lipsdp.lmi.LMIProblem.preconditioned`, or None.

    None when ``lmi`` is not a chain of at least one activation block with
    the output term on its last block, when a block exceeds :data:`MAX_BLOCK`,
    or when the recursion breaks down (a layer's ``R_k`` not positive definite,
    a zero output): the caller then keeps composed norm bounds.

    Parameters
    ----------
    lmi : LMIProblem
        Not preconditioned (any input reduction is fine: block 0 gets scale 1).

    Returns
    -------
    LayerPoint or None
    """
    blocks = lmi.blocks
    nb = len(blocks)
    if nb < 2 or max(b.size for b in blocks) > MAX_BLOCK:
        return None
    chain = BlockChain(lmi)
    last = chain.last
    kr, kc = chain.const_blocks
    # Input variables on block 0, a multiplier of layer k on blocks (k-1, k), the output term on the last.
    if last is None or np.any(last[: lmi.n_in] > 0) or np.any(kr != nb - 1) or np.any(kc != nb - 1):
        return None
    # Free multipliers (e.g. GroupSort's) stay at zero: a valid, if weaker, point.
    weight = np.where((np.arange(lmi.n_var) < lmi.n_in) | lmi.nonneg, 1.0, 0.0)

    try:
        T = chain.pieces(0, weight)[2]
        lam = np.ones(nb)
        for k in range(1, nb):
            _, Q, R = chain.pieces(k, weight)
            Lt = sla.cholesky((T + T.T) / 2, lower=True, check_finite=False)
            Z = sla.solve_triangular(Lt, Q, lower=True, check_finite=False)
            B = Z.T @ Z
            top = _top_generalized(Z, (R + R.T) / 2)
            if not np.isfinite(top) or top <= 0:
                return None  # this layer does not depend on the previous one: no scale to read off
            lam[k] = 0.5 / top
            T = lam[k] * R - lam[k] ** 2 * B
        rho = float(sla.eigh(chain.K, (T + T.T) / 2, eigvals_only=True, subset_by_index=[len(T) - 1] * 2,
                             check_finite=False)[0])
    except (sla.LinAlgError, ValueError):
        return None
    if not (np.isfinite(rho) and rho > 0 and np.all(np.isfinite(lam)) and np.all(lam > 0)):
        return None
    scale = 1.0 / np.sqrt(lam)
    scale[0] = 1.0
    return LayerPoint(scale, float(np.sqrt(rho)), rho * lam[chain.layer] * weight)


def _top_generalized(Z, R) -> float:
    """The largest eigenvalue of the pencil ``(Z^T Z, R)``, ``R > 0``: ``||Z L^{-T}||_2^2`` with ``R = L L^T``.

    Read off the smaller of the two Gram matrices of ``Y = Z L^{-T}`` (on a CNN's first convolution the
    input's Gram matrix is several times smaller than the pencil); ``L = sqrt(R)`` when ``R`` is
    diagonal (ReLU-type layers).  Raises ``LinAlgError`` when ``R`` is not positive definite.
    """
    d = np.diag(R).copy()
    if not np.any(R - np.diag(d)):
        if not np.all(d > 0):
            raise sla.LinAlgError("R is not positive definite")
        Y = Z / np.sqrt(d)
    else:
        L = sla.cholesky(R, lower=True, check_finite=False)
        Y = sla.solve_triangular(L, Z.T, lower=True, check_finite=False).T
    G = Y @ Y.T if Y.shape[0] <= Y.shape[1] else Y.T @ Y
    return float(sla.eigh(G, eigvals_only=True, subset_by_index=[len(G) - 1] * 2, check_finite=False)[0])
