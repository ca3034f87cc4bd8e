"""``lipsdp verify``: a saved certificate re-checked against a model, without solving anything.

The path is load -> lift -> verify, on the queries and congruences certification used
(:func:`lipsdp.verification.recheck`); implicit layers also get their well-posedness proved again.
A local certificate (``--center/--radius``) is re-checked on the network localized again on its stored
region (:func:`check_local`), and its Clarke-Jacobian bound is recomputed; an all-horizon RNN certificate
by :func:`lipsdp.recurrent_check.check_all_horizons`, a state-space CNN one by
:func:`lipsdp.structured_check.check_structured`.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import replace

import numpy as np

from lipsdp.certificate import Certificate
from lipsdp.errors import LipSDPError, NotVerifiedError
from lipsdp.jacobian import local_lipschitz_jacobian
from lipsdp.local import localize, region_norm_name
from lipsdp.pipeline import load_model
from lipsdp.recurrent_check import check_all_horizons
from lipsdp.structured_check import check_structured
from lipsdp.verification import check_claims, recheck
from lipsdp.wellposed import attach_well_posedness, implicit_nodes


def check_certificate(cert, model, **load_options) -> Certificate:
    """Re-check a saved certificate against a model without solving anything.

    The model must be the one certified (same architecture and weights: SHA-256
    of the graph).  Every LMI the certificate stands for is rebuilt from the
    model and the stored ``formulation``, ``norm`` and ``output_map``: one for
    l2, one per certified output for l_inf (docs/math.md §2.1).  The stored
    multipliers must then pass the rigorous test of :mod:`lipsdp.verify` as
    they are (nothing is repaired or re-derived), and the stated bounds must
    cover them exactly: ``bound >= sqrt(rho)`` (l2) or
    ``bound >= sqrt(sum lambda_in)`` for every output (l_inf, also each entry
    of ``network["per_output"]``).  So an edit that makes the certificate claim
    more than it proves (a lowered bound, a changed multiplier, another output)
    fails; an edit that keeps the claim true (a larger bound) is still a valid
    certificate and passes.  The checks are those of certification
    (:func:`lipsdp.verification.recheck`).  Local certificates: :func:`check_local`.

    Returns the certificate with refreshed verification details; raises
    :class:`~lipsdp.errors.NotVerifiedError` (exit 1) where a claim is not proven again, another
    :class:`~lipsdp.errors.LipSDPError` (exit 2) for a malformed certificate or another model.
    """
    if isinstance(cert, dict):
        cert = Certificate.from_dict(cert)
    check_claims(cert)
    t0 = time.perf_counter()
    if cert.formulation == "dissipation":  # --horizon all: the dissipation LMI and the storage condition
        margins = check_all_horizons(cert, model, **load_options)
        network = None
    else:
        network, _ = load_model(model, **load_options)
        network.validate()
        if cert.formulation == "state-space":  # --structure state-space: the per-convolution LMIs
            margins = check_structured(cert, network)
        else:
            margins = check_local(cert, network) if cert.region else recheck(cert, network)
    # Implicit layers: the bound means something only if the equilibrium is proved unique.
    if margins is not None and network is not None and implicit_nodes(network):
        attach_well_posedness(network, cert, cert.formulation, cert.norm)
        if not cert.network["well_posedness"].get("proved"):
            raise NotVerifiedError("the certificate does not verify: " + cert.network["well_posedness"]["message"])
    cert.verification = {**cert.verification, "rechecked": True,
                         "recheck_margin": min(margins) if margins else None,
                         "recheck_seconds": time.perf_counter() - t0}
    return cert


def _stored_region(cert, network) -> tuple[np.ndarray, float, str]:
    """The region's center, radius and norm, checked against the certificate's own record of them."""
    region = cert.region
    try:
        center = np.asarray(region["center"], dtype=np.float64).ravel()
        radius, norm = float(region["radius"]), region_norm_name(region["norm"])
    except (KeyError, TypeError, ValueError, LipSDPError) as exc:
        raise LipSDPError(f"the certificate's region is malformed (edited or corrupt): {exc}") from None
    if center.size != network.input_dim or not np.all(np.isfinite(center)):
        raise LipSDPError(f"the certificate's center ({center.size} values) does not fit this model's "
                          f"{network.input_dim} inputs (edited or corrupt)")
    if hashlib.sha256(np.ascontiguousarray(center).tobytes()).hexdigest() != region.get("center_sha256"):
        raise LipSDPError("the certificate's center does not match its center_sha256 (edited?)")
    if not (math.isfinite(radius) and radius >= 0):
        raise LipSDPError(f"the certificate's radius {radius!r} is not a finite number >= 0 (edited or corrupt)")
    if region.get("model_sha256") != network.fingerprint():
        raise LipSDPError("the model does not match the certificate (architecture or weights changed)")
    return center, radius, norm


def _sdp_claim(cert) -> Certificate:
    """The certificate of the SDP whose multipliers ``cert`` stores: ``bound`` is the smallest bound it is
    stated to prove (the certificate's, the local or the global one), its method the SDP's."""
    region = cert.region
    claims = [cert.global_bound] if region.get("sdp_from") == "global" else [region.get("local_bound")]
    if (cert.verification or {}).get("method") != "clarke-jacobian":
        claims.append(cert.bound)
    claims = [c for c in claims if c is not None]
    if not claims or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in claims):
        raise LipSDPError("the certificate's region states no SDP bound to re-check (edited or corrupt)")
    return replace(cert, bound=min(claims), region=None,
                   verification={**cert.verification, "method": region.get("sdp_method")})


def _global_claim(cert) -> Certificate | None:
    """The global certificate stored beside a local one (its ``global_bound``), or None."""
    stored = cert.region.get("global_certificate")
    if not isinstance(stored, dict):
        if cert.region.get("sdp_from") == "local" and cert.global_bound is not None:
            raise LipSDPError("the certificate states a global bound but holds no multipliers for it (edited?)")
        return None
    network = dict(cert.network, sha256=cert.region.get("model_sha256"), per_output=stored.get("per_output"))
    return replace(cert, bound=cert.global_bound, rho=stored.get("rho"), multipliers=stored.get("multipliers"),
                   multiplier_labels=stored.get("multiplier_labels"), region=None, network=network,
                   verification=stored.get("verification") or {})


def check_local(cert, network) -> list[float]:
    """Re-check a local certificate (docs/local.md) on ``network``, the model it was certified on.

    The stored center (matching ``center_sha256``), radius and norm define the region.  The stored
    multipliers are proven on the LMI they belong to (``region.sdp_from``): the network localized again on
    that region (:func:`lipsdp.local.localize`, the same pre-activation bounds, so the same sectors and the
    same SHA-256 as at certification; an enlarged region gives other sectors and fails) or the model
    itself.  The global bound is re-checked from its own stored multipliers, and a Clarke-Jacobian bound
    (``verification.method = "clarke-jacobian"``) is recomputed on the region's box (docs/math.md §6.3):
    every stated bound must cover what is proven again.  Returns the margins.
    """
    center, radius, norm = _stored_region(cert, network)
    region = cert.region
    sdp = _sdp_claim(cert)
    if region.get("sdp_from") == "local":
        local_net, _ = localize(network, center, radius, norm, method=region.get("method", "crown"),
                                eliminate=bool(region.get("eliminated", True)))
        if local_net.fingerprint() != (cert.network or {}).get("sha256"):
            raise NotVerifiedError("the certificate does not verify: the network localized on its stated region "
                              "has other sectors than the one certified (region edited?)")
        margins = recheck(sdp, local_net)
    elif region.get("sdp_from") == "global":
        margins = recheck(sdp, network)
    else:
        raise LipSDPError(f"the certificate's region names an unknown sdp_from {region.get('sdp_from')!r} "
                          "(edited or corrupt)")
    glob = _global_claim(cert)
    if glob is not None:
        margins = (margins or []) + (recheck(glob, network) or [])
    if (cert.verification or {}).get("method") == "clarke-jacobian":
        jac, _ = local_lipschitz_jacobian(network, center - radius, center + radius, norm=cert.norm)
        if not jac <= cert.bound:
            raise NotVerifiedError(f"the certificate does not verify: its bound {cert.bound!r} is below the "
                              f"Clarke-Jacobian bound {jac!r} proven again on the region's box (edited?)")
        margins = (margins or []) + [cert.bound - jac]
    return margins
