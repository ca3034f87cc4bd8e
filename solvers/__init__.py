"""Solver backends (installed as ``lipsdp.solvers``).

One class per backend, one file each (``scs_.py`` etc., with the trailing
underscore so a file never shadows the solver's own package).  Nothing here
imports a solver at ``import lipsdp``: availability is checked with
``importlib.util.find_spec``, and MOSEK's licence with a licence checkout.

``auto`` picks MOSEK when it is installed *and* licensed; otherwise lipsdp's
own ``completion`` (primal-dual, both iterates block-tridiagonal) for
feed-forward nets with a layer-by-layer start and an affordable iteration;
else ``chordal`` (clique chain of a feed-forward LMI) where its estimated cost
is below the dense method's (deep narrow nets), else its ``ipm`` for LMIs whose
constraints all have the factored rank-two form and
no free multipliers (slope-restricted nets, up to size 3000); for larger l2
LMIs lipsdp's ``fo`` (L-BFGS on the exact ``rho(T)``: approximate, verified);
else SDPA for free multipliers (GroupSort, Householder), CVXOPT up to size 600
and SCS above: the fastest that stayed accurate in
``benchmarks/bench_solvers.py`` and the tests.
"""

from __future__ import annotations

from lipsdp.errors import SolverLicenseError, SolverNotFound
from lipsdp.solvers.completion_ import CompletionIPM
from lipsdp.solvers.base import STATUSES, Backend, SolveResult
from lipsdp.solvers.chordal_ import ChordalIPM, estimate_cost
from lipsdp.solvers.clarabel_ import Clarabel
from lipsdp.solvers.cvxpy_ import CVXOPT, MOSEK, SDPA
from lipsdp.solvers.firstorder_ import FirstOrder
from lipsdp.solvers.ipm_ import LowRankIPM
from lipsdp.solvers.scs_ import SCS

#: Every backend lipsdp knows (name -> class).  Not the order ``auto`` tries them in:
#: that is :func:`get_backend` (MOSEK if licensed, the ipm rule, then :func:`_open_source_order`).
BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (MOSEK, LowRankIPM, ChordalIPM, CompletionIPM, SCS, SDPA, CVXOPT, Clarabel, FirstOrder)}


def installed() -> list[str]:
    """Names of the backends whose Python packages are importable."""
    return [name for name, b in BACKENDS.items() if b.is_installed()]


def usable() -> list[str]:
    """Names of installed backends that can actually solve (MOSEK needs a licence)."""
    return [name for name, b in BACKENDS.items() if b.license_status()[0]]


def describe() -> list[dict]:
    """One row per backend: name, installed, usable, reason, how to install."""
    rows = []
    for name, b in BACKENDS.items():
        ok, reason = b.license_status()
        rows.append({"name": name, "installed": b.is_installed(), "usable": ok, "status": reason,
                     "family": b.family, "install": b.install})
    return rows


def get_backend(name: str = "auto", *, n: int | None = None, free_multipliers: bool = False,
                factored: bool = False, single_input: bool = False, lmi=None) -> Backend:
    """An instance of the backend called ``name``.

    ``"auto"`` prefers a licensed MOSEK, then the best open-source backend for an
    LMI of size ``n`` (``factored``: every constraint has the rank-two form that
    :class:`~lipsdp.solvers.ipm_.LowRankIPM` exploits; ``single_input``: the l2 LMI,
    whose one input variable ``rho`` the ``fo`` backend needs; ``lmi``: the problem itself,
    whose layer chain lets ``auto`` weigh :class:`~lipsdp.solvers.chordal_.ChordalIPM`
    against the dense ipm by their estimated cost).  A missing or unlicensed
    backend raises an error that lists what is available and how to install the rest.
    """
    name = name.lower()
    if name == "auto":
        if MOSEK.license_status()[0]:
            return MOSEK()
        order = _open_source_order(n, free_multipliers)
        # Free multipliers (GroupSort, Householder) leave the ipm's Schur complement singular
        # near their unbounded optimal set; SDPA handles those (see _open_source_order).
        cost = estimate_cost(lmi) if lmi is not None and factored and not free_multipliers else None
        if lmi is not None and factored and not free_multipliers and \
                CompletionIPM.preferred(lmi, None if cost is None else cost[0]):
            # A layer chain with a strictly feasible start: both iterates stay block-tridiagonal,
            # unless the clique chain (linear in depth) is cheaper still (very deep narrow nets).
            order = ["completion"] + order
        elif cost is not None and cost[0] < cost[1] and cost[0] <= ChordalIPM.max_auto_cost:
            # Deep narrow nets: the clique chain's Newton system grows linearly with depth.
            order = ["chordal"] + order
        elif factored and not free_multipliers and (n is None or n <= LowRankIPM.max_auto_size):
            order = ["ipm"] + order
        elif single_input and not free_multipliers and n is not None and n > LowRankIPM.max_auto_size:
            # Beyond the interior-point methods' reach (minutes per iteration, SCS an n x n
            # eigendecomposition per iteration): descent on the exact rho(T), still verified.
            order = ["fo"] + order
        for choice in order:
            if BACKENDS[choice].is_installed():
                return BACKENDS[choice]()
        raise SolverNotFound("no SDP solver is installed; pip install scs")
    if name not in BACKENDS:
        raise SolverNotFound(f"unknown solver {name!r}; choose from auto, {', '.join(BACKENDS)}")
    cls = BACKENDS[name]
    if not cls.is_installed():
        raise SolverNotFound(f"solver {name!r} is not installed ({cls.install}); "
                             f"available: {', '.join(usable()) or 'none'}")
    ok, reason = cls.license_status()
    if not ok:
        raise SolverLicenseError(f"solver {name!r} is installed but unusable: {reason}; "
                                 f"available: {', '.join(usable()) or 'none'}")
    return cls()


def _open_source_order(n: int | None, free_multipliers: bool = False) -> list[str]:
    # Measured in benchmarks/bench_solvers.py on 2 cores, BLAS threads = 1 (see README).
    # CVXOPT is accurate on small and medium LMIs; SDPA is often faster but reports
    # "inaccurate" or fails on badly scaled nets; SCS scales furthest.
    if free_multipliers:
        # GroupSort / Householder QCs have free multipliers whose optimal set is unbounded:
        # CVXOPT stops on a singular KKT system there (51 of 90 nets), SDPA failed 3 of 90.
        return ["sdpa", "clarabel", "scs", "cvxopt"]
    if n is not None and n > 600:
        return ["scs", "cvxopt", "sdpa", "clarabel"]
    return ["cvxopt", "sdpa", "scs", "clarabel"]


__all__ = ["BACKENDS", "Backend", "SolveResult", "STATUSES", "describe", "get_backend", "installed", "usable"]
