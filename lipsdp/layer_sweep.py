"""Layer-by-layer sweeps that move a chain LMI's feasible point toward the SDP optimum.

:func:`lipsdp.scaling.chain_scales` picks one multiplier per layer, from the
input forward, each blind to the layers after it (ECLipsE-Fast on ReLU nets).
On deep nets its ``rho`` lies decades above the SDP's, more the deeper the
net, and an interior-point method started there spends about one iteration per
decade on the descent: its iteration count would grow with depth.  This module lowers ``rho`` by exact block
coordinate steps over one layer's per-neuron multipliers at a time.

With ``N = -M`` and layer ``k``'s terms ``[[P_k, Q_k], [Q_k^T, R_k]]`` on blocks
``(k-1, k)`` (linear in its multipliers ``lambda_k``), take the Schur
complements from the input forward and the requirements from the output back:

.. math::

    T_0 = N_{00},\\quad T_k = R_k - Q_k^T (T_{k-1} + P_k)^{-1} Q_k ;\\qquad
    V_l = K,\\quad V_{k-1} = -P_k + Q_k (R_k - V_k)^{-1} Q_k^T ,

``K = C^T C`` the output term on the last block.  Where the inverted matrices
are positive definite, ``N >= 0`` iff ``T_k >= V_k`` for any one ``k``
(docs/math.md §1.4; ``T_k`` depends only on the layers up to ``k`` and on
``rho``, ``V_k`` only on the layers after ``k``).  One step on layer ``k`` keeps
the later multipliers, solves the small SDP

.. math::

    \\max c \\quad\\text{s.t.}\\quad
    \\begin{bmatrix} T_{k-1}/\\tau + P_k(\\lambda) & Q_k(\\lambda) \\\\
    Q_k(\\lambda)^T & R_k(\\lambda) - c\\, V_k \\end{bmatrix} \\succeq 0
    \\qquad (\\tau = \\|T_{k-1}\\|_2),

and scales ``rho`` and the earlier multipliers by ``1 / (\\tau c)`` and
``lambda_k`` by ``1 / c``: since ``T_k`` is homogeneous in everything before it,
this is the smallest ``rho`` over ``lambda_k`` and a common scale of the earlier
layers, so every step lowers ``rho`` (or keeps it) and the point stays feasible.
A sweep is one backward pass for the ``V_k`` and one forward pass of steps.
ECLipsE (Xu and Sivaranjani, NeurIPS 2024) solves the same layer SDP with a one-layer
look-ahead, ``W_{k+1}^T W_{k+1}``, in place of ``V_k``; the exact requirement of
the rest of the network is what lets repeated sweeps keep improving.

From the swept point the interior-point methods' iteration counts stay about
flat in depth (benchmarks/results and docs/performance.md hold the figures).

This is a reduction, below the solve stage: the steps are solved by the shared
interior-point iteration of :mod:`lipsdp.interior` (:func:`~lipsdp.interior.solve_dense`,
as the ``ipm`` backend runs it, with every map from the dense factor rows:
:class:`~lipsdp.interior.SmallLMI`) on a ``(n_{k-1} + n_k)``-sized LMI with ``n_k + 1``
variables, with no solver backend involved.  Nothing here is a bound: the point is a
start and a scale for the real solve, and every certificate is verified as always.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from lipsdp.chain import BlockChain
from lipsdp.interior import solve_dense
from lipsdp.lmi import LMIProblem
from lipsdp.scaling import LayerPoint

#: Most sweeps taken by default.  The first gains most decades (784-16x64-10: six), the second about
#: half a decade, worth a few solver iterations only where an iteration costs more than a sweep:
#: see :data:`SECOND_SWEEP_WIDTH` (benchmarks/results/trained/sweeps.md).
SWEEPS = 2
#: Narrowest widest-hidden-block for which the default takes a second sweep.  Below it ``auto`` solves
#: with the chordal method, whose iterations are cheap there, and a second sweep saved none
#: (784-16x32-10, 784-16x64-10); at width 32 the completion method's iterations cost more than a sweep
#: and the second sweep saved three of 26 (784-32x32-10).
SECOND_SWEEP_WIDTH = 32
#: Fewest activation layers worth sweeping.  The greedy point's distance to the optimum grows with
#: depth while a sweep's cost per layer is fixed: on shallow nets the sweeps cost more than the
#: iterations they save (docs/performance.md).
MIN_LAYERS = 20
#: Widest activation block swept: each step is a dense interior-point solve of size ``2 w``.
MAX_WIDTH = 128
#: Tolerance of the layer SDPs: the step only needs a good point, not the layer optimum.
STEP_TOL = 1e-3
#: Each sweep starts from its point times this: the point is tight (``rho`` the smallest for its
#: multipliers), so some ``R_k - V_k`` is singular up to rounding; ``f x`` is strictly feasible,
#: ``N(f x) = N(x) - (f - 1) M_var(x)``, with room in every layer.
INFLATE = 1.1


def sweep(lmi, point: LayerPoint, sweeps: int | None = None, deadline: float | None = None) -> LayerPoint:
    """``point`` improved by up to ``sweeps`` layer-by-layer sweeps, or ``point`` itself.

    ``point`` itself when ``lmi`` has fewer than :data:`MIN_LAYERS` activation
    blocks, a block wider than :data:`MAX_WIDTH`, no factored terms, a layer
    without sign-constrained multipliers, or when a step fails numerically (the
    sweep stops there and keeps the best point so far: every completed step
    leaves a feasible one).

    Parameters
    ----------
    lmi : LMIProblem
        The chain LMI ``point`` was read from (not preconditioned).
    point : LayerPoint
        From :func:`lipsdp.scaling.chain_scales`.
    sweeps : int, optional
        None: :data:`SWEEPS`, or one where no hidden block is :data:`SECOND_SWEEP_WIDTH` wide.
    deadline : float, optional
        A :func:`time.perf_counter` value: a sweep still running then is dropped (the point of the
        sweeps before it is kept).

    Returns
    -------
    LayerPoint
        The same fields, the multipliers now per neuron; ``block_scale[k]`` is
        ``sqrt(rho / median(lambda_k))``, ``total`` is ``sqrt(rho)``.
    """
    chain = _Chain.of(lmi)
    if sweeps is None:
        sweeps = SWEEPS if chain is None or max(chain.sizes[1:]) >= SECOND_SWEEP_WIDTH else min(SWEEPS, 1)
    if chain is None or sweeps <= 0:
        return point
    x = np.asarray(point.x, dtype=np.float64).copy()
    best = x.copy()
    try:
        for _ in range(sweeps):
            x = chain.sweep(INFLATE * x, deadline)
            if x is None:
                break
            if x[0] < best[0]:
                best = x
    except (sla.LinAlgError, ValueError, FloatingPointError):
        pass
    rho0 = float(point.x[0])
    rho = float(best[0])
    if not (np.isfinite(rho) and 0 < rho < rho0 and np.all(np.isfinite(best))):
        return point
    scale = np.ones(len(lmi.blocks))
    for k in range(1, len(lmi.blocks)):
        own = best[chain.own[k]]
        scale[k] = np.sqrt(rho / np.median(own[own > 0]))
    return LayerPoint(scale, float(np.sqrt(rho)), best)


class _Chain(BlockChain):
    """The chain's per-layer blocks (:class:`~lipsdp.chain.BlockChain`), and the sweeps on them."""

    @classmethod
    def of(cls, lmi):
        blocks = lmi.blocks
        if (not blocks or lmi.factors is None or len(blocks) - 1 < MIN_LAYERS
                or max(b.size for b in blocks[1:]) > MAX_WIDTH):
            return None
        chain = cls(lmi)
        if chain.last is None:
            return None
        #: Each layer's variables that the sweeps move (sign-constrained; free ones stay at zero).
        chain.own = [np.flatnonzero((chain.layer == k) & (lmi.nonneg | (k == 0))) for k in range(chain.nb)]
        return None if any(len(o) == 0 for o in chain.own) else chain

    def requirements(self, x):
        """``[V_0, ..., V_l]`` at ``x`` (raises LinAlgError where some ``R_k - V_k`` is not definite)."""
        nb = len(self.sizes)
        V = [None] * nb
        V[-1] = self.K
        for k in range(nb - 1, 0, -1):
            P, Q, R = self.pieces(k, x)
            L = sla.cholesky(_sym(R - V[k]), lower=True, check_finite=False)
            Z = sla.solve_triangular(L, Q.T, lower=True, check_finite=False)
            V[k - 1] = _sym(-P + Z.T @ Z)
        return V

    def sweep(self, x, deadline=None):
        """One sweep from the feasible ``x``: a new feasible point, or None if a step failed or
        ``deadline`` passed."""
        nb = len(self.sizes)
        x = x.copy()
        V = self.requirements(x)
        # Scale factors still owed by each layer's multipliers (applied at the end).
        owed = np.ones(nb)
        T = self.pieces(0, x)[2]
        for k in range(1, nb):
            if deadline is not None and time.perf_counter() > deadline:
                return None
            tau = float(np.linalg.norm(T, 2))
            g = float(np.linalg.norm(V[k], 2))
            if not (tau > 0 and g > 0):
                return None
            stage = self.step_lmi(k, T / tau, V[k] / g)
            state, _, _ = solve_dense(stage, STEP_TOL, small=True)
            if not np.all(np.isfinite(state.y)):
                return None
            lam = np.maximum(state.y[1:], 0.0)
            if not np.any(lam > 0):
                return None
            lam = np.maximum(lam, 1e-12 * lam.max())
            xk = np.zeros_like(x)
            xk[self.own[k]] = lam
            P, Q, R = self.pieces(k, xk)
            L = sla.cholesky(_sym(T / tau + P), lower=True, check_finite=False)
            Z = sla.solve_triangular(L, Q, lower=True, check_finite=False)
            Tk = _sym(R - Z.T @ Z)
            # The largest c this lambda achieves, exactly: T_k >= c V_k.
            top = float(sla.eigh(V[k], Tk, eigvals_only=True, subset_by_index=[self.sizes[k] - 1] * 2,
                                 check_finite=False)[0])
            if not (np.isfinite(top) and top > 0):
                return None
            c = 1.0 / top
            owed[:k] *= 1.0 / (tau * c)
            x[self.own[k]] = lam / c
            T = Tk / c
        for k in range(nb):
            x[self.own[k]] *= owed[k]
        # rho exactly: the smallest input scale with T_0 >= V_0 at the final multipliers.
        V0 = self.requirements(x)[0]
        T0 = self.pieces(0, x)[2]
        s = float(sla.eigh(V0, T0, eigvals_only=True, subset_by_index=[self.sizes[0] - 1] * 2,
                           check_finite=False)[0])
        if not (np.isfinite(s) and s > 0):
            return None
        x[self.own[0]] *= s
        return x

    def step_lmi(self, k, T, V):
        """The layer SDP of step ``k`` as an :class:`~lipsdp.lmi.LMIProblem` in ``(c, lambda_k)``:
        ``min -c`` s.t. ``M = [[-T, 0], [0, 0]] + c [[0, 0], [0, V]] + sum_j lambda_j M_j <= 0``."""
        lmi, e, own = self.lmi, self.layer_entries[k], self.own[k]
        lo, n1, n2 = self.starts[k - 1], self.sizes[k - 1], self.sizes[k]
        n = n1 + n2
        pos = np.full(lmi.n_var, -1)
        pos[own] = 1 + np.arange(len(own))
        e = e[pos[lmi.var[e]] >= 0]
        r, c = lmi.rows[e] - lo, lmi.cols[e] - lo
        off = r != c
        vr, vc = np.nonzero(np.ones((n2, n2), dtype=bool))
        rows = np.concatenate([r, c[off], vr + n1])
        cols = np.concatenate([c, r[off], vc + n1])
        vals = np.concatenate([lmi.vals[e], lmi.vals[e][off], V.ravel()])
        var = np.concatenate([pos[lmi.var[e]], pos[lmi.var[e]][off], np.zeros(n2 * n2, dtype=np.int64)])
        const = np.zeros((n, n))
        const[:n1, :n1] = -T
        # Factored terms: layer k's rank-two terms on the clique's columns, V as sum_i s_i v_i v_i^T.
        R, iu, iw, coef, fvar = lmi.factors
        t = np.flatnonzero(pos[fvar] >= 0)
        used, inv = np.unique(np.concatenate([iu[t], iw[t]]), return_inverse=True)
        Rs = sp.csr_matrix(R)[used]
        if Rs.nnz and (Rs.indices.min() < lo or Rs.indices.max() >= lo + n):
            raise ValueError("a layer's factor rows leave its clique")
        Rs = Rs[:, lo:lo + n]
        ev, U = np.linalg.eigh(V)
        keep = ev > 1e-13 * ev[-1]
        Vrows = np.zeros((int(keep.sum()), n))
        Vrows[:, n1:] = (U[:, keep] * np.sqrt(ev[keep])).T
        nt, nv = len(t), int(keep.sum())
        factors = (sp.vstack([Rs, sp.csr_matrix(Vrows)], format="csr"),
                   np.concatenate([inv[:nt], len(used) + np.arange(nv)]),
                   np.concatenate([inv[nt:], len(used) + np.arange(nv)]),
                   np.concatenate([coef[t], np.full(nv, 0.5)]),
                   np.concatenate([pos[fvar[t]], np.zeros(nv, dtype=np.int64)]))
        objective = np.zeros(len(own) + 1)
        objective[0] = -1.0
        csr = sp.csr_matrix(const)
        return LMIProblem(n=n, input_dim=n1, const=csr, const_abs=abs(csr), rows=rows.astype(np.int64),
                          cols=cols.astype(np.int64), vals=vals, var=var.astype(np.int64), objective=objective,
                          nonneg=np.arange(len(own) + 1) > 0, labels=["c"] + [f"lambda_{j}" for j in own],
                          formulation="layer step", factors=factors)


def _sym(A):
    return (A + A.T) / 2
