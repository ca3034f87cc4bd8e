"""Hardswish, :math:`x\\,\\mathrm{ReLU6}(x + 3) / 6`: not monotone, slope sector [-1/2, 3/2].

The function is 0 for :math:`x \\le -3`, :math:`x (x + 3) / 6` on [-3, 3] and
:math:`x` for :math:`x \\ge 3`; it is continuous and its derivative is 0, then
:math:`(2x + 3) / 6 \\in [-1/2, 3/2]`, then 1.  Every difference quotient is an
average of the derivative, so the sector is [-1/2, 3/2], reached at
:math:`x \\to -3^+` and :math:`x \\to 3^-` (exact, no rounding needed).

References
----------
A. Howard et al., "Searching for MobileNetV3", ICCV 2019.
"""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import SlopeActivation, TorchModule


class Hardswish(SlopeActivation):
    """:math:`\\phi(x) = x \\min(\\max(x + 3, 0), 6) / 6`."""

    name = "hardswish"
    torch_modules = (TorchModule("torch.nn.modules.activation.Hardswish", "hardswish"),)
    aten = {"hardswish": lambda: {}}
    onnx = {"HardSwish": lambda attrs: {}}

    def evaluate(self, x, params):
        return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0

    def derivative(self, x, params):
        return np.where(x < -3.0, 0.0, np.where(x <= 3.0, x / 3.0 + 0.5, 1.0))

    def sector(self, params):
        return -0.5, 1.5

    def breakpoints(self, params):
        return (-3.0, 3.0)
