"""One certification's surroundings: its limits, thread pools, quiet solvers and progress display.

:func:`run` is entered once per call of :func:`lipsdp.certify` / :func:`lipsdp.certify_network` (and by
``lipsdp certify``, which sets its own limits first); a nested call joins the run in progress.
"""

from __future__ import annotations

import contextlib

from lipsdp import threads as thread_pools
from lipsdp.budget import Budget, current
from lipsdp.progress import display
from lipsdp.quiet import dropped


@contextlib.contextmanager
def run(time_limit=None, memory_limit=None, *, threads=None, progress=False, verbose=False, budget=None):
    """The context of one certification: its :class:`~lipsdp.budget.Budget` (deadline and memory cap
    over every phase), its thread pools (:mod:`lipsdp.threads`), solver output kept off the terminal
    unless ``verbose`` (:mod:`lipsdp.quiet`) and the progress display.  Within a run already
    in progress (``certify`` calling ``certify_network``, or the command line) it adds nothing.

    ``budget``: one made by the caller (the command line's counts from the process's start, caps its
    whole memory and is enforced by :mod:`lipsdp.watchdog` too).
    """
    if current() is not None:
        yield current()
        return
    budget = budget or Budget(time_limit, memory_limit)
    with dropped(not verbose), thread_pools.limited(threads), budget.active(), display(budget, progress):
        yield budget
