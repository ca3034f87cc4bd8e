"""Benchmark: the completion method's pairs of large products, one after the other and at once in two threads.

From the start point of a pickled LMI (``lmi.solve`` of a query), each pair that an iteration runs with two
run threads (:func:`lipsdp.threads.both`) is timed both ways in one process, alternating, so that a shared
machine's load falls on both alike: the two block solves with ``R^T``, the two Gram products, the two
products with the pattern, and the pattern product by halves of its block rows.  Wall seconds.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_completion_pairs.py /tmp/me/lmi64x64.pkl --rounds 3
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lmi", help="a pickled LMIProblem")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    import lipsdp.solvers.completion_ as C
    from lipsdp import threads
    from lipsdp.chain import BlockChain

    threadpool_limits(1)
    lmi = pickle.load(open(args.lmi, "rb"))
    ch = C.PatternChain(BlockChain(lmi))
    y, fac = C._Completion(lmi, ch, 1e-7, None, 0.0, False, 10, 0.95).start()
    rng = np.random.default_rng(0)
    b = [rng.random(ch.Rt.shape) for _ in range(4)]
    G = [np.empty((ch.r, ch.r)) for _ in range(2)]
    D = ch.assemble(y)
    pairs = {
        "two solves": (lambda: ch.solve(fac, b[0], ch.active), lambda: ch.solve(fac, b[1], ch.active)),
        "two Grams": (lambda: ch.gram_of(b[2], G[0], symmetric=True), lambda: ch.gram_of(b[3], G[1], symmetric=True)),
        "two pattern times": (lambda: ch.pattern_times(D, b[2], out=b[0]), lambda: ch.pattern_times(D, b[3], out=b[1])),
    }
    for rnd in range(args.rounds):
        cells = []
        for f, g in pairs.values():
            np.copyto(b[0], ch.Rt), np.copyto(b[1], ch.Rt)
            t = time.perf_counter()
            f(), g()
            seq = time.perf_counter() - t
            np.copyto(b[0], ch.Rt), np.copyto(b[1], ch.Rt)
            t = time.perf_counter()
            threads.both(f, g, 2)
            cells.append((seq, time.perf_counter() - t))
        t = time.perf_counter()
        ch.pattern_product(b[2], b[3])
        seq = time.perf_counter() - t
        t = time.perf_counter()
        ch.pattern_product(b[2], b[3], threads=2)
        cells.append((seq, time.perf_counter() - t))
        names = list(pairs) + ["pattern product"]
        print(f"round {rnd + 1}: " + ", ".join(f"{n} {a:.3f} / {p_:.3f} s ({a / p_:.2f}x)"
                                              for n, (a, p_) in zip(names, cells)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
