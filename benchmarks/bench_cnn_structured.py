"""Benchmark: CNNs through the structured (2-D state-space / Roesser) path, docs/math.md §7.4.

The issue-19 grid: 1x28x28 inputs, {2, 4, 8, 16} convolutions 3x3 with padding 1 of {8, 16, 32} channels, each
followed by LeakyReLU(0.01), then Flatten and one Linear to 10.  Weights are random (``torch.manual_seed``),
each convolution and the Linear scaled to unit spectral norm of its unrolled map (power iteration on
the plane, ``torch.linalg.matrix_norm`` for the Linear): the timing set of the issue, not trained nets.

For each net: ``lipsdp.certify(model, structure="state-space")`` with its build / solve / verify split,
the wall time of the whole call, the peak RSS of the process (``resource.getrusage``; one net per
process with ``--one``), the trivial bound and the sampled lower bound.  ``--compare-unrolled`` also runs
the unrolled SDP on small images (``--size``) and prints how much looser the structured bound is.  BLAS
threads are set to 1 before numpy loads (the machine may be shared: read the figures as such).

Usage::

    python benchmarks/bench_cnn_structured.py                       # the grid, one process per net
    python benchmarks/bench_cnn_structured.py --one 16 8            # one net: 16 channels, 8 convolutions
    python benchmarks/bench_cnn_structured.py --compare-unrolled --size 8 --grid 4x2,8x2
    python benchmarks/bench_cnn_structured.py --grid 8x2,16x2 --solver clarabel   # another solver

Writes ``benchmarks/results/cnn/structured.jsonl`` and prints the markdown table of
``benchmarks/results/cnn/structured.md`` when run on the whole grid; ``--table FILE`` prints the table of a
JSON-lines file (``--out``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
GRID = [(c, n) for c in (8, 16, 32) for n in (2, 4, 8, 16)]


def build(channels: int, convs: int, size: int = 28, seed: int = 0, slope: float = 0.01):
    """A random CNN of the grid, each layer scaled to unit spectral norm (see the module docstring)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers, c = [], 1
    for _ in range(convs):
        conv = nn.Conv2d(c, channels, 3, padding=1)
        with torch.no_grad():
            conv.weight /= _conv_norm(conv.weight, size)
        layers += [conv, nn.LeakyReLU(slope)]
        c = channels
    lin = nn.Linear(channels * size * size, 10)
    with torch.no_grad():
        lin.weight /= torch.linalg.matrix_norm(lin.weight, 2)
    return nn.Sequential(*layers, nn.Flatten(), lin).double().eval(), (1, size, size)


def _conv_norm(weight, size: int, iters: int = 60) -> float:
    import torch

    x = torch.randn(1, weight.shape[1], size, size)
    for _ in range(iters):
        y = torch.nn.functional.conv2d(x, weight, padding=1)
        x = torch.nn.functional.conv_transpose2d(y, weight, padding=1)
        x = x / x.norm()
    return float(torch.nn.functional.conv2d(x, weight, padding=1).norm())


def run_one(channels: int, convs: int, size: int, compare: bool, solver: str = "auto") -> dict:
    import lipsdp

    model, shape = build(channels, convs, size)
    t0 = time.perf_counter()
    cpu0 = _cpu_seconds()
    cert = lipsdp.certify(model, input_shape=shape, structure="state-space", solver=solver)
    row = {"channels": channels, "convs": convs, "size": size, "bound": cert.bound,
           "verified": cert.verified, "lower_bound": cert.lower_bound, "trivial_bound": cert.trivial_bound,
           "solver": cert.solver, "method": cert.verification.get("method"), "message": cert.message,
           "seconds": time.perf_counter() - t0,
           "timings": {k: round(v, 3) for k, v in cert.timings.items() if isinstance(v, float)},
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "cpu_seconds": _cpu_seconds(), "certify_cpu_seconds": _cpu_seconds() - cpu0,
           "solver_status": cert.solver_status, "iterations": cert.solver_iterations}
    if compare:
        t0 = time.perf_counter()
        un = lipsdp.certify(model, input_shape=shape, structure="unrolled", lower_bound_samples=0)
        lmi = cert.verification.get("sdp_bound", cert.bound)  # the structured LMIs' own bound
        row.update(unrolled=un.bound, unrolled_seconds=time.perf_counter() - t0, structured_lmi=lmi,
                   looser=(lmi / un.bound - 1.0) if lmi and un.bound else None)
    return row


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its children: a figure a shared machine inflates less."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def table(rows: list[dict]) -> list[str]:
    """The grid as a markdown table: bounds, the certify call's CPU and wall seconds, the solve, peak RSS."""
    lines = ["| channels | convs | bound | lower | trivial | bound / trivial | certify CPU s | certify wall s | "
             "solve wall s | iterations | peak RSS MiB | solver |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            error = r["error"] if isinstance(r["error"], str) else "; ".join(map(str, r["error"]))
            lines.append(f"| {r['channels']} | {r['convs']} | {error} | | | | | | | | | |")
            continue
        t = r["timings"]
        lines.append(f"| {r['channels']} | {r['convs']} | {r['bound']:.6f} | {r['lower_bound']:.4f} | "
                     f"{r['trivial_bound']:.4f} | {r['bound'] / r['trivial_bound']:.3f} | "
                     f"{r.get('certify_cpu_seconds', float('nan')):.1f} | {r['seconds']:.1f} | "
                     f"{t.get('solve', 0):.1f} | "
                     f"{r.get('iterations', '')} | {r['peak_rss_mib']:.0f} | {r['solver']} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", nargs=2, type=int, metavar=("CHANNELS", "CONVS"))
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--grid", default=None, help="channels x convs list, e.g. 8x2,16x4")
    ap.add_argument("--compare-unrolled", action="store_true")
    ap.add_argument("--solver", default="auto", help="the structured SDP's solver: auto, conv-ipm, clarabel, scs")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per net (its own process)")
    ap.add_argument("--out", default=None, help="also append each row to this JSON-lines file")
    ap.add_argument("--table", default=None, help="print the markdown table of this JSON-lines file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print("\n".join(table([json.loads(line) for line in open(args.table) if line.strip()])))
        return 0
    if args.one:
        print(json.dumps(run_one(*args.one, args.size, args.compare_unrolled, args.solver)))
        return 0
    grid = GRID if not args.grid else [tuple(int(v) for v in g.split("x")) for g in args.grid.split(",")]
    rows = []
    for c, n in grid:
        cmd = [sys.executable, __file__, "--one", str(c), str(n), "--size", str(args.size)]
        cmd += ["--compare-unrolled"] if args.compare_unrolled else []
        cmd += ["--solver", args.solver]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            row = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"channels": c, "convs": n, "error": out.stderr.strip().splitlines()[-1:]}
        except subprocess.TimeoutExpired:
            row = {"channels": c, "convs": n, "error": f"not finished in {args.timeout:.0f} s"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    if not args.compare_unrolled and args.size == 28 and not args.grid:
        dest = HERE / "results" / "cnn"
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "structured.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
