"""GELU, exact (erf) or torch's tanh approximation: not monotone, sector about [-0.129, 1.129].

Both forms satisfy :math:`\\phi(x) - \\phi(-x) = x`, so
:math:`\\phi'(x) + \\phi'(-x) = 1` and the sector is :math:`[m, 1 - m]` with
:math:`m = \\min \\phi'`.  For the erf form :math:`\\phi'(x) = \\Phi(x) + x\\varphi(x)`
and :math:`\\phi''(x) = \\varphi(x)(2 - x^2)` vanishes at :math:`\\pm\\sqrt 2`, so
:math:`m = \\Phi(-\\sqrt 2) - \\sqrt 2 \\varphi(\\sqrt 2)` in closed form; for the tanh
form it is found numerically.  Both are rounded outwards by
:data:`~lipsdp.activations.base.MARGIN`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from lipsdp.activations.base import MARGIN, NotExpressible, SlopeActivation, TorchModule

_C = math.sqrt(2.0 / math.pi)


def _tanh_form(x):
    return 0.5 * x * (1.0 + np.tanh(_C * (x + 0.044715 * x ** 3)))


def _tanh_derivative(x):
    t = np.tanh(_C * (x + 0.044715 * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * x * x)


@lru_cache(maxsize=None)
def _sector(approximate: str) -> tuple[float, float]:
    from scipy.optimize import minimize_scalar  # heavy (about 1 s): only when a sector is first asked for

    if approximate == "none":
        r2 = math.sqrt(2.0)
        lo = 0.5 * (1.0 + math.erf(-1.0)) - r2 * math.exp(-1.0) / math.sqrt(2.0 * math.pi)
    elif approximate == "tanh":
        lo = float(minimize_scalar(_tanh_derivative, bounds=(-4.0, -0.5), method="bounded",
                                   options={"xatol": 1e-12}).fun)
    else:
        raise ValueError(f"gelu: unknown approximate={approximate!r} (torch has 'none' and 'tanh')")
    return lo - MARGIN, 1.0 - lo + MARGIN


def _params(approximate="none") -> dict:
    """``Activation.params`` of torch's ``gelu`` / ONNX ``Gelu``; other forms are refused when loading."""
    if str(approximate) not in ("none", "tanh"):
        raise NotExpressible(f"with approximate={approximate!r} (the exact sector is known for 'none' and 'tanh')")
    return {"approximate": str(approximate)}


class GELU(SlopeActivation):
    """:math:`\\phi(x) = x \\Phi(x)`, or ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""

    name = "gelu"
    defaults = {"approximate": "none"}
    torch_modules = (TorchModule("torch.nn.modules.activation.GELU", "gelu", ("approximate",)),)
    aten = {"gelu": _params}
    onnx = {"Gelu": lambda attrs: _params(attrs.get("approximate", "none"))}
    implicit = True

    def evaluate(self, x, params):
        if self.param(params, "approximate") == "tanh":
            return _tanh_form(x)
        from scipy.special import erf  # heavy to import: only for nets that use the erf GELU

        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))

    def derivative(self, x, params):
        if self.param(params, "approximate") == "tanh":
            return _tanh_derivative(x)
        from scipy.special import erf

        return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    def sector(self, params):
        return _sector(str(self.param(params, "approximate")))
