"""Benchmark: trained CNNs certified end to end through the command line (issue 19, items 1 and 6).

The set
-------
``cnn-CxK``  28x28 inputs, K in {2, 4, 8, 16} convolutions (3x3, padding 1) of C in {8, 16, 32} channels,
             each followed by LeakyReLU(0.01), then Flatten and one Linear to 10 classes.
``rand-cnn-CxK`` the same architecture untrained (the initialisation, spectrally normalised), for comparison.

Trained nets are trained quickly (``--epochs`` epochs of Adam, seconds to a minute each on a CPU) on
scikit-learn's digits upsampled to 28x28 (bilinear; no downloads), with spectral normalisation
(``torch.nn.utils.parametrizations.spectral_norm``) on every Conv2d and Linear; the parametrisation is
removed after training, its weights kept (as exported models are).  Each net is saved the way users
save them, ``torch.save(model)`` (``.pt``, a whole-module pickle) and ``torch.onnx.export`` (``.onnx``),
under ``--model-dir`` (default ``benchmarks/results/trained/models/``, ignored by git: ``/benchmarks/results/``
is in ``.gitignore`` and the tables are added by hand).  The files are regenerated deterministically
(fixed seeds, one thread) when missing or when the recipe changed (its digest is in the file name).

What is measured
----------------
Each file is certified in its own subprocess by the command line,
``python -m lipsdp certify FILE --json --time-limit T --memory-limit M`` (``--trust-pickle`` and
``--input-shape`` for ``.pt``), killed after ``--net-limit`` seconds of wall time.  Printed: load / build /
solve / verify (the certificate's timings) and their ratio to the solve, the whole call, the bound, the
trivial bound (product of norms), lipsdp's sampled lower bound and the sandwich against a lower bound
sampled *independently* here with torch autograd on the real model (``lower <= bound <= trivial``), and
the peak RSS of the certifying process.  BLAS and torch threads are **as lipsdp chooses them**: the
thread variables (``OMP_NUM_THREADS`` ...) are removed from the subprocesses' environment.

Usage::

    python benchmarks/bench_trained_cnn.py                          # the whole grid, .pt and .onnx
    python benchmarks/bench_trained_cnn.py --sizes 8x2 16x4 --formats pt --time-limit 60
    python benchmarks/bench_trained_cnn.py --profile 32x16 --time-limit 30   # cProfile of one call (top 30)
    python benchmarks/bench_trained_cnn.py --formats pt --tag grid           # the acceptance grid: cnn-grid.md

Writes ``benchmarks/results/trained/cnn.{md,json}`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONVS, CHANNELS = (2, 4, 8, 16), (8, 16, 32)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")
#: Everything that changes the trained weights: part of the cached files' names.
RECIPE = {"optimizer": "Adam", "lr": 3e-3, "batch": 64, "seed": 0, "slope": 0.01, "kernel": 3, "padding": 1}


def grid(random: bool = False) -> list[str]:
    """Names of the nets: ``cnn-CxK`` (K convolutions of C channels), ``rand-cnn-CxK`` with ``random``."""
    names = [f"cnn-{c}x{k}" for c in CHANNELS for k in CONVS]
    return names + [f"rand-{n}" for n in names] if random else names


def parse_name(name: str) -> tuple[int, int, bool]:
    """``(channels, convs, trained)`` of a net name."""
    trained = not name.startswith("rand-")
    c, k = (int(s) for s in name.removeprefix("rand-").removeprefix("cnn-").split("x"))
    return c, k, trained


def make_model(channels: int, convs: int, size: int = 28):
    """The torch module, spectral normalisation on every Conv2d and Linear."""
    from torch import nn
    from torch.nn.utils.parametrizations import spectral_norm

    layers, c_in = [], 1
    for _ in range(convs):
        layers += [spectral_norm(nn.Conv2d(c_in, channels, RECIPE["kernel"], padding=RECIPE["padding"])),
                   nn.LeakyReLU(RECIPE["slope"])]
        c_in = channels
    layers += [nn.Flatten(), spectral_norm(nn.Linear(channels * size * size, 10))]
    return nn.Sequential(*layers)


def digits(size: int = 28):
    """scikit-learn's digits, 8x8 upsampled to ``size`` x ``size`` in [0, 1]: ``(x, y)`` tensors."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x, torch.tensor(d.target, dtype=torch.long)


def model_paths(name: str, model_dir: Path, size: int = 28, epochs: int = 3) -> dict[str, Path]:
    """Where ``name``'s files are cached: ``{"pt": ..., "onnx": ...}`` (the recipe's digest in the name)."""
    recipe = json.dumps({**RECIPE, "size": size, "epochs": epochs}, sort_keys=True)
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:8]
    stem = f"{name}-{size}px-{digest}"
    return {"pt": model_dir / f"{stem}.pt", "onnx": model_dir / f"{stem}.onnx"}


def build(name: str, model_dir: Path, size: int = 28, epochs: int = 3) -> dict:
    """Train ``name`` (unless random) and save it as ``.pt`` and ``.onnx`` unless both are cached.

    Returns ``{"paths": {...}, "train_accuracy": float or None, "train_seconds": float}``.
    """
    paths = model_paths(name, model_dir, size, epochs)
    if all(p.exists() for p in paths.values()):
        return {"paths": paths, "train_accuracy": None, "train_seconds": 0.0}
    import warnings

    import torch
    from torch.nn.utils import parametrize

    channels, convs, trained = parse_name(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-for-bit the same weights on every machine with the same torch
    torch.manual_seed(RECIPE["seed"])
    model = make_model(channels, convs, size)
    acc, t0 = None, time.perf_counter()
    x, y = digits(size)
    if trained:
        opt = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(RECIPE["batch"]):
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
    model.eval()
    with torch.no_grad():
        for _ in range(10):  # settle the spectral-norm power iteration of the untrained nets too
            model(x[:8])
        acc = float((model(x).argmax(1) == y).float().mean()) if trained else None
    for m in model.modules():  # keep the normalised weights, drop the parametrisation (as exported models do)
        if parametrize.is_parametrized(m):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model, paths["pt"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 1, size, size), str(paths["onnx"]), dynamo=False,
                          input_names=["x"], output_names=["logits"])
    torch.set_num_threads(threads)
    return {"paths": paths, "train_accuracy": acc, "train_seconds": time.perf_counter() - t0}


def torch_lower_bound(path: Path, size: int, samples: int = 16, seed: int = 1) -> float:
    """Largest ``||J(x)||_2`` at random inputs, by torch autograd on the saved module (float64)."""
    import torch

    model = torch.load(path, weights_only=False).double().eval()
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(samples):
        x = torch.randn(1, 1, size, size, generator=gen, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(lambda v: model(v)[0], x).reshape(10, -1)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


def certify_command(path: Path, size: int, time_limit: float | None, memory_limit: str | None,
                    extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "lipsdp", "certify", str(path), "--json"]
    if path.suffix == ".pt":
        cmd += ["--trust-pickle", "--input-shape", f"1,{size},{size}"]
    if time_limit:
        cmd += ["--time-limit", str(time_limit)]
    if memory_limit:
        cmd += ["--memory-limit", memory_limit]
    return cmd + extra


#: Runs the command and prints its children's peak RSS (KiB) on stderr's last line: that one process tree.
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print('peak_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(r.returncode)")


def run_one(cmd: list[str], net_limit: float) -> dict:
    """One certification in its own process (the thread variables removed); the certificate's fields."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True,
                             timeout=net_limit, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "killed", "wall": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    peak = [ln.split()[1] for ln in out.stderr.splitlines() if ln.startswith("peak_kib ")]
    result = {"exit": out.returncode, "wall": wall, "peak_gib": int(peak[-1]) / 2**20 if peak else None}
    try:
        cert = json.loads(out.stdout)
    except json.JSONDecodeError:
        return {**result, "status": "error", "message": out.stderr.strip()[-300:]}
    keep = ("bound", "status", "trivial_bound", "lower_bound", "timings", "message", "solver", "formulation")
    return {**result, **{k: cert.get(k) for k in keep}, "structure": (cert.get("network") or {}).get("structure")}


def _fmt(value, spec=".4g") -> str:
    return "" if value is None else format(value, spec)


def row(name: str, fmt: str, r: dict, torch_lower: float | None) -> str:
    t = r.get("timings") or {}
    solve = t.get("solve") or float("nan")
    ratio = lambda k: f"{t[k]:.2f} ({t[k] / solve:.2f})" if k in t else ""  # noqa: E731
    bound, trivial = r.get("bound"), r.get("trivial_bound")
    sandwich = "" if bound is None else (
        "ok" if (torch_lower is None or torch_lower <= bound) and (trivial is None or bound <= trivial) else "NO")
    status = r.get("status") if r.get("status") == "verified" else f"{r.get('status')}: {r.get('message') or ''}"[:90]
    return (f"| {name} | {fmt} | {status.replace('|', '/')} | {_fmt(bound, '.6g')} | {_fmt(trivial, '.6g')} "
            f"| {_fmt(r.get('lower_bound'), '.4g')} | {_fmt(torch_lower, '.4g')} | {sandwich} "
            f"| {_fmt(t.get('load'), '.2f')} | {ratio('build')} | {_fmt(t.get('solve'), '.2f')} | {ratio('verify')} "
            f"| {_fmt(t.get('total'), '.2f')} | {r['wall']:.1f} | {_fmt(r.get('peak_gib'), '.2f')} |")


HEADER = ["| net | file | status | bound | trivial | lower (lipsdp) | lower (torch) | sandwich | load s "
          "| build s (/solve) | solve s | verify s (/solve) | total s | wall s | peak GiB |", "|" + "---|" * 15]


def profile(name: str, args) -> None:
    """cProfile of one certification in this process (top 30 by cumulative time)."""
    import cProfile
    import pstats

    import lipsdp

    path = build(name, args.model_dir, args.size, args.epochs)["paths"]["pt"]
    prof = cProfile.Profile()
    prof.enable()
    try:
        cert = lipsdp.certify(str(path), trust_pickle=True, input_shape=(1, args.size, args.size),
                              time_limit=args.time_limit)
        print(name, cert.bound, cert.status, cert.timings)
    except Exception as exc:  # noqa: BLE001 - a profile is wanted whatever the outcome
        print(name, type(exc).__name__, exc)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", help="subset, e.g. 8x2 32x16 (CxK)")
    p.add_argument("--random", action="store_true", help="also the untrained nets")
    p.add_argument("--formats", nargs="+", choices=("pt", "onnx"), default=["pt", "onnx"])
    p.add_argument("--size", type=int, default=28, help="image side (28; smaller for quick checks)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--time-limit", type=float, default=600.0, help="lipsdp's --time-limit per call")
    p.add_argument("--memory-limit", default="8G", help="lipsdp's --memory-limit per call")
    p.add_argument("--net-limit", type=float, default=900.0, help="wall seconds per call (process killed)")
    p.add_argument("--torch-samples", type=int, default=16, help="autograd samples for the independent lower bound")
    p.add_argument("--model-dir", type=Path, default=HERE / "results" / "trained" / "models")
    p.add_argument("--out-dir", type=Path, default=HERE / "results" / "trained")
    p.add_argument("--tag", default="")
    p.add_argument("--profile", metavar="CxK", help="cProfile one certification in this process")
    p.add_argument("extra", nargs="*", help="after --: more options for lipsdp certify")
    args = p.parse_args(argv)
    if args.profile:
        profile(f"cnn-{args.profile}", args)
        return 0
    names = [n for n in grid(args.random) if not args.sizes or n.split("-")[-1] in args.sizes]
    lines, results = list(HEADER), {}
    for name in names:
        info = build(name, args.model_dir, args.size, args.epochs)
        torch_lower = torch_lower_bound(info["paths"]["pt"], args.size, args.torch_samples) \
            if args.torch_samples else None
        for fmt in args.formats:
            cmd = certify_command(info["paths"][fmt], args.size, args.time_limit, args.memory_limit, args.extra)
            runs = [run_one(cmd, args.net_limit) for _ in range(args.repeats)]
            ok = [r for r in runs if r.get("timings")]
            med = dict(ok[0] if ok else runs[0])
            if len(ok) > 1:
                med["timings"] = {k: statistics.median(r["timings"][k] for r in ok) for k in ok[0]["timings"]}
                med["wall"] = statistics.median(r["wall"] for r in ok)
            lines.append(row(name, fmt, med, torch_lower))
            print(lines[-1], flush=True)
            results[f"{name}.{fmt}"] = {"runs": runs, "torch_lower": torch_lower, "command": cmd[1:],
                                        "train_accuracy": info["train_accuracy"]}
    env = (f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, threads as lipsdp "
           f"chooses them (no thread variables), --time-limit {args.time_limit:g} --memory-limit {args.memory_limit}, "
           f"{args.size}x{args.size} images, {args.epochs} epochs, medians of {args.repeats} run(s)")
    table = "\n".join(lines)
    print("\n" + table + "\n\n" + env)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "cnn" + (f"-{args.tag}" if args.tag else "")
    (args.out_dir / f"{stem}.md").write_text(table + "\n\n" + env + "\n")
    (args.out_dir / f"{stem}.json").write_text(json.dumps({"environment": env, "results": results}, indent=1,
                                                          default=str))
    print(f"\nwrote {args.out_dir / (stem + '.md')}, {stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
