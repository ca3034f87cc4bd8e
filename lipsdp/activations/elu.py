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

    def breakpoints(self, params):
        return (0.0,)
