"""Clarabel (interior-point conic solver) backend, called directly.

Clarabel solves ``min 1/2 x^T P x + q^T x  s.t.  A x + s = b, s in K``; its PSD
cone (``PSDTriangleConeT``) takes the upper triangle, column-major, scaled by
sqrt(2).  Accurate, but its KKT system holds a dense ``n(n+1)/2`` block for the
PSD cone (roughly O(n^6) work per iteration), so it suits small LMIs only
(MATH.md section 10); :meth:`LMIProblem.memory_estimate` guards against it.

Reference: P. Goulart, Y. Chen, "Clarabel: An interior-point solver for conic
programs with quadratic objectives", arXiv 2405.12762, 2024.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from lipsdp.solvers.base import Backend, SolveResult


class Clarabel(Backend):
    name = "clarabel"
    modules = ("clarabel",)
    install = "pip install clarabel"
    family = "interior_point_cone"
    psd_triangle = "upper"
    status_map = {
        "Solved": "optimal", "AlmostSolved": "optimal_inaccurate",
        "PrimalInfeasible": "infeasible", "AlmostPrimalInfeasible": "infeasible",
        "DualInfeasible": "unbounded", "AlmostDualInfeasible": "unbounded",
        "MaxTime": "time_limit", "MaxIterations": "optimal_inaccurate",
        "NumericalError": "solver_error", "InsufficientProgress": "optimal_inaccurate",
    }
    default_tol = 1e-8

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        import clarabel

        t0 = time.perf_counter()
        A, b, n_nonneg = self.conic_data(lmi)
        settings = clarabel.DefaultSettings()
        settings.verbose = verbose
        tol = tol or self.default_tol
        settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = tol
        if time_limit:
            settings.time_limit = float(time_limit)
        cones = [clarabel.NonnegativeConeT(n_nonneg), clarabel.PSDTriangleConeT(lmi.n)]
        P = sp.csc_matrix((lmi.n_var, lmi.n_var))  # no quadratic term
        sol = clarabel.DefaultSolver(P, lmi.objective, A, b, cones, settings).solve()
        native = str(sol.status).split(".")[-1]
        return SolveResult(self.map_status(native), np.asarray(sol.x, dtype=np.float64), float(sol.obj_val),
                           time.perf_counter() - t0, int(sol.iterations), native)
