"""Every registered quadratic constraint holds on true input/output pairs; a wrong one is caught."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lipsdp.constraints import SlopeRestricted, get_constraint, registered
from lipsdp.network import Activation
from lipsdp.testing import check_constraint

PARAMS = {"leaky_relu": {"negative_slope": 0.2}, "elu": {"alpha": 1.5}, "softplus": {"beta": 2.0},
          "hardtanh": {"min_val": -0.5, "max_val": 2.0}}


def act(function, size=6, **params):
    return Activation("act", function, (size,), function=function, params={**PARAMS.get(function, {}), **params})


@pytest.mark.parametrize("function", sorted(registered()))
@pytest.mark.parametrize("formulation", ["neuron", "layer"])
def test_registered_constraints_hold(function, formulation):
    check_constraint(get_constraint(function), act(function), formulation=formulation)


def test_gelu_tanh_approximation_holds():
    check_constraint(get_constraint("gelu"), act("gelu", approximate="tanh"))


class TooNarrow(SlopeRestricted):
    """Claims tanh has slopes in [0.5, 1]: false (tanh flattens out)."""

    def sector(self, op):
        return 0.5, 1.0


def test_wrong_constraint_is_caught():
    with pytest.raises(AssertionError, match="violated"):
        check_constraint(TooNarrow(), act("tanh"))


@pytest.mark.parametrize("function", ["tanh", "sigmoid", "elu", "softplus", "silu", "gelu", "leaky_relu"])
def test_sector_is_the_derivative_range(function):
    """The sector equals [min phi', max phi'] on a fine grid (tight, not just valid)."""
    qc, op = get_constraint(function), act(function)
    lo, hi = qc.sector(op)
    x = np.linspace(-30, 30, 600_001)
    d = qc.derivative(x, op)
    assert lo <= d.min() + 1e-12 and d.max() <= hi + 1e-12
    assert d.min() - lo < 1e-6 and hi - d.max() < 1e-6


SLOPE_RESTRICTED = sorted(k for k, qc in registered().items() if isinstance(qc, SlopeRestricted))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SLOPE_RESTRICTED),
       st.floats(-50, 50, allow_nan=False), st.floats(-50, 50, allow_nan=False))
def test_incremental_slopes_inside_sector(function, a, b):
    """Hypothesis: every difference quotient lies in the sector."""
    qc, op = get_constraint(function), act(function, size=1)
    if a == b:
        return
    lo, hi = qc.sector(op)
    fa, fb = qc.evaluate(np.array([[a]]), op)[0, 0], qc.evaluate(np.array([[b]]), op)[0, 0]
    q = (fa - fb) / (a - b)
    # floating-point evaluation of phi is off by a few ulps, which the quotient divides by |a - b|
    tol = 1e-9 * (1 + abs(q)) + 1e-15 * (abs(fa) + abs(fb) + 1) / abs(a - b)
    if function == "softplus":  # torch's threshold switch makes a jump of ~1e-9 / beta
        tol += 1e-8 / abs(a - b)
    assert lo - tol <= q <= hi + tol
