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
from dataclasses import asdict, dataclass, field

#: ``status`` values: verified bound / solver returned something that failed verification / solver gave nothing.
VERIFIED, UNVERIFIED, SOLVER_FAILED = "verified", "unverified", "solver_failed"

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
        Product of spectral norms times slope bounds.
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
        ``method`` (``float-cholesky``), ``inflation``, ``margin``, ``message``.
    timings : dict
        Seconds for ``load``, ``build``, ``solve``, ``verify``, ``total``.
    network : dict
        Summary: source, input and output size, layers, LMI size.
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
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path) -> None:
        """Write the certificate as JSON, atomically (no half-written file on Ctrl-C)."""
        import os
        import tempfile

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
        from lipsdp.errors import LipSDPError

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
                         f"verify {self.timings.get('verify', 0):.2f})")]
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
