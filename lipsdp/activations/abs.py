"""The absolute value: slope sector [-1, 1].  ``torch.abs`` (ATen ``abs``) and ONNX ``Abs``; rewrites build it too.

:math:`(|a| - |b|) / (a - b)` is 1 for ``a, b`` of one sign and reaches -1 for opposite signs, so [-1, 1]
is the exact sector; torch's derivative at 0 is 0, as :meth:`Abs.derivative` (``sign``).  The
l_inf-distance and SortNet layers of :mod:`lipsdp.nn` apply it to ``x - w_i``.
"""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import SlopeActivation


class Abs(SlopeActivation):
    """:math:`\\phi(x) = |x|`."""

    name = "abs"
    aten = {"abs": lambda: {}}
    onnx = {"Abs": lambda attrs: {}}

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
