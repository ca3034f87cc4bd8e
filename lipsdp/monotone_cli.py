"""``lipsdp monotone``: prove or refute that outputs are nondecreasing in inputs over a region (docs/monotone.md).

``lipsdp monotone model.pt --inputs 0,3 --outputs 1 --center x.npy --radius 0.1`` (or ``--box lo.npy
hi.npy``) prints one JSON object (:meth:`lipsdp.monotonicity.MonotoneResult.to_dict`) and exits 0 when
every pair ``d f_j / d x_i >= 0`` is proved, 1 when one is refuted (with a witness) or unknown (the
JSON's ``status`` says which), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from lipsdp import arguments
from lipsdp.errors import LipSDPError
from lipsdp.monotonicity import monotone

__all__ = ["add_parser", "run"]




def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``lipsdp monotone`` on the ``lipsdp`` command's subparsers."""
    p = subparsers.add_parser("monotone", help="prove or refute d f_j / d x_i >= 0 over an input region")
    p.add_argument("model", help="any model file `lipsdp certify` reads")
    p.add_argument("--inputs", type=arguments.indices, required=True, help="input indices (flattened), e.g. 0,3")
    p.add_argument("--outputs", type=arguments.indices, required=True, help="output indices, e.g. 1")
    p.add_argument("--center", metavar="X.npy", help="centre of the l_inf ball (with --radius)")
    p.add_argument("--radius", type=arguments.radius, help="l_inf radius around --center")
    p.add_argument("--box", nargs=2, metavar=("LO.npy", "HI.npy"), help="the region's lower and upper ends")
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds for search and proof (default 10)")
    p.add_argument("--samples", type=int, default=512, help="random inputs tried as witnesses (default 512)")
    p.add_argument("--activation", help="activation between layers, for weights-only files")
    p.add_argument("--trust-pickle", action="store_true", help="allow arbitrary classes in pickled models")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _array(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LipSDPError(f"cannot read {path} as a .npy array: {exc}") from None


def run(args) -> int:
    """Run the subcommand; the exit code (0 proved, 1 refuted or unknown; bad input raises LipSDPError)."""
    if (args.center is None) != (args.radius is None) or (args.box is None) == (args.center is None):
        raise LipSDPError("give the region as --center X.npy --radius R, or as --box LO.npy HI.npy")
    if not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise LipSDPError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    region = ({"center": _array(args.center), "radius": args.radius} if args.center is not None
              else {"lower": _array(args.box[0]), "upper": _array(args.box[1])})
    result = monotone(args.model, args.inputs, args.outputs, time_limit=args.time_limit,
                      samples=max(args.samples, 0), activation=args.activation,
                      trust_pickle=args.trust_pickle, **region)
    print(json.dumps(result.to_dict()))
    return 0 if result.status == "proved" else 1
