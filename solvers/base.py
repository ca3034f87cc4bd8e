"""What every solver backend is: a class whose conventions are data, and the registry.

A backend turns an :class:`~lipsdp.lmi.LMIProblem` (``min c^T x`` s.t.
``M(x) <= 0``, some ``x_j >= 0``) into its native conic form, solves it and
maps the native status into a small shared vocabulary.  It returns the raw
iterate: nothing a backend says is trusted, :mod:`lipsdp.verify` checks it.

Each backend also states what the solve stage needs to plan with it: its memory
estimate (:meth:`Backend.memory_estimate`), its preference for a given LMI
(:meth:`Backend.preference`; ``auto`` takes the usable backend that prefers the LMI
most) and whether it is *specialised* (one of lipsdp's structure-exploiting methods,
after which ``auto`` re-solves with a general one when it stops without a point).
Registering a backend is the :func:`register` decorator.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

#: The shared status vocabulary (as in cvxpy).
STATUSES = ("optimal", "optimal_inaccurate", "infeasible", "unbounded", "time_limit", "solver_error")


@dataclass
class SolveResult:
    """The raw outcome of one solve.

    Attributes
    ----------
    status : str
        One of :data:`STATUSES`.
    x : ndarray or None, shape (n_var,)
        The iterate ``(rho, y)`` (unverified).
    objective : float or None
        The solver's objective (unverified; may lie below the optimum).
    seconds : float
        Wall time inside the solver call, setup included.
    iterations : int or None
    message : str
        The native status text.
    extras : dict
        Backend-specific raw output (residuals, native info).
    """

    status: str
    x: np.ndarray | None
    objective: float | None
    seconds: float
    iterations: int | None = None
    message: str = ""
    extras: dict = field(default_factory=dict)


@contextlib.contextmanager
def native_output_to_stderr():
    """Send what compiled solvers print on file descriptor 1 to stderr.

    SDPA and others write to the C-level stdout, which would corrupt
    ``lipsdp certify --json``.
    """
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout (e.g. some notebook kernels)
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        try:
            sys.stdout.flush()
        except ValueError:
            pass
        os.dup2(saved, 1)
        os.close(saved)


#: LMIs larger than this go to the general backends that scale furthest first (see :class:`LMIShape`).
LARGE_LMI = 600


class LMIShape:
    """What ``auto`` reads off an LMI to rank the backends, and the per-iteration costs it compares.

    Built from an :class:`~lipsdp.lmi.LMIProblem` (:meth:`of`), or from bare facts where a caller
    has no LMI (``lmi`` None: then no backend that needs the LMI's structure is preferred).

    Attributes
    ----------
    n : int or None
        Matrix size.
    free_multipliers : bool
        Some multiplier is sign-free (GroupSort, Householder): the specialised interior-point
        methods' Schur complement turns singular near their unbounded optimal set.
    factored : bool
        Every constraint has the rank-two form (:attr:`~lipsdp.lmi.LMIProblem.factors`).
    single_input : bool
        One input variable ``rho`` (the l2 LMI).
    lmi : LMIProblem or None
    """

    def __init__(self, n=None, free_multipliers=False, factored=False, single_input=False, lmi=None):
        self.n, self.free_multipliers, self.factored = n, bool(free_multipliers), bool(factored)
        self.single_input, self.lmi = bool(single_input), lmi
        self._costs: dict = {}

    @classmethod
    def of(cls, lmi) -> "LMIShape":
        """The shape of ``lmi`` (an :class:`~lipsdp.lmi.LMIProblem`, or an :class:`LMIShape` as it is)."""
        if isinstance(lmi, LMIShape):
            return lmi
        return cls(lmi.n, not bool(lmi.nonneg.all()), lmi.factors is not None, lmi.n_in == 1, lmi)

    @property
    def structured(self) -> bool:
        """Whether the LMI itself is at hand, factored and without free multipliers: what the
        structure-exploiting interior-point methods need before ``auto`` weighs their costs."""
        return self.lmi is not None and self.factored and not self.free_multipliers

    def cost(self, backend: type["Backend"]):
        """``backend.iteration_cost(lmi)``, computed once per shape."""
        if backend.name not in self._costs:
            self._costs[backend.name] = backend.iteration_cost(self.lmi)
        return self._costs[backend.name]


def dense_bytes(lmi) -> int:
    """Bytes of one dense ``n x n`` matrix."""
    return 8 * lmi.n * lmi.n


def stored_bytes(lmi) -> int:
    """Bytes of the stored COO basis (row, column, value)."""
    return 24 * len(lmi.vals)


def first_order_bytes(lmi) -> int:
    """A first-order method's peak: a few dense ``n x n`` matrices (projection or elimination) and the basis."""
    return 8 * dense_bytes(lmi) + 4 * stored_bytes(lmi)


class Backend:
    """Base class of solver backends.

    Class attributes
    ----------------
    name : str
        Lowercase keyword users pass (``--solver scs``).
    modules : tuple of str
        Python modules that must be importable.
    install : str
        How to install it (pip extra or package).
    family : str
        ``"first_order"``, ``"interior_point"`` or a lipsdp method's own family (reported by
        ``lipsdp solvers``; the benchmark compares within a family).
    psd_triangle, psd_scale : str, float
        How the backend vectorises a symmetric matrix.
    needs_license : bool
    supports_time_limit : bool
    status_map : dict
        Native status -> shared vocabulary.
    specialised : bool
        One of lipsdp's structure-exploiting methods: when ``auto`` chose it and it stops without
        an optimal point, :func:`~lipsdp.solvers.fallback` names a general backend to re-solve with.
    listing : int
        Position in :data:`BACKENDS` (``lipsdp solvers``, error messages); ties keep registration order.

    The memory estimate and the preference for an LMI are the classmethods
    :meth:`memory_estimate` and :meth:`preference`.
    """

    name: ClassVar[str] = ""
    modules: ClassVar[tuple[str, ...]] = ()
    install: ClassVar[str] = ""
    family: ClassVar[str] = "interior_point"
    psd_triangle: ClassVar[str] = "lower"
    psd_scale: ClassVar[float] = float(np.sqrt(2.0))
    needs_license: ClassVar[bool] = False
    supports_time_limit: ClassVar[bool] = True
    status_map: ClassVar[dict] = {}
    default_tol: ClassVar[float] = 1e-7
    specialised: ClassVar[bool] = False
    listing: ClassVar[int] = 100
    #: A general backend's preference ``(free multipliers, n > LARGE_LMI, otherwise)`` for ``auto``
    #: (:meth:`preference`); None: ``auto`` never picks it unless :meth:`preference` says otherwise.
    auto_rank: ClassVar[tuple[float, float, float] | None] = None

    @classmethod
    def memory_estimate(cls, lmi) -> int:
        """Rough peak bytes of a solve of ``lmi``.

        A general interior-point method: a dozen dense ``n x n`` work arrays, the Schur complement
        in the variables (``n_var^2``) and the stored basis.  Backends override it with their own.
        """
        return 12 * dense_bytes(lmi) + 8 * lmi.n_var ** 2 + 4 * stored_bytes(lmi)

    @classmethod
    def preference(cls, lmi) -> float | None:
        """How much ``auto`` prefers this backend for ``lmi`` (an LMI or an :class:`LMIShape`): the usable
        backend with the highest value is chosen; None: ``auto`` never picks it for this LMI.

        The default reads :attr:`auto_rank` (general backends, whose ranking depends only on free
        multipliers and size); the specialised methods override it with their own conditions and
        rank above every general backend, MOSEK above all.
        """
        if cls.auto_rank is None:
            return None
        shape = LMIShape.of(lmi)
        free, large, other = cls.auto_rank
        if shape.free_multipliers:
            return free
        return large if shape.n is not None and shape.n > LARGE_LMI else other

    @classmethod
    def iteration_cost(cls, lmi) -> float | None:
        """Flop-like cost of one iteration on ``lmi`` (None: not applicable), for methods that ``auto``
        weighs against each other."""
        return None

    @classmethod
    def is_installed(cls) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in cls.modules)

    @classmethod
    def license_status(cls) -> tuple[bool, str]:
        """``(usable, reason)``; backends without licences are usable when installed."""
        return (True, "no licence needed") if cls.is_installed() else (False, "not installed")

    @staticmethod
    def applies(lmi) -> bool:
        """Whether this backend can solve ``lmi`` at all (the conic backends take any LMI)."""
        return True

    def solve(self, lmi, *, time_limit: float | None = None, tol: float | None = None,
              verbose: bool = False) -> SolveResult:
        raise NotImplementedError

    def conic_data(self, lmi):
        """``(A, b, n_nonneg)`` with ``b - A x`` in (nonnegative cone) x (PSD cone) for the LMI.

        Rows: first ``x_j >= 0`` for sign-constrained ``j`` (``0 - (-1) x_j``), then
        ``svec(-M(x)) = -b_psd - A_psd x`` in this backend's PSD vectorisation.  This is
        the ``s = b - A x`` form shared by SCS and Clarabel.
        """
        A_psd, b_psd = lmi.svec(self.psd_triangle, self.psd_scale)
        nn = np.flatnonzero(lmi.nonneg)
        A_nn = sp.csc_matrix((-np.ones(len(nn)), (np.arange(len(nn)), nn)), shape=(len(nn), lmi.n_var))
        return sp.vstack([A_nn, A_psd]).tocsc(), np.concatenate([np.zeros(len(nn)), -b_psd]), len(nn)

    def map_status(self, native) -> str:
        return self.status_map.get(native, "solver_error")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"



#: Every backend lipsdp knows (name -> class), in :attr:`Backend.listing` order.
BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: add a backend to :data:`BACKENDS` under ``cls.name``.

    Everything else about it (availability, memory, preference for ``auto``, fallback)
    is read from the class, so registering is the only step.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    BACKENDS[cls.name] = cls
    ordered = sorted(BACKENDS.items(), key=lambda item: item[1].listing)  # stable: ties keep their order
    BACKENDS.clear()
    BACKENDS.update(ordered)
    return cls
