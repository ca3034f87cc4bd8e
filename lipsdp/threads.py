"""How many threads BLAS, OpenMP and torch use during a run, chosen by lipsdp for the problem and the machine.

NumPy's, SciPy's and torch's thread pools start one thread per core.  On small problems (the LMIs of
most nets are a few hundred to a few thousand rows) the threads spend more time waiting for each other
than computing, and on a machine whose cores are busy with other work they spin against it: the README's
first command took tens of times longer in the solve with the default pools than with one thread on a
shared 2-core machine (figures in docs/solvers.md).  So a run limits the pools with ``threadpoolctl``
(every BLAS and OpenMP library loaded in the process) and ``torch.set_num_threads``, sets
``OMP_NUM_THREADS`` and its siblings for the solver worker processes it starts, and puts everything back
afterwards.  :func:`choose` picks the count; ``--threads N`` / ``threads=N`` overrides it.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time

from threadpoolctl import ThreadpoolController, threadpool_limits

#: LMI rows per thread: below this a second thread costs more than it brings.
ROWS_PER_THREAD = 2000
#: Seconds over which :func:`busy_elsewhere` measures the other processes' use of the CPUs (``/proc/stat``
#: counts in hundredths of a second: a tenth gives the share of each CPU to about a tenth).
BUSY_WINDOW = 0.1
#: What the pools of the process's solver workers read when they start.
ENVIRONMENT = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
               "NUMEXPR_NUM_THREADS")

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("lipsdp_threads", default=None)


def cores() -> int:
    """CPUs this process may run on (its affinity mask and, in a container, its cgroup's CPU quota)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota, period = fh.read().split()
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def choose(rows: int | None = None) -> int:
    """Threads for a problem of ``rows`` LMI rows (None: not known yet, e.g. while loading).

    One per :data:`ROWS_PER_THREAD` rows, at most the cores that are idle: the cores of :func:`cores`
    less those other processes keep busy (:func:`busy_elsewhere`).
    """
    if not rows or rows < 2 * ROWS_PER_THREAD:
        return 1
    now = time.monotonic()
    if _LAST_BUSY[0] is None or now - _LAST_BUSY[0] > 2.0:  # one measurement serves the calls of a few seconds
        _LAST_BUSY[:] = [now, busy_elsewhere()]
    return max(1, min(rows // ROWS_PER_THREAD, int(cores() - _LAST_BUSY[1] + 0.5)))


_LAST_BUSY: list = [None, 0.0]  # (time.monotonic() of the last measurement, its CPUs)


def _cpu_times() -> tuple[int, int]:
    """``(idle + iowait, total)`` clock ticks of every CPU since boot (``/proc/stat``)."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:9]]
    return ticks[3] + ticks[4], sum(ticks)


def _own_cpu() -> float:
    return time.process_time()  # every thread of this process


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def busy_elsewhere(window: float = BUSY_WINDOW) -> float:
    """CPUs other processes keep busy now: the non-idle share of every CPU over ``window`` seconds
    (``/proc/stat``) less this process's own CPU time in it (its BLAS threads may still spin after a call).

    Not the load average: a minute's memory, so a run just finished (a loop of certifications, a
    benchmark) still counted as a busy core for the next one, which then ran on one thread.  Where
    ``/proc/stat`` cannot be read: the load average less this process's own one.
    """
    try:
        idle0, total0 = _cpu_times()
        own0 = _own_cpu()
        _pause(window)
        idle1, total1 = _cpu_times()
        own = _own_cpu() - own0
    except (OSError, ValueError, IndexError):
        try:
            return max(0.0, os.getloadavg()[0] - 1.0)
        except OSError:
            return 0.0
    span = total1 - total0
    if span <= 0:
        return 0.0
    cpus = os.cpu_count() or 1
    busy = (1.0 - (idle1 - idle0) / span) * cpus
    return max(0.0, busy - own / window)


class Pools:
    """The thread limits of one run; :meth:`fit` re-limits them, :meth:`restore` puts the originals back."""

    def __init__(self, requested: int | None = None):
        self.requested = requested
        self.count = None
        self._limiters, self._torch, self._environ = [], None, {}

    def fit(self, rows: int | None = None) -> int:
        """Limit every pool loaded now (libraries load lazily: call again after loading torch) to
        ``requested`` threads, or to :func:`choose` for ``rows``."""
        count = self.requested or choose(rows)
        torch = sys.modules.get("torch")
        if torch is not None and self._torch is None:  # before threadpoolctl: torch reads OpenMP's count
            self._torch = torch.get_num_threads()
        self._limiters.append(ThreadpoolController().limit(limits=count))
        if torch is not None:
            torch.set_num_threads(count)
        for name in ENVIRONMENT:
            self._environ.setdefault(name, os.environ.get(name))
            os.environ[name] = str(count)
        self.count = count
        return count

    def restore(self) -> None:
        for limiter in reversed(self._limiters):
            limiter.restore_original_limits()
        self._limiters.clear()
        torch = sys.modules.get("torch")
        if torch is not None and self._torch is not None:
            torch.set_num_threads(self._torch)
        for name, value in self._environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._environ.clear()


@contextlib.contextmanager
def limited(requested: int | None = None):
    """Limit the thread pools for the block (``requested`` threads, or chosen by :func:`fit`)."""
    pools = Pools(requested)
    token = _CURRENT.set(pools)
    pools.fit()
    try:
        yield pools
    finally:
        _CURRENT.reset(token)
        pools.restore()


def blas(threads: int | None):
    """Limit BLAS to ``threads`` threads for a ``with`` block (None: as it is).

    For a solver whose iteration is many small products run two at a time (:func:`both`) and a few
    large ones: the small ones lose to a second BLAS thread's start and join."""
    return contextlib.nullcontext() if threads is None else threadpool_limits(limits=threads, user_api="blas")


def fit(rows: int | None = None) -> int | None:
    """Re-limit the current run's pools for a problem of ``rows`` LMI rows; None outside a run."""
    pools = _CURRENT.get()
    return None if pools is None else pools.fit(rows)


def count() -> int | None:
    """Threads of the current run (what a solver worker process should use), None outside one."""
    pools = _CURRENT.get()
    return None if pools is None else pools.count


def both(first, second, threads: int = 2):
    """``(first(), second())``: with ``threads >= 2``, ``second`` runs in a helper thread while ``first``
    runs in this one, each on ``threads // 2`` BLAS threads, the BLAS limits put back afterwards; with
    fewer, one after the other as they are.

    For two independent large products of one solver iteration (NumPy's ``matmul`` releases the GIL):
    on two cores two single-threaded products of shape ``(64, 64) x (64, 8000)`` gain more than one
    product on two BLAS threads, which splits too thin an operand.  The callables must not write
    to the same arrays.  An exception in either is raised here, after both have finished.
    """
    if threads < 2:
        return first(), second()
    box: dict = {}

    def run():
        try:
            box["value"] = second()
        except BaseException as exc:  # raised in the caller's thread below
            box["error"] = exc

    # Looked up each time (about a millisecond): a BLAS loaded since (torch's) is limited too.
    limiter = ThreadpoolController().select(user_api="blas").limit(limits=threads // 2)
    try:
        worker = threading.Thread(target=run, name="lipsdp-both", daemon=True)
        worker.start()
        try:
            value = first()
        finally:
            worker.join()
    finally:
        limiter.restore_original_limits()
    if "error" in box:
        raise box["error"]
    return value, box["value"]


def halves(work, n: int, threads: int = 2, split: int | None = None):
    """``work(0, h)`` and ``work(h, n)`` at once (:func:`both`), ``h = n // 2`` or ``split``; with ``threads < 2``
    the one call ``work(0, n)``.  For loops over rows, block rows or tiles whose halves write apart."""
    if threads < 2:
        return work(0, n)
    h = n // 2 if split is None else split
    return both(lambda: work(0, h), lambda: work(h, n), threads)
