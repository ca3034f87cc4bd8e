"""A spinner on stderr for long solves (the solve stage's only user interface)."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager


@contextmanager
def spinner(text: str, enabled: bool, delay: float = 1.0):
    """Show ``text`` and the elapsed seconds on stderr while the block runs, once it has run ``delay`` s.

    Short solves print nothing, and neither does a run whose stderr is not a
    terminal (logs, pipes, ``--json``).  The spinner runs in a daemon thread so a
    solver holding the main thread in native code still shows progress.
    """
    if not enabled or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    done = threading.Event()
    t0 = time.monotonic()

    def spin():
        if done.wait(delay):
            return
        status = console.status(f"{text} ({delay:.0f} s)")
        status.start()
        try:
            while not done.wait(1.0):
                status.update(f"{text} ({time.monotonic() - t0:.0f} s; Ctrl-C stops, --time-limit bounds it)")
        finally:
            status.stop()

    thread = threading.Thread(target=spin, name="lipsdp-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2.0)
