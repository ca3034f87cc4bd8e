"""Horizon-T bounds of an RNN model for a range of horizons, made non-decreasing (docs/math.md §13.1).

The LipSDP value of an unrolled RNN is non-decreasing in the horizon in exact arithmetic
(docs/math.md §13.1), but each verified bound carries its own small inflation (§10), so once the
bounds level off consecutive ones can differ in the last digits either way (measured: down by
3e-10 relative).  :func:`certify_horizons` reports, for each ``T``, the verified bound at ``T``
and the envelope ``max_{T' <= T}`` of the verified bounds, which is also a bound at ``T`` (it is
at least the one verified there) and is non-decreasing.
"""

from __future__ import annotations

from dataclasses import dataclass

from lipsdp.certificate import Certificate
from lipsdp.pipeline import certify

__all__ = ["HorizonBound", "certify_horizons"]


@dataclass
class HorizonBound:
    """One horizon of :func:`certify_horizons`.

    Attributes
    ----------
    horizon : int
    bound : float or None
        The bound verified at this horizon (``certificate.bound``).
    envelope : float or None
        ``max`` of the verified bounds at horizons ``<= horizon`` in the sweep: a bound at this
        horizon too, and non-decreasing; None once some horizon was not verified.
    certificate : Certificate
    """

    horizon: int
    bound: float | None
    envelope: float | None
    certificate: Certificate


def certify_horizons(model, horizons, **options) -> list[HorizonBound]:
    """Certify ``model`` (an ``nn.RNN`` model) at each horizon in ``horizons`` (increasing).

    ``options`` are those of :func:`lipsdp.certify` (``horizon`` excluded).

    Examples
    --------
    >>> rows = certify_horizons(model, range(1, 21))        # doctest: +SKIP
    >>> [r.envelope for r in rows]                          # doctest: +SKIP
    """
    horizons = [int(T) for T in horizons]
    if horizons != sorted(set(horizons)):
        raise ValueError(f"horizons must increase: {horizons}")
    rows, best = [], 0.0
    for T in horizons:
        cert = certify(model, horizon=T, **options)
        if best is not None:
            best = max(best, cert.bound) if cert.verified else None
        rows.append(HorizonBound(T, cert.bound if cert.verified else None, best, cert))
    return rows
