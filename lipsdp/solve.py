"""The solve stage: which backend, whether it fits in memory, running it, and what to do when it stops.

Everything the certification needs to know about backends goes through
:mod:`lipsdp.solvers` (:func:`~lipsdp.solvers.choose`, :func:`~lipsdp.solvers.fallback`,
:func:`~lipsdp.solvers.fitting` and each backend's ``memory_estimate``); the rest of lipsdp
never names a backend.
A backend's answer is never trusted as a bound: the verify stage
(:mod:`lipsdp.verification`) proves one from its point or reports that it could not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from lipsdp.budget import current, note
from lipsdp.errors import LipSDPError, ResourceError
from lipsdp.resources import available_memory
from lipsdp.solvers import choose, fallback, fitting
from lipsdp.solvers.base import BACKENDS, SolveResult, native_output_to_stderr

#: A solve that ended otherwise gets a second backend under ``auto``: it neither converged nor ran out of time.
_SETTLED = ("optimal", "optimal_inaccurate", "time_limit")
#: Share of the available memory a solve may plan for; the rest is the process's own and the verifier's.
MEMORY_SHARE = 0.8
#: An ``optimal`` answer whose own dual value lies more than this (relative) below its objective did not
#: converge (an interior-point method's gap test has an absolute floor that a badly scaled objective
#: slips under, docs/math.md §5.3): with the default tolerance it is solved again at :data:`TIGHT_TOL`.
DUAL_GAP = 1e-4
TIGHT_TOL = 1e-14
#: Flops a second of the interior-point methods' BLAS-3 work on one core, and their iterations from the
#: swept start: an estimate of a solve's seconds (784-64x64-10: 2e11 flops an iteration, about 15 CPU s,
#: 37 iterations; docs/performance.md).
FLOP_RATE, ITERATIONS = 1.3e10, 35
#: Under a time limit, an ``auto`` solve estimated at more than this multiple of the seconds left cannot
#: get near the optimum (its first iterates are looser than its start): the layer sweeps get
#: :data:`HOPELESS_SWEEP_SHARE` of the time left (:func:`sweep_deadline`), the solve is not started, and the
#: verified bound is the start point's (:func:`lipsdp.verification.verify_solution`).
HOPELESS, HOPELESS_SWEEP_SHARE = 4.0, 0.6


def solve_seconds(backend, lmi) -> float | None:
    """About how many seconds ``backend`` needs for ``lmi`` on one core (None: no estimate)."""
    cost = backend.iteration_cost(lmi) if backend.applies(lmi) else None
    return None if not cost else float(cost) * ITERATIONS / FLOP_RATE


def sweep_deadline(t_start: float, time_limit, solver: str, share: float):
    """The preconditioning sweeps' deadline under ``time_limit`` (None without one), as a function of the
    LMI to solve (:class:`~lipsdp.reductions.Precondition`): ``share`` of the limit, or
    :data:`HOPELESS_SWEEP_SHARE` of the time left where an ``auto`` solve of a chain LMI by the completion
    method cannot finish in it (the sweeps then make the bound)."""
    if not time_limit:
        return None

    def deadline(lmi) -> float:
        now, budget = time.perf_counter(), current()
        left = budget.seconds_left() if budget is not None and budget.deadline is not None else \
            t_start + time_limit - now  # the run's deadline counts the load too
        need = solve_seconds(BACKENDS["completion"], lmi) if solver.lower() == "auto" else None
        if need is not None and need > HOPELESS * max(left, 0.0):
            return now + HOPELESS_SWEEP_SHARE * max(left, 0.0)
        return t_start + share * time_limit

    return deadline


@dataclass
class Solution:
    """A backend's answer, in the variables of the LMI it solved.

    ``objective`` and ``dual`` are the raw values ``c^T x`` of that LMI (the
    reductions' :meth:`~lipsdp.reductions.Reduction.invert` map them back);
    ``path`` holds an interior-point method's last iterates, newest last.
    """

    x: np.ndarray | None
    status: str
    message: str = ""
    objective: float | None = None
    dual: float | None = None
    iterations: int | None = None
    path: list | None = None
    solver: str = ""


class ClosedForm:
    """The solve stage of a network without activations, where no solver is needed.

    l2: an eigenvalue problem that verification solves from ``rho = 0``.  l_inf:
    ``min sum(lambda) s.t. diag(lambda) >= c c^T`` is ``lambda = |c| ||c||_1``.
    """

    seconds = 0.0

    def __call__(self, query) -> Solution:
        n_var = query.given.n_var
        if query.norm == "l2":
            x = np.zeros(n_var)
        else:
            c = np.abs(np.asarray(query.output_map @ query.lifting.output.toarray())[0])
            x = c * c.sum() / query.scale[:n_var]
        return Solution(x, "optimal", solver="closed-form")


def _relative_gap(result: SolveResult) -> float:
    """``(objective - dual) / |objective|`` of a backend's answer; NaN where it reports no dual value."""
    dual = result.extras.get("dual_objective") if isinstance(result.extras, dict) else None
    if result.objective is None or dual is None or not np.isfinite(dual) or result.objective == 0:
        return float("nan")
    return (result.objective - float(dual)) / abs(result.objective)


def far_from_dual(result: SolveResult) -> bool:
    """Whether ``result`` says ``optimal`` while its own dual value lies more than :data:`DUAL_GAP` below
    its objective (both in the solved LMI's units)."""
    return result.status == "optimal" and result.x is not None and _relative_gap(result) > DUAL_GAP


def run_backend(backend, lmi, time_limit, tol, progress: bool = False, label: str = "") -> tuple[SolveResult, float]:
    """``(result, seconds)`` of ``backend`` on ``lmi``; a crash is a ``solver_error`` result, not an exception.

    Within a run with a time limit (:mod:`lipsdp.budget`) the backend gets at most its share of the
    seconds left.  ``progress`` is kept for callers; the run's display shows what is being solved.
    """
    t0 = time.perf_counter()
    budget = current()
    if budget is not None:
        time_limit = budget.solver_seconds(time_limit)
    note(f"a {lmi.n}x{lmi.n} LMI{label} with {backend.name}"
         + (f", at most {time_limit:.3g} s" if time_limit else ""))
    with native_output_to_stderr():
        try:
            result = backend.solve(lmi, time_limit=time_limit, tol=tol)
        except LipSDPError:
            raise
        except Exception as exc:  # a backend crash is a solver failure, not a lipsdp bug
            result = SolveResult("solver_error", None, None, time.perf_counter() - t0,
                                 message=f"{type(exc).__name__}: {exc}")
    if time_limit and not backend.supports_time_limit:
        result.message += f" ({backend.name} has no time limit; --time-limit was not applied)"
    return result, time.perf_counter() - t0


class Solve:
    """The solve stage of one certification: one backend for all its queries.

    The backend is chosen, and its memory checked, on the first query; a
    ``time_limit`` is one budget for a solve and its fallback.  ``seconds`` sums
    the backends' wall time.
    """

    def __init__(self, solver: str = "auto", *, time_limit=None, tol=None, memory_limit=None, progress=False):
        self.solver, self.time_limit, self.tol = solver, time_limit, tol
        self.memory_limit, self.progress = memory_limit, progress
        self.backend = None
        self.seconds = 0.0

    def __call__(self, query) -> Solution:
        lmi = query.solve
        if self.backend is None:
            self.backend = choose(self.solver, lmi)
            self._check_memory(lmi)
        hopeless = self._hopeless(lmi)
        if hopeless:
            return Solution(None, "time_limit", hopeless, solver=self.backend.name)
        result, seconds = run_backend(self.backend, lmi, self.time_limit, self.tol, self.progress, query.label)
        self.seconds += seconds
        name = self.backend.name
        if self.solver.lower() == "auto" and result.status not in _SETTLED:
            result, name = self._retry(lmi, result, seconds, query.label)
        elif self.tol is None and far_from_dual(result):
            result = self._tighten(lmi, result, seconds, query.label)
        extras = result.extras if isinstance(result.extras, dict) else {}
        return Solution(result.x, result.status, result.message, result.objective, extras.get("dual_objective"),
                        result.iterations, extras.get("path"), name)

    def _hopeless(self, lmi) -> str | None:
        """Why an ``auto`` solve is not started (an estimate :data:`HOPELESS` times the seconds left, and a
        start point to verify instead), or None."""
        budget = current()
        left = None if budget is None else budget.seconds_left()
        if self.solver.lower() != "auto" or left is None or lmi.start is None:
            return None
        need = solve_seconds(self.backend, lmi)
        if need is None or need <= HOPELESS * max(left, 0.0):
            return None
        return (f"not solved: {self.backend.name} would need about {need:.3g} s on one core ({ITERATIONS} "
                f"iterations), {max(left, 0.0):.3g} s were left")

    def _check_memory(self, lmi) -> None:
        need = self.backend.memory_estimate(lmi)
        budget = int(MEMORY_SHARE * available_memory())  # within a run: what its memory limit leaves
        budget = min(budget, self.memory_limit) if self.memory_limit else budget
        if need > budget:
            fits = fitting(lmi, budget)
            advice = "these fit: " + ", ".join(f"--solver {name} (about {n / 2**30:.2g} GiB)" for n, name in fits) \
                if fits else "no installed backend fits: try --split K or a smaller network"
            raise ResourceError(f"solving this {lmi.n}x{lmi.n} LMI with {self.backend.name} needs about "
                                f"{need / 2**30:.1f} GiB but {budget / 2**30:.1f} GiB are available; {advice}")

    def _tighten(self, lmi, result, seconds, label):
        """The re-solve at :data:`TIGHT_TOL` of an answer :func:`far_from_dual`, where it returned a point."""
        left = None if not self.time_limit else self.time_limit - seconds
        if left is not None and left <= 0:
            return result
        again, seconds = run_backend(self.backend, lmi, left, TIGHT_TOL, self.progress, label)
        self.seconds += seconds
        if again.x is None or again.status not in ("optimal", "optimal_inaccurate"):
            return result
        again.message = (f"{again.message}; re-solved at tol {TIGHT_TOL:g}: the first answer's dual value lay "
                         f"{_relative_gap(result):.1e} below its objective").lstrip("; ")
        return again

    def _retry(self, lmi, result, seconds, label):
        """``(result, backend name)``: the fallback's result where it converged, else the first one."""
        alt = fallback(lmi, self.backend)
        if alt is None:
            return result, self.backend.name
        left = None if not self.time_limit else self.time_limit - seconds
        budget = current()
        if budget is not None and budget.seconds_left() is not None:
            left = budget.seconds_left()  # the run's deadline; run_backend takes the solver's share of it
        alt_result, seconds = run_backend(alt, lmi, left, self.tol, self.progress, label) \
            if left is None or left > 0 else (result, 0.0)
        self.seconds += seconds
        if alt_result.status == "optimal" and alt_result.x is not None:
            alt_result.message = (f"{alt_result.message}; {self.backend.name} stopped ({result.status}: "
                                  f"{result.message}), re-solved with {alt.name}").lstrip("; ")
            return alt_result, alt.name
        return result, self.backend.name
