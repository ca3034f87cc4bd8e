"""SiLU (swish), :math:`x \\sigma(x)`: not monotone, slope sector [-0.0998393..., 1.0998393...].

:math:`\\phi(x) - \\phi(-x) = x`, so :math:`\\phi'(x) + \\phi'(-x) = 1` and the
sector is :math:`[m, 1 - m]` with :math:`m = \\min \\phi'`, found numerically on
the negative axis and rounded outwards by :data:`~lipsdp.activations.base.MARGIN`.
"""

from __future__ import annotations

from functools import lru_cache


from lipsdp.activations.base import MARGIN, SlopeActivation, TorchModule, sigmoid


def _derivative(x):
    s = sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


@lru_cache(maxsize=None)
def _sector() -> tuple[float, float]:
    from scipy.optimize import minimize_scalar  # heavy (about 1 s): only when a sector is first asked for

    lo = float(minimize_scalar(_derivative, bounds=(-4.0, -0.5), method="bounded", options={"xatol": 1e-12}).fun)
    return lo - MARGIN, 1.0 - lo + MARGIN


class SiLU(SlopeActivation):
    """:math:`\\phi(x) = x / (1 + e^{-x})`."""

    name = "silu"
    torch_modules = (TorchModule("torch.nn.modules.activation.SiLU", "silu"),)
    aten = {"silu": lambda: {}}
    implicit = True

    def evaluate(self, x, params):
        return x * sigmoid(x)

    def derivative(self, x, params):
        return _derivative(x)

    def sector(self, params):
        return _sector()
