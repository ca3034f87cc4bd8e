"""Benchmark: the completion method's iteration from the factor rows against the one through the dense inverses.

For each model (a ``.pt`` file as ``lipsdp certify`` reads it, or a pickled ``LMIProblem``), the LMI that
``certify`` hands the solver is captured once, then solved with ``products = "rows"`` (block solves with
``R^T`` and slab Grams, :class:`lipsdp.solvers.completion_.RowKernel`) and ``products = "dense"``
(:mod:`lipsdp.solvers.completion_dense`), alternating round by round in one process so that a shared
machine's load falls on both alike.  Threads: ``--threads`` (default 2, lipsdp's own pools; the
thread-variables of the environment are left as they are and printed).  Prints each configuration's median
solve seconds, iterations and objective, and the ratio rows / dense.

Usage::

    python benchmarks/bench_completion_dense.py /tmp/lipsdp-trained/mlp-32x64.pt /tmp/lipsdp-trained/mlp-64x64.pt
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time


def captured_lmi(path: str):
    """The LMI that certify hands the solver for the model at ``path`` (or the pickled LMI itself)."""
    if path.endswith(".pkl"):
        with open(path, "rb") as fh:
            return pickle.load(fh)
    import lipsdp.pipeline as pipeline
    from lipsdp import solve

    box = {}

    class Captured(Exception):
        pass

    def grab(self, query):
        box["lmi"] = query.solve
        raise Captured

    real = solve.Solve.__call__
    solve.Solve.__call__ = grab
    try:
        pipeline.certify_network(pipeline.load_model(path, trust_pickle=True)[0], lower_bound_samples=0)
    except Captured:
        pass
    finally:
        solve.Solve.__call__ = real
    return box["lmi"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help=".pt models or pickled LMIProblems")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import lipsdp.solvers.completion_ as C
    from lipsdp import threads

    env = {k: os.environ.get(k) for k in threads.ENVIRONMENT if os.environ.get(k)}
    print(f"threads {args.threads} (lipsdp's pools); environment {env or 'no thread variables'}")
    print(f"{'model':32s} {'n':>6s} {'rows s':>8s} {'dense s':>8s} {'ratio':>6s}  iterations  objective rows / dense")
    for path in args.models:
        lmi = captured_lmi(path)
        times = {"rows": [], "dense": []}
        last = {}
        for _ in range(args.rounds):
            for products in ("rows", "dense"):
                C._Completion.products = products
                with threads.limited(args.threads):
                    t = time.perf_counter()
                    res = C.CompletionIPM().solve(lmi)
                    times[products].append(time.perf_counter() - t)
                last[products] = res
        C._Completion.products = "auto"
        r, d = statistics.median(times["rows"]), statistics.median(times["dense"])
        print(f"{os.path.basename(path):32s} {lmi.n:6d} {r:8.1f} {d:8.1f} {r / d:6.2f}  "
              f"{last['rows'].iterations:4d} / {last['dense'].iterations:<4d}  "
              f"{last['rows'].objective:.9e} / {last['dense'].objective:.9e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
