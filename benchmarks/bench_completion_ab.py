"""Benchmark: one completion-method iteration, an older commit's code against the working tree's, side by side.

Both versions run in one process on the same pickled LMI (``lmi.solve`` of a query, as written by a
dump of :class:`lipsdp.solve.Solve`'s argument), one after the other, so that a shared machine's
load falls on both alike.  The baseline is the commit's ``solvers/completion_.py`` (``lipsdp.solvers``) and
``lipsdp/interior.py``, loaded from git as private modules.  Reports CPU seconds per iteration
(process time between the starts of consecutive iterations; wall time with ``--threads`` above 1), the iteration count and the
objective after the same number of iterations (the iterates agree up to rounding), and with
``--full`` a complete solve by the working tree's code.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_completion_ab.py /tmp/lmi32x64.pkl --iters 3 --full \\
        --out benchmarks/results/completion-ab.md
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def baseline(ref: str):
    """The ``(completion module, interior module)`` of commit ``ref``, loaded without registering."""
    import lipsdp.solvers.base as base

    def load(name, path):
        src = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True, capture_output=True,
                             text=True).stdout
        mod = types.ModuleType(name)
        mod.__file__ = f"{ref}:{path}"
        sys.modules[name] = mod
        exec(compile(src, mod.__file__, "exec"), mod.__dict__)
        return mod

    saved = dict(base.BACKENDS)
    interior = load("_ab_interior", "lipsdp/interior.py")
    completion = load("_ab_completion", "solvers/completion_.py")
    base.BACKENDS.clear()
    base.BACKENDS.update(saved)  # the old class must not replace the registered one
    completion.factor_schur, completion.term_schur = interior.factor_schur, interior.term_schur
    return completion


#: The clock of the per-iteration figures: CPU time on one thread, wall time with several (main).
CLOCK = time.process_time


def iterate(module, lmi, iters: int, workers: int = 1):
    """Run ``iters`` iterations; ``(CPU s per iteration list, objective, iterations, status)``."""
    from lipsdp.chain import BlockChain
    marks = []
    chain_cls = module.PatternChain
    chain = chain_cls(BlockChain(lmi))
    inner = chain.completion_inverse

    def mark(X):
        marks.append(CLOCK())
        return inner(X)

    chain.completion_inverse = mark
    state = module._Completion(lmi, chain, module.CompletionIPM.default_tol, None, time.perf_counter(), False,
                               iters, module.CompletionIPM.step_fraction)
    state.workers = workers  # the working tree's pairs of products in two threads (old code: ignored)
    status, _ = state.run()
    marks.append(CLOCK())
    per = list(np.diff(marks))
    return per, float(np.asarray(lmi.objective) @ state.y), state.iterations, status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lmis", nargs="+", help="pickled LMIProblem files")
    p.add_argument("--base", default="7f8c0c0", help="baseline commit (default: %(default)s)")
    p.add_argument("--iters", type=int, default=3, help="iterations timed per version")
    p.add_argument("--full", action="store_true", help="then solve to the end with the working tree's code")
    p.add_argument("--full-base", action="store_true", help="... and with the baseline's")
    p.add_argument("--out", help="append a markdown table here")
    p.add_argument("--threads", type=int, default=None,
                   help="limit BLAS to this many threads (threadpoolctl); default: as the environment says")
    p.add_argument("--workers", type=int, default=1,
                   help="the new code's products two at a time in threads with 2 (wall-clock timing)")
    args = p.parse_args(argv)
    global CLOCK
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    if (args.threads or 1) > 1 or args.workers > 1:
        CLOCK = time.perf_counter
    unit = "wall s" if CLOCK is time.perf_counter else "CPU s"
    import lipsdp.solvers.completion_ as new
    old = baseline(args.base)
    lines = [f"\n### {time.strftime('%Y-%m-%d %H:%M')} baseline {args.base}, {args.iters} iterations each"
             f"{f', {args.threads} BLAS threads' if args.threads else ''}"
             f"{f', new code with {args.workers} workers' if args.workers > 1 else ''} ({unit})\n",
             "| LMI | n | r | m | old s/it | new s/it | ratio | objective after (old, new) | rel diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    fulls = []
    for path in args.lmis:
        lmi = pickle.load(open(path, "rb"))
        # Only the last iterations are timed: the first also pays for the arrays' first touch.
        po, fo, _, _ = iterate(old, lmi, args.iters + 1)
        pn, fn, _, _ = iterate(new, lmi, args.iters + 1, args.workers)
        so, sn = float(np.median(po[1:])), float(np.median(pn[1:]))
        row = (f"| {Path(path).name} | {lmi.n} | {lmi.factors[0].shape[0]} | {lmi.n_var} | {so:.3f} | {sn:.3f} | "
               f"{so / sn:.2f} | {fo:.12g}, {fn:.12g} | {abs(fo - fn) / abs(fo):.1e} |")
        print(row, flush=True)
        lines.append(row)
        for which, mod, wanted in (("new", new, args.full), ("old", old, args.full_base)):
            if not wanted:
                continue
            from lipsdp import threads
            t = CLOCK()
            # A run's thread pools (lipsdp.threads): the new code pairs its products with 2 or more.
            with threads.limited(args.workers if which == "new" else args.threads or 1):
                res = mod.CompletionIPM().solve(lmi)
            full = (f"- {Path(path).name}, full solve ({which}): {res.status}, {res.iterations} iterations, "
                    f"objective {res.objective:.16g}, {CLOCK() - t:.1f} {unit}")
            print(full, flush=True)
            fulls.append(full)
    lines += [""] + fulls
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
