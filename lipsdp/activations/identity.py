"""The identity as an activation node: slope sector [1, 1].  No model format names it."""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import SlopeActivation


class Identity(SlopeActivation):
    """:math:`\\phi(x) = x`."""

    name = "identity"

    def evaluate(self, x, params):
        return x

    def derivative(self, x, params):
        return np.ones_like(x)

    def derivative_range(self, lo, hi, params):
        return np.ones(np.shape(lo)), np.ones(np.shape(hi))

    def sector(self, params):
        return 1.0, 1.0
