"""The command line's limits, enforced from outside the interpreter: a watchdog process.

Python cannot stop a thread inside a native call, and a watchdog *thread* cannot even run while the main
thread holds the GIL in one: ``scipy.linalg.eigh`` of a 2500x2500 matrix held it for 5.6 s here, longer
than the slack ``--time-limit`` allows.  So ``lipsdp certify`` with a limit starts a small watchdog process
(a bare interpreter, no imports beyond the standard library) that reads the clock and the resident memory
of lipsdp and its solver workers from ``/proc`` every :data:`~lipsdp.budget.POLL` seconds.  When the run
goes its grace (``Budget.grace``) past its deadline, or its memory passes the cap or would pass it before
the next look at the pace of the last tenth of a second (looking twice the last gap ahead, at least six
polls: on a loaded machine the looks come late, and a 50 MB step takes milliseconds), the watchdog prints
lipsdp's one-line report (and, with ``--json``, its JSON object) and sends ``SIGHUP``, for which lipsdp has
installed the C library's ``_exit`` as a native handler: the process ends at once with exit code 1 (SIGHUP
is signal 1), whatever it is doing, and the solver workers die with it (``PR_SET_PDEATHSIG``).  Under
``nohup`` (SIGHUP ignored: a hangup must not end the run) lipsdp runs on in a forked child that the
watchdog ends with SIGKILL, and the parent, which only waits, exits 1.  lipsdp keeps the watchdog informed of the phase, what was done and the best
verified bound through a pipe (:meth:`~lipsdp.budget.Budget.enter` and ``verified``), and closes the pipe
when the run ends: the watchdog then exits without a word.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys

from lipsdp.budget import POLL

# The watchdog process.  argv: parent pid, deadline (time.monotonic(), the same clock in every process;
# -1 for none), memory cap in bytes (-1 for none), poll seconds, the JSON template or "" (no --json), and
# how to end lipsdp: "HUP" (its native handler exits 1) or "KILL".
_WATCHDOG = r"""
import json, os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: lipsdp handles it
ppid, deadline, cap, poll = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
template = json.loads(sys.argv[5]) if sys.argv[5] else None
page, me = os.sysconf("SC_PAGE_SIZE"), os.getpid()
state, buffer, children, listed = {}, b"", [], 0.0
seen = []  # (time, resident bytes) of the looks of the last WINDOW seconds
WINDOW = 0.1

def resident(pid):
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * page
    except (OSError, ValueError, IndexError):
        return 0

def descendants(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids = [int(k) for k in fh.read().split()]
        except (OSError, ValueError):
            continue
        for kid in kids:
            if kid != me:
                found += [kid] + descendants(kid)
    return found

while True:
    ready, _, _ = select.select([0], [], [], poll)
    if ready:
        data = os.read(0, 1 << 16)
        if not data:
            sys.exit(0)
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            state.update(json.loads(line))
    now = time.monotonic()
    which = None
    if deadline >= 0 and now > deadline:
        which = "time"
    elif cap >= 0:
        if now - listed > 0.2:
            children, listed = descendants(ppid), now
        total = resident(ppid) + sum(resident(c) for c in children)
        # The growth until the next look, at the pace of the last WINDOW seconds (one look's growth is no
        # pace: looks come in bursts on a busy machine), over twice the longest of the last gap and three
        # polls: the next wake-up may come later than this one did, and the process grows meanwhile.
        ahead = 0.0
        if seen:
            t_old, old = seen[0]
            if now > t_old:
                ahead = max(total - old, 0) / (now - t_old) * 2 * max(now - seen[-1][0], 3 * poll)
        seen.append((now, total))
        while len(seen) > 1 and now - seen[0][0] > WINDOW:
            del seen[0]
        if total + ahead > cap:
            which = "memory"
    if which is None:
        continue
    spent = dict(state.get("spent", {}))
    phase = state.get("phase", "startup")
    if phase != "startup":
        spent[phase] = spent.get(phase, 0.0) + now - state.get("phase_start", now)
    done = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in spent.items())
    message = (f"{state[which]} reached during {phase} after {now - state['start']:.1f} s"
               f"{f' (done: {done})' if done else ''}{state.get('best', '; no bound verified')}")
    if template is not None:
        os.write(1, (json.dumps({**template, "message": message,
                                 "best_verified_bound": state.get("best_bound")}) + "\n").encode())
    os.write(2, f"lipsdp: {message}\n".encode())
    os.kill(ppid, signal.SIGHUP if sys.argv[6] == "HUP" else signal.SIGKILL)
    sys.exit(0)
"""


def _state(budget) -> dict:
    """What the watchdog needs to report ``budget``'s run: the phases' seconds, the best bound."""
    state = {"phase": budget.phase, "phase_start": budget.phase_start, "spent": budget.spent(current=False)}
    if budget.best:
        state.update(best=f"; best verified bound so far {budget.best[0]:.6g} ({budget.best[1]})",
                     best_bound=budget.best[0])
    return state


@contextlib.contextmanager
def _exit_on_sighup():
    """Make SIGHUP end the process at once with exit code 1: the C library's ``_exit`` as native handler.

    Yields whether it did: not where SIGHUP is ignored or handled already (``nohup``: a hangup must not
    end the run); lipsdp then runs on in a forked child (:func:`supervise`), which the watchdog ends with
    SIGKILL instead (after its one line), and the parent exits 1.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    previous = libc.signal(signal.SIGHUP, ctypes.cast(libc._exit, ctypes.c_void_p).value)
    if previous:  # not SIG_DFL (0): SIG_IGN (1) or a handler of its own; leave it
        libc.signal(signal.SIGHUP, previous)
        yield False
        return
    try:
        yield True
    finally:
        libc.signal(signal.SIGHUP, previous)


def supervise(limited: bool) -> None:
    """Where SIGHUP cannot be lipsdp's (``nohup``), run on in a forked child and end this process as it ends.

    For the command line's own process, before it starts any thread (``limited``: a time or memory limit
    was asked for; otherwise nothing happens).  The watchdog then ends the *child* with SIGKILL (after its
    one line), and this parent, which does nothing but wait, turns that into exit code 1, the code of a
    limit reached.  Returns in the child; never returns in the parent, which passes SIGINT and SIGTERM on
    to the child (Ctrl-C reaches both, one process group: the child ends once, at the first) and exits
    with the child's exit code.
    """
    if not limited or not sys.platform.startswith("linux") or signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        return
    for sig in (signal.SIGINT, signal.SIGTERM):  # one sent to this process alone reaches the child too
        signal.signal(sig, lambda number, _frame: os.kill(child, number))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:  # pragma: no cover (PEP 475 retries; kept for clarity)
            continue
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        os._exit(1)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)  # no flush: the child wrote this process's buffers already


@contextlib.contextmanager
def guard(budget, json_template: dict | None = None, stderr=None, stdout=None):
    """Enforce ``budget``'s limits on this process from a watchdog process while the block runs.

    ``json_template``: with ``--json``, the object printed on stdout when a limit is reached (its
    ``message`` and ``best_verified_bound`` are filled in).  ``stderr`` / ``stdout``: where the watchdog
    writes (default: this process's descriptors 2 and 1 as they are now).
    """
    if (budget.deadline is None and budget.memory_cap is None) or not sys.platform.startswith("linux"):
        yield
        return
    # A little after lipsdp's own check (LimitReached), so that one reports a limit it reaches first.
    deadline = -1.0 if budget.deadline is None else budget.deadline + budget.grace + 0.2
    cap = -1 if budget.memory_cap is None else budget.memory_cap
    limits = {"start": budget.start}
    if budget.time_limit:
        limits["time"] = f"time limit of {budget.time_limit:g} s"
    if budget.memory_limit is not None:
        limits["memory"] = f"memory limit of {budget.memory_limit / 2**30:.3g} GiB"
    # The handler stays also around the end: a watchdog that already decided still ends the process.
    with _exit_on_sighup() as hup:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), repr(deadline),
                                 str(cap), repr(POLL), "" if json_template is None else json.dumps(json_template),
                                 "HUP" if hup else "KILL"],
                                stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, close_fds=True)

        def tell(state):
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.write((json.dumps(state) + "\n").encode())
                proc.stdin.flush()

        tell({**limits, **_state(budget)})
        previous = budget.on_change
        budget.on_change = lambda b: tell(_state(b))
        try:
            yield
        finally:
            budget.on_change = previous
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()  # the run is over: the watchdog leaves without a word
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:  # pragma: no cover
                proc.kill()
                proc.wait()
