"""``lipsdp robustness``: clean and certified accuracy of a classifier on a data set (docs/robustness.md).

``lipsdp robustness model.pt --data test.npz --radii 0.1,0.2,0.5`` loads the model and the data,
checks that they fit, certifies the Lipschitz bounds the method needs (one SDP for ``global``, one per
pair of classes for ``pairwise``), turns them into certified radii (docs/math.md §9) and prints clean
accuracy, certified accuracy at each radius and the distribution of radii: a table, or one JSON object
with ``--json``; ``--plot`` draws certified accuracy against radius. ``--workers N`` or ``--scheduler
ADDRESS`` spread the units over processes or a Dask cluster (:mod:`lipsdp.parallel`); ``--out`` streams
them to a file that a rerun resumes from.

Exit codes as for ``lipsdp certify``: 0 when every bound used was verified, 1 when one was not (its
pair then certifies nothing, so the figures stay sound), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np

from lipsdp.arguments import positive_int
from lipsdp.dataset import check_data, load_data, range_warning
from lipsdp.errors import LipSDPError
from lipsdp.parallel import CHUNK, evaluate_dataset, make_executor
from lipsdp.pipeline import load_model
from lipsdp.smoothing import smoothed_radii, smoothing_report

__all__ = ["add_parser", "run", "summary"]

NORMS = {"2": "l2", "l2": "l2", "inf": "linf", "linf": "linf"}
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _radii(text: str) -> list[float]:
    try:
        radii = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of radii: {text!r} (use e.g. 0.1,0.2,0.5)") from None
    if not radii or any(not math.isfinite(r) or r < 0 for r in radii):
        raise argparse.ArgumentTypeError(f"radii must be finite and >= 0: {text!r}")
    return sorted(set(radii))


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a range: {text!r} (use lo,hi, e.g. 0,1)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"need finite lo < hi: {text!r}")
    return lo, hi



def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (use e.g. 1,28,28 or 784)")
    return shape


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lipsdp robustness`` on the ``lipsdp`` command's subparsers."""
    r = subparsers.add_parser("robustness", help="clean and certified accuracy of a classifier on a data set")
    r.add_argument("model", help="the classifier (any model file `lipsdp certify` reads); its outputs are logits")
    r.add_argument("--data", required=True, help="test set: .npz with arrays x and y, .npy inputs (with "
                                                 "--labels), or a torch .pt holding {'x':..., 'y':...} or (x, y)")
    r.add_argument("--labels", help="labels .npy file, with a .npy --data")
    r.add_argument("--radii", type=_radii, default=[0.1, 0.2, 0.5], help="radii to report (default 0.1,0.2,0.5)")
    r.add_argument("--norm", default="l2", type=str.lower, choices=sorted(NORMS), help="2 / l2 (default) or linf")
    r.add_argument("--method", default="pairwise", choices=["pairwise", "global", "local"],
                   help="pairwise (default: one SDP per pair of classes, tightest among global bounds), global "
                        "(one SDP) or local (per sample, SDPs on its balls of the --radii in turn; radii capped at "
                        "the ball)")
    r.add_argument("--input-range", type=_range, metavar="LO,HI",
                   help="the input range the model was trained on; warns when the data lies elsewhere")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r.add_argument("--plot", metavar="FILE.png", help="draw certified accuracy against radius")
    r.add_argument("--workers", type=positive_int, metavar="N", help="run the units on N local processes")
    r.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the units on a Dask cluster, e.g. tcp://host:8786 (pip install 'lipsdp[distributed]')")
    r.add_argument("--out", metavar="RESULTS.jsonl",
                   help="stream unit results to this file; rerunning with it resumes without redoing them")
    r.add_argument("--chunk", type=positive_int, default=CHUNK, help=f"samples per unit (default {CHUNK})")
    r.add_argument("--solver", default="auto", help="solver backend, as for `lipsdp certify`")
    r.add_argument("--formulation", default="neuron", choices=["neuron", "layer"])
    r.add_argument("--time-limit", type=float, help="solver seconds per SDP")
    r.add_argument("--activation", help="activation between layers, for weights-only files")
    r.add_argument("--input-shape", type=_shape, help="input shape without batch axis, e.g. 1,28,28")
    r.add_argument("--trust-pickle", action="store_true", help="allow arbitrary classes in pickled models")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    r.add_argument("--smoothing", type=float, metavar="SIGMA",
                   help="certify the Gaussian-smoothed classifier with noise SIGMA (docs/robustness.md)")
    r.add_argument("--samples", type=positive_int, default=1000, help="Monte-Carlo samples per input (--smoothing)")
    r.add_argument("--alpha", type=float, default=0.001, help="each radius fails with probability <= ALPHA (--smoothing)")
    return r


def _progress_bar():
    """A rich progress bar with ETA on stderr (only on a terminal), as :func:`evaluate_dataset` wants it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return None, None
    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), "ETA", TimeRemainingColumn(), console=console, transient=True)

    def start(total: int, done: int):
        task = bar.add_task("certifying units", total=total, completed=done)
        return lambda: bar.advance(task)

    return bar, start


def summary(result, radii, warnings=()) -> dict:
    """The JSON-ready report of a :class:`~lipsdp.parallel.DatasetResult` (the ``--json`` object)."""
    finite = [None if not math.isfinite(r) else float(r) for r in result.radii]
    bounds = [{k: b.get(k) for k in ("id", "pair", "bound", "verified", "status", "solver")} for b in result.bounds]
    quant = np.quantile(result.radii, QUANTILES)
    return {"method": result.method, "norm": result.norm, "n": int(len(result.radii)),
            "clean_accuracy": result.clean_accuracy,
            "certified_accuracy": {repr(float(r)): result.certified_accuracy(r) for r in radii},
            "radius_quantiles": {repr(q): (float(v) if math.isfinite(v) else None) for q, v in zip(QUANTILES, quant)},
            "verified": result.verified, "bounds": bounds,
            "bound": bounds[0]["bound"] if result.method in ("global", "local") else None,
            **({"local_bounds": result.local_bounds} if result.local_bounds is not None else {}),
            "radii": finite, "predictions": result.predictions.tolist(), "labels": result.labels.tolist(),
            "units": {"computed": result.computed, "reused": result.reused},
            "model_digest": result.header.get("model"), "data_digest": result.header.get("data"),
            "warnings": list(warnings)}


def _table(report: dict, args) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"lipsdp robustness {args.model} --data {args.data}"), show_header=False)
    table.add_column(style="bold")
    table.add_column()
    verified = [b["bound"] for b in report["bounds"] if b["verified"]]
    if report["method"] == "global":
        bound_text = f"{verified[0]:.6g}" if verified else "not verified"
    else:
        bound_text = (f"{len(verified)}/{len(report['bounds'])} pairs verified" +
                      (f", L_yj from {min(verified):.4g} to {max(verified):.4g}" if verified else ""))
    rows = [("method", f"{report['method']} ({report['norm']})"), ("bounds", bound_text),
            ("samples", str(report["n"])), ("clean accuracy", f"{report['clean_accuracy']:.4f}")]
    rows += [(f"certified accuracy at {r}", f"{acc:.4f}") for r, acc in report["certified_accuracy"].items()]
    rows += [(f"radius, {float(q):.0%} quantile", "inf" if v is None else f"{v:.4g}")
             for q, v in report["radius_quantiles"].items()]
    rows.append(("units", f"{report['units']['computed']} computed, {report['units']['reused']} read from --out"))
    for key, value in rows:
        table.add_row(escape(key), escape(value))
    out = sys.stdout
    Console(file=out, soft_wrap=True, width=None if out.isatty() else 200).print(table)


def _plot(path: str, result, radii) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    finite = result.radii[np.isfinite(result.radii)]
    top = max([*radii, float(finite.max()) if finite.size else 0.0]) * 1.05 or 1.0
    grid = np.linspace(0.0, top, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(grid, [result.certified_accuracy(r) for r in grid], label=f"{result.method} ({result.norm})")
    ax.scatter(radii, [result.certified_accuracy(r) for r in radii], zorder=3)
    ax.axhline(result.clean_accuracy, color="gray", linestyle=":", label="clean accuracy")
    ax.set_xlabel(f"radius ({result.norm})")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend()
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        raise LipSDPError(f"cannot write the plot {path}: {exc}") from None
    finally:
        plt.close(fig)


def run(args) -> int:
    """Run ``lipsdp robustness``; returns the exit code (bad input raises :class:`LipSDPError`, exit 2)."""
    norm = NORMS[args.norm]
    network, _ = load_model(args.model, activation=args.activation, input_shape=args.input_shape,
                            trust_pickle=args.trust_pickle)
    network.validate()
    x, y = load_data(args.data, labels=args.labels)
    x, y = check_data(x, y, network.op(network.input).shape, network.output_dim, source=args.data)
    warnings = [w for w in [range_warning(x, args.input_range)] if w]
    for w in warnings:
        print(f"lipsdp: warning: {w}", file=sys.stderr, flush=True)
    if getattr(args, "smoothing", None) is not None:
        return run_smoothing(network, x, y, args, warnings)
    executor = make_executor(network, workers=args.workers, scheduler=args.scheduler)
    bar, start = _progress_bar()
    try:
        if bar is not None:
            bar.start()
        result = evaluate_dataset(network, x, y, method=args.method, norm=norm, solver=args.solver,
                                  formulation=args.formulation, time_limit=args.time_limit, executor=executor,
                                  out=args.out, chunk=args.chunk, progress=start,
                                  region_radii=args.radii if args.method == "local" else None)
    finally:
        if bar is not None:
            bar.stop()
        executor.close()
    report = summary(result, args.radii, warnings)
    if args.plot:
        _plot(args.plot, result, args.radii)
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        _table(report, args)
        for w in warnings:
            print(f"warning: {w}")
    return 0 if result.verified else 1


def run_smoothing(network, x, y, args, warnings) -> int:
    """``lipsdp robustness --smoothing SIGMA``: certified radii of the smoothed classifier (lipsdp.smoothing)."""
    if args.norm not in ("2", "l2") or args.method == "local":
        raise LipSDPError("--smoothing certifies l2 radii with --method global or pairwise")
    unused = [flag for flag, value in (("--out", args.out), ("--plot", args.plot), ("--workers", args.workers),
                                       ("--scheduler", args.scheduler), ("--time-limit", args.time_limit),
                                       ("--formulation layer", args.formulation == "layer")) if value]
    if unused:
        raise LipSDPError(f"--smoothing does not support {', '.join(unused)} yet")
    result = smoothed_radii(network, x, y, sigma=args.smoothing, samples=args.samples, alpha=args.alpha,
                            L=args.method, solver=args.solver)
    report = dict(smoothing_report(result, args.radii), warnings=list(warnings))
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        rows = [("method", report["method"]), ("sigma, samples, alpha", f"{args.smoothing:g}, {args.samples}, "
                f"{args.alpha:g}"), ("confidence", report["confidence"]), ("samples", str(report["n"])),
                ("clean accuracy (smoothed)", f"{report['clean_accuracy']:.4f}"),
                ("abstained", str(report["abstained"])),
                ("Lipschitz-margin radius used", f"{report['lipschitz_radius_used']} samples")]
        rows += [(f"certified accuracy at {r}", f"{a:.4f}") for r, a in report["certified_accuracy"].items()]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
    return 0 if np.all(np.isfinite(result.L[~np.eye(len(result.L), dtype=bool)])) else 1
