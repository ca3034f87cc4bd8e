"""ELU with parameter ``a``: slope sector [min(0, a), max(1, a)].

For :math:`x \\le 0` the derivative :math:`a e^x` sweeps (0, a] (or [a, 0)), and it
is 1 for :math:`x > 0`.  SELU and CELU (``scale``, ``input_scale`` != 1) are other
functions and are refused.
"""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import NotExpressible, SlopeActivation, TorchModule


def _aten_elu(alpha=1.0, scale=1.0, input_scale=1.0) -> dict:
    if float(scale) != 1.0 or float(input_scale) != 1.0:
        raise NotExpressible("with scale != 1 (SELU/CELU)")
    return {"alpha": float(alpha)}


class ELU(SlopeActivation):
    """:math:`\\phi(x) = x` for :math:`x > 0`, :math:`a (e^x - 1)` otherwise."""

    name = "elu"
    defaults = {"alpha": 1.0}
    torch_modules = (TorchModule("torch.nn.modules.activation.ELU", "elu", ("alpha",)),)
    aten = {"elu": _aten_elu}
    onnx = {"Elu": lambda attrs: {"alpha": float(attrs.get("alpha", 1.0))}}
    implicit = True
    implicit_param = "alpha"

    def evaluate(self, x, params):
        a = self.param(params, "alpha")
        return np.where(x > 0, x, a * np.expm1(np.minimum(x, 0.0)))

    def derivative(self, x, params):
        return np.where(x > 0, 1.0, self.param(params, "alpha") * np.exp(np.minimum(x, 0.0)))

    def sector(self, params):
        a = self.real(params, "alpha")
        return min(0.0, a), max(1.0, a)

    def derivative_range(self, lo, hi, params):
        # phi' is a e^x (monotone in x) below 0 and 1 above: its range is spanned by the endpoints and,
        # across 0, by a and 1.
        a = self.real(params, "alpha")
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        d_lo, d_hi = self.derivative(lo, params), self.derivative(hi, params)
        left = np.minimum(d_lo, d_hi)
        right = np.maximum(d_lo, d_hi)
        across = (lo <= 0) & (hi > 0)
        left = np.where(across, np.minimum(left, min(a, 1.0)), left) - 1e-10
        right = np.where(across, np.maximum(right, max(a, 1.0)), right) + 1e-10
        glo, ghi = self.sector(params)
        return np.maximum(left, glo), np.minimum(right, ghi)

    def breakpoints(self, params):
        return (0.0,)
