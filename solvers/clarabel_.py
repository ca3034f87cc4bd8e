"""Clarabel (interior-point conic solver) backend, called directly.

Clarabel solves ``min 1/2 x^T P x + q^T x  s.t.  A x + s = b, s in K``; its PSD
cone (``PSDTriangleConeT``) takes the upper triangle, column-major, scaled by
sqrt(2).  Accurate, but its KKT system holds a dense ``n(n+1)/2`` block for the
PSD cone (roughly O(n^6) work per iteration), so it suits small LMIs only
(docs/math.md §10); :meth:`Clarabel.memory_estimate` lets the solve stage guard against it.

Reference: P. Goulart, Y. Chen, "Clarabel: An interior-point solver for conic
programs with quadratic objectives", arXiv 2405.12762, 2024.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from lipsdp.solvers.base import Backend, SolveResult, dense_bytes, register, stored_bytes


@register
class Clarabel(Backend):
    """Clarabel, called in its native form.

    Conventions: ``A x + s = b``, ``s`` in (nonnegative cone) x (PSD cone), upper triangle,
    column-major, scaled by ``sqrt(2)``.  Memory: the dense ``(n(n+1)/2)^2`` scaling block of
    the PSD cone.  Preference: accurate but the slowest to scale, last of the general backends
    (second where multipliers are free).
    """

    name = "clarabel"
    listing = 7
    auto_rank = (3, 1, 1)
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

    @classmethod
    def memory_estimate(cls, lmi) -> int:
        m = lmi.n * (lmi.n + 1) // 2
        return 8 * m * m + 8 * dense_bytes(lmi) + 4 * stored_bytes(lmi)

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
