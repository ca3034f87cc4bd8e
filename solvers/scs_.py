"""SCS (splitting conic solver) backend, called directly in its native form.

SCS solves ``min c^T x  s.t.  b - A x in K``; the PSD cone takes the lower
triangle, column-major, off-diagonal entries scaled by sqrt(2).  Our LMI
``M(x) <= 0`` becomes ``svec(-M_c) - A x in S_+`` with ``A = svec`` of the
``M_j``; sign-constrained multipliers go to the nonnegative cone.

SCS is a first-order method: its points are slightly infeasible (top
eigenvalue ~1e-5) and its objective can sit below the optimum, so its output is
only a starting point for :mod:`lipsdp.verify`.

Reference: B. O'Donoghue, E. Chu, N. Parikh, S. Boyd, "Conic optimization via
operator splitting and homogeneous self-dual embedding", JOTA 2016.
"""

from __future__ import annotations

import time

import numpy as np

from lipsdp.solvers.base import Backend, SolveResult, first_order_bytes, register


@register
class SCS(Backend):
    """SCS, called in its native form.

    Conventions: ``b - A x`` in (nonnegative cone) x (PSD cone), lower triangle, column-major,
    off-diagonal entries times ``sqrt(2)``.  Memory: a few dense ``n x n`` matrices for the
    projection (:func:`~lipsdp.solvers.base.first_order_bytes`).  Preference: the general backend
    that scales furthest, first for LMIs above ``LARGE_LMI``, third otherwise.
    """

    name = "scs"
    listing = 4
    auto_rank = (2, 4, 2)
    modules = ("scs",)
    install = "pip install scs"
    family = "first_order"
    psd_triangle = "lower"
    status_map = {
        "solved": "optimal", "solved_inaccurate": "optimal_inaccurate",
        "infeasible": "infeasible", "infeasible_inaccurate": "infeasible",
        "unbounded": "unbounded", "unbounded_inaccurate": "unbounded",
        "interrupted": "time_limit",
    }
    default_tol = 1e-6

    @classmethod
    def memory_estimate(cls, lmi) -> int:
        return first_order_bytes(lmi)

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        import scs

        t0 = time.perf_counter()
        A, b, n_nonneg = self.conic_data(lmi)
        tol = tol or self.default_tol
        settings = dict(eps_abs=tol, eps_rel=tol, verbose=verbose, max_iters=200_000)
        if time_limit:
            settings["time_limit_secs"] = float(time_limit)
        solver = scs.SCS({"A": A, "b": b, "c": lmi.objective}, {"l": n_nonneg, "s": [lmi.n]}, **settings)
        sol = solver.solve()
        info = sol["info"]
        native = info["status"]
        status = self.map_status(native)
        # SCS 3.x spells some statuses with the reason, e.g. "solved (inaccurate - reached
        # time_limit_secs)"; classify those by their words.
        if status == "solver_error" and "inaccurate" in native:
            status = "optimal_inaccurate" if native.startswith("solved") else self.map_status(native.split(" ")[0])
        if "time_limit" in native or status == "time_limit" or (
                status == "optimal_inaccurate" and time_limit
                and info.get("solve_time", 0) / 1e3 >= 0.95 * time_limit):
            status = "time_limit"
        x = np.asarray(sol["x"], dtype=np.float64)
        return SolveResult(status, x, float(info.get("pobj", np.nan)), time.perf_counter() - t0,
                           int(info.get("iter", 0)), native, extras={"info": dict(info)})
