"""``certify(..., structure=...)``: which formulation of a CNN to certify, and its certificate.

``"unrolled"`` is the LMI of the unrolled network (docs/math.md §7.1); ``"state-space"`` the chain of
small Roesser LMIs (docs/math.md §7.4, :mod:`lipsdp.conv_lmi`), whose size does not grow with the image
but which can be looser; ``"both"`` computes the two and keeps the smaller verified bound, recording both
and how much looser the structured one is; ``"auto"`` takes the structured path for conv chains whose
unrolled LMI would be large (:data:`AUTO_MIN_NEURONS`) and unrolls everything else.
"""

from __future__ import annotations

import time

import numpy as np

from lipsdp.bounds import PROVEN_NORM_SIZE
from lipsdp.budget import checkpoint, current, record_if_limited
from lipsdp.certificate import UNVERIFIED, VERIFIED, Certificate, trivial_certificate
from lipsdp.conv_lmi import certify_chain
from lipsdp.convnet import (ConvChain, NotAConvChain, chain_lower_bound, chain_proven_trivial_bound,
                             chain_trivial_bound, conv_chain, with_output_map)
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.verification import proven_trivial_bound

STRUCTURES = ("auto", "unrolled", "state-space", "both")
#: ``auto`` takes the structured path from this many hidden neurons on (the unrolled LMI's size).
AUTO_MIN_NEURONS = 4096


def structured_chain(network, structure: str, norm: str, split) -> ConvChain | None:
    """The conv chain to certify structurally, or None to unroll (``auto``: also when it is no chain).

    Raises :class:`UnsupportedLayerError` for ``state-space`` / ``both`` on what the path does not handle.
    """
    if structure not in STRUCTURES:
        raise LipSDPError(f"unknown structure {structure!r}: one of {', '.join(STRUCTURES)}")
    if structure == "unrolled":
        return None
    reason = None
    if norm != "l2":
        reason = "the structured (state-space) path certifies the l2 norm only"
    elif split:
        reason = "the structured (state-space) path does not combine with --split"
    if reason:
        if structure == "auto":
            return None
        raise NotAConvChain(reason)
    if structure == "auto" and sum(network.op(n).size for n in network.activations()) < AUTO_MIN_NEURONS:
        return None
    try:
        return conv_chain(network)
    except UnsupportedLayerError:
        if structure == "auto":
            return None
        raise


def certify_by_structure(network, structure: str, split, options: dict, unrolled) -> Certificate:
    """The certificate ``certify`` returns for ``structure``; ``unrolled(network, split, options)`` is the
    pipeline's unrolled path (taken when :func:`structured_chain` says so, and for ``both``)."""
    t0 = time.perf_counter()
    checkpoint("build")  # reading the chain back (kernels recovered and checked) is the build's
    conv = structured_chain(network, structure, options["norm"], split)
    if conv is None:
        return unrolled(network, split, options)
    recovery = time.perf_counter() - t0
    cert = certify_structured(network, conv, **{k: options[k] for k in (
        "output_map", "solver", "time_limit", "lower_bound_samples", "source", "load_seconds")})
    cert.timings.update(chain=recovery, build=cert.timings.get("build", 0.0) + recovery,
                        total=cert.timings.get("total", 0.0) + recovery)
    cert = at_most_trivial(cert, network, options["output_map"], conv)
    if structure == "both":
        cert = record_both(cert, unrolled(network, None, options))
    return cert


def at_most_trivial(cert: Certificate, network, output_map, chain: ConvChain | None = None) -> Certificate:
    """Never above the proven product of norms (the structured LMIs can be looser than it, docs/math.md
    §7.4): as :func:`lipsdp.pipeline.certify_network` does for the unrolled SDP.  Convolutions too large
    for a proven norm of their matrix get one on the torus (``chain`` given, docs/math.md §7.5)."""
    if not cert.verified or cert.trivial_bound is None or cert.bound <= cert.trivial_bound:
        return cert
    if chain is not None and any(np.prod(c.in_shape) + np.prod(c.out_shape) > PROVEN_NORM_SIZE for c in chain.layers):
        proven = chain_proven_trivial_bound(chain, output_map)  # (the matrices' own proof would fail, slowly)
    else:
        proven = proven_trivial_bound(network, "l2", output_map)
    if proven is None or cert.bound <= proven:
        return cert
    return trivial_certificate(cert, proven)


def certify_structured(network, chain: ConvChain, *, output_map=None, solver: str = "auto",
                       time_limit: float | None = None, lower_bound_samples: int = 128, source: str = "",
                       load_seconds: float = 0.0) -> Certificate:
    """The certificate of ``chain`` (read from ``network``) by the structured LMIs of docs/math.md §7.4."""
    t0 = time.perf_counter()
    # the bracketing bounds on the recovered kernels, never on the unrolled matrices (lipsdp.convops)
    trivial = chain_trivial_bound(chain) * (1.0 if output_map is None else _norm2(output_map))
    # a verified bound from the start, so a limit reached later reports one
    record_if_limited(lambda: chain_proven_trivial_bound(chain, output_map), "product of norms")
    lower = chain_lower_bound(network, chain, samples=lower_bound_samples, output_map=output_map) \
        if lower_bound_samples else None
    if output_map is not None:
        chain = with_output_map(chain, output_map)
    summary = {"source": str(source or network.source), "input_dim": network.input_dim,
               "output_dim": network.output_dim, "structure": "state-space",
               "hidden_neurons": int(sum(network.op(n).size for n in network.activations())),
               "layers": [f"{op.kind}{list(op.shape)}" for op in network.ops()], "sha256": network.fingerprint()}
    if chain.input_phases != (1, 1):
        summary["phases"] = phases_of(chain)
    around = time.perf_counter() - t0  # bounds and fingerprint: counted in the build
    budget = current()
    limit = budget.solver_seconds(time_limit) if budget is not None else time_limit
    res = certify_chain(chain, solver="auto" if solver in ("auto", None) else solver, time_limit=limit)
    details = res.details
    summary.update(lmi_size=max(details.get("lmi_sizes") or [0]), lmi_sizes=details.get("lmi_sizes"))
    timings = dict(res.timings, build=res.timings.get("build", 0.0) + around, bounds=around, load=load_seconds,
                   total=load_seconds + time.perf_counter() - t0)
    verification = {"method": "state-space: per-layer float Cholesky (docs/math.md §7.4, §10)",
                    "structure": "state-space", "read_out": details.get("read_out"),
                    "tail_gain": res.tail_gain, "sector": "activation sectors widened to contain 0",
                    "point": details.get("point")}  # re-checked by lipsdp.structured_check
    if "phases" in summary:
        verification["method"] += "; strided convolutions as stride-1 ones between polyphase images (§7.6)"
    solver_status = details.get("solver_status", "")
    note = "" if solver_status in ("optimal", "") else f"; solver status {solver_status}: the bound is valid, maybe not tight"
    status, message = (VERIFIED, "verified (structured: 2-D state-space LMIs per convolution)" + note
                       + ("" if res.message == "verified" else f"; {res.message}")) if res.verified \
        else (UNVERIFIED, f"the structured LMIs were not verified: {res.message}")
    return Certificate(res.bound if res.verified else None, status, formulation="state-space",
                       solver=details.get("solver", ""), solver_status=details.get("solver_status", ""),
                       message=message, trivial_bound=trivial, lower_bound=lower,
                       solver_objective=details.get("solver_objective"),
                       solver_iterations=details.get("solver_iterations"), rho=res.rho,
                       multipliers=details.get("supplies", []), multiplier_labels=["channel supplies X_0 = rho I, X_1, ..., X_L"],
                       output_map=None if output_map is None else [list(map(float, r)) for r in output_map],
                       verification=verification, timings=timings, network=summary)


def phases_of(chain: ConvChain) -> dict:
    """The polyphase factors the chain was read in (docs/math.md §7.6): the input's and each convolution's
    output's ``(fh, fw)``, and the channels of the phase images."""
    return {"input": list(chain.input_phases), "outputs": [list(layer.phases) for layer in chain.layers],
            "channels": [chain.layers[0].in_shape[0]] + [layer.out_shape[0] for layer in chain.layers]}


def _norm2(A) -> float:
    return float(np.linalg.norm(np.atleast_2d(np.asarray(A, dtype=float)), 2))


def record_both(structured: Certificate, unrolled: Certificate) -> Certificate:
    """``structure="both"``: the smaller verified bound, with both and the structured LMIs' looseness."""
    a = structured.bound if structured.verified else None
    b = unrolled.bound if unrolled.verified else None
    best = unrolled if a is None or (b is not None and b <= a) else structured
    lmi = structured.verification.get("sdp_bound", a)  # the structured LMIs' own bound (may exceed the trivial)
    best.network["structures"] = {"state-space": lmi, "unrolled": b,
                                  "state_space_looser_by": None if lmi is None or not b else lmi / b - 1.0}
    if lmi is not None and b is not None and lmi > b:
        best.message += f"; the structured bound {lmi:.6g} is {100 * (lmi / b - 1):.3g}% looser than the unrolled one"
    return best
