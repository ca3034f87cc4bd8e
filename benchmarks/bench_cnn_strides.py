"""Benchmark: strided convolutions and average pooling on the structured path (docs/math.md §7.6).

Nets (random weights, ``torch.manual_seed(seed)``, every convolution and the Linear scaled to unit spectral
norm of its unrolled map by power iteration, LeakyReLU(0.01), 1 input channel, Flatten + Linear to 10):

- ``stride``:  conv 3x3 stride 2 pad 1 -> conv 4x4 stride 2 pad 1
- ``stride3``: conv 3x3 stride 2 pad 1 -> conv 3x3 stride 2 pad 1
- ``avgpool``: conv 3x3 pad 1 -> AvgPool2d(2) -> conv 3x3 pad 1 -> AvgPool2d(2)
- ``mixed``:   conv 3x3 pad 1 -> conv 4x4 stride 2 pad 1 -> conv 3x3 pad 1

For each: ``lipsdp.certify(model, structure="state-space")`` (bound, lower and trivial bounds, the LMI
sizes, the phase images' channels, CPU and wall seconds, peak RSS of the process) and with
``--compare-unrolled`` the unrolled SDP's bound and the ratio structured / unrolled.  BLAS threads 1.

Usage::

    python benchmarks/bench_cnn_strides.py --size 8 --channels 4,8 --compare-unrolled
    python benchmarks/bench_cnn_strides.py --size 28 --channels 8,16 --kinds stride,avgpool
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


def _unit(module, size_in: int, iters: int = 60):
    """Scale a Conv2d (on a ``size_in`` image) or Linear to unit spectral norm of its unrolled map."""
    import torch

    if isinstance(module, torch.nn.Linear):
        with torch.no_grad():
            module.weight /= torch.linalg.matrix_norm(module.weight, 2)
        return module
    w = module.weight.detach()
    f = lambda x: torch.nn.functional.conv2d(x, w, stride=module.stride, padding=module.padding)  # noqa: E731
    x = torch.randn(1, module.in_channels, size_in, size_in)
    for _ in range(iters):
        x = x.requires_grad_()
        y = f(x)
        x = torch.autograd.grad(y, x, y.detach())[0].detach()  # S^T S x
        x = x / x.norm()
    with torch.no_grad():
        module.weight /= f(x).norm()
    return module


def build(kind: str, channels: int, size: int, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    specs = {"stride": [(3, 2), (4, 2)], "stride3": [(3, 2), (3, 2)], "avgpool": [(3, 1), "pool", (3, 1), "pool"],
             "mixed": [(3, 1), (4, 2), (3, 1)]}[kind]
    layers, c, s = [], 1, size
    for spec in specs:
        if spec == "pool":
            layers.append(nn.AvgPool2d(2))
            s //= 2
            continue
        k, stride = spec
        layers += [_unit(nn.Conv2d(c, channels, k, stride=stride, padding=1), s), nn.LeakyReLU(0.01)]
        c, s = channels, (s + 2 - k) // stride + 1
    lin = _unit(nn.Linear(c * s * s, 10), 0)
    return nn.Sequential(*layers, nn.Flatten(), lin).double().eval()


def run_one(kind: str, channels: int, size: int, compare: bool) -> dict:
    import lipsdp

    model = build(kind, channels, size)
    cpu0, t0 = time.process_time(), time.perf_counter()
    cert = lipsdp.certify(model, input_shape=(1, size, size), structure="state-space", lower_bound_samples=64)
    row = {"kind": kind, "channels": channels, "size": size, "verified": cert.verified, "bound": cert.bound,
           "lower_bound": cert.lower_bound, "trivial_bound": cert.trivial_bound,
           "phase_channels": cert.network.get("phases", {}).get("channels"),
           "lmi_sizes": cert.network.get("lmi_sizes"), "iterations": cert.solver_iterations,
           "structured_lmi": cert.verification.get("sdp_bound", cert.bound),
           "cpu_seconds": time.process_time() - cpu0, "seconds": time.perf_counter() - t0,
           "solve_seconds": cert.timings.get("solve"),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if compare:
        un = lipsdp.certify(model, input_shape=(1, size, size), structure="unrolled", lower_bound_samples=0)
        row.update(unrolled=un.bound, ratio=cert.bound / un.bound if un.verified else None)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="stride,avgpool,mixed")
    ap.add_argument("--channels", default="4,8")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--compare-unrolled", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "CHANNELS"))
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.size, args.compare_unrolled)))
        return 0
    for kind in args.kinds.split(","):
        for c in args.channels.split(","):
            cmd = [sys.executable, __file__, "--one", kind, c, "--size", str(args.size)]
            cmd += ["--compare-unrolled"] if args.compare_unrolled else []
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else \
                    json.dumps({"kind": kind, "channels": int(c), "error": out.stderr.strip().splitlines()[-1:]})
            except subprocess.TimeoutExpired:
                line = json.dumps({"kind": kind, "channels": int(c), "error": f"not finished in {args.timeout:.0f} s"})
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
