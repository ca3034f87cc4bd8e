"""The run's limits: one deadline and one memory cap for a whole certification (load, build, solve, verify).

A :class:`Budget` is created at the start of :func:`lipsdp.certify` (and of ``lipsdp certify``) and made
current with :meth:`Budget.active` (a context variable, so threads and nested calls see their own). Any
stage may then call :func:`checkpoint` between steps of a long loop: it costs a clock read and, with a memory
cap, one read of ``/proc``, and raises :class:`LimitReached` once a limit is spent. The solve stage asks
:func:`current` for the seconds left (:meth:`Budget.solver_seconds`) and gives them to the backend, so a
solver stops by itself and its unfinished point is still verified (a bound verified in time is a result,
exit 0). Planning reads the memory left (:meth:`Budget.memory_left`, through
:func:`lipsdp.resources.available_memory`), so a build or a solve that would not fit is refused before it
starts.

In-process callers get this cooperative enforcement only: Python cannot stop a thread inside a native call.
The command line adds a watchdog process (:mod:`lipsdp.watchdog`) that ends the process, with one line and
exit code 1, when the run goes its grace (:data:`GRACE` or less) past its deadline or its resident memory (with the
solver worker processes) passes the cap, so the limits hold there whatever the code in between does.
"""

from __future__ import annotations

import contextlib
import contextvars
import time

from lipsdp.errors import LipSDPError

try:  # a dependency (setup.cfg); resident memory is read from /proc without it
    import psutil
except ImportError:  # pragma: no cover
    psutil = None

#: Seconds past the deadline at which the run is stopped: the solver was given until the deadline, and
#: verifying its point or writing the result may run this much longer.
GRACE = 1.0
#: Share of the seconds left that the solver gets; the rest is kept for verifying its point.
SOLVER_SHARE = 0.75
#: Seconds between two looks of the command line's watchdog at the clock and the resident memory: a dense
#: allocation grows by a few GB/s, so this keeps the overshoot of a memory limit to a few percent.
POLL = 0.01

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("lipsdp_budget", default=None)


class LimitReached(LipSDPError):
    """The run's time or memory limit was reached before a result (exit code 1, as for no verified bound)."""

    exit_code = 1


def resident_memory(children: bool = True) -> int:
    """Resident bytes of this process and, with ``children``, of its child processes (solver workers)."""
    if psutil is None:  # pragma: no cover
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096
    proc = psutil.Process()
    total = proc.memory_info().rss
    if children:
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
    return total


def parse_size(text: str) -> int:
    """Bytes from ``"2G"``, ``"500M"``, ``"1.5GiB"``, ``"800k"`` or a plain number of bytes (powers of 1024)."""
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in units else ""
    number = float(s[:-1] if unit else s)
    if not number > 0:
        raise ValueError(f"not a positive size: {text!r}")
    return int(number * units[unit])


class Budget:
    """A deadline and a memory cap for one run, and what the run has done so far.

    Parameters
    ----------
    time_limit : float, optional
        Seconds for the whole run, counted from ``start``.
    memory_limit : int, optional
        Bytes of resident memory (this process and its solver workers).  With ``absolute`` (the command
        line) that is the whole process; otherwise (the API) what the run may add to what the process held
        when it started, so a caller's own data is not counted.
    start : float, optional
        ``time.monotonic()`` value the limit counts from (default: now; the command line passes the
        process's start).
    grace : float
        Seconds past the deadline before the run is stopped (:data:`GRACE`; the command line takes less).
    """

    def __init__(self, time_limit=None, memory_limit=None, *, start=None, absolute=False, grace=GRACE):
        self.grace = grace
        self.start = time.monotonic() if start is None else start
        self.time_limit = time_limit or None
        self.deadline = None if not time_limit else self.start + time_limit
        self.memory_limit = memory_limit
        self.memory_cap = None if memory_limit is None else \
            int(memory_limit) + (0 if absolute else resident_memory())
        # "startup": from ``start`` (the command line: the process's start, so the interpreter and imports)
        self.phase, self.phase_start, self.done = "startup", self.start, []
        self.best = None
        self.peak = 0
        self.detail = ""
        self.eta, self._steps_start = None, None
        #: Called with the budget when the phase changes or a bound is verified (the watchdog's news).
        self.on_change = None
        self._children, self._children_at = [], -1.0

    def resident(self) -> int:
        """Resident bytes now, as :func:`resident_memory`, listing the child processes at most twice a
        second (the list is the costly part; their sizes are read every time)."""
        if psutil is None:  # pragma: no cover
            return resident_memory()
        now = time.monotonic()
        proc = psutil.Process()
        if now - self._children_at > 0.5:
            with contextlib.suppress(psutil.Error):
                self._children, self._children_at = proc.children(recursive=True), now
        total = proc.memory_info().rss
        for child in self._children:
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        self.peak = max(self.peak, total)
        return total

    # --- time -------------------------------------------------------------------------------------
    def seconds_left(self) -> float | None:
        """Seconds to the deadline (negative past it), None without a time limit."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def solver_seconds(self, asked=None) -> float | None:
        """The solver's time limit: :data:`SOLVER_SHARE` of what is left (at least a millisecond, so a
        solver past the deadline still returns its starting point at once), or ``asked`` if smaller."""
        left = self.seconds_left()
        if left is None:
            return asked
        mine = max(SOLVER_SHARE * left, 1e-3)
        return mine if asked is None else min(mine, asked)

    # --- memory -----------------------------------------------------------------------------------
    def memory_left(self) -> int | None:
        """Bytes the run may still add, None without a memory cap."""
        if self.memory_cap is None:
            return None
        return self.memory_cap - self.resident()

    # --- what happened ----------------------------------------------------------------------------
    def enter(self, phase: str) -> None:
        """Start ``phase`` (``load``, ``build``, ``solve``, ``verify``...), after checking the limits."""
        now = time.monotonic()
        self.done.append((self.phase, now - self.phase_start))
        self.phase, self.phase_start, self.detail = phase, now, ""
        if self.on_change is not None:
            self.on_change(self)
        self.check()

    def verified(self, bound: float, what: str = "") -> None:
        """Record a bound verified during the run (reported if a limit stops it later)."""
        if bound is not None and (self.best is None or bound < self.best[0]):
            self.best = (float(bound), what)
            if self.on_change is not None:
                self.on_change(self)

    def spent(self, current: bool = True) -> dict:
        """Seconds per phase so far, in the order first entered (with ``current``, the phase in progress too)."""
        spent = {}
        now = [(self.phase, time.monotonic() - self.phase_start)] if current else []
        for name, seconds in self.done + now:
            if name != "startup" or seconds >= 0.05:
                spent[name] = spent.get(name, 0.0) + seconds
        return spent

    def reached(self) -> str | None:
        """Which limit is spent (``"time"``, ``"memory"``) or None."""
        if self.deadline is not None and time.monotonic() > self.deadline + self.grace:
            return "time"
        if self.memory_cap is not None and self.memory_left() < 0:
            return "memory"
        return None

    def describe(self, which: str) -> str:
        """One line: which limit, in which phase, what was done, the best verified bound if any."""
        limit = f"time limit of {self.time_limit:g} s" if which == "time" else \
            f"memory limit of {self.memory_limit / 2**30:.3g} GiB"
        done = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.spent().items())
        best = f"; best verified bound so far {self.best[0]:.6g} ({self.best[1]})" if self.best else \
            "; no bound verified"
        return f"{limit} reached during {self.phase} after {time.monotonic() - self.start:.1f} s" \
               f"{f' (done: {done})' if done else ''}{best}"

    def check(self) -> None:
        """Raise :class:`LimitReached` when a limit is spent."""
        which = self.reached()
        if which:
            raise LimitReached(self.describe(which))

    # --- scope ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self):
        """Make this the budget :func:`current` and :func:`checkpoint` see."""
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


def record_if_limited(prove, what: str) -> None:
    """Under a time or memory limit, call ``prove()`` (a verified bound, or None) and record its value with the
    run's budget as ``what``, so a limit reached later still reports a bound; without limits nothing is done
    (the proof may cost, and only a limit's report needs it early)."""
    budget = current()
    if budget is None or (budget.deadline is None and budget.memory_cap is None):
        return
    value = prove()
    if value is not None:
        budget.verified(value, what)


def current() -> Budget | None:
    """The budget of the run in progress, None outside one."""
    return _CURRENT.get()


def note(detail: str) -> None:
    """Say what the current phase is doing (shown by :func:`lipsdp.progress.display`); no-op outside a run."""
    budget = _CURRENT.get()
    if budget is not None:
        budget.detail = detail


def step(done: int, total: int) -> None:
    """Say that ``done`` of ``total`` like steps (an l_inf certificate's outputs) are done: the progress
    display then shows an estimate of the time left; no-op outside a run."""
    budget = _CURRENT.get()
    if budget is None:
        return
    now = time.monotonic()
    if done == 0 or budget._steps_start is None:
        budget._steps_start, budget.eta = now, None
    if 0 < done < total:
        budget.eta = now + (now - budget._steps_start) / done * (total - done)


def checkpoint(phase: str | None = None) -> None:
    """Raise :class:`LimitReached` when the current run's limits are spent; with ``phase``, start it.

    Cheap (a clock read; one ``/proc`` read with a memory cap): call it between steps of long loops.
    """
    budget = _CURRENT.get()
    if budget is None:
        return
    if phase is not None and phase != budget.phase:
        budget.enter(phase)
    else:
        budget.check()
