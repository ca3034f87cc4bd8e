"""``lipsdp verify``: a saved certificate re-checked against a model, without solving anything.

The path is load -> lift -> verify, on the queries and congruences certification used
(:func:`lipsdp.verification.recheck`); implicit layers also get their well-posedness proved again.
"""

from __future__ import annotations

import time

from lipsdp.certificate import Certificate
from lipsdp.errors import LipSDPError
from lipsdp.pipeline import load_model
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
    (:func:`lipsdp.verification.recheck`).

    Returns the certificate with refreshed verification details; raises
    :class:`~lipsdp.errors.LipSDPError` (exit 2) otherwise.
    """
    if isinstance(cert, dict):
        cert = Certificate.from_dict(cert)
    check_claims(cert)
    t0 = time.perf_counter()
    network, _ = load_model(model, **load_options)
    network.validate()
    margins = recheck(cert, network)
    # Implicit layers: the bound means something only if the equilibrium is proved unique.
    if margins is not None and implicit_nodes(network):
        attach_well_posedness(network, cert, cert.formulation, cert.norm)
        if not cert.network["well_posedness"].get("proved"):
            raise LipSDPError("the certificate does not verify: " + cert.network["well_posedness"]["message"])
    cert.verification = {**cert.verification, "rechecked": True,
                         "recheck_margin": min(margins) if margins else None,
                         "recheck_seconds": time.perf_counter() - t0}
    return cert
