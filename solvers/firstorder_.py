"""Quasi-Newton descent on the exact ``rho(T)`` of LipSDP (docs/math.md §1.4 and §8.4).

For fixed multipliers ``T`` the best ``rho`` is an eigenvalue problem.  For a
feed-forward net the LMI is block-tridiagonal and the backward block
elimination of section 1.4 gives it at a cost linear in depth:

.. math::

    S_l = M_{ll},\\qquad S_k = M_{kk} - M_{k,k+1} S_{k+1}^{-1} M_{k+1,k}\\ (k = l-1, \\dots, 1),
    \\qquad \\rho(T) = \\lambda_{\\max}\\big(M_{00} - M_{01} S_1^{-1} M_{10}\\big),

valid when every ``S_k < 0`` (other nets: one hidden block, ``P - Q R^{-1} Q^T``).
Wide layers whose own block is diagonal (ReLU-type, as a CNN's first convolution) are
eliminated first, through sparse products, so that the dense steps run at the widths of
their narrower neighbours (:func:`_early_blocks`; the same ``rho(T)``).
*Every* such ``T`` certifies ``sqrt(rho(T))``, so speed never costs soundness;
the answer is re-derived and proved by :mod:`lipsdp.verify` as always.

``rho(T)`` is convex but not smooth (a largest eigenvalue).  The method
minimises its soft maximum (Nesterov, Math. Program. 2007), an upper bound on it,

.. math::

    f_\\beta(T) = \\tfrac{1}{\\beta}\\log\\sum_i e^{\\beta\\lambda_i} \\;\\ge\\; \\rho(T)
    \\qquad (\\lambda_i \\text{ the eigenvalues of the input Schur complement}),

(the eigenvalues more than ``30 / beta`` below ``rho`` left out: :meth:`_Descent.spectrum`)
over ``theta = log T`` (free multipliers as they are) with L-BFGS (scipy), for
``beta = b / rho`` with ``b = 10^2, 10^3, ...`` (continuation: the smoothing
costs at most ``rho log(n_0) / b``).  Its gradient is exact and cheap: see
:class:`_Descent`.  The ``T`` with the smallest exact ``rho(T)`` seen is kept.
Repairing an inexact solve through the exact ``rho(T)`` is LipDiff's idea
(Wang et al., ICLR 2024), here for the vector-output LipSDP.

It is the fast, approximate path for LMIs too large for the interior-point
methods (the status is ``optimal_inaccurate``), and it reports how approximate:
the first smoothing level, converged tightly, gives a dual feasible ``X`` after a
small repair (:meth:`_Descent.dual_bound`), whose value is a lower bound on
the SDP optimum.
The dense algebra runs in numpy, or in torch on CUDA when
:func:`lipsdp.accel.device_for` says so (``LIPSDP_DEVICE``).  l2 only (``rho``
as the single input variable); use SCS for l_inf.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.linalg import eigh, solve_triangular
from scipy.linalg.lapack import dpotrf

from lipsdp import progress
from lipsdp.accel import as_tensor, device_for
from lipsdp.chain import BlockChain
from lipsdp.solvers.base import Backend, LMIShape, SolveResult, first_order_bytes, register
from lipsdp.solvers.ipm_ import LowRankIPM


@register
class FirstOrder(Backend):
    """L-BFGS on the smoothed exact ``rho(T)`` (numpy; torch on CUDA when present; l2 only).

    Conventions: reads the band blocks of the chain (:class:`lipsdp.chain.BlockChain`) and the
    rank-two factors of the LMI directly; its answer is approximate (``optimal_inaccurate``) and
    verified as always.  Memory: a few dense ``n x n`` matrices, as a first-order method.
    Preference: for l2 LMIs without free multipliers beyond the interior-point methods' reach
    (``n > LowRankIPM.max_auto_size``), the lowest of lipsdp's methods; specialised.
    """

    name = "fo"
    listing = 8
    specialised = True
    #: ``auto``'s rank when it prefers this method (below every other lipsdp method).
    specialised_rank = 10.0
    modules = ("scipy",)
    install = "built in (numpy and scipy; torch for CUDA)"
    family = "first_order"
    supports_time_limit = True
    default_tol = 1e-6
    #: Function evaluations in all (each one block elimination and one eigenvalue problem), and per
    #: smoothing level: the late levels gain little.
    max_evals, level_evals = 3000, 300
    #: Smoothing levels ``b`` (``beta = b / rho``): stop once a level gains less than ``tol``.
    levels = (1e2, 1e3, 1e4, 1e5, 1e6, 1e7)
    #: The smoothing level converged tightly (gradient ~1e-8; at most ``dual_evals`` evaluations),
    #: whose end point gives the dual bound (:meth:`_Descent.dual_bound`).
    dual_level, dual_evals = 1e2, 150
    #: Eliminate wide diagonal blocks first (:func:`_early_blocks`); False keeps the plain backward
    #: recursion (the same ``rho(T)``; ``benchmarks/bench_cnn.py`` compares the two).
    early_elimination = True

    @staticmethod
    def applies(lmi) -> bool:
        """Whether ``lmi`` is an l2 LMI (one input variable, ``rho``)."""
        return lmi.n_in == 1

    @classmethod
    def memory_estimate(cls, lmi) -> int:
        return first_order_bytes(lmi)

    @classmethod
    def preference(cls, lmi) -> float | None:
        # Beyond the interior-point methods' reach (an iteration of minutes; SCS an n x n
        # eigendecomposition per iteration): descent on the exact rho(T), still verified.
        shape = LMIShape.of(lmi)
        if (shape.single_input and not shape.free_multipliers and shape.n is not None
                and shape.n > LowRankIPM.max_auto_size):
            return cls.specialised_rank
        return None

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        t0 = time.perf_counter()
        if not self.applies(lmi):
            return SolveResult("solver_error", None, None, 0.0, message="the fo backend certifies l2 bounds only")
        state = _Descent(lmi, time_limit, t0, verbose, early=self.early_elimination)
        if state.start() is None:
            return SolveResult("infeasible", None, None, time.perf_counter() - t0,
                               message="neither uniform nor per-layer multipliers made every pivot negative definite")
        tol = tol or self.default_tol
        status, previous = "optimal_inaccurate", state.best_rho
        stages = 0
        for b in self.levels[:2]:  # the per-layer scales first (deep nets span decades across layers)
            if not state.minimise(b, self.max_evals, subspace=state.layers):
                break
        for b in self.levels:
            stages += 1
            # The first level is converged tightly: its end point gives the dual bound below (running
            # out of its budget only weakens that bound).
            budget = min(self.max_evals, state.evals + (self.dual_evals if b == self.dual_level else self.level_evals))
            # A level that runs out of its own budget ends there (its best point is kept); running out
            # of time or of max_evals ends the descent.
            done = state.minimise(b, budget, tight=b == self.dual_level) or \
                (not state.timed_out and state.evals < self.max_evals)
            if not done:
                status = "time_limit" if state.timed_out else status
                break
            if verbose:
                print(f"fo: level {b:.0e}: rho {state.best_rho:.10g} after {state.evals} evaluations")
            if previous - state.best_rho <= tol * abs(state.best_rho) and b >= 1e4:
                break
            previous = state.best_rho
        # A lower bound on the optimum, so the certificate can say how tight the bound is: from the
        # stationary point of the tightly converged level (its smoothing costs rho log(n0) / b in the
        # *primal* there, not in the bound, which stays valid).
        dual = state.dual_bound([p for p in state.level_ends if p[2]])
        x = np.concatenate([[state.best_rho], state.unpack(state.best_theta)])
        return SolveResult(status, x, state.best_rho, time.perf_counter() - t0, state.evals,
                           f"{status}: {state.evals} evaluations, {stages} smoothing levels",
                           extras={"device": state.device, "evaluations": state.evals,
                                   "chain_blocks": len(state.groups), "dual_objective": dual})


class _Descent:
    """The objective ``f_beta``, its gradient, and the L-BFGS driver.

    Gradient: ``d lambda_i / d T_j = z_i^T F_j z_i`` with ``z_i`` the null vector of
    ``M(lambda_i, T)`` whose input part is the eigenvector ``v_i``: ``z_0 = v_i``,
    ``z_k = -S_k^{-1} M_{k,k-1} z_{k-1}`` (the same block elimination run forward), and
    ``z^T F_j z = 2 coef (R z)[u] (R z)[w]`` over the factored rank-two terms of ``F_j``.
    """

    #: Eigenvalues more than ``WINDOW / beta`` below the largest are left out of ``f_beta`` (:meth:`spectrum`),
    #: on input blocks of ``SUBSET_MIN`` or more.  Below, the whole spectrum is cheap, and the path L-BFGS
    #: takes is kept: the last bits of ``f`` change its path, and a subset path can take markedly more
    #: evaluations.
    WINDOW, SUBSET_MIN = 30.0, 1024

    def __init__(self, lmi, time_limit, t0, verbose, early=True):
        self.time_limit, self.t0, self.verbose = time_limit, t0, verbose
        self.timed_out = False
        self.groups = _chain_groups(lmi)
        self.la = _LinearAlgebra(device_for(max(b - a for a, b in self.groups)))
        self.device = self.la.device
        self.free = np.asarray(~lmi.nonneg[1:])
        rows, cols = np.asarray(lmi.rows), np.asarray(lmi.cols)
        var, vals = np.asarray(lmi.var), np.asarray(lmi.vals, dtype=np.float64)
        const = lmi.const.tocoo()
        K = len(self.groups)
        gid = np.empty(lmi.n, dtype=np.int64)
        start = np.array([a for a, _ in self.groups])
        size = np.array([b - a for a, b in self.groups])
        for g, (a, b) in enumerate(self.groups):
            gid[a:b] = g
        # The band blocks (k, k) and (k-1, k), filled from the COO by bincount.
        self.pieces = {}
        gr, gc, cr, cc = gid[rows], gid[cols], gid[const.row], gid[const.col]
        for g in range(K):
            for h in (g, g + 1):
                if h >= K:
                    continue
                sel = (gr == g) & (gc == h)
                pos = (rows[sel] - start[g]) * size[h] + (cols[sel] - start[h])
                csel = (cr == g) & (cc == h)
                base = np.zeros(size[g] * size[h])
                np.add.at(base, (const.row[csel] - start[g]) * size[h] + (const.col[csel] - start[h]),
                          const.data[csel])
                self.pieces[g, h] = (pos, vals[sel], var[sel], base, (int(size[g]), int(size[h])))
        #: Dense templates ``(values, variables)`` of the pieces that are mostly filled, one entry per
        #: position (a dense layer's coupling): a gather is several times cheaper than the scatter-add.
        self.templates = {}
        for key, (pos, pvals, pvar, base, _) in self.pieces.items():
            if len(pos) >= base.size // 4 and len(np.unique(pos)) == len(pos):
                values, index = np.zeros(base.size), np.zeros(base.size, dtype=np.int32)
                values[pos], index[pos] = pvals, pvar
                self.templates[key] = (values, index, bool(np.any(base)))
        R, iu, iw, coef, fvar = lmi.factors if lmi.factors is not None else (None,) * 5
        self.coo = (rows, cols, vals, var)  # without a factored form: z^T F_j z from the entries
        self.R = None if R is None else sp.csr_matrix(R)
        self.iu, self.iw, self.coef, self.fvar = iu, iw, coef, fvar
        self.n, self.m = lmi.n, lmi.n_var
        self.const, self.input_dim, self.blocks = lmi.const.tocsr(), lmi.input_dim, lmi.blocks
        vb = np.asarray(lmi.var_block[1:]) if lmi.var_block is not None else np.zeros(self.m - 1, dtype=int)
        self.var_block = vb
        keys = np.unique(np.stack([vb, self.free.astype(int)]), axis=1)
        #: One direction per (layer, sign-constrained or free): the per-layer scales.
        self.layers = np.stack([(vb == k) & (self.free == bool(fr)) for k, fr in keys.T], axis=1).astype(float)
        self.evals = 0
        self.best_rho, self.best_theta = np.inf, None
        self.hint = None if lmi.start is None else np.asarray(lmi.start[1:], dtype=np.float64)
        self.level_ends = []  # (beta, theta, tight) at the end of each full smoothing level
        #: L-BFGS settings per smoothing level ``b``: relative decrease ``ftol_factor / b``.
        self.ftol_factor, self.gtol, self.maxcor = 1e-3, 1e-6, 20
        self.window = 16  # eigenvalues within WINDOW / beta of the largest at the last evaluation
        self.early = _early_blocks(self.pieces, [int(x) for x in size]) if early else {}
        self.sparse = {key: _SparsePiece(*self.pieces[key]) for e, sparse in self.early.items() if sparse
                       for key in ((e - 1, e), (e, e + 1))}

    def unpack(self, theta):
        return np.where(self.free, theta, np.exp(theta))

    def block(self, g, h, y):
        pos, vals, var, base, shape = self.pieces[g, h]
        if (g, h) in self.templates:
            values, index, has_base = self.templates[g, h]
            dense = values * y[index]
            return (dense + base if has_base else dense).reshape(shape)
        return (base + np.bincount(pos, weights=vals * y[var], minlength=base.size)).reshape(shape)

    def diagonal(self, g, y):
        """The diagonal of block ``(g, g)`` (a diagonal block: see :func:`_early_blocks`)."""
        pos, vals, var, base, (n, _) = self.pieces[g, g]
        return base[::n + 1] + np.bincount(pos // n, weights=vals * y[var], minlength=n)

    def coupling(self, g, h, y):
        """Block ``(g, h = g + 1)``: sparse where :func:`_early_blocks` chose sparse products, else dense."""
        return self.sparse[g, h].matrix(y) if (g, h) in self.sparse else self.block(g, h, y)

    def eliminate(self, y, down_to: int = 1):
        """The block elimination of ``M(0, T)`` (``y = (0, T)``) down to block ``down_to``.

        Returns ``(S, factors, couplings, early)``: the last Schur complement (the input block's
        when ``down_to == 1``); the Cholesky factors ``L_k`` of ``-S_k`` and the blocks
        ``M_{j,k}`` (``j`` the block before ``k`` once the early blocks are gone) of the
        backward recursion; and, per early block ``e``, ``(1 / -diag M_ee, M_{e-1,e}, M_{e,e+1})``.
        ``None`` as soon as a pivot is not negative definite.

        The early blocks (:func:`_early_blocks`: diagonal, wider than the dense steps they
        save) are eliminated first, each into its two neighbours:
        ``M_{e-1,e-1} += P D P^T``, ``M_{e+1,e+1} += Q^T D Q``, ``M_{e-1,e+1} = P D Q`` with
        ``D = (-M_ee)^{-1}``, ``P = M_{e-1,e}``, ``Q = M_{e,e+1}``.  A symmetric matrix is
        negative definite iff its pivots are in any block order, and the input block's Schur
        complement does not depend on the order, so ``rho(T)`` is the same function.
        """
        la = self.la
        K = len(self.groups)
        early = {}
        if down_to == 1:
            for e in self.early:
                d = self.diagonal(e, y)
                if not np.all(d < 0):
                    return None
                early[e] = (1.0 / -d, self.coupling(e - 1, e, y), self.coupling(e, e + 1, y))
        keep = [k for k in range(down_to - 1, K) if k not in early]

        def diagonal_block(k):
            M = self.block(k, k, y)
            for e in (k - 1, k + 1):
                if e in early:
                    D, P, Q = early[e]
                    M += _product(P, D, P.T) if e == k + 1 else _product(Q.T, D, Q)
            return la.array(M)

        def coupling_block(j, k):
            if k == j + 1:
                return la.array(self.block(j, k, y))
            D, P, Q = early[j + 1]
            return la.array(_product(P, D, Q))

        factors, couplings = {}, {}
        S = diagonal_block(keep[-1])
        for i in range(len(keep) - 1, 0, -1):
            j, k = keep[i - 1], keep[i]
            L = la.cholesky(-S)
            if L is None:
                return None
            B = coupling_block(j, k)
            Z = la.solve_lower(L, B.T)
            S = diagonal_block(j) + Z.T @ Z
            factors[k], couplings[k] = L, B
        return S, factors, couplings, early

    def null_vectors(self, factors, couplings, early, z):
        """Per block, in order, the null vectors of ``M(rho, T)`` whose input parts are the columns of ``z``.

        ``z_k = -S_k^{-1} M_{k,j} z_j`` along the recursion of :meth:`eliminate`, then
        ``z_e = (-M_ee)^{-1} (M_{e,e-1} z_{e-1} + M_{e,e+1} z_{e+1})`` for the early blocks
        (their rows of ``M z = 0``).
        """
        la = self.la
        parts = {0: z}
        for k in sorted(factors):
            L = factors[k]
            z = la.solve_upper(L, la.solve_lower(L, couplings[k].T @ z))
            parts[k] = z
        parts = {k: la.numpy(p) for k, p in parts.items()}
        for e, (D, P, Q) in early.items():
            parts[e] = D[:, None] * (P.T @ parts[e - 1] + Q @ parts[e + 1])
        return [parts[k] for k in range(len(self.groups))]

    def evaluate(self, theta, beta=None, vectors=False):
        """``(f_beta, exact rho, gradient in theta)``; ``None`` where some pivot ``S_k`` is not < 0.

        Without ``beta`` only the exact ``rho`` is computed (``f = rho``, no gradient).  With
        ``vectors``, the weighted null vectors ``Zs`` (``sum_i w_i z_i z_i^T = Zs Zs^T``) come too.
        """
        la = self.la
        t = self.unpack(theta)
        out = self.eliminate(np.concatenate([[0.0], t]))
        if out is None:
            return None
        S, factors, couplings, early = out
        lam, V = self.spectrum(S, beta)
        rho = float(lam[-1])
        if beta is None:
            return rho, rho, None
        shifted = np.exp(beta * (lam - rho))
        total = float(shifted.sum())
        f = rho + np.log(total) / beta
        w = shifted / total
        keep = np.flatnonzero(w > 1e-12)
        # Null vectors, weighted by sqrt(w_i) so that sum_i w_i z_i z_i^T = Zs Zs^T.
        Zs = np.vstack(self.null_vectors(factors, couplings, early, V[:, keep] * la.array(np.sqrt(w[keep]))))
        grad_t = self.quadratic_forms(Zs)[1:]
        grad = np.where(self.free, grad_t, grad_t * t)
        return (f, rho, grad, Zs) if vectors else (f, rho, grad)

    def spectrum(self, S, beta):
        """The eigenpairs of ``S`` that ``f_beta`` and its gradient need, ascending.

        Those within ``WINDOW / beta`` of the largest (each of the others weighs less than
        ``exp(-WINDOW) = 9e-14`` in ``f_beta``, below the ``1e-12`` the gradient keeps), or the largest
        alone when ``beta`` is None.  In numpy, on blocks of :attr:`SUBSET_MIN` or more, they come
        from LAPACK's subset driver, asked for a few more than the window held at the last
        evaluation (a tridiagonalisation and a few eigenvectors, about half the cost of the whole
        spectrum on large input blocks); when the window holds more, or a quarter of the spectrum, all of them.
        """
        la, n = self.la, S.shape[0]
        k = 1 if beta is None else min(n, 2 * self.window + 16)
        if la.device == "numpy" and k <= n // 4 and n >= self.SUBSET_MIN:
            lam, V = eigh((S + S.T) / 2, subset_by_index=(n - k, n - 1), driver="evr", check_finite=False)
            if beta is None:
                return lam, V
            if lam[0] < lam[-1] - self.WINDOW / beta:  # the whole window is in
                self.window = int(np.sum(lam >= lam[-1] - self.WINDOW / beta))
                return lam, V
        lam, V = la.eigh(S)
        if beta is not None:
            self.window = int(np.sum(lam >= lam[-1] - self.WINDOW / beta))
        return lam, V

    def quadratic_forms(self, Zs):
        """``sum_i z_i^T F_j z_i`` for every variable ``j`` (columns ``z_i`` of ``Zs``)."""
        if self.R is not None:
            RZ = self.R @ Zs
            per_term = 2.0 * self.coef * np.einsum("ij,ij->i", RZ[self.iu], RZ[self.iw])
            return np.bincount(self.fvar, weights=per_term, minlength=self.m)
        rows, cols, vals, var = self.coo
        return np.bincount(var, weights=vals * np.einsum("ij,ij->i", Zs[rows], Zs[cols]), minlength=self.m)

    def dual_bound(self, points) -> float:
        """A lower bound on the SDP optimum from the smoothed eigenvectors at ``(beta, theta)`` points (nan if none).

        The dual of ``min rho  s.t.  F_0 - rho E_0^T E_0 + sum_j y_j F_j <= 0, y >= 0`` is
        ``max <F_0, X>  s.t.  X >= 0, tr(E_0 X E_0^T) = 1, <F_j, X> >= 0``.  At a point where
        ``f_beta`` is nearly stationary (the end of a smoothing level), ``X = Zs Zs^T`` (the
        weighted null vectors) has input trace 1 and ``<F_j, X> = d f_beta / d T_j``, nearly
        zero but of either sign.  The violations are repaired with ``Q = V diag(c) V^T``,
        ``V`` the increments of the net linearised at mid-slope (``v_phi = (alpha + beta)/2
        p^T v``, one per input coordinate), for which every slope constraint has
        ``<F_j, v v^T> >= 0``; the weights ``c >= 0`` maximise the resulting value
        ``<F_0, X'> / tr(E_0 X' E_0^T) <= rho*`` (a linear-fractional program, solved as an
        LP).  Feasibility is re-checked in floating point; only slope-type constraints (no
        free multipliers) qualify.  The bound is as tight as the point is stationary.
        """
        from scipy.optimize import linprog  # HiGHS, a solver package: loaded only when fo runs

        V = self.midslope_directions()
        if V is None or np.any(self.free):
            return float("nan")
        n0 = self.input_dim
        H = np.stack([self.quadratic_forms(V[:, [s]])[1:] for s in range(V.shape[1])], axis=1)
        if np.any(H < 0):
            return float("nan")
        a_v = np.sum(V * (self.const @ V), axis=0)
        b_v = np.sum(V[:n0] ** 2, axis=0)
        best = float("nan")
        for beta, theta, *_ in points:
            out = self.evaluate(theta, beta, vectors=True)
            if out is None:
                continue
            Zs = out[3]
            g = self.quadratic_forms(Zs)[1:]
            A0 = float(np.sum(Zs * (self.const @ Zs)))
            trX = float(np.sum(Zs[:n0] ** 2))
            # max (A0 + a.c) / (trX + b.c)  s.t.  g + H c >= 0, c >= 0: a linear-fractional program,
            # an LP in (t, u = t c) (Charnes and Cooper 1962).
            bad = np.flatnonzero(g < 0)
            c = np.zeros(V.shape[1])
            if len(bad):
                rows = np.hstack([g[bad, None], H[bad]])
                rows /= np.abs(rows).max(axis=1, keepdims=True)  # HiGHS's tolerances are absolute
                # HiGHS's interior point: far faster than its dual simplex on these dense LPs.
                res = linprog(-np.concatenate([[A0], a_v]), A_ub=-rows, b_ub=np.zeros(len(bad)),
                              A_eq=np.concatenate([[trX], b_v])[None, :], b_eq=[1.0],
                              bounds=[(0, None)] * (1 + V.shape[1]), method="highs-ipm")
                if res.status == 0 and res.x[0] > 0:
                    c = res.x[1:] / res.x[0]
            # Whatever the LP left violated (its tolerance), a uniform weight on every direction fixes:
            # X' = X + V diag(c) V^T must satisfy <F_j, X'> >= 0 exactly as computed here.
            deficit = -(g + H @ c)
            if np.any(deficit > 0):
                rowsum = H.sum(axis=1)
                need = deficit > 0
                if np.any(rowsum[need] <= 0):
                    continue
                c = c + 2.0 * float(np.max(deficit[need] / rowsum[need]))
                if np.any(g + H @ c < 0):
                    continue
            value = (A0 + a_v @ c) / (trX + b_v @ c)
            if np.isfinite(value) and not value <= best:
                best = float(value)
        return best

    def midslope_directions(self, count: int | None = None):
        """``count`` lifted increments ``v = [x; phi_1; ...]`` of the net linearised at mid-slope.

        Each constraint term ``coef (a b^T + b a^T)`` of a slope-restricted neuron has
        ``a - b = 2 q - (alpha + beta) p`` with ``q`` the unit row of the neuron's output;
        setting that output so that ``(a - b)^T v = 0`` gives ``a^T v = b^T v`` and
        ``v^T F_j v > 0``.  Outputs are set block by block (feed-forward lifting); None when
        the terms do not have this form (one output coordinate per term, from earlier blocks).
        """
        if self.R is None or not self.blocks:
            return None
        mult = np.asarray(self.fvar) > 0  # the multipliers' terms (not rho's)
        Dm = (self.R[np.asarray(self.iu)[mult]] - self.R[np.asarray(self.iw)[mult]]).tocsr()
        Dm.eliminate_zeros()
        nnz = np.diff(Dm.indptr)
        if np.any(nnz == 0):
            return None
        own = np.maximum.reduceat(Dm.indices, Dm.indptr[:-1])  # the latest coordinate of each term
        if len(np.unique(own)) != len(own):
            return None
        # One direction per input coordinate (the repair chooses their weights), or ``count`` random ones.
        count = count or self.input_dim
        V = np.zeros((self.n, count))
        V[:self.input_dim] = np.eye(self.input_dim, count) if count == self.input_dim else \
            np.random.default_rng(0).standard_normal((self.input_dim, count))
        set_ = np.zeros(self.n, dtype=bool)
        set_[:self.input_dim] = True
        for b in self.blocks[1:]:
            terms = np.flatnonzero((own >= b.start) & (own < b.stop))
            if not len(terms):
                continue
            Db = Dm[terms]
            diag = np.asarray(Db[np.arange(len(terms)), own[terms]]).ravel()
            rest = Db - sp.csr_matrix((diag, (np.arange(len(terms)), own[terms])), shape=Db.shape)
            rest.eliminate_zeros()
            if np.any(diag == 0) or (rest.nnz and not np.all(set_[rest.indices])):
                return None
            V[own[terms]] = -(rest @ V) / diag[:, None]
            set_[own[terms]] = True
        return V

    def start(self):
        """A feasible start: uniform multipliers ``2^k`` (the preconditioned LMI makes 1 the natural
        scale), the best one; failing that (deep nets), one scale per layer chosen from the last layer
        back.  The LMI's own start hint (:mod:`lipsdp.scaling`'s layer-by-layer point, which the
        power-of-two scales only approximate, so uniform multipliers lose a factor per layer) is taken
        instead where no uniform start is feasible or it is better by more than a factor of 2 (on
        deep nets; on shallow ones, where the two are close, the uniform start converged better).
        None if nothing makes every pivot negative definite."""
        best = None
        previous = None  # rho at the last feasible uniform point: stop once the family stops improving
        for kappa in 2.0 ** np.arange(-4, 31):
            theta = np.where(self.free, 0.0, float(np.log(kappa))) * np.ones(self.m - 1)
            out = self.evaluate(theta)
            if out is not None and out[1] < self.best_rho:
                self.best_rho, self.best_theta, best = out[1], theta, kappa
            if previous is not None and (out is None or out[1] >= previous):
                break
            previous = out[1] if out is not None else previous
        if self.hint is not None and np.all(self.hint[~self.free] > 0) and np.all(np.isfinite(self.hint)):
            theta = np.where(self.free, self.hint, np.log(np.where(self.free, 1.0, self.hint)))
            # The hint's hidden blocks are only as negative definite as the input's influence on the
            # last layer, which fades with depth: lift every multiplier a little (-M grows by 1e-3 N).
            theta = np.where(self.free, theta, theta + np.log1p(1e-3))
            out = self.evaluate(theta)
            if out is not None and out[1] < 0.5 * self.best_rho:
                self.best_rho, self.best_theta, best = out[1], theta, "hint"
        if best is None and len(self.groups) > 2:
            theta = self.layerwise_start()
            out = None if theta is None else self.evaluate(theta)
            if out is not None:
                self.best_rho, self.best_theta, best = out[1], theta, "per layer"
        return best

    def layerwise_start(self):
        """Per-layer multipliers ``2^j``, last layer first: the smallest that keeps the pivots from
        that layer on negative definite, times 4 (increasing ``T_k`` makes ``S_k`` more negative)."""
        theta = np.zeros(self.m - 1)
        for k in range(len(self.groups) - 1, 0, -1):
            layer = (self.var_block == k) & ~self.free
            for j in range(-10, 400):
                theta[layer] = j * np.log(2.0)
                if self.eliminate(np.concatenate([[0.0], self.unpack(theta)]), down_to=k) is not None:
                    break
            else:
                return None
            theta[layer] += 2 * np.log(2.0)
        return theta

    def minimise(self, b, max_evals, subspace=None, tight=False) -> bool:
        """One smoothing level from the best point so far; False on a time limit or the evaluation budget.

        ``subspace`` (shape ``(m - 1, d)``): move only along its columns (one per layer: the
        per-layer scale of the multipliers, which deep nets need first and plain L-BFGS finds slowly).
        ``tight``: converge the smoothed objective itself (gradient ~1e-8), as the dual bound needs.
        """
        from scipy.optimize import minimize  # L-BFGS-B, a solver package: loaded only when fo runs

        base = self.best_theta.copy()
        P = subspace
        scale = max(self.best_rho, 1e-300)
        beta = b / scale

        class _Stop(Exception):
            pass

        last = [base]

        def fun(phi):
            theta = base + P @ phi if P is not None else phi
            last[0] = theta
            if self.time_limit and time.perf_counter() - self.t0 > self.time_limit:
                self.timed_out = True
                raise _Stop
            if self.evals >= max_evals:
                raise _Stop
            self.evals += 1
            out = self.evaluate(theta, beta)
            if out is None or not np.isfinite(out[0]):
                # Outside the region where rho(T) is defined: a value the line search backs off from.
                return 1e10, np.zeros_like(phi)
            f, rho, grad = out
            if P is not None:
                grad = P.T @ grad
            if rho < self.best_rho:
                self.best_rho, self.best_theta = rho, theta.copy()
            progress.iteration("fo", self.evals, self.best_rho)  # rho(T): exact for T, not yet verified
            # Normalised so that values and gradients are of order one whatever the scale of rho.
            return f / scale, grad / scale

        try:
            options = {"maxiter": 1000, "maxcor": self.maxcor, "ftol": self.ftol_factor / b, "gtol": self.gtol}
            if tight:
                options.update(maxcor=50, ftol=1e-16, gtol=1e-11)
            res = minimize(fun, np.zeros(P.shape[1]) if P is not None else base, jac=True, method="L-BFGS-B",
                           options=options)
        except _Stop:
            if tight and not self.timed_out:  # out of evaluations: the last point still gives a (weaker) bound
                self.level_ends.append((beta, np.asarray(last[0], dtype=np.float64), True))
            return False
        if P is None:  # where this level's smoothed objective is (nearly) stationary: dual_bound's points
            self.level_ends.append((beta, np.asarray(res.x, dtype=np.float64), tight))
        return True


class _LinearAlgebra:
    """The few dense operations of one evaluation, in numpy/scipy or in torch (CUDA when present)."""

    def __init__(self, device: str):
        self.device = device
        if device != "numpy":
            import torch

            self.torch = torch

    def array(self, A):
        if self.device == "numpy" or not isinstance(A, np.ndarray):
            return A
        return as_tensor(A, self.device)

    def numpy(self, A):
        return A if isinstance(A, np.ndarray) else A.cpu().numpy()

    def cholesky(self, A):
        """Lower Cholesky factor, or None if ``A`` is not positive definite."""
        if self.device == "numpy":
            L, info = dpotrf(A, lower=1, clean=1)
            return L if info == 0 else None
        L, info = self.torch.linalg.cholesky_ex(A)
        return L if int(info) == 0 else None

    def solve_lower(self, L, B):
        if self.device == "numpy":
            return solve_triangular(L, B, lower=True, check_finite=False)
        return self.torch.linalg.solve_triangular(L, B, upper=False)

    def solve_upper(self, L, B):
        """``L^{-T} B``."""
        if self.device == "numpy":
            return solve_triangular(L, B, lower=True, trans="T", check_finite=False)
        return self.torch.linalg.solve_triangular(L.T, B, upper=True)

    def eigh(self, S):
        """Ascending eigenvalues and eigenvectors as numpy arrays."""
        if self.device == "numpy":
            return eigh((S + S.T) / 2, check_finite=False)
        lam, V = self.torch.linalg.eigh((S + S.T) / 2)
        return lam.cpu().numpy(), V


#: How much slower a flop of a sparse product (scipy) runs than one of a dense one (BLAS), for
#: :func:`_early_blocks`'s choice.
_SPARSE_FLOP_COST = 10.0
#: An early block must save this share of the elimination's flops and this many flops: below, the
#: extra calls cost more than the flops they save, and the plain recursion is kept (on the MLPs of
#: the benchmark, whose narrower input block saves 0.5-5% at most).
_EARLY_MIN_SHARE, _EARLY_MIN_FLOPS = 0.2, 1e6


def _early_blocks(pieces, sizes) -> dict[int, bool]:
    """The chain blocks to eliminate first, each with whether its products are taken sparse.

    A block ``e`` (not the input, not the last) whose own block ``M_ee`` is diagonal
    (ReLU-type layers, whose next layer has ``alpha = 0``) can be eliminated before the
    dense recursion at the cost of three products through it
    (:meth:`_Descent.eliminate`), which makes its neighbours adjacent.  That pays when it
    is wider than its neighbours: on an MNIST-sized CNN (784 -> 3136 -> 1568 -> 100) the
    3136 block's Cholesky and its rank-1568 Schur update go, and the rest works at 1568.
    The choice is greedy on a flop model (sparse products from the blocks' patterns, at
    :data:`_SPARSE_FLOP_COST` per flop), no two chosen blocks adjacent; on equal widths
    (784-1024x4-10) it chooses none, nor where it would save little (:data:`_EARLY_MIN_SHARE`).
    """
    K = len(sizes)

    def diagonal(e):
        pos, _, _, base, (n, _) = pieces[e, e]
        nz = np.flatnonzero(base)
        return bool(np.all(pos // n == pos % n) and np.all(nz // n == nz % n))

    def products(e) -> tuple[float, bool]:
        """The flops of ``P D P^T``, ``Q^T D Q`` and ``P D Q``, and whether sparse is the cheaper."""
        a, n, b = sizes[e - 1], sizes[e], sizes[e + 1]
        dense = float(a * a + a * b + b * b) * n
        cols_p = np.bincount(pieces[e - 1, e][0] % n, minlength=n).astype(float)  # entries of P per column
        rows_q = np.bincount(pieces[e, e + 1][0] // b, minlength=n).astype(float)  # entries of Q per row
        sparse = _SPARSE_FLOP_COST * float(np.sum((cols_p + rows_q) ** 2))
        return min(dense, sparse), sparse < dense

    def chain(early) -> float:
        keep = [k for k in range(K) if k not in early]
        steps = sum(n ** 3 / 3 + n * n * m + m * m * n
                    for n, m in ((float(sizes[k]), float(sizes[j])) for j, k in zip(keep, keep[1:])))
        return steps + sum(products(e)[0] for e in early)

    candidates = [e for e in range(1, K - 1) if diagonal(e)]
    early: set = set()
    while True:
        allowed = [e for e in candidates if not {e - 1, e, e + 1} & early]
        cost = chain(early)
        gains = {e: cost - chain(early | {e}) for e in allowed}
        if not gains or max(gains.values()) < max(_EARLY_MIN_SHARE * cost, _EARLY_MIN_FLOPS):
            return {e: products(e)[1] for e in sorted(early)}
        early.add(max(gains, key=gains.get))


class _SparsePiece:
    """A band block as a CSR matrix whose pattern is fixed: each evaluation fills in the values."""

    def __init__(self, pos, vals, var, base, shape):
        nz = np.flatnonzero(base)
        where = np.concatenate([pos, nz])
        self.pattern, self.slot = np.unique(where, return_inverse=True)
        self.vals, self.var, self.base, self.shape = vals, var, base[nz], shape
        rows = self.pattern // shape[1]
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))])
        self.indices = self.pattern % shape[1]

    def matrix(self, y):
        weights = np.concatenate([self.vals * y[self.var], self.base])
        data = np.bincount(self.slot, weights=weights, minlength=len(self.pattern))
        return sp.csr_matrix((data, self.indices, self.indptr), shape=self.shape)


def _product(A, d, B):
    """``A diag(d) B`` as a dense array (``A``, ``B`` dense or sparse)."""
    if sp.issparse(A):
        out = (A @ sp.diags(d)) @ B
        return out.toarray() if sp.issparse(out) else np.asarray(out)
    return (A * d) @ (B.toarray() if sp.issparse(B) else B)


def _chain_groups(lmi) -> list[tuple[int, int]]:
    """Index ranges of the blocks of a block-tridiagonal LMI (input block first).

    The blocks of the lifting when only neighbouring blocks are coupled (a
    feed-forward net: :class:`lipsdp.chain.BlockChain`); otherwise ``[input, everything else]``.
    """
    blocks = [(b.start, b.stop) for b in lmi.blocks] if lmi.blocks else [(0, lmi.n)]
    if len(blocks) <= 2:
        return blocks if len(blocks) == 2 else [(0, lmi.input_dim), (lmi.input_dim, lmi.n)]
    chain = BlockChain(lmi)
    banded = chain.entries_banded and chain.const_banded
    return blocks if banded else [blocks[0], (blocks[1][0], blocks[-1][1])]
