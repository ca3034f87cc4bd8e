"""What a run is doing, on stderr: the phase (load, build, solve, verify), what it works on, the seconds
spent and, under a time limit, the seconds left.

The stages report through the run's :class:`~lipsdp.budget.Budget`: :meth:`~lipsdp.budget.Budget.enter`
starts a phase, :func:`~lipsdp.budget.note` says what is being done (the LMI being solved; a backend may
note its iterations with :func:`iteration`: objective, gap and an estimate of the time left; the best
verified bound once there is one), and :func:`display` shows it.  Nothing is shown for runs
shorter than a second or when stderr is not a terminal (logs, pipes), unless asked for
(``progress="always"``).  The display runs in a daemon thread, so a solver holding the main thread in
native code still shows progress.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

from lipsdp.budget import current


@dataclass
class Iterations:
    """A solver's progress in the current run: its last iteration, its objective as a bound (``sqrt`` of
    the objective in original units: the solver's value, *not* verified), its relative gap when it has
    one, and ``(seconds, log10 gap)`` of the recent iterations for the estimate of the time left."""

    solver: str
    count: int = 0
    bound: float | None = None
    gap: float | None = None
    tol: float | None = None
    history: list = field(default_factory=list)

    def eta(self) -> float | None:
        """Seconds to reach ``tol``, extrapolating the recent decrease of ``log gap`` (an interior-point
        method's gap falls about geometrically), or None while it cannot be estimated."""
        if self.tol is None or self.gap is None or not self.gap > 0 or len(self.history) < 3:
            return None
        (t0, g0), (t1, g1) = self.history[0], self.history[-1]
        rate = (g1 - g0) / max(t1 - t0, 1e-9)  # decades per second (negative while converging)
        if not rate < 0:
            return None
        return max(g1 - math.log10(self.tol), 0.0) / -rate  # decades still to go, at that rate


_RECORDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_SCALE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def objective_scale(factor: float) -> None:
    """Say that a solver's objective times ``factor`` is ``rho`` in original units (the preconditioning's
    ``v[0]``, :class:`~lipsdp.reductions.Precondition`); no-op outside a run."""
    budget = current()
    if budget is not None:
        _SCALE[budget] = float(factor)


def iteration(solver: str, count: int, objective: float | None, gap: float | None = None,
              tol: float | None = None) -> None:
    """A solver's iteration ``count`` (its objective, relative gap and target ``tol`` when it has them), for
    :func:`display`; cheap (no verification), a no-op outside a run."""
    budget = current()
    if budget is None:
        return
    record = _RECORDS.get(budget)
    if record is None or record.solver != solver or count < record.count:
        record = _RECORDS[budget] = Iterations(solver)
    record.count, record.tol = count, tol
    if objective is not None and math.isfinite(objective):
        record.bound = math.sqrt(max(objective, 0.0) * _SCALE.get(budget, 1.0))
    if gap is not None and math.isfinite(gap) and gap > 0:
        record.gap = gap
        record.history.append((time.monotonic(), math.log10(gap)))
        del record.history[:-6]


def iterations(budget) -> Iterations | None:
    """The solver progress recorded in ``budget``'s run, None before the first iteration."""
    return _RECORDS.get(budget)


def _solver_text(budget) -> tuple[str, float | None]:
    """What :func:`line` adds during the solve: iteration, objective (not verified), gap; and the ETA."""
    record = _RECORDS.get(budget)
    if record is None or budget.phase != "solve":
        return "", None
    text = f"; iteration {record.count}"
    if record.bound is not None:
        text += f", objective {record.bound:.7g} (not yet verified)"
    if record.gap is not None:
        text += f", gap {record.gap:.1e}"
    eta = record.eta()
    return text, None if eta is None else time.monotonic() + eta


def line(budget) -> str:
    """One status line for ``budget``'s run: ``solve: a 300x300 LMI (output 2) with sdpa (4 s; about 9 s to go;
    at most 16 s left)``: the estimate once a first l_inf output is done, the limit's seconds left."""
    now = time.monotonic()
    solver, solver_eta = _solver_text(budget)
    text = budget.phase + (f": {budget.detail}" if budget.detail else "") + solver
    if budget.best is not None:
        text += f"; best verified bound {budget.best[0]:.7g}"
    left = budget.seconds_left()
    until = budget.eta if budget.eta is not None else solver_eta
    eta = "" if until is None else f"; about {max(until - now, 0.0):.0f} s to go"
    eta += f"; at most {max(left, 0.0):.0f} s left" if left is not None else ""
    return f"{text} ({now - budget.start:.0f} s{eta}; Ctrl-C stops)"


@contextmanager
def display(budget, enabled, delay: float = 1.0):
    """Show the run's progress on stderr while the block runs, once it has run ``delay`` seconds.

    ``enabled``: False, True (only when stderr is a terminal) or ``"always"`` (also into a pipe or file:
    one line per change).
    """
    if not enabled or budget is None or (enabled != "always" and not sys.stderr.isatty()):
        yield
        return
    from rich.console import Console

    console = Console(file=sys.stderr, soft_wrap=True)  # a log line is never cut
    done = threading.Event()

    def show():
        if done.wait(delay):
            return
        if not console.is_terminal:  # a log: one line per change
            last = None
            while not done.wait(0.5):
                text = f"{budget.phase}: {budget.detail}" if budget.detail else budget.phase
                record = _RECORDS.get(budget)
                if record is not None and budget.phase == "solve":  # a line per iteration
                    text += f" {record.count}"
                if text != last:
                    console.print(f"lipsdp: {line(budget)}", markup=False, highlight=False)
                    last = text
            return
        status = console.status(line(budget))
        status.start()
        try:
            while not done.wait(0.5):
                status.update(line(budget))
        finally:
            status.stop()

    thread = threading.Thread(target=show, name="lipsdp-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2.0)
