"""Leaky ReLU and PReLU with one shared slope ``a``: slope sector [min(a, 1), max(a, 1)]."""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import NotExpressible, SlopeActivation, TorchModule


def _one_slope(weight) -> dict:
    """PReLU's learned slope, when all channels share it (a per-channel slope is not elementwise-uniform)."""
    w = np.asarray(weight, dtype=np.float64).ravel()
    if w.size != 1 and not np.all(w == w[0]):
        raise NotExpressible("with one slope per channel")
    return {"negative_slope": float(w[0])}


class LeakyReLU(SlopeActivation):
    """:math:`\\phi(x) = x` for :math:`x \\ge 0`, :math:`a x` otherwise; quotients fill [min(a,1), max(a,1)]."""

    name = "leaky_relu"
    defaults = {"negative_slope": 0.01}
    torch_modules = (TorchModule("torch.nn.modules.activation.LeakyReLU", "leaky_relu", ("negative_slope",)),
                     TorchModule("torch.nn.modules.activation.PReLU", "prelu", ("weight",)))
    aten = {"leaky_relu": lambda negative_slope=0.01: {"negative_slope": float(negative_slope)},
            "prelu": _one_slope, "_prelu_kernel": _one_slope}
    onnx = {"LeakyRelu": lambda attrs: {"negative_slope": float(attrs.get("alpha", 0.01))},
            "PRelu": lambda attrs, slope: _one_slope(slope)}
    implicit = True
    implicit_param = "negative_slope"

    def evaluate(self, x, params):
        return np.where(x >= 0, x, self.param(params, "negative_slope") * x)

    def derivative(self, x, params):
        return np.where(x >= 0, 1.0, self.param(params, "negative_slope"))

    def sector(self, params):
        a = self.real(params, "negative_slope")
        return min(a, 1.0), max(a, 1.0)

    def derivative_range(self, lo, hi, params):
        a = self.real(params, "negative_slope")
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        left = np.where(hi <= 0, a, np.where(lo >= 0, 1.0, min(a, 1.0)))
        right = np.where(hi <= 0, a, np.where(lo >= 0, 1.0, max(a, 1.0)))
        return left, right

    def breakpoints(self, params):
        return (0.0,)
