"""What every solver backend is: a class whose conventions are data.

A backend turns an :class:`~lipsdp.lmi.LMIProblem` (``min c^T x`` s.t.
``M(x) <= 0``, some ``x_j >= 0``) into its native conic form, solves it and
maps the native status into a small shared vocabulary.  It returns the raw
iterate: nothing a backend says is trusted, :mod:`lipsdp.verify` checks it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

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
        ``"first_order"`` or ``"interior_point"``.
    psd_triangle, psd_scale : str, float
        How the backend vectorises a symmetric matrix.
    needs_license : bool
    supports_time_limit : bool
    status_map : dict
        Native status -> shared vocabulary.
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
        import scipy.sparse as sp

        A_psd, b_psd = lmi.svec(self.psd_triangle, self.psd_scale)
        nn = np.flatnonzero(lmi.nonneg)
        A_nn = sp.csc_matrix((-np.ones(len(nn)), (np.arange(len(nn)), nn)), shape=(len(nn), lmi.n_var))
        return sp.vstack([A_nn, A_psd]).tocsc(), np.concatenate([np.zeros(len(nn)), -b_psd]), len(nn)

    def map_status(self, native) -> str:
        return self.status_map.get(native, "solver_error")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"
