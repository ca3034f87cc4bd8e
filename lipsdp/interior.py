"""The primal-dual interior-point iteration shared by lipsdp's own SDP methods.

Problem (the LMI of :class:`~lipsdp.lmi.LMIProblem`, ``F_0 = M_c``)::

    min c^T y   s.t.   S = -F_0 - sum_j y_j F_j  >= 0 (PSD),   y_j >= 0 for j in N

and its dual ``max <F_0, X>`` s.t. ``c_j + <F_j, X> = z_j`` (``z_j >= 0`` on ``N``,
0 elsewhere), ``X >= 0``; at a feasible pair the gap is ``<X, S> + z^T y_N``.

:class:`InteriorPoint` runs the HKM direction with Mehrotra's predictor-corrector
(Helmberg, Rendl, Vanderbei and Wolkowicz, SIAM J. Optim. 1996; Kojima, Shindoh and
Hara 1997; Monteiro 1997) in the SDPA-style infeasible form (Fujisawa, Kojima and
Nakata 1997) over a list of dense PSD blocks.  What the blocks are is the caller's:
:class:`DenseLMI` (one block, the whole LMI: :mod:`lipsdp.solvers.ipm_`) or the clique
chain of :mod:`lipsdp.solvers.chordal_`.  The Schur complement is formed from the
rank-two factors of the constraint matrices (:func:`term_schur`), the technique of DSDP
for rank-one constraints (Benson, Ye and Zhang, SIAM J. Optim. 2000).

The module sits below the solver backends and the reductions: the backends
(``ipm``, ``chordal``, ``completion``) and the layer sweeps of :mod:`lipsdp.layer_sweep`
(a small per-layer SDP each step) all iterate with it.  It imports nothing of lipsdp.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.linalg import LinAlgError, cho_solve, cholesky, eigh
from scipy.linalg.lapack import dpotrf, dpotri, dsygst

from lipsdp import progress


def dense_iteration_cost(lmi) -> float:
    """One iteration of the dense method (:class:`DenseLMI`) in the flop-like units of the chordal and completion
    estimates: ``25 n^3`` for the dense ``n x n`` products, factorisations and step lengths, ``m^3``
    for the Schur complement, and about 1 ms of fixed work."""
    return 25.0 * float(lmi.n) ** 3 + float(lmi.n_var) ** 3 + 2e7


class DenseLMI:
    """The LMI as one dense block: linear maps from the COO basis, Schur complement from the factors."""

    def __init__(self, lmi):
        self.n, self.m = lmi.n, lmi.n_var
        self.sizes = [lmi.n]
        self.F0s = [lmi.const.toarray()]
        self.basis = lmi.basis().tocsr()  # (n*n, m): vec(F_j), column-major
        self.basisT = self.basis.T.tocsr()
        R, iu, iw, coef, var = lmi.factors
        self.R = sp.csr_matrix(R)
        self.iu, self.iw = np.asarray(iu), np.asarray(iw)
        # K (T x m): term -> variable, weighted by coef, so H = K^T h K.
        T = len(coef)
        self.KT = sp.csr_matrix((np.asarray(coef, dtype=np.float64), (np.arange(T), np.asarray(var))),
                                shape=(T, self.m)).T.tocsr()

    def linear(self, y):
        """``[sum_j y_j F_j]``: the variable part of each block."""
        return [(self.basis @ y).reshape(self.n, self.n, order="F")]

    def adjoint(self, Gs):
        """``(<F_j, G>)_j``."""
        return self.basisT @ Gs[0].reshape(-1, order="F")

    def schur(self, X, Z):
        """``H_ij = tr(F_i X F_j Z)`` from the Gram matrices of the factor rows."""
        R = self.R
        return term_schur((R @ (R @ X).T).T, (R @ (R @ Z).T).T, self.iu, self.iw, self.KT)

    def newton(self, Xs, Zs, N, lp):
        """A solver for ``(H + diag_N(lp)) dy = rhs``, or None if H is numerically singular."""
        H = self.schur(Xs[0], Zs[0])
        H[N, N] += lp
        return factor_schur(H)


class SmallLMI(DenseLMI):
    """:class:`DenseLMI` with every map from the factor rows held dense: for small LMIs (the layer
    sweeps' steps, ``n`` a few hundred), where the COO basis's sparse products cost more in scipy's
    overhead than the ``r x n`` dense products cost in flops.

    ``sum_j y_j F_j = R^T K(y) R`` with ``K`` symmetric, ``kappa_t = coef_t y_{var_t}`` at ``(u_t, w_t)`` and
    ``(w_t, u_t)``; ``<F_j, G> = sum_t 2 coef_t r_u^T G r_w`` over the terms of ``j``.
    """

    def __init__(self, lmi):  # noqa: D107 (DenseLMI's fields but the basis)
        self.n, self.m = lmi.n, lmi.n_var
        self.sizes = [lmi.n]
        self.F0s = [lmi.const.toarray()]
        R, iu, iw, coef, var = lmi.factors
        self.R = np.asarray(R.toarray() if sp.issparse(R) else R, dtype=np.float64)
        self.iu, self.iw = np.asarray(iu), np.asarray(iw)
        self.coef, self.var = np.asarray(coef, dtype=np.float64), np.asarray(var)
        T = len(self.coef)
        self.KT = sp.csr_matrix((self.coef, (np.arange(T), self.var)), shape=(T, self.m)).T.tocsr()
        self.Ru, self.Rw = self.R[self.iu], self.R[self.iw]  # each term's two rows

    def linear(self, y):
        M = (self.Ru.T * (self.coef * y[self.var])) @ self.Rw
        return [M + M.T]

    def adjoint(self, Gs):
        RG = self.R @ Gs[0]
        return self.KT @ (2.0 * np.einsum("ij,ij->i", RG[self.iu], self.R[self.iw]))

    def schur(self, X, Z):
        R = self.R
        return term_schur(R @ X @ R.T, R @ Z @ R.T, self.iu, self.iw, self.KT)


def factor_schur(H, symmetric=False):
    """A solver for ``H dy = rhs`` (``H`` the symmetric Schur complement, overwritten), or None.

    Cholesky after Jacobi scaling: on deep nets the diagonal of ``H`` spans many orders of
    magnitude, and a regularisation relative to its largest entry would swamp the small ones.
    The regularisations ``1e-14, 1e-11, 1e-8`` (of the unit diagonal) are tried in turn: free
    multipliers can make ``H`` singular near the optimum.  None if all fail.

    All in place (``H`` is ``m x m``, up to a few thousand): LAPACK's ``dpotrf`` overwrites the
    lower triangle only, so a failed try restores it from the upper one (``H`` is symmetric by
    then) and the saved diagonal.  ``symmetric``: ``H`` is exactly symmetric already (no averaging,
    which costs an ``m x m`` temporary).
    """
    if not symmetric:
        H += H.T
        H *= 0.5
    hd = np.sqrt(np.maximum(np.diag(H), 1e-300))
    H /= hd[:, None]
    H /= hd
    diag = np.diag(H).copy()
    for i, reg in enumerate((1e-14, 1e-11, 1e-8)):
        if i:  # the failed try overwrote the lower triangle
            lower = np.tril_indices(len(H), -1)
            H[lower] = H.T[lower]
        np.fill_diagonal(H, diag + reg)
        # H.T is H's memory in Fortran order: its upper triangle is H's lower one, factored in place.
        Hf, info = dpotrf(H.T, lower=0, clean=0, overwrite_a=1)
        if info != 0:
            continue
        return lambda rhs: cho_solve((Hf, False), rhs / hd, check_finite=False) / hd
    return None


def term_schur(GX, GZ, u, w, KT):
    """``K^T h K`` with ``h_ts = tr((u_t w_t^T + w_t u_t^T) X (u_s w_s^T + w_s u_s^T) Z)``.

    ``GX = R X R^T`` and ``GZ = R Z R^T`` are the Gram matrices of the factor rows
    ``R``; ``u, w`` index the rows of each term and ``KT`` (variables x terms, sparse)
    carries the coefficients.
    """
    h = GX[np.ix_(w, u)] * GZ[np.ix_(u, w)]
    h += GX[np.ix_(w, w)] * GZ[np.ix_(u, u)]
    h += GX[np.ix_(u, u)] * GZ[np.ix_(w, w)]
    h += GX[np.ix_(u, w)] * GZ[np.ix_(w, u)]
    KTh = KT @ h
    return (KT @ KTh.T).T


class InteriorPoint:
    """State and steps of one solve over a list of PSD blocks (dense iterates per block).

    ``structure`` supplies the blocks' sizes and constants ``F0s``, the maps
    ``linear(y)`` (the blocks of ``sum_j y_j F_j``) and ``adjoint(Gs)``, and
    ``newton(Xs, Zs, N, lp)``, a solver for the Schur complement system:
    :class:`DenseLMI` (one block) or the clique chain of :mod:`~lipsdp.solvers.chordal_`.
    """

    path_length = 8

    def __init__(self, structure, objective, nonneg, tol, time_limit, t0, verbose, max_iters, step_fraction):
        self.st = structure
        self.m = len(objective)
        self.tol, self.time_limit, self.t0, self.verbose = tol, time_limit, t0, verbose
        self.max_iters, self.step_fraction = max_iters, step_fraction
        self.c = np.asarray(objective, dtype=np.float64)
        self.N = np.flatnonzero(nonneg)
        self.iterations = 0
        #: The backend's name when its iterations are reported to the progress display (None: silent,
        #: as in the layer sweeps' small solves).
        self.report = None
        #: The last iterates near the optimum (multipliers), newest last: :mod:`lipsdp.verify` may find
        #: one of them, further from the boundary, provable where the final point's margin is lost to rounding.
        self.path = []
        self.dual_objective = self.gap = self.pinf = self.dinf = float("nan")
        # Start: multipliers 1, X = I, S = s I with s the size of M at that point (the norm of
        # -F0 - F(y0), by a few power steps), so the first steps are not all spent on infeasibility
        # (a fixed large multiple of I costs several more iterations).
        self.y = np.zeros(self.m)
        self.y[self.N] = 1.0
        self.X = [np.eye(k) for k in structure.sizes]
        self.S = [np.eye(k) * self.norm_estimate(F0 + F) for k, F0, F in
                  zip(structure.sizes, structure.F0s, structure.linear(self.y))]
        self.z = np.ones(len(self.N))

    @staticmethod
    def norm_estimate(A, steps: int = 30) -> float:
        """``max(1, ~||A||_2)`` by power iteration (a scale, not a bound)."""
        if not A.size:
            return 1.0
        v = np.random.default_rng(0).standard_normal(A.shape[0])
        est = 0.0
        for _ in range(steps):
            w = A @ v
            est = float(np.linalg.norm(w))
            if est == 0.0 or not np.isfinite(est):
                break
            v = w / est
        return max(1.0, est if np.isfinite(est) else 1.0)

    # -- helpers ------------------------------------------------------------
    @staticmethod
    def max_step(L, dM):
        """Largest ``a`` with ``L L^T + a dM >= 0`` (inf if every step is).

        The smallest eigenvalue of ``L^{-1} dM L^{-T}``, computed densely: an iterative estimate
        is not accurate enough, and its errors let the iterates hug the boundary.
        """
        # LAPACK's dsygst forms L^{-1} dM L^{-T} using symmetry: cheaper than two triangular solves.
        W, info = dsygst(dM, L, itype=1, lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"dsygst failed ({info})")
        lam = eigh(W, lower=True, eigvals_only=True, subset_by_index=[0, 0], check_finite=False,
                   overwrite_a=True)[0]
        return np.inf if lam >= 0 else -1.0 / lam

    @staticmethod
    def _positive_step(Ms, dMs, a):
        """``(Ms + a' dMs, their Cholesky factors, a')``, ``a' = a 0.8^k`` the largest that keeps every
        block positive definite."""
        for _ in range(30):
            new, factors = [], []
            try:
                for M, dM in zip(Ms, dMs):
                    Mn = M + a * dM
                    Mn = (Mn + Mn.T) / 2
                    factors.append(cholesky(Mn, lower=True, check_finite=False))
                    new.append(Mn)
                return new, factors, a
            except LinAlgError:
                a *= 0.8
        return Ms, None, 0.0

    @staticmethod
    def max_step_vec(v, dv):
        neg = dv < 0
        return np.inf if not np.any(neg) else float(np.min(-v[neg] / dv[neg]))

    def run(self):
        st, N = self.st, self.N
        nc = sum(st.sizes) + len(N)
        normF0 = 1.0 + np.sqrt(sum(np.sum(F0 * F0) for F0 in st.F0s))
        normc = 1.0 + np.linalg.norm(self.c)
        X, S, y, z = self.X, self.S, self.y, self.z
        dot = lambda As, Bs: sum(float(np.sum(A * B)) for A, B in zip(As, Bs))  # noqa: E731
        status, message = "solver_error", "iteration limit reached"
        Ls = [cholesky(Sk, lower=True, check_finite=False) for Sk in S]
        Lx = [cholesky(Xk, lower=True, check_finite=False) for Xk in X]
        for it in range(self.max_iters):
            self.iterations = it
            if self.time_limit and time.perf_counter() - self.t0 > self.time_limit:
                return "time_limit", f"time limit after {it} iterations"
            Z = []
            for L in Ls:
                Zk, info = dpotri(L, lower=1)
                if info != 0:
                    return "solver_error", f"singular dual slack at iteration {it}"
                Z.append(np.tril(Zk) + np.tril(Zk, -1).T)
            yN = y[N]
            zfull = np.zeros(self.m)
            zfull[N] = z
            Rd = [-F0 - F - Sk for F0, F, Sk in zip(st.F0s, st.linear(y), S)]
            r = zfull - self.c - st.adjoint(X)
            mu = (dot(X, S) + float(z @ yN)) / nc
            pobj, dobj = float(self.c @ y), dot(st.F0s, X)
            self.dual_objective = dobj
            # Relative to the objective itself, not 1 + |.|: deep nets can have optima of 1e-6
            # after preconditioning (the trivial bound it scales by is far above the SDP value).
            self.gap = abs(pobj - dobj) / max(abs(pobj), abs(dobj), 1e-14)
            self.pinf = np.sqrt(dot(Rd, Rd)) / normF0
            self.dinf = np.linalg.norm(r) / normc
            if self.report:
                progress.iteration(self.report, it, pobj, self.gap, self.tol)
            if self.pinf < 1e-6 and self.gap < 1e-2:
                self.path.append(y.copy())
                del self.path[:-self.path_length]
            if self.verbose:
                print(f"ipm {it:3d}  pobj {pobj:+.9e}  dobj {dobj:+.9e}  gap {self.gap:.1e}  "
                      f"pinf {self.pinf:.1e}  dinf {self.dinf:.1e}  mu {mu:.1e}")
            # y is what gets verified: it needs a small gap and S = -M(y) (pinf); X only
            # supplies the dual bound, whose residual floors near 1e-8 in float64.
            if self.gap < self.tol and self.pinf < self.tol and self.dinf < 1e3 * self.tol:
                return "optimal", f"converged in {it} iterations"
            if mu < 1e-3 * self.tol * max(abs(pobj), 1e-14) and self.gap < 1e2 * self.tol:
                return "optimal_inaccurate", f"stalled at iteration {it} (gap {self.gap:.1e}, dual residual {self.dinf:.1e})"
            if not np.isfinite(mu):
                return "solver_error", "non-finite iterate"

            solve = st.newton(X, Z, N, z / yN)
            if solve is None:
                return ("optimal_inaccurate" if self.gap < 1e-4 else "solver_error",
                        f"singular Schur complement at iteration {it} (gap {self.gap:.1e})")
            # After the first full dual step S = -M(y) holds up to rounding: skip the product.
            XRdZ = [Xk @ Rk @ Zk if self.pinf > 1e-13 else 0.0 for Xk, Rk, Zk in zip(X, Rd, Z)]

            def direction(smu, corr_X, corr_lp):
                G = []
                for k in range(len(X)):
                    Gk = smu * Z[k] - X[k] - XRdZ[k]
                    if corr_X is not None:
                        Gk = Gk - corr_X[k]
                    G.append((Gk + Gk.T) / 2)
                rhs = r - st.adjoint(G)
                rhs[N] += (smu - z * yN - corr_lp) / yN
                dy = solve(rhs)
                dS = [Rk - dF for Rk, dF in zip(Rd, st.linear(dy))]
                dX = []
                for k in range(len(X)):
                    dXk = smu * Z[k] - X[k] - X[k] @ dS[k] @ Z[k]
                    if corr_X is not None:
                        dXk = dXk - corr_X[k]
                    dX.append((dXk + dXk.T) / 2)
                dz = (smu - z * yN - corr_lp - z * dy[N]) / yN
                return dy, dS, dX, dz

            def steps(dy, dS, dX, dz):
                aP = min([self.max_step(L, d) for L, d in zip(Lx, dX)] + [self.max_step_vec(z, dz)])
                aD = min([self.max_step(L, d) for L, d in zip(Ls, dS)] + [self.max_step_vec(yN, dy[N])])
                return aP, aD

            dy, dS, dX, dz = direction(0.0, None, 0.0)
            aP, aD = steps(dy, dS, dX, dz)
            aP, aD = min(1.0, aP), min(1.0, aD)
            mu_aff = (sum(float(np.sum((Xk + aP * dXk) * (Sk + aD * dSk))) for Xk, dXk, Sk, dSk in zip(X, dX, S, dS))
                      + float((z + aP * dz) @ (yN + aD * dy[N]))) / nc
            sigma = min(1.0, max(0.0, mu_aff / mu)) ** 3
            dy, dS, dX, dz = direction(sigma * mu, [a @ b @ c for a, b, c in zip(dX, dS, Z)], dy[N] * dz)
            aP, aD = steps(dy, dS, dX, dz)
            aP = min(1.0, self.step_fraction * aP)
            aD = min(1.0, self.step_fraction * aD)
            # The Cholesky factors of the next iterates are needed anyway; they also catch
            # a step that rounding pushed out of the cone (then back off).
            Xn, Lx, aP = self._positive_step(X, dX, aP)
            Sn, Ls, aD = self._positive_step(S, dS, aD)
            if Lx is None or Ls is None:
                return ("optimal_inaccurate" if self.gap < 1e-4 else "solver_error",
                        f"no positive definite step at iteration {it} (gap {self.gap:.1e})")
            X, S = Xn, Sn
            if self.verbose:
                print(f"      steps aP {aP:.2e} aD {aD:.2e} sigma {sigma:.2e}")
            z = z + aP * dz
            y = y + aD * dy
            self.X, self.S, self.y, self.z = X, S, y, z
        self.iterations = self.max_iters
        if self.gap < 1e-4:
            status, message = "optimal_inaccurate", f"iteration limit (gap {self.gap:.1e})"
        return status, message


def solve_dense(lmi, tol: float, *, time_limit: float | None = None, t0: float | None = None,
                verbose: bool = False, max_iters: int = 80, step_fraction: float = 0.95,
                report: str | None = None, small: bool = False) -> tuple:
    """Run :class:`InteriorPoint` on the whole factored ``lmi`` (one dense block).

    Returns ``(state, status, message)``: the final :class:`InteriorPoint` (its ``y`` the
    answer, only a candidate for verification) and the status in the shared vocabulary.
    ``lmi.factors`` must not be None.  ``report``: the backend's name, to report each iteration
    to the progress display (:func:`lipsdp.progress.iteration`).  ``small``: all maps from the dense factor
    rows (:class:`SmallLMI`), for LMIs of a few hundred rows.
    """
    t0 = time.perf_counter() if t0 is None else t0
    maps = SmallLMI if small else DenseLMI
    state = InteriorPoint(maps(lmi), lmi.objective, lmi.nonneg, tol, time_limit, t0, verbose,
                          max_iters, step_fraction)
    state.report = report
    status, message = state.run()
    return state, status, message
