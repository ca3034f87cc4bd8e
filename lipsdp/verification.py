"""The verify stage: from a solver's point, or a certificate's stored multipliers, to a proven bound.

Both :func:`lipsdp.certify` (:func:`verify_solution`) and ``lipsdp verify``
(:func:`recheck`) come through here, on the same :class:`~lipsdp.reductions.Query`
objects and the same exact congruences (:class:`~lipsdp.reductions.Precondition`),
and both prove with the same rigorous test (:mod:`lipsdp.verify`,
docs/math.md §10).  A bound is only ever proven on the LMI of the network as
given (``Query.given``), up to exact power-of-two congruences.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from lipsdp.bounds import node_lipschitz, proven_spectral_norm, proven_trivial_bound  # noqa: F401 (re-exported)
from lipsdp.budget import record_if_limited
from lipsdp.certificate import SCHEMA_VERSION, composition_certificate, constant_certificate
from lipsdp.errors import LipSDPError, NotVerifiedError
from lipsdp.exact import exact_negative_definite
from lipsdp.lifting import lift
from lipsdp.reductions import Precondition, Query, composed_norm_scales, queries, readouts
from lipsdp.verify import (Verification, balanced_scales, rigorous_negative_definite, round_up_sqrt, verify,
                           verify_balanced)

FORMULATIONS = ("neuron", "layer")
#: Formulations of certificates ``lipsdp verify`` re-checks with their own LMIs (:mod:`lipsdp.checking`).
RECHECKED_ELSEWHERE = ("dissipation", "state-space")
NORMS = ("l2", "linf")

#: A verified bound more than this (relative) above the solver's own value sends verification on to an
#: interior-point method's earlier iterates: rounding can hide the margin of a final point that sits on
#: the boundary (deep nets), while a slightly earlier, more interior one proves a bound nearer the optimum.
PATH_GAP = 1e-6
#: A solve cut short by the time: the start point may prove a better bound than its point (:func:`_better_start`).
CUT_SHORT = "time_limit"


@dataclass
class Outcome:
    """What the verify stage made of one query's solution.

    ``verification`` is None when the solver returned no point; ``objective`` and
    ``dual`` are the solver's values as bounds (``sqrt``, original units), for
    comparison only.
    """

    label: str
    verification: Verification | None
    status: str
    objective: float | None
    message: str
    labels: list
    dual: float | None
    iterations: int | None
    solver: str


def record_proven_trivial(network, norm: str, output_map) -> None:
    """Under a time or memory limit, prove the product of norms at once and record it with the run's budget.

    The proven trivial bound (:func:`~lipsdp.bounds.proven_trivial_bound`, upward-rounded products of
    proven norms) is a verified upper bound on its own, so a limit reached later in the build, the solve or
    the verification still reports a bound ("best verified bound so far", exit code 1) instead of none.
    Without limits nothing is done: the final certificate proves the product only where it needs it.
    """
    record_if_limited(lambda: proven_trivial_bound(network, norm, output_map), "product of norms")


def _verify(lmi, x, v, objective, candidates=None) -> Verification:
    """:func:`~lipsdp.verify.verify`, retried on a block-balanced congruence when it fails or lands
    far above the solver's ``objective`` (the test's uniform shift can swamp small blocks of deep
    nets); the better of the two.  ``candidates``: try only the first few candidate multiplier vectors."""
    ver = verify(lmi, x, scale=v, candidates=candidates)
    if not ver.verified or (objective and ver.bound > objective * (1 + 1e-5)):
        alt = verify_balanced(lmi, x, scale=v, candidates=candidates)
        if alt.verified and (not ver.verified or alt.bound < ver.bound):
            ver = alt
    return ver


def _earlier_iterates(lmi, path, v, ver: Verification) -> Verification:
    """The best of ``ver`` and the verified earlier iterates of ``path``, newest first, stopping where
    an iterate's own objective cannot beat the bound in hand."""
    for xk in reversed(path[:-1]):
        obj_k = float(np.sqrt(max(float(lmi.objective @ xk) * v[0], 0.0)))
        if ver.verified and obj_k >= ver.bound:
            break
        # The multipliers as returned only: an earlier iterate is worth having where it sits inside
        # with margin, and the floors and scalings that rescue a boundary point cost a dozen dense
        # factorisations each.
        alt = _verify(lmi, xk, v, obj_k, candidates=1)
        if alt.verified and (not ver.verified or alt.bound < ver.bound):
            ver = alt
    return ver


def _exact_recheck(query: Query, ver: Verification) -> Verification:
    """``--strict``: confirm a float-verified point in exact rational arithmetic, or drop it."""
    try:
        ok = exact_negative_definite(query.full(), ver.x, query.lifting, output_map=query.output_map)
    except NotImplementedError as exc:
        raise LipSDPError(f"--strict: {exc}") from exc
    if not ok:
        return replace(ver, verified=False, bound=None, message="the exact rational check rejected the point")
    return replace(ver, method="exact", message=ver.message + "; confirmed exactly (rational arithmetic)")


#: ``id(start) -> (weak reference to start, target, Verification)``: each start point is tested once.
_STARTS: dict = {}


def _start_bound(query: Query, below: float | None = None) -> Verification | None:
    """The verified bound of the solved LMI's layer-by-layer start point (:mod:`lipsdp.scaling`, improved by
    :mod:`lipsdp.layer_sweep`), or None: no start, or its objective is not below ``below``.  The start is
    in the variables of ``query.target`` (the congruence maps both alike), and feasible up to rounding."""
    start, v = query.solve.start, query.scale
    if start is None or len(start) != query.target.n_var or not np.all(np.isfinite(start)):
        return None
    objective = float(np.sqrt(max(float(query.target.objective @ start) * v[0], 0.0)))
    if below is not None and objective >= below:
        return None
    done = _STARTS.get(id(start))  # verified already after the build (record_start_bound): the same test
    if done is not None and done[0]() is start and done[1] is query.target:
        return done[2]
    ver = _verify(query.target, start, v, objective)
    _STARTS[id(start)] = (weakref.ref(start), query.target, ver)
    weakref.finalize(start, _STARTS.pop, id(start), None)
    return ver


def _better_start(query: Query, ver: Verification | None, why: str = "") -> Verification | None:
    """``ver`` (the point of a solve stopped by the time limit, or None), or the start point's
    verification where that proves a smaller bound: an interior-point method's first iterates lie further
    inside than its start (the completion method doubles it), so under a short limit the start is often
    the better point.  Either way the bound is not the SDP's optimum; the message says which point it is."""
    if ver is not None and ver.verified and query.norm == "l2" and not query.label:
        record_if_limited(lambda: ver.bound, "the solver's unfinished point")  # in case the start's test is cut
    alt = _start_bound(query, ver.bound if ver is not None and ver.verified else None)
    if alt is None or not alt.verified:
        return ver
    return replace(alt, message=f"the layer-by-layer start point, not the SDP optimum, which lies below by an "
                                f"unknown amount ({why or 'the solve stopped early'}): {alt.message}")


def record_start_bound(query: Query) -> None:
    """Under a time or memory limit, verify the layer-by-layer start point of an l2 query at once and record
    its bound with the run's budget, so a limit reached in the solve reports it instead of the product of
    norms (on 784-64x64-10 one iteration of the completion method takes longer than its whole share)."""
    if query.norm == "l2" and not query.label:
        record_if_limited(lambda: (lambda ver: ver.bound if ver is not None and ver.verified else None)(
            _start_bound(query)), "the layer-by-layer start point")


def verify_solution(query: Query, solution, *, strict: bool = False) -> Outcome:
    """Prove a bound from ``solution`` (a :class:`~lipsdp.solve.Solution`, inverted through the
    reductions) on ``query.target``, the LMI of the network as given under the reductions' congruence."""
    v = query.scale
    objective = None if solution.objective is None else float(np.sqrt(max(solution.objective, 0.0)))
    dual = None
    if solution.dual is not None and solution.status in ("optimal", "optimal_inaccurate"):
        dual = float(np.sqrt(max(solution.dual, 0.0)))
    ver = _verify(query.target, solution.x, v, objective) if solution.x is not None else None
    if ver is not None and solution.path and objective and \
            (not ver.verified or ver.bound > objective * (1 + PATH_GAP)):
        ver = _earlier_iterates(query.target, solution.path, v, ver)
    if solution.status == CUT_SHORT:
        ver = _better_start(query, ver, solution.message)
    if strict and ver is not None and ver.verified:
        ver = _exact_recheck(query, ver)
    return Outcome(query.label, ver, solution.status, objective, solution.message, query.given.labels, dual,
                   solution.iterations, solution.solver)


# ---------------------------------------------------------------------------------------------------
# The trivial bound, proven: what a certificate falls back to when the SDP's verified bound is worse.

# ---------------------------------------------------------------------------------------------------
# Re-checking a saved certificate: the stored multipliers, as they are, on the same queries.


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _not_recheckable(cert) -> str | None:
    """The kinds of certificate whose LMIs are not rebuilt from the network by :func:`recheck`."""
    if getattr(cert, "region", None) and "center" not in cert.region:  # lipsdp.local before schema 2
        return "local certificates written without their center (before schema_version 2)"
    if (cert.verification or {}).get("method") == "composition":  # lipsdp.compose: one per block
        return "composed certificates (lipsdp.compose) here: lipsdp.composition.check_composed does, as lipsdp verify"
    return None


def check_claims(cert) -> None:
    """Refuse, before loading anything, a certificate that cannot be re-checked or is malformed."""
    version = cert.schema_version
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= SCHEMA_VERSION:
        raise LipSDPError(f"the certificate's schema_version {version!r} is not one this lipsdp "
                          f"reads (0 to {SCHEMA_VERSION}): written by a newer lipsdp, or edited")
    kind = _not_recheckable(cert)
    if kind:
        raise LipSDPError(f"re-checking {kind} is not supported yet: certify the model again")
    if cert.norm not in NORMS or cert.formulation not in FORMULATIONS + RECHECKED_ELSEWHERE:
        raise LipSDPError(f"the certificate names an unknown norm {cert.norm!r} or formulation "
                          f"{cert.formulation!r} (edited or corrupt)")
    if not cert.verified:
        raise LipSDPError("the certificate holds no verified bound to check")
    if (cert.verification or {}).get("method") == "split":
        raise LipSDPError("re-checking split certificates (--split or the memory fallback) is not supported yet: "
                          "certify again without splitting, or re-run the split certification")
    if not _is_number(cert.bound) or not math.isfinite(cert.bound) or cert.bound < 0:
        raise LipSDPError(f"the certificate's bound {cert.bound!r} is not a finite number (edited or corrupt)")


def _stored_output_map(cert, m: int):
    """The certificate's ``output_map`` as a finite ``(k, m)`` array, or None (the whole output)."""
    if cert.output_map is None:
        return None
    try:
        omap = np.atleast_2d(np.asarray(cert.output_map, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise LipSDPError(f"the certificate's output_map is not a matrix (edited or corrupt): {exc}") from None
    if omap.ndim != 2 or omap.shape[1] != m or len(omap) == 0 or not np.all(np.isfinite(omap)):
        raise LipSDPError(f"the certificate's output_map (shape {omap.shape}) does not fit this model's "
                          f"{m} outputs (edited or corrupt)")
    return omap


def _stored_point(query: Query, x, where: str) -> np.ndarray:
    """The stored multipliers as a point of ``query``'s LMI, or an error if they cannot be one."""
    raw = query.given
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        x = None
    if x is None or x.shape != (raw.n_var,) or not np.all(np.isfinite(x)) or np.any(x[raw.nonneg] < 0):
        raise LipSDPError(f"the certificate's multipliers{where} do not fit this model's LMI (edited or corrupt)")
    return x


def _check_claims_covered(x, n_in: int, claims, where: str) -> None:
    """Every stated bound must be at least ``sqrt(rho)`` or ``sqrt(sum lambda_in)`` of ``x``, summed in
    rationals and rounded up, as :func:`~lipsdp.verify.verify` reports it."""
    proven = round_up_sqrt(sum((Fraction(float(t)) for t in x[:n_in]), Fraction(0)))
    for claim in claims:
        if not _is_number(claim) or not proven <= claim:
            raise NotVerifiedError(f"the certificate does not verify{where}: a stated bound {claim!r} is below "
                              f"what its multipliers prove ({proven!r}; edited?)")


def _congruences(query: Query, x, block_scale, trivial):
    """The exact congruences certification may have proven ``x`` in: its preconditioning, the composed
    norm bounds, and blocks balanced at ``x`` (:func:`~lipsdp.verify.verify_balanced`); lazily, as
    each costs more than the last."""
    yield Precondition(block_scale, trivial)
    yield Precondition(block_scale, trivial, scales=composed_norm_scales)
    yield Precondition(*balanced_scales(query.given, x), scales=composed_norm_scales)


def _prove_stored(query: Query, x, block_scale, trivial, where: str) -> float:
    """The margin with which ``-M(x)`` is proven positive definite under one of the congruences."""
    ok = exact = False
    for congruence in _congruences(query, x, block_scale, trivial):
        reduced, v = congruence.apply(query)
        xs = x / v
        if not np.array_equal(xs * v, x):  # v holds powers of two: exact unless under/overflow
            continue
        exact = True
        ok, margin = rigorous_negative_definite(reduced.target, xs)
        if ok:
            return margin
    if not exact:
        raise LipSDPError(f"the certificate's multipliers{where} are out of range (edited or corrupt)")
    raise NotVerifiedError(f"the certificate does not verify{where}: M is not provably negative definite "
                      "at its multipliers (edited multipliers, bound or output?)")


def _recheck_trivial(cert, network, omap) -> float:
    """A certificate whose bound is the proven trivial bound: proven again; every stated bound covers it."""
    proven = proven_trivial_bound(network, cert.norm, omap)
    if proven is None:
        raise NotVerifiedError("the certificate does not verify: its trivial bound cannot be proven for this model")
    per_output = (cert.network or {}).get("per_output") if cert.norm == "linf" else None
    claims = [cert.bound] + [p.get("bound") if isinstance(p, dict) else None for p in per_output or []]
    for claim in claims:
        if not _is_number(claim) or not proven <= claim:
            raise NotVerifiedError(f"the certificate does not verify: a stated bound {claim!r} is below the proven "
                              f"trivial bound {proven!r} (edited?)")
    return cert.bound - proven


def recheck(cert, network) -> list[float] | None:
    """Prove ``cert``'s stored multipliers on ``network``'s LMIs as they are; the margins, one per query
    (None for a constant network, whose ``L = 0`` is read off the graph).  Raises
    :class:`~lipsdp.errors.LipSDPError` for anything that does not verify."""
    if network.fingerprint() != (cert.network or {}).get("sha256"):
        raise LipSDPError("the model does not match the certificate (architecture or weights changed)")
    if (cert.verification or {}).get("method") == "structural":
        if not network.is_constant():
            raise NotVerifiedError("the certificate does not verify: it claims a constant network (edited?)")
        return None
    omap = _stored_output_map(cert, network.output_dim)
    if (cert.verification or {}).get("method") == "trivial":
        return [_recheck_trivial(cert, network, omap)]
    count = len(readouts(network.output_dim, cert.norm, omap))
    stored = [cert.multipliers] if count == 1 else cert.multipliers
    if not stored or not isinstance(stored, list) or len(stored) != count:
        raise LipSDPError(f"the certificate holds {len(stored or [])} multiplier vectors for "
                          f"{count} outputs (edited or corrupt)")
    per_output = (cert.network or {}).get("per_output") if cert.norm == "linf" else None
    if per_output is not None and (not isinstance(per_output, list) or len(per_output) != count):
        raise LipSDPError("the certificate's per-output bounds do not match its outputs (edited or corrupt)")
    lifting = lift(network)
    lips = node_lipschitz(network)
    block_scale = np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]])
    margins = []
    for i, (query, x) in enumerate(zip(queries(lifting, cert.formulation, cert.norm, omap), stored)):
        where = f" (output {i})" if count > 1 else ""
        x = _stored_point(query, x, where)
        claims = [cert.bound]
        if per_output is not None:
            claims.append((per_output[i] or {}).get("bound") if isinstance(per_output[i], dict) else None)
        _check_claims_covered(x, query.given.n_in, claims, where)
        try:
            margins.append(_prove_stored(query, x, block_scale, lips[network.output], where))
        except LipSDPError:
            if query.given.input_metric is None:
                raise
            # A certificate proven on the unrestricted LMI (before docs/math.md §10.1) keeps its margin there.
            margins.append(_prove_stored(query.unrestricted(), x, block_scale, lips[network.output], where))
    return margins


def closed_form(network, common: dict, lower, output_map, strict: bool, timings: dict):
    """The certificate when no SDP is needed, else None: ``L = 0`` for a constant network; the proven
    trivial bound (the layers' norms and gains composed, :func:`proven_trivial_bound`) where the sampled
    lower bound reaches it to 1e-9, so no SDP could be tighter (l_inf-distance and SortNet nets in
    l_inf, docs/math.md §2.5).  Not with ``strict`` (the norms are proven in floating point)."""
    if network.is_constant():
        return constant_certificate(common, timings)
    if strict or not lower:
        return None
    norm = common["norm"]
    proven = proven_trivial_bound(network, norm, output_map)
    if proven is None or proven > lower * (1 + 1e-9):
        return None
    return composition_certificate(common, proven, len(readouts(network.output_dim, norm, output_map)), timings)

