"""Wide MNIST-shaped MLPs with LeakyReLU / GELU / SiLU through ``lipsdp certify`` (issue T21B).

Each net (torch default init, ``torch.manual_seed(0)``, saved whole with ``torch.save``) is certified
by ``python -m lipsdp certify --trust-pickle --json`` under ``/usr/bin/time -f %M`` once per source tree
given with ``--tree`` (``PYTHONPATH``), side by side, BLAS threads 1.  Prints a markdown table: wall s,
peak RSS GiB, lipsdp's build/solve/verify seconds, bound, verified, lower and trivial bounds.

    python benchmarks/bench_wide_sector.py --tree before=/path/to/old --tree after=. \\
        --net leaky:784-128-128-10 --net gelu:784-512-10 --timeout 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACTS = {"leaky": "torch.nn.LeakyReLU(0.01)", "gelu": "torch.nn.GELU()", "silu": "torch.nn.SiLU()",
        "relu": "torch.nn.ReLU()"}


def make(act: str, dims: list[int], path: Path) -> None:
    import torch
    torch.manual_seed(0)
    layers = []
    for k, (i, o) in enumerate(zip(dims, dims[1:])):
        layers.append(torch.nn.Linear(i, o))
        if k < len(dims) - 2:
            layers.append(eval(ACTS[act]))
    torch.save(torch.nn.Sequential(*layers), path)


def run(tree: str, model: Path, timeout: int) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "lipsdp", "certify", "--trust-pickle",
                            "--json", str(model)], capture_output=True, text=True, env=env, timeout=timeout,
                           cwd=model.parent)  # not the caller's directory: -m puts it before PYTHONPATH
    except subprocess.TimeoutExpired:
        return {"wall": time.perf_counter() - t0, "error": f"killed after {timeout} s"}
    out = {"wall": time.perf_counter() - t0, "peak": int(p.stderr.strip().splitlines()[-1]) / 2**20}
    try:
        d = json.loads(p.stdout)
        out.update(bound=d.get("bound"), verified=d.get("verified"), timings=d.get("timings", {}),
                   lower=d.get("lower_bound"), trivial=d.get("trivial_bound"), solver=d.get("solver"))
    except json.JSONDecodeError:
        out["error"] = p.stderr.strip().splitlines()[-2][:160] if len(p.stderr.strip().splitlines()) > 1 else "?"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", action="append", required=True, help="label=path")
    ap.add_argument("--net", action="append", required=True, help="act:dims, e.g. leaky:784-256-256-10")
    ap.add_argument("--timeout", type=int, default=300)
    a = ap.parse_args()
    print("| net | tree | wall s | peak GiB | build / solve / verify s | solver | bound | verified | lower | trivial |")
    print("|---|---|---:|---:|---|---|---:|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.net:
            act, dims = spec.split(":")
            model = Path(tmp) / f"{act}-{dims}.pt"
            make(act, [int(d) for d in dims.split("-")], model)
            for tree in a.tree:
                label, path = tree.split("=", 1)
                r = run(path, model, a.timeout)
                if "error" in r:
                    print(f"| {act} {dims} | {label} | {r['wall']:.1f} | {r.get('peak', float('nan')):.2f} | "
                          f"{r['error']} | | | | | |", flush=True)
                    continue
                t = r["timings"]
                print(f"| {act} {dims} | {label} | {r['wall']:.1f} | {r['peak']:.2f} | {t.get('build', 0):.1f} / "
                      f"{t.get('solve', 0):.1f} / {t.get('verify', 0):.2f} | {r['solver']} | {r['bound']!r} | "
                      f"{r['verified']} | {r['lower']:.6g} | {r['trivial']:.6g} |", flush=True)


if __name__ == "__main__":
    main()
