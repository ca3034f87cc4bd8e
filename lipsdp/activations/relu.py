"""ReLU, :math:`\\max(x, 0)`: slope sector [0, 1]."""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import SlopeActivation, TorchModule


class ReLU(SlopeActivation):
    """:math:`\\phi(x) = \\max(x, 0)`; the difference quotients fill [0, 1]."""

    name = "relu"
    torch_modules = (TorchModule("torch.nn.modules.activation.ReLU", "relu"),)
    aten = {"relu": lambda: {}}
    onnx = {"Relu": lambda attrs: {}}
    implicit = True

    def evaluate(self, x, params):
        return np.maximum(x, 0.0)

    def derivative(self, x, params):
        return (x > 0).astype(np.float64)

    def sector(self, params):
        return 0.0, 1.0

    def derivative_range(self, lo, hi, params):
        # On an interval that stays on one side of 0 every difference quotient is 0 (or 1).
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        return (lo >= 0).astype(np.float64), (hi > 0).astype(np.float64)

    def breakpoints(self, params):
        return (0.0,)
