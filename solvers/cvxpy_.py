"""Backends reached through cvxpy's well-kept solver interfaces (MOSEK, SDPA, CVXOPT).

cvxpy already knows how to hand an LMI to these solvers (dualising it for the
interior-point codes that want the primal standard form).  We give it the LMI
in its cheapest shape: one sparse matrix ``B`` with ``vec(M(x)) = B x + vec(M_c)``,
so cvxpy's canonicalisation is a single sparse product rather than a
neuron-by-neuron expression tree.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from lipsdp.solvers.base import Backend, SolveResult, register
from lipsdp.solvers.deadline import solve_in_child


class CvxpyBackend(Backend):
    """A solver reached through cvxpy; subclasses name it and set its options.

    Conventions: cvxpy's (it dualises the LMI for the primal standard form these codes want).
    Memory: the general interior-point estimate of :meth:`Backend.memory_estimate`.
    """

    cvxpy_name = ""
    status_map = {
        "optimal": "optimal", "optimal_inaccurate": "optimal_inaccurate",
        "infeasible": "infeasible", "infeasible_inaccurate": "infeasible",
        "unbounded": "unbounded", "unbounded_inaccurate": "unbounded",
        "user_limit": "time_limit",
    }

    #: Whether the solver stops itself at a wall-clock limit (else a worker process is killed for it).
    native_time_limit = True

    def options(self, time_limit, tol) -> dict:
        return {}

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        if time_limit and not self.native_time_limit:
            return solve_in_child(self, lmi, time_limit, tol=tol, verbose=verbose)
        import cvxpy as cp

        t0 = time.perf_counter()
        n = lmi.n
        x = cp.Variable(lmi.n_var)
        B = lmi.basis()
        c = lmi.const.toarray().ravel(order="F")
        negM = cp.reshape(-(B @ x) - c, (n, n), order="F")
        cons = [0.5 * (negM + negM.T) >> 0]
        nn = np.flatnonzero(lmi.nonneg)
        if len(nn):
            cons.append(x[nn] >= 0)
        prob = cp.Problem(cp.Minimize(lmi.objective @ x), cons)
        try:
            with warnings.catch_warnings():
                # "Solution may be inaccurate": we verify every point ourselves.
                warnings.simplefilter("ignore", UserWarning)
                prob.solve(solver=self.cvxpy_name, verbose=verbose, **self.options(time_limit, tol or self.default_tol))
        except cp.error.SolverError as exc:
            return SolveResult("solver_error", None, None, time.perf_counter() - t0, message=str(exc))
        value = None if x.value is None else np.asarray(x.value, dtype=np.float64)
        stats = prob.solver_stats
        return SolveResult(self.map_status(prob.status), value,
                           None if prob.value is None else float(prob.value), time.perf_counter() - t0,
                           getattr(stats, "num_iters", None), str(prob.status))


@register
class MOSEK(CvxpyBackend):
    """MOSEK interior-point solver (commercial; free academic licences).

    Preference: above every other backend for every LMI, where licensed (``auto`` considers
    usable backends only).
    """

    name = "mosek"
    listing = 0
    cvxpy_name = "MOSEK"
    modules = ("mosek", "cvxpy")
    install = "pip install 'lipsdp[mosek]' and a licence file (https://www.mosek.com/license/request)"
    needs_license = True
    default_tol = 1e-9
    _licence: tuple[bool, str] | None = None

    @classmethod
    def preference(cls, lmi) -> float | None:
        return 100.0

    @classmethod
    def license_status(cls):
        if not cls.is_installed():
            return False, "not installed"
        if cls._licence is None:
            try:
                import mosek

                with mosek.Env() as env:
                    env.checkoutlicense(mosek.feature.pts)
                cls._licence = (True, "licensed")
            except Exception as exc:  # mosek raises its own Error for every licence problem
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                cls._licence = (False, f"no valid licence ({text})")
        return cls._licence

    def options(self, time_limit, tol):
        params = {"MSK_DPAR_INTPNT_CO_TOL_REL_GAP": tol, "MSK_DPAR_INTPNT_CO_TOL_PFEAS": tol,
                  "MSK_DPAR_INTPNT_CO_TOL_DFEAS": tol}
        if time_limit:
            params["MSK_DPAR_OPTIMIZER_MAX_TIME"] = float(time_limit)
        return {"mosek_params": params}


@register
class SDPA(CvxpyBackend):
    """SDPA primal-dual interior-point solver (sdpa-python).

    Preference: first where multipliers are free (GroupSort, Householder: their optimal set is
    unbounded, and the other interior-point codes stop on a singular system there); otherwise
    often faster than CVXOPT but less accurate on badly scaled nets, so second.
    """

    name = "sdpa"
    listing = 5
    auto_rank = (4, 2, 3)
    cvxpy_name = "SDPA"
    modules = ("sdpap", "cvxpy")
    install = "pip install sdpa-python"
    native_time_limit = False  # only maxIteration; the limit is held by solvers/deadline.py

    def options(self, time_limit, tol):
        return {"epsilonStar": tol, "epsilonDash": tol}


@register
class CVXOPT(CvxpyBackend):
    """CVXOPT primal-dual interior-point solver.

    Preference: first of the general backends up to ``LARGE_LMI`` (accurate on small and medium
    LMIs), after SCS above it, last where multipliers are free (its KKT system turns singular).
    """

    name = "cvxopt"
    listing = 6
    auto_rank = (1, 3, 4)
    cvxpy_name = "CVXOPT"
    modules = ("cvxopt", "cvxpy")
    install = "pip install cvxopt"
    native_time_limit = False  # only maxiters; the limit is held by solvers/deadline.py

    def options(self, time_limit, tol):
        return {"abstol": tol, "reltol": tol, "feastol": tol, "max_iters": 200}
