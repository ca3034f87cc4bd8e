"""Local Lipschitz bounds: LipSDP on an input region with per-neuron slope sectors (docs/math.md §6).

On a region ``||x - center||_norm <= radius`` every neuron's pre-activation stays in an interval
(:mod:`lipsdp.preact`), and on it the activation is slope-restricted in the range of its derivative there
(:meth:`lipsdp.activations.SlopeActivation.derivative_range`): ``[0, 0]`` or ``[1, 1]`` for a stable
ReLU, a narrower sector for tanh away from 0.  :func:`localize` writes those sectors into a copy of the
network (``params["sector"]``, which :class:`lipsdp.constraints.SlopeRestricted` reads), and the same
SDP and the same rigorous verification then prove a bound that holds for every pair of inputs in the
region.  :func:`certify_region` runs both the global and the local certification and keeps the smaller
verified bound, so the local bound is never above the global one.

The local bound says nothing outside the region: a robustness radius derived from it is capped at the
region's radius (:func:`lipsdp.robustness.certified_radii`'s ``cap``; docs/math.md §9).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from lipsdp import activations
from lipsdp.bounds import jacobians
from lipsdp.errors import LipSDPError
from lipsdp.network import Activation, Add, Affine, Network
from lipsdp.preact import preactivation_bounds_ball

#: Region norms accepted from users: the Lipschitz norm's names and their aliases.
REGION_NORMS = {"l2": "l2", "2": "l2", "linf": "linf", "inf": "linf"}


def region_norm_name(norm: str) -> str:
    """``"l2"`` or ``"linf"`` from the names users type (``2``, ``l2``, ``inf``, ``linf``)."""
    try:
        return REGION_NORMS[str(norm).lower()]
    except KeyError:
        raise LipSDPError(f"unknown region norm {norm!r}; choose l2 or linf") from None


def localize(network: Network, center, radius: float, norm: str = "l2", method: str = "crown",
             eliminate: bool = True):
    """A network for the SDP whose activations carry per-neuron sectors valid on the region.

    With ``eliminate`` (default), a stable neuron (one slope ``d_i`` on the region: ``alpha_i == beta_i``)
    leaves the activation: its increment is exactly ``d_i`` times its pre-activation's, so it becomes a
    linear map (an Affine node, added to the unstable neurons' part), and only unstable neurons keep a
    quadratic constraint (docs/math.md §6.2).  Biases are kept; the SDP ignores them.

    Returns
    -------
    (Network, dict)
        The network (its fingerprint differs from the model's: the region is part of what is certified)
        and statistics: ``neurons``, ``stable`` (neurons with one exact slope), ``method``.
    """
    norm = region_norm_name(norm)
    bounds = preactivation_bounds_ball(network, center, radius, norm, method=method)
    local = Network(source=network.source)
    new: dict[int, int] = {}
    neurons = stable = 0
    for n in network.graph.nodes:
        op, parents = network.op(n), [new[p] for p in network.parents(n)]
        if not isinstance(op, Activation):
            new[n] = local.add(op, parents)
            continue
        entry = activations.get(op.function)
        alpha, beta = entry.derivative_range(*bounds[network.parents(n)[0]], op.params)
        glo, ghi = entry.sector(op.params)
        alpha, beta = np.maximum(alpha, glo), np.minimum(beta, ghi)  # never wider than the global sector
        fixed = alpha == beta
        neurons += op.size
        stable += int(np.count_nonzero(fixed))
        if eliminate and fixed.any():
            new[n] = _split_stable(local, op, parents[0], alpha, beta, fixed)
        else:
            new[n] = local.add(_with_sector(op, alpha, beta), parents)
    local.output = new[network.output]
    return local, {"neurons": neurons, "stable": stable, "method": method, "eliminated": bool(eliminate)}


def _with_sector(op: Activation, alpha: np.ndarray, beta: np.ndarray, **changes) -> Activation:
    # Tuples, not arrays: params are hashed and compared by value (fingerprints, caveats).
    return replace(op, params={**op.params, "sector": (tuple(alpha.tolist()), tuple(beta.tolist()))}, **changes)


def _split_stable(local: Network, op: Activation, parent: int, alpha, beta, fixed) -> int:
    """Add ``op`` to ``local`` as ``diag(d) v`` on its stable neurons plus the activation of the unstable
    ones, embedded back in place; return the node holding the result."""
    n = op.size
    linear = local.add(Affine(f"{op.name}.stable", "StableSlopes", op.shape,
                              weight=sp.diags(np.where(fixed, alpha, 0.0)).tocsr()), [parent])
    if fixed.all():
        return linear
    free = np.flatnonzero(~fixed)
    select = sp.csr_matrix((np.ones(free.size), (np.arange(free.size), free)), shape=(free.size, n))
    picked = local.add(Affine(f"{op.name}.unstable_in", "Select", (free.size,), weight=select), [parent])
    act = local.add(_with_sector(op, alpha[free], beta[free], shape=(free.size,)), [picked])
    back = local.add(Affine(f"{op.name}.unstable_out", "Embed", op.shape, weight=select.T.tocsr()), [act])
    return local.add(Add(f"{op.name}.local", "Add", op.shape), [linear, back])


def region_record(center, radius: float, norm: str) -> dict:
    """``Certificate.region``: the center's SHA-256 (float64 bytes), the radius and the norm."""
    center = np.ascontiguousarray(np.asarray(center, dtype=np.float64).ravel())
    return {"center_sha256": hashlib.sha256(center.tobytes()).hexdigest(), "radius": float(radius),
            "norm": region_norm_name(norm), "input_dim": int(center.size)}


def local_lower_bound(network: Network, center, radius: float, norm: str = "l2", lipschitz_norm: str = "l2",
                      samples: int = 128, seed: int = 0, output_map=None) -> float:
    """Largest Jacobian norm at the center and at random points of the region: a lower bound on the local
    constant (sampled, like :func:`lipsdp.bounds.sampled_lower_bound`)."""
    rng = np.random.default_rng(seed)
    center = np.asarray(center, dtype=np.float64).ravel()
    d = center.size
    if region_norm_name(norm) == "l2":
        u = rng.standard_normal((samples, d))
        u *= (radius * rng.uniform(0, 1, (samples, 1)) ** (1.0 / d)) / np.linalg.norm(u, axis=1, keepdims=True)
    else:
        u = radius * rng.uniform(-1, 1, (samples, d))
    x = np.vstack([center, center + u])
    J = jacobians(network, x)
    if output_map is not None:
        J = np.einsum("km,bmn->bkn", np.atleast_2d(output_map), J)
    J = J[np.all(np.isfinite(J), axis=(1, 2))]
    if not len(J):
        return 0.0
    value = np.linalg.norm(J, 2, axis=(1, 2)) if lipschitz_norm == "l2" else np.abs(J).sum(axis=2).max(axis=1)
    return float(value.max())


def _check_region(network: Network, center, radius) -> tuple[np.ndarray, float]:
    if center is None or radius is None:
        raise LipSDPError("a local bound needs both a center and a radius")
    center = np.asarray(center, dtype=np.float64).ravel()
    if center.size != network.input_dim:
        raise LipSDPError(f"the center has {center.size} entries; the network has {network.input_dim} inputs")
    if not np.all(np.isfinite(center)):
        raise LipSDPError("the center has NaN or Inf entries")
    radius = float(radius)
    if not (np.isfinite(radius) and radius >= 0):
        raise LipSDPError(f"the radius must be a finite number >= 0, got {radius}")
    return center, radius


def certify_region(certify_network, network: Network, *, center, radius, region_norm=None,
                   bound_method: str = "crown", **options):
    """The local certificate of ``network`` on the region, by ``certify_network`` (the pipeline's, passed in
    so that this module stays below it).

    Both the global and the local bound are certified; the certificate is the local one when it verified
    and is not above the global one, else the global one (which holds on the region too).  ``bound`` is the
    better verified bound, ``global_bound`` the global one, ``region`` describes the region, and
    ``lower_bound`` is sampled in the region (:func:`local_lower_bound`).
    """
    center, radius = _check_region(network, center, radius)
    norm = options.get("norm", "l2")
    region_norm = region_norm_name(region_norm or norm)
    samples = options.get("lower_bound_samples", 128)
    glob = certify_network(network, **{**options, "lower_bound_samples": 0})  # sampled in the region below
    local_net, stats = localize(network, center, radius, region_norm, method=bound_method)
    loc = certify_network(local_net, **{**options, "lower_bound_samples": 0, "compare": False})
    use_local = loc.verified and (not glob.verified or loc.bound <= glob.bound)
    cert = loc if use_local else glob
    cert.region = {**region_record(center, radius, region_norm), **stats,
                   "local_verified": loc.verified, "local_bound": loc.bound if loc.verified else None,
                   "bound_from": "local" if use_local else "global", **recheck_record(network, center, glob, cert, use_local)}
    cert.global_bound = glob.bound if glob.verified else None
    # Both products of norms bound the local constant; the rewritten graph's is often the looser one.
    trivial = [t for t in (loc.trivial_bound, glob.trivial_bound) if t is not None]
    cert.trivial_bound = min(trivial) if trivial else None
    cert.caveats = glob.caveats
    cert.lower_bound = local_lower_bound(network, center, radius, region_norm, norm, samples,
                                         output_map=options.get("output_map")) if samples else None
    if not use_local and loc.verified:
        cert.message += "; the local SDP's bound was not below the global one, so the global bound is reported"
    elif not loc.verified:
        cert.message += f"; the local bound did not verify ({loc.message})"
    return cert


def recheck_record(network: Network, center, glob, cert, use_local: bool) -> dict:
    """What ``lipsdp verify`` needs beyond the certificate's own multipliers (docs/certificates.md): the
    center itself, the model's SHA-256 (the certificate's ``network.sha256`` is the localized network's
    when the local SDP won), which LMI the stored multipliers belong to (``sdp_from``) and how they were
    proven (``sdp_method``, kept when a Clarke-Jacobian bound later replaces the bound), and the global
    certificate's multipliers when the local one is stored, so that ``global_bound`` is re-checked too."""
    record = {"center": np.asarray(center, dtype=np.float64).ravel().tolist(), "model_sha256": network.fingerprint(),
              "sdp_from": "local" if use_local else "global", "sdp_method": (cert.verification or {}).get("method")}
    if use_local and glob.verified:
        record["global_certificate"] = {
            "bound": glob.bound, "rho": glob.rho, "multipliers": glob.multipliers,
            "multiplier_labels": glob.multiplier_labels, "verification": glob.verification,
            "per_output": (glob.network or {}).get("per_output")}
    return record


def read_region(center_path, radius, region_norm=None) -> dict:
    """The command line's ``--center X.npy --radius R [--region-norm]`` as :func:`lipsdp.certify` keywords
    (empty without them); one clear error for a missing half, an unreadable file or a bad radius."""
    if center_path is None and radius is None:
        if region_norm is not None:
            raise LipSDPError("--region-norm needs --center and --radius")
        return {}
    if center_path is None or radius is None:
        raise LipSDPError("a local bound needs both --center X.npy and --radius R")
    try:
        center = np.load(center_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise LipSDPError(f"{center_path}: not a readable .npy array ({exc})") from None
    if not np.issubdtype(center.dtype, np.number) or np.iscomplexobj(center):
        raise LipSDPError(f"{center_path}: the center must be a real numeric array, got {center.dtype}")
    return {"center": center.astype(np.float64), "radius": radius,
            "region_norm": None if region_norm is None else region_norm_name(region_norm)}


def regional(certify_network, center=None, radius=None, region_norm=None):
    """``certify_network`` itself without a region; with one, the function certifying on it.

    :func:`lipsdp.certify`'s ``center``, ``radius`` and ``region_norm`` (default: the Lipschitz ``norm``)
    arrive here: the local bound holds on the ball ``||x - center||_region_norm <= radius``
    (:func:`certify_region`).
    """
    if center is None and radius is None:
        return certify_network

    def run(network, **options):
        return certify_region(certify_network, network, center=center, radius=radius, region_norm=region_norm,
                              **options)
    return run
