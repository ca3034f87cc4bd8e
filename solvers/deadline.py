"""Wall-clock limits for backends that have none: the solve runs in a worker process that is killed at the limit.

SDPA and CVXOPT have iteration limits (``maxIteration``, ``maxiters``) but no
time limit, and neither offers a per-iteration callback; SDPA does all its
work in one C++ call that Python cannot interrupt.  So when a limit is asked
for, :func:`solve_in_child` sends the LMI to a worker process (a fresh
interpreter, ``python -c``) and kills the worker when the limit passes; the
result is ``time_limit`` with no point, so nothing unfinished can become a
bound.  A worker that dies (a native crash, the OOM killer) becomes a
``solver_error`` instead of taking lipsdp down with it.

Why a plain interpreter and not :mod:`multiprocessing`: its ``spawn`` and
``forkserver`` children re-import the caller's main script, which breaks every
user script without an ``if __name__ == "__main__"`` guard, and ``fork`` would
copy locks held by the parent's threads (torch's pool, the progress spinner).

Workers are kept between solves (an l_inf certificate solves once per output):
the first solve with a limit pays for starting Python and importing cvxpy
later ones only for pickling the LMI.  The limit counts
from the moment the worker starts the solve, as a native limit does.  Without
a limit, backends solve in-process and none of this runs.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from lipsdp import threads as thread_pools
from lipsdp.budget import current
from lipsdp.solvers.base import SolveResult

#: Seconds a new worker may take to start (interpreter and imports).
STARTUP_LIMIT = 300.0

#: Every live worker process; a hard exit on Ctrl-C (``lipsdp.cli``) kills them.
ACTIVE: set = set()

_IDLE: list = []
_LOCK = threading.Lock()

# The worker's entry point: the parent's sys.path first (lipsdp may run from a
# source tree), then the loop.  Kept tiny so that nothing runs before sys.path is set.
_BOOT = ("import sys, pickle; sys.path[:] = pickle.load(sys.stdin.buffer); "
         "from lipsdp.solvers.deadline import _worker_main; _worker_main()")


def _worker_main() -> None:
    """Worker side: announce readiness, then solve requests until the parent closes the pipe."""
    # Ctrl-C belongs to the parent, which kills this process; a worker traceback would be noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):  # die with the parent even if it is killed outright
        try:
            ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        except (OSError, AttributeError):
            pass
    requests = Connection(os.dup(0), writable=False)
    replies = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # native solver output goes to stderr, never into the reply pipe or ``--json``
    # Warm: the first request should not pay for cvxpy (the backend's own module is imported when
    # the request is unpickled, before the worker reports "started", so outside the limit).
    import cvxpy  # noqa: F401
    from threadpoolctl import threadpool_limits

    replies.send(("ready", None))
    while True:
        try:
            backend, lmi, tol, verbose, threads = requests.recv()
        except EOFError:
            return
        replies.send(("started", None))
        try:
            with threadpool_limits(limits=threads):  # the parent's choice (lipsdp.threads); None: as started
                result = backend.solve(lmi, time_limit=None, tol=tol, verbose=verbose)
        except Exception as exc:  # the parent decides what a backend failure means
            try:
                replies.send(("error", exc))
            except Exception:  # an unpicklable exception still reports its type and text
                replies.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))
        else:
            replies.send(("done", result))


class _Worker:
    """One worker process and the two pipes to it."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, close_fds=True)
        ACTIVE.add(self)
        self.proc.stdin.write(pickle.dumps(list(sys.path)))
        self.proc.stdin.flush()
        self.requests = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.replies = Connection(os.dup(self.proc.stdout.fileno()), writable=False)

    def kill(self) -> None:
        ACTIVE.discard(self)
        for conn in (self.requests, self.replies):
            conn.close()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: a solver inside C code ignores nothing else reliably
        self.proc.wait()

    def close(self) -> None:
        """Let an idle worker exit on its own (end of its request pipe), killing it if it lingers."""
        ACTIVE.discard(self)
        self.requests.close()
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _not_started(backend, t0: float, what: str) -> SolveResult:
    """The result of a worker that did not get to solving: ``time_limit`` where the run's time ran out
    first (it was killed), ``solver_error`` otherwise."""
    seconds = time.perf_counter() - t0
    budget = current()
    if budget is not None and budget.seconds_left() is not None and budget.seconds_left() <= budget.grace / 2:
        return SolveResult("time_limit", None, None, seconds,
                           message=f"stopped at the {budget.time_limit:g} s time limit (the {backend.name} worker "
                                   f"process {what} in time and was killed)")
    return SolveResult("solver_error", None, None, seconds,
                       message=f"the {backend.name} worker process {what} within {STARTUP_LIMIT:g} s")


def stop_all() -> None:
    """Kill every worker (a hard exit on Ctrl-C; also at interpreter exit)."""
    for worker in list(ACTIVE):
        try:
            worker.kill()
        except Exception:  # best effort: the process is exiting anyway
            pass


atexit.register(stop_all)


def _receive(worker: _Worker, timeout: float):
    """The worker's next message, None after ``timeout`` seconds; EOFError when it died."""
    if not worker.replies.poll(timeout):
        return None
    return worker.replies.recv()


def _startup_wait() -> float:
    """Seconds to wait for a worker to start or take the LMI: :data:`STARTUP_LIMIT`, or less when the
    run's time limit (:mod:`lipsdp.budget`) ends sooner."""
    budget = current()
    left = None if budget is None else budget.seconds_left()
    return STARTUP_LIMIT if left is None else max(min(STARTUP_LIMIT, left + budget.grace / 2), 0.0)


def solve_in_child(backend, lmi, time_limit: float, *, tol=None, verbose=False) -> SolveResult:
    """``backend.solve(lmi)`` in a worker process, killed after ``time_limit`` seconds of solving.

    Parameters
    ----------
    backend : Backend
        Picklable and importable by the worker (backends are plain classes);
        its ``solve`` runs there without a limit.
    lmi : LMIProblem
    time_limit : float
        Seconds from the worker's start of the solve to its termination.
    tol : float, optional
    verbose : bool

    Returns
    -------
    SolveResult
        The worker's result; ``time_limit`` with ``x=None`` when it was killed;
        ``solver_error`` when it died.  ``extras["child_overhead"]`` holds the
        seconds spent outside the solve (starting a worker, moving the data).

    Raises
    ------
    Exception
        Whatever the backend raised in the worker (re-raised here, so a
        :class:`~lipsdp.errors.LipSDPError` keeps its meaning).
    """
    t0 = time.perf_counter()
    with _LOCK:
        worker = _IDLE.pop() if _IDLE else None
    keep = False
    try:
        if worker is None or worker.proc.poll() is not None:
            worker = _Worker()
            if _receive(worker, _startup_wait()) is None:
                return _not_started(backend, t0, "did not start")
        worker.requests.send((backend, lmi, tol, verbose, thread_pools.count()))
        if _receive(worker, _startup_wait()) is None:  # "started": the LMI arrived
            return _not_started(backend, t0, "did not receive the LMI")
        t_start = time.perf_counter()
        reply = _receive(worker, time_limit)
        if reply is None:
            return SolveResult("time_limit", None, None, time.perf_counter() - t0,
                               message=f"stopped at the {time_limit:g} s time limit ({backend.name} has no "
                                       "native time limit: its worker process was killed)",
                               extras={"child_overhead": t_start - t0})
        kind, payload = reply
        keep = True
    except (EOFError, OSError):
        worker.proc.wait()
        return SolveResult("solver_error", None, None, time.perf_counter() - t0,
                           message=f"the {backend.name} worker process died (exit code {worker.proc.returncode})")
    finally:
        if keep:
            with _LOCK:
                _IDLE.append(worker)
        elif worker is not None:
            worker.kill()
    if kind == "error":
        raise payload
    payload.extras = {**payload.extras, "child_overhead": (time.perf_counter() - t0) - payload.seconds}
    return payload
