"""Hardtanh (and ReLU6, its ``[0, 6]`` case): ``clip(x, min_val, max_val)``, slope sector [0, 1]."""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import SlopeActivation, TorchModule


class Hardtanh(SlopeActivation):
    """:math:`\\phi(x) = \\min(\\max(x, l), u)`; a constant (sector [0, 0]) when ``u <= l``."""

    name = "hardtanh"
    defaults = {"min_val": -1.0, "max_val": 1.0}
    torch_modules = (TorchModule("torch.nn.modules.activation.Hardtanh", "hardtanh", ("min_val", "max_val")),
                     TorchModule("torch.nn.modules.activation.ReLU6", "relu6"))
    aten = {"hardtanh": lambda min_val=-1.0, max_val=1.0: {"min_val": float(min_val), "max_val": float(max_val)},
            "relu6": lambda: {"min_val": 0.0, "max_val": 6.0}}

    def evaluate(self, x, params):
        return np.clip(x, self.param(params, "min_val"), self.param(params, "max_val"))

    def derivative(self, x, params):
        return ((x > self.param(params, "min_val")) & (x < self.param(params, "max_val"))).astype(np.float64)

    def sector(self, params):
        lo, hi = self.real(params, "min_val"), self.real(params, "max_val")
        return 0.0, (1.0 if hi > lo else 0.0)

    def derivative_range(self, lo, hi, params):
        # 1 where the interval lies inside (min_val, max_val), 0 where it lies outside, [0, 1] across a kink.
        low, high = self.real(params, "min_val"), self.real(params, "max_val")
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        if not high > low:
            return np.zeros(lo.shape), np.zeros(hi.shape)
        inside = (lo >= low) & (hi <= high)
        outside = (hi <= low) | (lo >= high)
        return inside.astype(np.float64), (~outside).astype(np.float64)

    def breakpoints(self, params):
        return (self.real(params, "min_val"), self.real(params, "max_val"))
