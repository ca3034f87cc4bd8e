"""Quadratic constraints for activation functions (installed as ``lipsdp.constraints``).

One family per module, all derived from
:class:`~lipsdp.constraints.base.QuadraticConstraint`.  The registry maps an
activation key (``Activation.function`` in :mod:`lipsdp.network`) to its
family; third parties add their own with :func:`register_constraint`, and check
it with :func:`lipsdp.testing.check_constraint`.
"""

from __future__ import annotations

from lipsdp.constraints.base import QCTerms, QuadraticConstraint, check_lmi_memory, joined_outer_terms, outer_terms
from lipsdp.constraints.groupsort import GroupSort
from lipsdp.constraints.householder import Householder
from lipsdp.constraints.slope import SlopeRestricted

_REGISTRY: dict[str, QuadraticConstraint] = {}


def register_constraint(qc: QuadraticConstraint, *, replace: bool = False) -> QuadraticConstraint:
    """Make ``qc`` the constraint of every activation key in ``qc.functions``."""
    for key in qc.functions:
        if key in _REGISTRY and not replace:
            raise ValueError(f"activation {key!r} already has a constraint ({_REGISTRY[key]!r})")
        _REGISTRY[key] = qc
    return qc


def get_constraint(function: str) -> QuadraticConstraint:
    """The constraint registered for activation key ``function``."""
    try:
        return _REGISTRY[function]
    except KeyError:
        raise KeyError(f"no quadratic constraint for activation {function!r}; "
                       f"known: {', '.join(sorted(_REGISTRY))}") from None


def registered() -> dict[str, QuadraticConstraint]:
    """A copy of the registry: activation key -> constraint."""
    return dict(_REGISTRY)


register_constraint(SlopeRestricted())
register_constraint(GroupSort())
register_constraint(Householder())

__all__ = ["GroupSort", "Householder", "QCTerms", "QuadraticConstraint", "SlopeRestricted", "get_constraint",
           "check_lmi_memory", "joined_outer_terms", "outer_terms", "register_constraint", "registered"]
