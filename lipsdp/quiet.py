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
import threading
import warnings


def _writes_to_descriptor_2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


_LOCK = threading.Lock()
#: How many blocks (in any thread) are in :func:`dropped` now, and what the first one saved.
_STATE = {"depth": 0, "saved": None, "original": None, "terminal": None}


def _enter() -> bool:
    """Redirect descriptor 2 for the first block in; False where there is no descriptor 2."""
    with _LOCK:
        if _STATE["depth"] == 0:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
            except (OSError, ValueError, AttributeError):  # no descriptor 2 (some embedded interpreters)
                return False
            original, terminal = sys.stderr, None
            if _writes_to_descriptor_2(original):
                terminal = open(saved, "w", buffering=1, encoding=getattr(original, "encoding", None) or "utf-8",
                                errors="backslashreplace", closefd=False)
                sys.stderr = terminal
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
            _STATE.update(saved=saved, original=original, terminal=terminal)
        _STATE["depth"] += 1
        return True


def _leave() -> None:
    """Put descriptor 2 (and ``sys.stderr``) back when the last block leaves."""
    with _LOCK:
        _STATE["depth"] -= 1
        if _STATE["depth"]:
            return
        if _STATE["terminal"] is not None:
            _STATE["terminal"].flush()
            sys.stderr = _STATE["original"]
            _STATE["terminal"].close()
        os.dup2(_STATE["saved"], 2)
        os.close(_STATE["saved"])
        _STATE.update(saved=None, original=None, terminal=None)


@contextlib.contextmanager
def dropped(enabled: bool = True):
    """Within the block, native output to descriptor 2 is discarded and Python warnings are ignored.

    Blocks may nest and overlap across threads (``lipsdp.certify`` called from several threads): the
    first one in redirects, the last one out restores.
    """
    if not enabled or not _enter():
        yield
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _leave()
