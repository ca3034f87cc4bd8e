"""``lipsdp verify`` of an all-horizon RNN certificate (``--horizon all``, :mod:`lipsdp.recurrent`).

The certificate stores the verified point of the dissipation LMI: ``rho`` and the multipliers (slope
multipliers ``t`` and the storage matrix ``P``).  The re-check rebuilds the state-space form from the
model, the dissipation LMI and the storage condition (:func:`lipsdp.recurrent.dissipation_lmi`,
:func:`~lipsdp.recurrent.storage_lmi`, docs/math.md §13.2) and proves both at the stored point with the
rigorous test of certification (:func:`lipsdp.verify.rigorous_negative_definite`): nothing is solved.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

from lipsdp.errors import LipSDPError, NotVerifiedError
from lipsdp.io import load_network, network_from_module
from lipsdp.io.rnn import is_program
from lipsdp.network import Network
from lipsdp.recurrent import dissipation_lmi, state_space, storage_lmi
from lipsdp.verify import rigorous_negative_definite, round_up_sqrt

__all__ = ["check_all_horizons"]


def _unrolled(cert, model, input_shape, trust_pickle: bool) -> Network:
    """The model unrolled at the horizon certification read it at (``network.lower_bound_horizon``)."""
    if isinstance(model, Network):
        return model
    summary = cert.network or {}
    if input_shape is None and not is_program(model):
        T, n = summary.get("lower_bound_horizon"), summary.get("input_dim")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (T, n)):
            raise LipSDPError("the certificate does not say at which horizon the model was read (edited or corrupt)")
        input_shape = (T, n)
    if isinstance(model, (str, os.PathLike)):
        return load_network(model, input_shape=input_shape, trust_pickle=trust_pickle)
    return network_from_module(model, input_shape=input_shape)


def _stored_point(cert, n_var: int, nonneg) -> np.ndarray:
    try:
        x = np.asarray([cert.rho, *cert.multipliers], dtype=np.float64)
    except (TypeError, ValueError):
        x = None
    if x is None or x.shape != (n_var,) or not np.all(np.isfinite(x)) or np.any(x[nonneg] < 0):
        raise LipSDPError("the certificate's rho and multipliers do not fit this model's dissipation LMI "
                          "(edited or corrupt)")
    return x


def check_all_horizons(cert, model, *, input_shape=None, trust_pickle: bool = False, **_) -> list[float]:
    """Prove an all-horizon certificate again on ``model``; the margins of the dissipation LMI and of the
    storage condition.  The stated bound must cover ``sqrt(rho)`` (rounded up in rationals), the model must
    match the stored SHA-256 of the unrolled network (where stored), and both tests must pass at the
    stored point as it is.  Raises :class:`~lipsdp.errors.LipSDPError` otherwise."""
    network = _unrolled(cert, model, input_shape, trust_pickle)
    sha = (cert.network or {}).get("sha256")
    if sha is not None and network.fingerprint() != sha:
        raise LipSDPError("the model does not match the certificate (architecture or weights changed)")
    ss = state_space(network)
    lmi = dissipation_lmi(ss)
    x = _stored_point(cert, lmi.n_var, lmi.nonneg)
    proven = round_up_sqrt(Fraction(float(x[0])))
    if isinstance(cert.bound, bool) or not isinstance(cert.bound, (int, float)) or not math.isfinite(cert.bound) \
            or not proven <= cert.bound:
        raise NotVerifiedError(f"the certificate does not verify: its bound {cert.bound!r} is below what its "
                          f"multipliers prove ({proven!r}; edited?)")
    ok, margin = rigorous_negative_definite(lmi, x)
    if not ok:
        raise NotVerifiedError("the certificate does not verify: the dissipation LMI is not provably negative definite "
                          "at its multipliers (edited multipliers or bound?)")
    what = "P - C^T C > 0" if ss.mode == "last" else "P > 0"
    ok, storage_margin = rigorous_negative_definite(storage_lmi(ss, lmi), x)
    if not ok:
        raise NotVerifiedError(f"the certificate does not verify: the storage condition {what} cannot be proved at "
                          "its multipliers, so the bound is not proved for every horizon (edited?)")
    return [float(margin), float(storage_margin)]
