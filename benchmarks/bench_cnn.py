"""Benchmark: the ``fo`` backend on convolutional nets, with and without eliminating wide blocks first.

A CNN's first convolution is its widest layer (an MNIST-sized net: 784 inputs, 3136
neurons, then 1568, 100, 10), and ``fo``'s block elimination used to factor that
3136 x 3136 block at every evaluation.  ``fo`` now eliminates such a block first, through
sparse products into its neighbours (:func:`lipsdp.solvers.firstorder_._early_blocks`),
and works at 1568.  Both compute the same ``rho(T)``; this script measures what it saves.

Configurations (side by side, in one process, round-robin over ``--repeats``)
-----------------------------------------------------------------------------
``fo``
    ``lipsdp.certify(model, solver="fo", lower_bound_samples=0)``, the default.
``fo-plain``
    The same with ``FirstOrder.early_elimination = False`` (the plain backward recursion).

Nets (random weights from ``torch.manual_seed``, ReLU, built here)
-------------------------------------------------------------------
``small``   1x12x12 -> Conv 8 3x3 -> Conv 16 4x4/2 -> 32 -> 10 (blocks 144 / 800 / 256 / 32), run to the end.
``mnist``   1x28x28 -> Conv 16 4x4/2 -> Conv 32 4x4/2 -> 100 -> 10 (blocks 784 / 3136 / 1568 / 100),
            with ``--time-limit`` (default 60 s: the plain run needs 27 min to converge): the bound
            each reaches in the same time.

Every run is verified by lipsdp as always.  Reported: medians of bound, wall time (the
whole ``certify`` call), evaluations and seconds per evaluation (the solve's time over its
evaluations, its start included), and the ratios of ``fo-plain`` to ``fo``.  BLAS threads
are set to 1 before numpy loads (this machine is shared; timings compare algorithms, not
cores).

Usage::

    python benchmarks/bench_cnn.py                 # both nets, 3 repeats (about 15 minutes)
    python benchmarks/bench_cnn.py --nets small --repeats 1
    python benchmarks/bench_cnn.py --nets mnist --configs fo --time-limit 0 --repeats 1   # to the end

Writes ``benchmarks/results/cnn/cnn.{md,json}``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
CONFIGS = ("fo", "fo-plain")


def build(name: str):
    """``(torch model, input shape)`` of a benchmark net."""
    import torch
    from torch import nn

    torch.manual_seed({"small": 1, "mnist": 0}[name])
    if name == "small":
        model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 4, stride=2), nn.ReLU(),
                              nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))
        return model.eval(), (1, 12, 12)
    model = nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))
    return model.eval(), (1, 28, 28)


def run_one(model, shape, config: str, time_limit) -> dict:
    import lipsdp
    from lipsdp.solvers.firstorder_ import FirstOrder

    saved = FirstOrder.early_elimination
    FirstOrder.early_elimination = config == "fo"
    try:
        t0 = time.perf_counter()
        cert = lipsdp.certify(model, input_shape=shape, solver="fo", lower_bound_samples=0, time_limit=time_limit)
        seconds = time.perf_counter() - t0
    finally:
        FirstOrder.early_elimination = saved
    evals = cert.solver_iterations or 0
    return {"bound": cert.bound, "verified": cert.verified, "seconds": seconds, "solve": cert.timings.get("solve"),
            "evaluations": evals, "per_eval": cert.timings.get("solve", seconds) / max(evals, 1),
            "status": cert.solver_status, "dual": cert.solver_dual_objective,
            "lmi_size": cert.network.get("solved_lmi_size")}


def _fmt(bound) -> str:
    return "none (not verified)" if bound is None else f"{bound:.6f}"


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nets", nargs="+", choices=("small", "mnist"), default=["small", "mnist"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--time-limit", type=float, default=60.0,
                   help="seconds per run on the mnist net (default 60; 0: none, fo then takes several minutes)")
    p.add_argument("--out-dir", type=Path, default=HERE / "results" / "cnn")
    args = p.parse_args(argv)

    import lipsdp

    results = {}
    for name in args.nets:
        model, shape = build(name)
        limit = args.time_limit if name == "mnist" and args.time_limit > 0 else None
        runs = {c: [] for c in args.configs}
        for rep in range(args.repeats):
            for config in args.configs:
                r = run_one(model, shape, config, limit)
                runs[config].append(r)
                print(f"  [{rep + 1}/{args.repeats}] {name:6s} {config:9s} bound {_fmt(r['bound'])} "
                      f"{'verified' if r['verified'] else 'NOT VERIFIED'}  {r['seconds']:7.1f} s  "
                      f"{r['evaluations']:5d} evaluations  {r['per_eval']:.4f} s each", flush=True)
        results[name] = {"time_limit": limit, "runs": runs}

    lines = ["| net | LMI | limit | config | bound | wall s | evaluations | s / evaluation | plain / fo per evaluation "
             "| plain / fo wall | bound vs fo-plain |", "|" + "---|" * 11]
    for name, res in results.items():
        runs = res["runs"]
        both = "fo-plain" in runs and "fo" in runs
        plain_eval, plain_wall, plain_bound = (median(runs.get("fo-plain", []), k) for k in ("per_eval", "seconds", "bound"))
        for config, rows in runs.items():
            per, wall, bound = median(rows, "per_eval"), median(rows, "seconds"), median(rows, "bound")
            ratio_eval = f"{plain_eval / per:.1f}x" if config == "fo" and both else ""
            ratio_wall = f"{plain_wall / wall:.1f}x" if config == "fo" and both and res["time_limit"] is None else ""
            rel = f"{(bound - plain_bound) / plain_bound:+.2e}" if config == "fo" and both and bound and plain_bound else ""
            lines.append(f"| {name} | {rows[0]['lmi_size']} | {res['time_limit'] or 'none'} | {config} | {_fmt(bound)} "
                         f"| {wall:.1f} | {median(rows, 'evaluations'):.0f} | {per:.4f} | {ratio_eval} | {ratio_wall} "
                         f"| {rel} |")
    env = (f"lipsdp {lipsdp.__version__}, Python {platform.python_version()}, {platform.machine()}, "
           f"{os.cpu_count()} CPUs, OMP/OPENBLAS/MKL threads = 1, medians of {args.repeats} run(s)")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + env)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "cnn.md").write_text(table + "\n\n" + env + "\n")
    (args.out_dir / "cnn.json").write_text(json.dumps({"environment": env, "results": results}, indent=1))
    print(f"\nwrote {args.out_dir / 'cnn.md'}, cnn.json")
    bad = [r for res in results.values() for rows in res["runs"].values() for r in rows if not r["verified"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
