"""Benchmark: lipsdp on models as people train them (issue 19, item 6).

The set
-------
``mlp``  784-{16,32,64}x{2,8,16,32,64}-10 (width x depth): spectrally normalised ``Linear`` layers
         and LeakyReLU(0.01), as in the GLipSDP / LipSDP papers' MNIST MLPs.
``cnn``  28x28 inputs, {2,4,8,16} convolutions of {8,16,32} channels (3x3, padding 1, LeakyReLU(0.01)),
         then Flatten and one Linear to 10 classes.
``random`` a few untrained nets of the same shapes (``torch.manual_seed``), for comparison.

Trained nets are trained quickly (a few epochs of Adam) on scikit-learn's digits upsampled to
28x28 (bilinear; no downloads), the spectral normalisation removed after training (its weights
kept), and saved the way users save them, ``torch.save(model)``, under ``--model-dir``; a file
already there is reused.

What is measured
----------------
Each net is certified in a fresh subprocess (``lipsdp.certify(path, trust_pickle=True,
lower_bound_samples=0, time_limit=...)``), killed after ``--net-limit`` seconds of wall time
(reported as ``timeout``).  From the certificate's timings: load / build / solve / verify, their
ratio to the solve, and the whole call; from the OS: peak RSS of the subprocess.  Medians over
``--repeats``.  BLAS threads are set to 1 (``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1``)
before numpy loads, in this process and in the workers.

Usage::

    python benchmarks/bench_trained.py --only mlp --sizes 16x2 16x8 64x3 --repeats 1
    python benchmarks/bench_trained.py --only cnn --net-limit 120
    python benchmarks/bench_trained.py --cli --sizes 64x8 --repeats 5   # as users run it: lipsdp certify --json
    python benchmarks/bench_trained.py --profile 64x3      # cProfile of one certify call (top 30)
    python benchmarks/bench_trained.py --phases 16x64 --sweeps 1   # each stage's wall / CPU s and peak RSS
    python benchmarks/bench_trained.py --compare results/trained/trained-before.json results/trained/trained-after.json

Writes ``benchmarks/results/trained/trained.{md,json}`` (``--tag`` adds a suffix, e.g. ``before``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MLP_WIDTHS, MLP_DEPTHS = (16, 32, 64), (2, 8, 16, 32, 64)
CNN_CONVS, CNN_CHANNELS = (2, 4, 8, 16), (8, 16, 32)


def grid(only: str) -> list[str]:
    """Names of the nets: ``mlp-WxL``, ``cnn-CxK`` (K convolutions of C channels), ``rand-...``."""
    names = []
    if only in ("all", "mlp"):
        names += [f"mlp-{w}x{d}" for w in MLP_WIDTHS for d in MLP_DEPTHS]
    if only in ("all", "cnn"):
        names += [f"cnn-{c}x{k}" for c in CNN_CHANNELS for k in CNN_CONVS]
    if only in ("all", "random"):
        names += ["rand-mlp-16x8", "rand-mlp-64x3", "rand-cnn-8x2"]
    return names


def parse_size(name: str) -> tuple[str, int, int, bool]:
    """``(kind, width_or_channels, depth_or_convs, trained)`` of a net name."""
    trained = not name.startswith("rand-")
    kind, size = name.removeprefix("rand-").split("-")
    a, b = (int(s) for s in size.split("x"))
    return kind, a, b, trained


def make_model(kind: str, a: int, b: int):
    """The torch module (spectral normalisation on every Linear / Conv2d)."""
    from torch import nn
    from torch.nn.utils.parametrizations import spectral_norm

    act = lambda: nn.LeakyReLU(0.01)  # noqa: E731
    layers = []
    if kind == "mlp":
        layers.append(nn.Flatten())
        dims = [784] + [a] * b
        for i, o in zip(dims, dims[1:]):
            layers += [spectral_norm(nn.Linear(i, o)), act()]
        layers.append(spectral_norm(nn.Linear(dims[-1], 10)))
    else:
        c_in = 1
        for _ in range(b):
            layers += [spectral_norm(nn.Conv2d(c_in, a, 3, padding=1)), act()]
            c_in = a
        layers += [nn.Flatten(), spectral_norm(nn.Linear(a * 28 * 28, 10))]
    return nn.Sequential(*layers)


def digits28():
    """scikit-learn's digits, 8x8 upsampled to 28x28 in [0, 1]: ``(x, y)`` tensors."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


def train_and_save(name: str, path: Path, epochs: int = 3) -> dict:
    """Train ``name`` (unless random) and ``torch.save`` it to ``path``; returns its accuracy info."""
    import torch
    from torch.nn.utils import parametrize

    kind, a, b, trained = parse_size(name)
    torch.manual_seed(0)
    model = make_model(kind, a, b)
    acc = None
    if trained:
        x, y = digits28()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(64):
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
    model.eval()
    for m in model.modules():  # keep the normalised weights, drop the parametrisation (as exported models do)
        if parametrize.is_parametrized(m):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return {"train_accuracy": acc}


def worker(path: str, time_limit: float | None, solver: str) -> None:
    """Certify one file; print one JSON line (run in a subprocess)."""
    import lipsdp

    t0 = time.perf_counter()
    cert = lipsdp.certify(path, trust_pickle=True, lower_bound_samples=0, time_limit=time_limit, solver=solver,
                          input_shape=(1, 28, 28))
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"bound": cert.bound, "verified": cert.verified, "trivial": cert.trivial_bound,
                      "timings": cert.timings, "wall": wall, "peak_gib": peak, "solver": cert.solver,
                      "status": cert.solver_status, "lmi": cert.network.get("solved_lmi_size"),
                      "message": cert.message}))


def run_cli(path: Path, limit: float, time_limit: float | None, solver: str) -> dict:
    """``lipsdp certify FILE --json`` in its own process, as a user runs it: the thread variables removed
    (threads as lipsdp chooses them), peak RSS of that process tree; the same fields as :func:`worker`."""
    import bench_trained_cnn as cli_bench  # the CNN benchmark's command line runner (same directory)

    cmd = cli_bench.certify_command(path, 28, time_limit, None, ["--samples", "0", "--solver", solver])
    r = cli_bench.run_one(cmd, limit)
    if r.get("status") == "killed":
        return {"status": "timeout", "wall": r["wall"]}
    if "timings" not in r or r.get("exit") not in (0, 1):
        return {"status": "error", "wall": r["wall"], "message": r.get("message", "")}
    return {"bound": r["bound"], "verified": r["status"] == "verified", "trivial": r["trivial_bound"],
            "timings": r["timings"], "wall": r["wall"], "peak_gib": r["peak_gib"], "solver": r["solver"],
            "status": r["status"], "lmi": "", "message": r["message"]}


def run_one(path: Path, limit: float, time_limit: float | None, solver: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(path), "--solver", solver]
    if time_limit:
        cmd += ["--time-limit", str(time_limit)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall": time.perf_counter() - t0}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        return {"status": "error", "wall": time.perf_counter() - t0, "message": out.stderr.strip()[-300:]}
    return json.loads(lines[-1])


def median(rows, *keys):
    vals = []
    for r in rows:
        v = r
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if v is not None:
            vals.append(v)
    return statistics.median(vals) if vals else None


def row(name: str, runs: list[dict]) -> str:
    ok = [r for r in runs if "timings" in r]
    if not ok:
        return f"| {name} | | {runs[0]['status']} ({runs[0]['wall']:.0f} s) | | | | | | | |"
    t = {k: median(ok, "timings", k) for k in ("load", "build", "solve", "verify", "total")}
    solve = t["solve"] or float("nan")
    bound = median(ok, "bound")
    frac = (t["build"] + t["verify"]) / t["total"] if t["total"] else float("nan")
    return (f"| {name} | {ok[0]['lmi']} | {'%.9g' % bound if bound is not None else 'not verified'} | {t['load']:.2f} "
            f"| {t['build']:.2f} ({t['build'] / solve:.2f}) | {t['solve']:.2f} | {t['verify']:.2f} "
            f"({t['verify'] / solve:.2f}) | {t['total']:.2f} | {frac:.0%} | {median(ok, 'peak_gib'):.2f} |")


def compare(before: Path, after: Path) -> str:
    """A side-by-side markdown table of two result files (bounds, build + verify, totals)."""
    a, b = (json.loads(Path(f).read_text())["results"] for f in (before, after))
    lines = ["| net | bound before | bound after | same | build+verify before s | after s | total before s "
             "| after s |", "|" + "---|" * 8]
    for name in [n for n in a if n in b]:
        ra, rb = ([r for r in x[name]["runs"] if "timings" in r] for x in (a, b))
        if not ra or not rb:
            lines.append(f"| {name} | {'ok' if ra else a[name]['runs'][0]['status']} "
                         f"| {'ok' if rb else b[name]['runs'][0]['status']} | | | | | |")
            continue
        ba, bb = median(ra, "bound"), median(rb, "bound")
        bv = [median(r, "timings", "build") + median(r, "timings", "verify") for r in (ra, rb)]
        same = "yes" if ba == bb else ("tighter" if bb is not None and ba is not None and bb < ba else "NO")
        lines.append(f"| {name} | {ba!r} | {bb!r} | {same} | {bv[0]:.2f} | {bv[1]:.2f} "
                     f"| {median(ra, 'timings', 'total'):.2f} | {median(rb, 'timings', 'total'):.2f} |")
    return "\n".join(lines)


def profile(name: str, model_dir: Path, solver: str) -> None:
    import cProfile
    import pstats

    import lipsdp

    path = model_dir / f"{name}.pt"
    if not path.exists():
        train_and_save(name, path)
    prof = cProfile.Profile()
    prof.enable()
    cert = lipsdp.certify(str(path), trust_pickle=True, lower_bound_samples=0, solver=solver)
    prof.disable()
    print(name, cert.bound, cert.verified, cert.timings)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def phases(name: str, model_dir: Path, solver: str, sweeps: int | None) -> None:
    """The stages of one l2 certify call made one by one, with wall and CPU seconds and peak RSS after
    each: load, lift, the LMI, the input reduction, preconditioning (``sweeps`` layer sweeps; None: the
    default), the solve, verification (issue 19: where build and verify spend their time)."""
    import numpy as np

    from lipsdp import pipeline
    from lipsdp.bounds import node_lipschitz
    from lipsdp.lifting import lift
    from lipsdp.reductions import Precondition, Query, ReduceInput, preconditioning_scales
    from lipsdp.solve import Solve
    from lipsdp.verification import verify_solution

    clock = [time.perf_counter(), time.process_time()]

    def tick(what: str) -> None:
        wall, cpu = time.perf_counter() - clock[0], time.process_time() - clock[1]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{what:14s} wall {wall:8.2f} s  cpu {cpu:8.2f} s  peak {peak:.2f} GiB", flush=True)
        clock[:] = [time.perf_counter(), time.process_time()]

    path = model_dir / f"{name}.pt"
    if not path.exists():
        train_and_save(name, path)
    net, _ = pipeline.load_model(str(path), trust_pickle=True, input_shape=(1, 28, 28))
    tick("load")
    lips = node_lipschitz(net)
    lifting = lift(net)
    tick("lift")
    query = Query.build(lifting, "neuron", "l2", None)
    tick(f"LMI n={query.given.n}")
    query, _ = ReduceInput().apply(query)
    tick("reduce input")
    block_scale = np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]])
    pre = Precondition(block_scale, lips[net.output],
                       scales=lambda lmi, b, t, deadline=None: preconditioning_scales(lmi, b, t, sweeps=sweeps))
    query, v = pre.apply(query)
    tick("precondition")
    solve = Solve(solver)
    solution = pre.invert(solve(query), v)
    tick(f"solve ({solve.backend.name}, {solution.iterations} it)")
    out = verify_solution(query, solution)
    tick("verify")
    print(name, "bound", repr(out.verification.bound), "verified", out.verification.verified)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("all", "mlp", "cnn", "random"), default="mlp")
    p.add_argument("--sizes", nargs="+", help="subset, e.g. 16x2 64x64 (matched against the names' sizes)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--net-limit", type=float, default=600.0, help="wall seconds per certify call (subprocess killed)")
    p.add_argument("--time-limit", type=float, default=None, help="lipsdp's own --time-limit per call")
    p.add_argument("--solver", default="auto")
    p.add_argument("--cli", action="store_true",
                   help="run `lipsdp certify --json` as a user does (threads as lipsdp chooses) instead of the API")
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "lipsdp-trained")
    p.add_argument("--out-dir", type=Path, default=HERE / "results" / "trained")
    p.add_argument("--tag", default="")
    p.add_argument("--profile", metavar="SIZE", help="cProfile one MLP certify call, e.g. 64x3")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                   help="side-by-side table of two result JSON files (bounds must be the same or tighter)")
    p.add_argument("--phases", metavar="SIZE", help="the stages of one MLP certify call one by one, e.g. 16x64")
    p.add_argument("--sweeps", type=int, default=None, help="with --phases: layer sweeps (default: lipsdp's)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.time_limit, args.solver)
        return 0
    if args.compare:
        print(compare(*args.compare))
        return 0
    if str(ROOT) not in sys.path:  # in-process modes measure this checkout's lipsdp, as the workers do
        sys.path.insert(0, str(ROOT))
    if args.phases:
        phases(f"mlp-{args.phases}", args.model_dir, args.solver, args.sweeps)
        return 0
    if args.profile:
        profile(f"mlp-{args.profile}", args.model_dir, args.solver)
        return 0

    names = [n for n in grid(args.only) if not args.sizes or n.split("-")[-1] in args.sizes]
    results = {}
    for name in names:
        path = args.model_dir / f"{name}.pt"
        info = {} if path.exists() else train_and_save(name, path)
        runs = []
        for rep in range(args.repeats):
            r = (run_cli if args.cli else run_one)(path, args.net_limit, args.time_limit, args.solver)
            runs.append(r)
            t = r.get("timings", {})
            print(f"  [{rep + 1}/{args.repeats}] {name:14s} {r.get('status')!s:12s} bound {r.get('bound')} "
                  + " ".join(f"{k} {t[k]:.2f}" for k in ("load", "build", "solve", "verify", "total") if k in t)
                  + f" peak {r.get('peak_gib', 0):.2f} GiB", flush=True)
        results[name] = {"runs": runs, **info}

    env = (f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
           + ("through `lipsdp certify --json`, threads as lipsdp chooses them (no thread variables), "
              if args.cli else "OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1, ")
           + f"solver {args.solver}, "
           f"medians of {args.repeats} run(s), per-net wall limit {args.net_limit:.0f} s")
    lines = ["| net | LMI solved | bound | load s | build s (/solve) | solve s | verify s (/solve) | total s "
             "| build+verify share | peak GiB |", "|" + "---|" * 10]
    lines += [row(name, res["runs"]) for name, res in results.items()]
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + env)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "trained" + (f"-{args.tag}" if args.tag else "")
    (args.out_dir / f"{stem}.md").write_text(table + "\n\n" + env + "\n")
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"environment": env, "results": results}, indent=1))
    print(f"\nwrote {args.out_dir / (stem + '.md')}, {stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
