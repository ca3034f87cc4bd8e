"""The absolute value: slope sector [-1, 1].  No model format names it; rewrites and tests build it."""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import SlopeActivation


class Abs(SlopeActivation):
    """:math:`\\phi(x) = |x|`."""

    name = "abs"

    def evaluate(self, x, params):
        return np.abs(x)

    def derivative(self, x, params):
        return np.sign(x)

    def sector(self, params):
        return -1.0, 1.0

    def derivative_range(self, lo, hi, params):
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        return np.where(lo >= 0, 1.0, -1.0), np.where(hi <= 0, -1.0, 1.0)

    def breakpoints(self, params):
        return (0.0,)
