"""The result users get: a :class:`Certificate`.

A certificate carries a bound only when lipsdp itself verified it
(:mod:`lipsdp.verify`); otherwise ``bound`` is None and ``status`` says why.
It serialises to JSON with everything needed to re-check it: the multipliers,
the formulation, the solver and its raw status, timings and the comparators
(trivial upper bound, sampled lower bound).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

from lipsdp import __version__
from lipsdp.errors import LipSDPError

#: ``status`` values: verified bound / solver returned something that failed verification / solver gave nothing.
VERIFIED, UNVERIFIED, SOLVER_FAILED = "verified", "unverified", "solver_failed"

#: Version of the certificate's JSON layout; files written before it was recorded read as 0.
SCHEMA_VERSION = 2

#: Temporary files :meth:`Certificate.save` is writing now; a hard exit on Ctrl-C (``lipsdp.cli``) removes them.
WRITING: set = set()


@dataclass
class Certificate:
    """A Lipschitz certificate for one network.

    Attributes
    ----------
    bound : float or None
        Verified upper bound on the Lipschitz constant (``sqrt(rho)`` rounded up),
        or None when nothing was verified.
    status : str
        ``"verified"``, ``"unverified"`` or ``"solver_failed"``.
    norm : str
        ``"l2"`` (l2 -> l2 gain).
    formulation : str
        ``"neuron"`` (LipSDP-Neuron) or ``"layer"`` (LipSDP-Layer).
    solver : str
        Backend used (``"closed-form"`` for nets without activations).
    solver_status : str
        The backend's status in the shared vocabulary; never trusted on its own.
    message : str
        One readable sentence about the outcome.
    trivial_bound : float
        Product of spectral norms times slope bounds; rounded up to a bound proven in floating point
        where the SDP's bound came out above the float product (:func:`trivial_certificate`).
    lower_bound : float or None
        Largest sampled Jacobian norm (the true constant is at least this).
    solver_objective : float or None
        ``sqrt`` of the solver's raw objective, for comparison only.
    solver_dual_objective : float or None
        ``sqrt`` of the solver's dual objective where the backend reports one
        (``ipm``, ``completion``, ``chordal``: up to the solver's dual residual; ``fo``: from a
        repaired dual feasible point): a lower bound on the SDP optimum, so
        ``bound / solver_dual_objective - 1`` is how far the verified bound sits
        above the best this formulation can give.  Not a bound on ``L``.
    solver_iterations : int or None
        Iterations (interior point, SCS) or evaluations (``fo``) the backend reported,
        summed over the solves of the certificate; None where it reports none.
    rho : float or None
        The verified ``rho`` (``bound**2 >= rho``).
    multipliers : list of float, or list of lists
        The verified multipliers, in the order of ``multiplier_labels``; for an
        l_inf certificate of several outputs, one such list per output.
    multiplier_labels : list of str
    output_map : list of lists or None
        The ``(k, m)`` matrix ``c`` when ``c f`` was certified instead of ``f``
        (``--output I`` stores the row ``e_I``); None for the whole output.
        ``lipsdp verify`` rebuilds the LMI with it.
    verification : dict
        ``method`` (``float-cholesky``; ``exact`` with ``--strict``; ``structural`` for a constant net;
        ``trivial`` when the bound is the proven trivial bound, the SDP's being worse), ``inflation``,
        ``margin``, ``message``.
    timings : dict
        Seconds for ``load``, ``build``, ``solve``, ``verify``, ``total``.
    network : dict
        Summary: source, input and output size, layers, LMI size.
    lipsdp_version : str or None
        The lipsdp that wrote the certificate (None in files written before it was recorded).
    schema_version : int
        Version of the JSON layout (:data:`SCHEMA_VERSION`; 0 for files written before it was recorded).
    created : str or None
        When the certificate was made: UTC, ISO 8601 (None in files written before it was recorded).
    caveats : list of str
        Where the bound is for a function slightly other than the model's, one line each: torch's Softplus
        switches to the identity above its threshold with a tiny jump, so the bound ``L`` holds for the smooth
        softplus and torch's function satisfies ``|f(x) - f(y)| <= L |x - y| + 2 J``
        (:func:`lipsdp.activations.caveats`).  Empty when the bound is the model's own.
    region : dict or None
        For a local bound (:mod:`lipsdp.local`): the input region it holds on, ``center_sha256`` (float64
        bytes), ``radius``, ``norm``, with how it was obtained; None for a global bound.
    global_bound : float or None
        For a local bound: the verified global bound computed alongside (``bound`` is never above it).
    """

    bound: float | None
    status: str
    norm: str = "l2"
    formulation: str = "neuron"
    solver: str = ""
    solver_status: str = ""
    message: str = ""
    trivial_bound: float | None = None
    lower_bound: float | None = None
    solver_objective: float | None = None
    solver_dual_objective: float | None = None
    solver_iterations: int | None = None
    rho: float | None = None
    multipliers: list = field(default_factory=list)
    multiplier_labels: list = field(default_factory=list)
    output_map: list | None = None
    verification: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    network: dict = field(default_factory=dict)
    lipsdp_version: str | None = __version__
    schema_version: int = SCHEMA_VERSION
    created: str | None = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    caveats: list = field(default_factory=list)
    region: dict | None = None
    global_bound: float | None = None

    @property
    def verified(self) -> bool:
        return self.status == VERIFIED and self.bound is not None

    @property
    def seconds(self) -> float:
        return float(self.timings.get("total", 0.0))

    @property
    def ratio(self) -> float | None:
        """``bound / trivial_bound``: how much tighter than the product of norms."""
        if not self.verified or not self.trivial_bound:
            return None
        return self.bound / self.trivial_bound

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verified"] = self.verified
        d["seconds"] = self.seconds
        d["ratio"] = self.ratio
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> "Certificate":
        """The certificate a JSON object describes; one written before versions were recorded reads as
        schema 0 with no version or date (rather than today's)."""
        names = {f for f in cls.__dataclass_fields__}
        old = {"lipsdp_version": None, "schema_version": 0, "created": None}
        return cls(**{**old, **{k: v for k, v in d.items() if k in names}})

    def save(self, path) -> None:
        """Write the certificate as JSON, atomically (no half-written file on Ctrl-C)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".lipsdp-", suffix=".json")
        WRITING.add(tmp)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(self.to_json(indent=1))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            WRITING.discard(tmp)

    @classmethod
    def load(cls, path) -> "Certificate":
        try:
            with open(path) as fh:
                return cls.from_dict(json.load(fh))
        except (OSError, ValueError, TypeError) as exc:
            raise LipSDPError(f"{path}: not a lipsdp certificate ({exc})") from exc

    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a human-readable table."""
        def fmt(v):
            return "-" if v is None else f"{v:.6g}"
        rows = [("Lipschitz bound (l2)" if self.norm == "l2" else f"Lipschitz bound ({self.norm})",
                 fmt(self.bound) if self.verified else "none (not verified)"),
                ("status", self.status),
                *([("region", f"{self.region['norm']} ball, radius {self.region['radius']:g}, center sha256 "
                              f"{self.region['center_sha256'][:12]}"), ("global bound", fmt(self.global_bound))]
                  if self.region else []),
                ("trivial bound (prod of norms)", fmt(self.trivial_bound)),
                ("ratio bound / trivial", fmt(self.ratio)),
                ("sampled lower bound", fmt(self.lower_bound)),
                *([("SDP dual value (gap of the bound)", self._dual_text())]
                  if self.verified and self.solver_dual_objective else []),
                *([("MaxMin as two-ReLU residual (paper baseline)",
                    fmt(self.network["comparisons"].get("two_relu_rewrite")))]
                  if self.network.get("comparisons") else []),
                *([("split into pieces (looser)", " x ".join(fmt(p.get("bound")) for p in self.network["split"]))]
                  if self.network.get("split") else []),
                ("formulation", self.formulation),
                ("solver", f"{self.solver} ({self.solver_status})"),
                ("LMI size", str(self.network.get("lmi_size", "-"))),
                ("time", f"{self.seconds:.2f} s (load {self.timings.get('load', 0):.2f}, "
                         f"build {self.timings.get('build', 0):.2f}, solve {self.timings.get('solve', 0):.2f}, "
                         f"verify {self.timings.get('verify', 0):.2f})"),
                *[("caveat", line) for line in self.caveats]]
        return rows

    def _dual_text(self) -> str:
        dual = self.solver_dual_objective
        gap = self.bound / dual - 1
        if dual > 0 and gap >= 1:
            # fo's repaired dual can be valid but near zero (deep nets): a relative gap of 1e21 reads as noise.
            return f"{dual:.6g} (weak: the bound is {self.bound / dual:.3g}x it)"
        return f"{dual:.6g} ({gap:.1e})"

    def __str__(self) -> str:
        rows = self.summary_rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + f"\n{self.message}"


# ---------------------------------------------------------------------------------------------------
# The certificate stage: assembling a Certificate from what the verify stage proved.


def network_summary(network, lifting, source) -> dict:
    """``Certificate.network``: what was certified (its SHA-256 is what ``lipsdp verify`` matches)."""
    layers = [f"{op.kind}{list(op.shape)}" for op in network.ops()]
    return {"source": str(source), "input_dim": network.input_dim, "output_dim": network.output_dim,
            "hidden_neurons": int(sum(b.size for b in lifting.blocks[1:])), "layers": layers,
            "lmi_size": lifting.n, "feedforward": network.is_feedforward(), "sha256": network.fingerprint()}


def constant_certificate(common: dict, timings: dict) -> Certificate:
    """``L = 0``, read off the graph: some all-zero layer cuts every input-output path."""
    return Certificate(0.0, VERIFIED, solver="closed-form", solver_status="optimal",
                       message="verified: the network is constant (an all-zero layer cuts every path from "
                       "input to output)", rho=0.0, verification={"method": "structural"}, timings=timings,
                       **common)


def certificate_from_outcomes(outcomes, common: dict, timings: dict) -> Certificate:
    """One certificate from the verify stage's outcomes (:class:`lipsdp.verification.Outcome`, one per
    query): verified only if every query verified; its bound is the largest of theirs."""
    worst = next((o.status for o in outcomes if o.status != "optimal"), "optimal")
    objectives = [o.objective for o in outcomes]
    duals = [o.dual for o in outcomes if o.dual is not None]
    iterations = [o.iterations for o in outcomes]
    solver = outcomes[-1].solver
    common = dict(common, solver=solver, solver_status=worst, timings=timings,
                  solver_objective=None if None in objectives else max(objectives),
                  solver_dual_objective=max(duals) if len(duals) == len(outcomes) and duals else None,
                  solver_iterations=sum(iterations) if iterations and None not in iterations else None)
    if common["norm"] == "linf":
        common["network"]["per_output"] = [
            {"output": i, "bound": o.verification.bound if o.verification else None, "solver_status": o.status}
            for i, o in enumerate(outcomes)]
    for o in outcomes:
        if o.verification is None:
            return Certificate(None, SOLVER_FAILED, message=f"{solver} returned no solution{o.label} "
                               f"({o.status}{': ' + o.message if o.message else ''})", **common)
        if not o.verification.verified:
            return Certificate(None, UNVERIFIED, message=f"{solver} finished{o.label} ({o.status}) but its "
                               f"multipliers could not be verified: {o.verification.message}",
                               verification={"method": o.verification.method, "message": o.verification.message},
                               **common)
    best = max(outcomes, key=lambda o: o.verification.bound).verification
    note = "" if worst == "optimal" else f" (solver status {worst}: the bound is valid, maybe not tight)"
    multipliers = best.x.tolist() if len(outcomes) == 1 else [o.verification.x.tolist() for o in outcomes]
    return Certificate(best.bound, VERIFIED, message=f"verified{note}", rho=best.rho, multipliers=multipliers,
                       multiplier_labels=list(outcomes[0].labels),
                       verification={"method": best.method,
                                     "inflation": max(o.verification.inflation for o in outcomes),
                                     "margin": min(o.verification.margin for o in outcomes),
                                     "message": best.message},
                       **common)


def split_certificate(parts, bound, common: dict) -> Certificate:
    """The certificate of a network certified piece by piece (docs/math.md §8.2): ``bound`` is the
    composition of the pieces' bounds (None unless every piece verified); labelled as looser."""
    common["network"]["split"] = [{"bound": c.bound, "status": c.status, "solver": c.solver,
                                   "solver_status": c.solver_status, "lmi_size": c.network.get("lmi_size"),
                                   "multipliers": c.multipliers, "multiplier_labels": c.multiplier_labels}
                                  for c in parts]
    common = dict(common, solver=parts[0].solver,
                  solver_status=next((c.solver_status for c in parts if c.solver_status != "optimal"), "optimal"),
                  verification={"method": "split", "pieces": len(parts)})
    failed = next((c for c in parts if not c.verified), None)
    if failed is not None:
        return Certificate(None, failed.status, message=f"split into {len(parts)} pieces; a piece was not verified: "
                           f"{failed.message}", **common)
    return Certificate(bound, VERIFIED,
                       message=f"verified by splitting into {len(parts)} pieces: the product of their LipSDP bounds "
                       f"({' x '.join(f'{c.bound:.6g}' for c in parts)}); sound but looser than the SDP on the "
                       "whole network", **common)


def trivial_certificate(sdp: Certificate, proven: float) -> Certificate:
    """The certificate whose bound is the proven trivial bound ``proven``, which lies below ``sdp``'s
    verified SDP bound (a solver that stopped short of the optimum on a net whose constant is the
    product of its norms, e.g. orthogonal GroupSort nets), or where ``sdp`` did not verify and
    :func:`falls_back`.  The multipliers go: the bound rests on the norms alone, and ``lipsdp verify`` proves them again (``verification.method = "trivial"``)."""
    network = dict(sdp.network)
    if network.get("per_output"):  # every output's constant is at most the trivial bound
        network["per_output"] = [dict(p, bound=proven) for p in network["per_output"]]
    message = (f"verified: the trivial bound (product of norms, proven in floating point) {proven:.9g} is below "
               f"the SDP's verified bound {sdp.bound:.9g} ({sdp.solver}, {sdp.solver_status}), so it is the "
               "certificate") if sdp.bound is not None else (
        f"verified: the trivial bound (product of norms and gains, proven in floating point) {proven:.9g} is the "
        f"certificate; the SDP's point did not verify ({sdp.solver}, {sdp.solver_status}), and an l_inf SDP cannot beat "
        "the composed gains of order statistics (docs/math.md §2.5)")
    return replace(sdp, bound=proven, trivial_bound=proven, rho=None, multipliers=[], multiplier_labels=[],
                   message=message, network=network, status=VERIFIED,
                   verification={"method": "trivial", "sdp_bound": sdp.bound, "sdp_verification": sdp.verification,
                                 "message": "every layer's norm proven by a floating-point Cholesky test"})


def composition_certificate(common: dict, proven: float, outputs: int, timings: dict) -> Certificate:
    """The proven trivial bound ``proven`` as the certificate, with no SDP solved: the sampled lower bound
    already reaches it, so no SDP could be tighter (l_inf-distance and SortNet layers, docs/math.md §2.5).
    ``lipsdp verify`` proves the norms again (``verification.method = "trivial"``)."""
    network = dict(common["network"])
    if common["norm"] == "linf":  # every output's constant is at most the composed bound
        network["per_output"] = [{"output": i, "bound": proven, "solver_status": "not solved"} for i in range(outputs)]
    message = (f"verified: the composition of the layers' norms and gains, proven in floating point, is {proven:.9g}, "
               "and the sampled lower bound reaches it: no SDP can be tighter, none was solved")
    return Certificate(proven, VERIFIED, solver="closed-form", solver_status="optimal", message=message,
                       timings=timings, **dict(common, network=network, trivial_bound=proven),
                       verification={"method": "trivial", "message": "every layer's norm proven in floating point"})


def falls_back(network, norm: str) -> bool:
    """Whether a certificate whose SDP did not verify takes the proven trivial bound instead: l_inf
    certificates of nets with order statistics (``groupsort`` activations: l_inf-distance, SortNet), whose
    l_inf SDP cannot beat the composed gains at those units (docs/math.md §2.5), so the product of norms is
    their natural certificate.  ``network`` is read through ``activations()`` and ``op()`` only."""
    return norm == "linf" and any(network.op(n).function == "groupsort" for n in network.activations())

