"""``lipsdp verify`` of a state-space CNN certificate (``--structure state-space``, docs/math.md §7.4).

The certificate stores the channel supplies ``X_0 = rho I, X_1, ..., X_L`` (its multipliers), the
read-out gain ``t`` (``verification.tail_gain``) and the solver's point (``verification.point``: the
storages ``P1``, ``P2``, slope multipliers and the read-out ``Y``).  The re-check reads the conv chain
from the model again (:func:`lipsdp.convnet.conv_chain`) and proves every per-convolution block, the
read-out's Gram bound and ``X_L >= Y^-1`` with the tests of certification
(:func:`lipsdp.conv_lmi.recheck_chain`); nothing is solved.  The stated bound must cover ``sqrt(rho t)``.
"""

from __future__ import annotations

import numpy as np

from lipsdp.conv_lmi import recheck_chain
from lipsdp.convnet import conv_chain
from lipsdp.errors import LipSDPError, NotVerifiedError
from lipsdp.verification import recheck

__all__ = ["check_structured"]


def _output_map(cert, m: int):
    if cert.output_map is None:
        return None
    try:
        omap = np.atleast_2d(np.asarray(cert.output_map, dtype=np.float64))
    except (TypeError, ValueError):
        omap = None
    if omap is None or omap.ndim != 2 or omap.shape[1] != m or not np.all(np.isfinite(omap)):
        raise LipSDPError("the certificate's output_map does not fit this model's outputs (edited or corrupt)")
    return omap


def check_structured(cert, network) -> list[float]:
    """Prove a state-space certificate again on ``network``; its margin ``bound - sqrt(rho t)``.  A certificate
    whose bound is the proven trivial bound (the structured LMIs were looser) is re-checked as such."""
    if network.fingerprint() != (cert.network or {}).get("sha256"):
        raise LipSDPError("the model does not match the certificate (architecture or weights changed)")
    if (cert.verification or {}).get("method") == "trivial":
        return recheck(cert, network)
    point, t = (cert.verification or {}).get("point"), (cert.verification or {}).get("tail_gain")
    if not isinstance(point, dict):
        raise LipSDPError("the certificate holds no solver point for its structured LMIs (written before "
                          "schema_version 2, or edited): certify the model again")
    omap = _output_map(cert, network.output_dim)
    chain = conv_chain(network) if omap is None else conv_chain(network, omap)
    try:
        bound, why = recheck_chain(chain, point, cert.multipliers, float(t))
    except (ValueError, IndexError, TypeError, KeyError) as exc:
        raise LipSDPError(f"the certificate's structured multipliers do not fit this model (edited or corrupt): "
                          f"{exc}") from None
    if bound is None:
        raise NotVerifiedError(f"the certificate does not verify: {why} at its multipliers (edited?)")
    if isinstance(cert.bound, bool) or not isinstance(cert.bound, (int, float)) or not bound <= cert.bound:
        raise NotVerifiedError(f"the certificate does not verify: its bound {cert.bound!r} is below what its "
                          f"multipliers prove ({bound!r}; edited?)")
    return [cert.bound - bound]
