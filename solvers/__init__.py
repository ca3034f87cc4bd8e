"""Solver backends (installed as ``lipsdp.solvers``).

One class per backend, one file each (``scs_.py`` etc., with the trailing
underscore so a file never shadows the solver's own package), registered with
:func:`register`.  Nothing here imports a solver at ``import lipsdp``:
availability is checked with ``importlib.util.find_spec``, and MOSEK's licence
with a licence checkout.

Each backend states its own memory estimate and its preference for an LMI;
``auto`` (:func:`choose`) takes the usable backend with the highest preference.
The ranking this gives, highest first: a licensed MOSEK; lipsdp's ``completion``
(primal-dual, both iterates block-tridiagonal) for feed-forward nets with a
layer-by-layer start and an affordable iteration; ``chordal`` (clique chain) where
its estimated cost is below the dense method's (deep narrow nets); ``ipm`` for LMIs
whose constraints all have the factored rank-two form and no free multipliers (up
to size 3000); for larger l2 LMIs ``fo`` (L-BFGS on the exact ``rho(T)``:
approximate, verified); else SDPA for free multipliers (GroupSort, Householder),
CVXOPT up to size 600 and SCS above: the fastest that stayed accurate in
``benchmarks/bench_solvers.py`` and the tests.
"""

from __future__ import annotations

from lipsdp.errors import SolverLicenseError, SolverNotFound
from lipsdp.solvers.base import BACKENDS, STATUSES, Backend, LMIShape, SolveResult, register
from lipsdp.solvers.chordal_ import ChordalIPM
from lipsdp.solvers.clarabel_ import Clarabel
from lipsdp.solvers.completion_ import CompletionIPM
from lipsdp.solvers.cvxpy_ import CVXOPT, MOSEK, SDPA
from lipsdp.solvers.firstorder_ import FirstOrder
from lipsdp.solvers.ipm_ import LowRankIPM
from lipsdp.solvers.scs_ import SCS


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


def choose(name: str, lmi) -> Backend:
    """An instance of the backend called ``name`` for ``lmi``.

    ``"auto"``: the usable backend with the highest :meth:`~lipsdp.solvers.base.Backend.preference`
    for ``lmi`` (an :class:`~lipsdp.lmi.LMIProblem`, or an :class:`~lipsdp.solvers.base.LMIShape`).
    A missing or unlicensed backend raises an error that lists what is available and how to
    install the rest.

    Raises
    ------
    SolverNotFound
        Unknown or not installed; for ``auto``, no backend installed that takes the LMI.
    SolverLicenseError
        Installed but unusable (MOSEK without a licence).
    """
    name = name.lower()
    if name == "auto":
        return _best(LMIShape.of(lmi))
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


def fallback(lmi, failed: Backend) -> Backend | None:
    """What ``auto`` re-solves ``lmi`` with after ``failed`` stopped without an optimal point.

    None unless ``failed`` is :attr:`~lipsdp.solvers.base.Backend.specialised` (one of lipsdp's
    structure-exploiting methods: they stall on some badly conditioned LMIs, ``fo`` may find no
    feasible start); then the general backend ``auto`` would pick for an LMI of this size and
    these multipliers, whatever its structure.  Raises :class:`SolverNotFound` when none is installed.
    """
    if not failed.specialised:
        return None
    shape = LMIShape(n=lmi.n, free_multipliers=not bool(lmi.nonneg.all()))
    return _best(shape, general_only=True)


def fitting(lmi, budget: int) -> list[tuple[int, str]]:
    """``(bytes, name)`` of the usable backends that apply to ``lmi`` and whose memory estimate fits
    in ``budget`` bytes, smallest first."""
    fits = []
    for name in usable():
        cls = BACKENDS[name]
        need = cls.memory_estimate(lmi)
        if cls.applies(lmi) and need <= budget:
            fits.append((need, name))
    return sorted(fits)


def get_backend(name: str = "auto", *, n: int | None = None, free_multipliers: bool = False,
                factored: bool = False, single_input: bool = False, lmi=None) -> Backend:
    """:func:`choose` from bare facts about the LMI (compatibility form).

    ``n``: matrix size; ``factored``: every constraint has the rank-two form;
    ``single_input``: the l2 LMI (one input variable ``rho``); ``lmi``: the problem itself,
    which the structure-exploiting methods need before ``auto`` weighs them.
    """
    return choose(name, LMIShape(n, free_multipliers, factored, single_input, lmi))


def _best(shape: LMIShape, general_only: bool = False) -> Backend:
    best, best_pref = None, None
    for name in usable():
        cls = BACKENDS[name]
        if general_only and cls.specialised:
            continue
        pref = cls.preference(shape)
        if pref is not None and (best_pref is None or pref > best_pref):
            best, best_pref = cls, pref
    if best is None:
        raise SolverNotFound("no SDP solver is installed; pip install scs")
    return best()


__all__ = ["BACKENDS", "Backend", "LMIShape", "SolveResult", "STATUSES", "choose", "describe", "fallback",
           "fitting", "get_backend", "installed", "register", "usable", "CVXOPT", "MOSEK", "SDPA", "SCS",
           "Clarabel", "ChordalIPM", "CompletionIPM", "FirstOrder", "LowRankIPM"]
