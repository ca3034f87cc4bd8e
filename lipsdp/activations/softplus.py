"""Softplus with ``beta`` and torch's linear ``threshold``: slope sector [0, 1].

:math:`\\phi'(x) = \\sigma(\\beta x)` ranges over (0, 1) for every real
:math:`\\beta \\ne 0`.  Torch returns ``x`` itself where :math:`\\beta x` exceeds
``threshold`` ``t``; there its function jumps down by :math:`\\log(1 + e^{-t}) / |\\beta|`
(:meth:`Softplus.discontinuity`; about 2e-9 for the default ``t = 20``, below
the accuracy of float32 models).  The sector, hence the certified bound, is
that of the smooth function :math:`\\log(1 + e^{\\beta x}) / \\beta`; with a small
threshold the torch function differs from it by that jump.
"""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import SlopeActivation, TorchModule, sigmoid


class Softplus(SlopeActivation):
    """:math:`\\phi(x) = \\log(1 + e^{\\beta x}) / \\beta` (``x`` above the threshold)."""

    name = "softplus"
    defaults = {"beta": 1.0, "threshold": 20.0}
    torch_modules = (TorchModule("torch.nn.modules.activation.Softplus", "softplus", ("beta", "threshold")),)
    aten = {"softplus": lambda beta=1.0, threshold=20.0: {"beta": float(beta), "threshold": float(threshold)}}
    # ONNX Softplus is log(1 + e^x) exactly; torch's threshold 20 differs from it by < 3e-9.
    onnx = {"Softplus": lambda attrs: {"beta": 1.0, "threshold": 20.0}}
    implicit = True
    implicit_param = "beta"

    def evaluate(self, x, params):
        b, thr = self.param(params, "beta"), self.param(params, "threshold")
        return np.where(b * x > thr, x, np.logaddexp(0.0, b * x) / b)

    def derivative(self, x, params):
        b, thr = self.param(params, "beta"), self.param(params, "threshold")
        return np.where(b * x > thr, 1.0, sigmoid(b * x))

    def sector(self, params):
        if self.real(params, "beta") == 0.0:
            raise ValueError("softplus: beta = 0 does not define a function")
        self.real(params, "threshold")
        return 0.0, 1.0

    def discontinuity(self, params):
        b, thr = self.real(params, "beta"), self.real(params, "threshold")
        return float(np.logaddexp(0.0, -thr) / abs(b)) if b else 0.0

    def breakpoints(self, params):
        b, thr = self.real(params, "beta"), self.real(params, "threshold")
        return (0.0, thr / b) if b else (0.0,)
