"""Keep what solvers and numerical libraries print off the user's terminal.

SDPA's C++ code writes "Strange behavior : primal < dual" and the like straight to the process's file
descriptors, and ARPACK, cvxpy and the backends raise Python warnings; none of it changes a verified
bound, and users read it as an error.  :func:`dropped` sends file descriptor 2 (where
:func:`~lipsdp.solvers.base.native_output_to_stderr` also sends descriptor 1 during a solve) to
``os.devnull`` for the block and ignores Python warnings; lipsdp's own lines (the progress display,
errors) still reach the terminal, because ``sys.stderr``, when it writes to descriptor 2, is re-pointed
at a copy of the original descriptor.  Both ``lipsdp.certify`` and the command line use it, unless
``verbose=True`` / ``--debug``.  Descriptor 2 is the process's: other threads' native output during the
block is dropped too.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings


def _writes_to_descriptor_2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


@contextlib.contextmanager
def dropped(enabled: bool = True):
    """Within the block, native output to descriptor 2 is discarded and Python warnings are ignored."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 (some embedded interpreters)
        yield
        return
    original = sys.stderr
    terminal = None
    if _writes_to_descriptor_2(original):
        terminal = open(saved, "w", buffering=1, encoding=getattr(original, "encoding", None) or "utf-8",
                        errors="backslashreplace", closefd=False)
        sys.stderr = terminal
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if terminal is not None:
            terminal.flush()
            sys.stderr = original
            terminal.close()
        os.dup2(saved, 2)
        os.close(saved)
