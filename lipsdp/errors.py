"""Exceptions raised by lipsdp.

Every error a user can fix derives from :class:`LipSDPError`; its message is one
line that says what was wrong and what to do.  The command line prints that line
and exits with :attr:`LipSDPError.exit_code` (2 for bad input, 1 for a solver
that produced no verified bound).
"""

from __future__ import annotations


class LipSDPError(Exception):
    """Root of all lipsdp errors."""

    exit_code = 2


class ModelLoadError(LipSDPError):
    """The file could not be read as a model (missing, corrupt, weights only, unsafe)."""


class UnsafeModelError(ModelLoadError):
    """Loading the file would execute pickled code, and the user did not opt in."""


class UnsupportedLayerError(LipSDPError):
    """The network holds layers lipsdp cannot describe; all of them are listed."""

    def __init__(self, layers):
        self.layers = list(layers)
        items = "; ".join(f"{name} (#{pos}, {kind})" for name, pos, kind in self.layers)
        super().__init__(f"unsupported layer{'s' if len(self.layers) > 1 else ''}: {items}")


class InvalidNetworkError(LipSDPError):
    """Weights are not finite or shapes do not fit together."""


class NotVerifiedError(LipSDPError):
    """``lipsdp verify``: the certificate states more than its stored proof proves again (a lowered bound, a
    changed multiplier, an enlarged region); exit code 1, as for a bound that did not verify."""

    exit_code = 1


class WellPosednessError(LipSDPError):
    """An implicit (equilibrium) layer whose equilibrium lipsdp cannot prove to exist and be unique."""


class SolverNotFound(LipSDPError):
    """The requested solver backend is not installed."""


class SolverLicenseError(LipSDPError):
    """The requested solver is installed but has no valid licence."""


class SolverError(LipSDPError):
    """The backend failed (exception, numerical trouble, time-out) and gave nothing to verify."""

    exit_code = 1


class ResourceError(LipSDPError):
    """The problem would not fit the memory or time the user allowed."""
