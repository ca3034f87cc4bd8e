"""The ``lipsdp`` command line.

``lipsdp certify model.pt`` prints a table (or one JSON object with ``--json``)
and exits 0 when a bound was verified (also from the unfinished point of a
``--time-limit`` hit), 1 when no verified bound came out of the solver, and 2
for bad input (missing or unreadable file, unsupported layers, NaN weights,
unknown or unlicensed solver...).  Errors are one line on stderr; ``--debug``
shows the traceback.  ``--time-limit`` and ``--memory-limit`` cover the whole
command, counted from the process's start: when one is reached before a
verified bound, the command stops with one line saying what was done (and the
best bound verified so far, if any) and exit code 1 (:mod:`lipsdp.budget`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time

import psutil

from lipsdp import __version__, arguments, robustness_cli
from lipsdp import monotone_cli
from lipsdp.budget import Budget, LimitReached
from lipsdp.certificate import WRITING, Certificate
from lipsdp.errors import LipSDPError, ResourceError
from lipsdp.local import read_region
from lipsdp.checking import check_certificate
from lipsdp.composition import check_composed
from lipsdp.pipeline import certify
from lipsdp.quiet import dropped
from lipsdp.resources import keep_freed_memory
from lipsdp.session import run
from lipsdp.solvers import describe
from lipsdp.watchdog import guard, supervise






class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 2 with one line, as for every other bad input
        self.print_usage(sys.stderr)
        print(f"lipsdp: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lipsdp", description="Certified upper bounds on the Lipschitz constant of neural networks (LipSDP).")
    p.add_argument("--version", action="version", version=f"lipsdp {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("certify", help="certify an l2 or l_inf Lipschitz bound for a model file")
    c.add_argument("model", help="model file: torch.save'd module (.pt), TorchScript, torch.export (.pt2), "
                                 "ONNX, checkpoint/state_dict (needs --activation) or LipSDP .mat")
    c.add_argument("--solver", default="auto",
                   help="auto (default: a licensed MOSEK, else lipsdp's own completion / chordal / ipm for "
                        "slope-restricted nets and fo for l2 LMIs beyond size 3000, else SDPA / CVXOPT / SCS), "
                        "mosek, completion, chordal, ipm, fo, scs, sdpa, cvxopt, clarabel; `lipsdp solvers` "
                        "lists them")
    c.add_argument("--formulation", default="neuron", choices=["neuron", "layer"],
                   help="LipSDP-Neuron (default, tighter) or LipSDP-Layer")
    c.add_argument("--norm", default="l2", choices=["l2", "linf"],
                   help="l2 (default) or linf (every output's l_inf -> |.| constant; their maximum)")
    c.add_argument("--output", type=int, metavar="I", help="certify only output I (e.g. one logit)")
    c.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    c.add_argument("--input-shape", type=arguments.shape, help="input shape without batch axis, e.g. 1,28,28")
    c.add_argument("--horizon", type=arguments.horizon, metavar="T|all",
                   help="nn.RNN models: certify sequences of T steps, or 'all' for one bound valid for every T")
    c.add_argument("--activation", help="activation between layers, for weights-only files (relu, tanh, ...)")
    c.add_argument("--time-limit", type=arguments.positive, metavar="SECONDS",
                   help="seconds for the whole command (load, build, solve, verify), from its start; the solver "
                        "gets most of what is left and its unfinished point is still verified")
    c.add_argument("--memory-limit", type=arguments.memory_size, metavar="SIZE",
                   help="peak resident memory of the whole command, solver processes included (e.g. 2G, 500M); "
                        "what would not fit is refused before it starts, and the command stops (exit 1) if "
                        "it is reached anyway")
    c.add_argument("--threads", type=arguments.positive_int, metavar="N",
                   help="threads for BLAS, OpenMP and torch (default: chosen for the problem size and the idle "
                        "cores; environment variables such as OMP_NUM_THREADS are not needed)")
    c.add_argument("--progress", action="store_true",
                   help="show progress on stderr also with --json or when stderr is not a terminal")
    c.add_argument("--tol", type=arguments.positive, help="solver tolerance")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary classes in pickled models (runs code from the file: only for files you trust)")
    c.add_argument("--samples", type=int, default=128, help="random inputs for the sampled lower bound (0: skip)")
    c.add_argument("--split", type=arguments.positive_int, metavar="K", default=None,
                   help="certify a chain network in pieces of K activation layers and multiply their bounds "
                        "(sound, looser; for nets too big for one SDP; l2 only). Without it lipsdp splits only "
                        "when the whole LMI does not fit in memory")
    c.add_argument("--structure", choices=("auto", "unrolled", "state-space", "both"), default="auto",
                   help="convolutions unrolled, or as 2-D state-space LMIs whose size does not grow with the image "
                        "(stride-1 conv chains, l2; can be looser); both: keep the better, report both")
    c.add_argument("--strict", action="store_true",
                   help="also prove the certificate exactly in rational arithmetic (slope-restricted activations)")
    c.add_argument("--center", metavar="X.npy", help="a local bound: on the ball of --radius around this input (.npy)")
    c.add_argument("--radius", type=float, metavar="R", help="radius of the local bound's ball (with --center)")
    c.add_argument("--region-norm", choices=["l2", "linf", "2", "inf"],
                   help="norm of the local bound's ball (default: --norm, the Lipschitz norm)")
    c.add_argument("--save", metavar="CERT.json", help="write the certificate (multipliers, weights hash) to a file")
    c.add_argument("--debug", action="store_true",
                   help="show tracebacks, and what solvers print (kept off the terminal otherwise)")

    v = sub.add_parser("verify", help="re-check a saved certificate against a model, without solving")
    v.add_argument("certificate", help="file written by `lipsdp certify --save`")
    v.add_argument("model", help="the model file that was certified")
    v.add_argument("--activation", help="for weights-only files, as when certifying")
    v.add_argument("--input-shape", type=arguments.shape)
    v.add_argument("--trust-pickle", action="store_true")
    v.add_argument("--json", action="store_true")
    v.add_argument("--debug", action="store_true",
                   help="show tracebacks, and what numerical libraries print (kept off the terminal otherwise)")

    robustness_cli.add_parser(sub)
    monotone_cli.add_parser(sub)

    s = sub.add_parser("solvers", help="list solver backends: installed, licensed, how to add the rest")
    s.add_argument("--json", action="store_true")
    return p


def _console(file=None):
    """A rich console; wide when writing to a pipe or file so cells are not cut."""
    from rich.console import Console

    file = file or sys.stdout
    return Console(file=file, soft_wrap=True, width=None if file.isatty() else 200)


def _print_table(rows, title=None, file=None):
    try:
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        for k, v in rows:
            print(f"{k}: {v}", file=file)
        return
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    from rich.markup import escape

    for k, v in rows:
        table.add_row(escape(k), escape(v))
    _console(file).print(table)


#: Seconds past ``--time-limit`` before the command stops (the API allows :data:`lipsdp.budget.GRACE`).
CLI_GRACE = 0.5


def _process_start() -> float:
    """``time.monotonic()`` at this process's start: limits count the interpreter's start and imports too.

    From ``/proc`` (the start in clock ticks after boot, and the seconds since boot: 10 ms resolution;
    psutil's ``create_time`` goes through the boot time in whole seconds, up to a second off).
    """
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.monotonic() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # not Linux
        return time.monotonic() - max(0.0, time.time() - psutil.Process().create_time())


def _limit_reached(args, message: str, budget) -> int:
    """Report a spent limit: one line on stderr and, with ``--json``, one object on stdout; exit code 1."""
    with _OUTPUT:
        if args.json:
            best = budget.best[0] if budget is not None and budget.best else None
            print(json.dumps({"verified": False, "bound": None, "status": "limit_reached", "model": args.model,
                              "message": message, "best_verified_bound": best}), flush=True)
        print(f"lipsdp: {message}", file=sys.stderr, flush=True)
    return 1


def _cmd_certify(args, own_process: bool) -> int:
    if own_process and args.memory_limit is None:
        keep_freed_memory()  # page faults on fresh pages were a large share of big runs (lipsdp.resources)
    budget = Budget(args.time_limit, args.memory_limit, absolute=True, grace=CLI_GRACE,
                    start=getattr(args, "process_start", None) if own_process else None)
    template = {"verified": False, "bound": None, "status": "limit_reached", "model": args.model} \
        if args.json else None
    # The process's own command: a watchdog process enforces the limits, also inside native calls.
    watch = guard(budget, template, stderr=sys.stderr) if own_process else contextlib.nullcontext()
    try:
        with watch, run(budget=budget, threads=args.threads, verbose=args.debug,
                        progress="always" if args.progress else not args.json):
            cert = certify(args.model, solver=args.solver, formulation=args.formulation, norm=args.norm,
                           output_index=args.output, activation=args.activation, input_shape=args.input_shape,
                           time_limit=args.time_limit, tol=args.tol, trust_pickle=args.trust_pickle,
                           lower_bound_samples=max(args.samples, 0), strict=args.strict, split=args.split,
                           structure=args.structure, horizon=args.horizon,
                           **read_region(args.center, args.radius, args.region_norm))
    except LimitReached as exc:
        if args.debug:
            raise
        return _limit_reached(args, str(exc), budget)
    except ResourceError as exc:
        # Refused before allocating because of the user's --memory-limit: that limit is reached (exit 1, with the
        # best verified bound so far); without one, the machine cannot hold the problem (exit 2, as bad input).
        if args.debug or args.memory_limit is None:
            raise
        best = f"; best verified bound so far {budget.best[0]:.6g} ({budget.best[1]})" if budget.best else \
            "; no bound verified"
        return _limit_reached(args, f"memory limit of {args.memory_limit / 2**30:.3g} GiB reached during "
                                    f"{budget.phase}: {exc}{best}", budget)
    except MemoryError:
        if args.debug:
            raise
        return _limit_reached(args, f"out of memory during {budget.phase} (try --memory-limit, --split K "
                                    "or a smaller network)", budget)
    with _OUTPUT:
        if args.save:
            cert.save(args.save)
        if args.json:
            print(cert.to_json(), flush=True)
        else:
            _print_table(cert.summary_rows(), title=f"lipsdp certify {args.model}")
            print(cert.message, flush=True)
    return 0 if cert.verified else 1


def _what_was_certified(cert) -> str:
    """``l2``, ``linf``, ``linf, output 3`` or ``l2, output map 2x10``: what a certificate bounds."""
    if cert.output_map is None:
        return cert.norm
    rows = cert.output_map
    if len(rows) == 1 and sorted(rows[0]).count(0) == len(rows[0]) - 1 and max(rows[0]) == 1:
        return f"{cert.norm}, output {rows[0].index(1)}"
    return f"{cert.norm}, output map {len(rows)}x{len(rows[0])}"


def _cmd_verify(args) -> int:
    try:
        cert = Certificate.load(args.certificate)
        if (cert.verification or {}).get("method") == "composition":  # lipsdp.compose: block by block
            cert = check_composed(cert, args.model, trust_pickle=args.trust_pickle)
        else:
            cert = check_certificate(cert, args.model, activation=args.activation, input_shape=args.input_shape,
                                     trust_pickle=args.trust_pickle)
    except LipSDPError as exc:
        if args.json:  # scripts read one object on stdout either way; the error line still goes to stderr
            with _OUTPUT:
                print(json.dumps({"verified": False, "error": str(exc), "model": args.model}), flush=True)
        raise
    seconds = cert.verification["recheck_seconds"]
    if args.json:
        per_output = cert.network.get("per_output") if cert.norm == "linf" else None
        text = json.dumps({"verified": True, "bound": cert.bound, "status": "verified", "norm": cert.norm,
                           "model": args.model, "output_map": cert.output_map,
                           "per_output": None if per_output is None else [p.get("bound") for p in per_output],
                           "seconds": seconds})
    else:
        where = (f" on the {cert.region['norm']} ball of radius {cert.region['radius']:g} around its center"
                 if cert.region else " for every horizon" if cert.formulation == "dissipation" else "")
        text = (f"certificate holds: {args.model} is {cert.bound:.6g}-Lipschitz ({_what_was_certified(cert)}){where}, "
                f"re-checked in {seconds:.2f} s")
    with _OUTPUT:
        print(text, flush=True)
    return 0


def _cmd_solvers(args) -> int:
    rows = describe()
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="lipsdp solver backends (auto: licensed MOSEK, else the fastest open-source one)")
    for col in ("name", "installed", "usable", "status", "family", "install"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "yes" if r["installed"] else "no", "yes" if r["usable"] else "no",
                      escape(r["status"]), r["family"], escape(r["install"]))
    _console().print(table)
    return 0


_INTERRUPTED = "lipsdp: interrupted"
_announced = threading.Lock()
#: Held while results are written (``--save``, stdout): Ctrl-C waits for it, so output is whole or absent.
_OUTPUT = threading.Lock()


def _announce_interrupt() -> None:
    """Print the one line about Ctrl-C, once, whichever thread gets there first."""
    if _announced.acquire(blocking=False):
        print(_INTERRUPTED, file=sys.stderr, flush=True)


def _exit_interrupted() -> None:
    """Leave now, from the watcher thread: one line, exit 130, no partial output, no orphan solver process.

    Output being written is finished first (``_OUTPUT``); anything still in
    ``sys.stdout``'s buffer is dropped with the process, so stdout holds a whole
    JSON object or nothing.  Temporary files of :meth:`Certificate.save` are
    removed; the destination is only ever replaced atomically, never partial.
    """
    _OUTPUT.acquire(timeout=10.0)
    _announce_interrupt()
    for tmp in list(WRITING):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    deadline = sys.modules.get("lipsdp.solvers.deadline")
    if deadline is not None:
        deadline.stop_all()
    with contextlib.suppress(Exception):
        if sys.stderr.isatty():  # the progress spinner hides the cursor
            sys.stderr.write("\x1b[?25h")
            sys.stderr.flush()
    os._exit(130)


@contextlib.contextmanager
def _interrupts():
    """Make Ctrl-C end the command at once: exit 130, one line, nothing half-written.

    Why not ``KeyboardInterrupt``: native solvers take SIGINT for themselves
    (SCS and SDPA install their own handlers and return an "interrupted" result,
    which lipsdp would then report and save), Python cannot raise inside a long
    C call, and an asynchronous ``KeyboardInterrupt`` landing in a weakref
    callback or ``__del__`` is printed as "Exception ignored" with a traceback
    and lost.  So SIGINT is blocked in every thread and collected by a watcher
    thread with ``sigwait``, which exits the process cleanly
    (:func:`_exit_interrupted`).  The watcher needs the GIL: a solver that
    holds it in native code (SDPA without ``--time-limit``) delays the exit
    until its call returns.

    Only for the process's own command (``lipsdp`` / ``python -m lipsdp``),
    since it ends the process; in-process callers keep ``KeyboardInterrupt``.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    closing = threading.Event()
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def watch():  # inherits the blocked mask: SIGINT now reaches only this sigwait
        signal.sigwait({signal.SIGINT})
        if not closing.is_set():
            _exit_interrupted()

    watcher = threading.Thread(target=watch, name="lipsdp-interrupts", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        closing.set()
        with contextlib.suppress(ProcessLookupError):
            signal.pthread_kill(watcher.ident, signal.SIGINT)  # ends its sigwait
        watcher.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)  # a pending SIGINT raises here


def main(argv=None, *, own_process: bool | None = None) -> int:
    """Run the ``lipsdp`` command; returns the exit code.

    ``own_process`` (default: when ``argv`` is None, i.e. the console script or
    ``python -m lipsdp``) lets Ctrl-C end the process at once (:func:`_interrupts`).
    """
    global _announced
    _announced = threading.Lock()  # one "interrupted" line per command, also when called in-process
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    own = argv is None if own_process is None else own_process
    if own and args.command == "certify":
        args.process_start = _process_start()  # the command's start, also for a child forked next
        supervise(bool(args.time_limit or args.memory_limit))  # before any thread: nohup'd limited runs
    guard = _interrupts() if own else contextlib.nullcontext()
    try:
        with guard, dropped(not debug):  # solvers' own output off the terminal (lipsdp.quiet)
            if args.command == "certify":
                return _cmd_certify(args, own)
            if args.command == "verify":
                return _cmd_verify(args)
            if args.command == "robustness":
                return robustness_cli.run(args)
            if args.command == "monotone":
                return monotone_cli.run(args)
            return _cmd_solvers(args)
    except LipSDPError as exc:
        if debug:
            raise
        print(f"lipsdp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _announce_interrupt()
        return 130
    except Exception as exc:  # an unexpected failure still gets one line, not a traceback
        if debug:
            raise
        print(f"lipsdp: error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
