"""What a run is doing, on stderr: the phase (load, build, solve, verify), what it works on, the seconds
spent and, under a time limit, the seconds left.

The stages report through the run's :class:`~lipsdp.budget.Budget`: :meth:`~lipsdp.budget.Budget.enter`
starts a phase, :func:`~lipsdp.budget.note` says what is being done (the LMI being solved; a backend may
note its iterations and the best verified bound), and :func:`display` shows it.  Nothing is shown for runs
shorter than a second or when stderr is not a terminal (logs, pipes), unless asked for
(``progress="always"``).  The display runs in a daemon thread, so a solver holding the main thread in
native code still shows progress.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


def line(budget) -> str:
    """One status line for ``budget``'s run: ``solve: a 300x300 LMI (output 2) with sdpa (4 s; about 9 s to go;
    at most 16 s left)``: the estimate once a first l_inf output is done, the limit's seconds left."""
    now = time.monotonic()
    text = budget.phase + (f": {budget.detail}" if budget.detail else "")
    left = budget.seconds_left()
    eta = "" if budget.eta is None else f"; about {max(budget.eta - now, 0.0):.0f} s to go"
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
