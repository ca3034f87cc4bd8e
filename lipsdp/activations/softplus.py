"""Softplus with ``beta`` and torch's linear ``threshold``: slope sector [0, 1], or refused.

:math:`\\phi(x) = \\log(1 + e^{\\beta x}) / \\beta` has
:math:`\\phi'(x) = \\sigma(\\beta x)`, which ranges over (0, 1) for every real
:math:`\\beta \\ne 0`, negative ones included (then :math:`\\phi` rises from
:math:`x` at :math:`-\\infty` to 0 at :math:`+\\infty`): the sector [0, 1] is exact.

Torch returns ``x`` itself where :math:`\\beta x` exceeds ``threshold`` ``t``;
there its function jumps by :math:`\\log(1 + e^{-t}) / |\\beta|` at
:math:`x = t / \\beta` (:meth:`Softplus.discontinuity`).  A discontinuous
function has no finite Lipschitz constant, so a Softplus whose jump is at least
:data:`MAX_JUMP` is refused (every loader: the ATen mapping raises
:class:`~lipsdp.activations.base.NotExpressible`, :meth:`Softplus.sector` a
``ValueError``), with the jump and the threshold that avoids it.  Below
:data:`MAX_JUMP` the loaders accept torch's Softplus as the smooth softplus and
certify that function (torch's default ``t = 20`` with ``beta = 1`` jumps by
2.06e-9, below the accuracy of float32 models); the torch function then differs
from the certified one by at most that jump per neuron, which the certificate states
(:meth:`Softplus.caveat`, ``Certificate.caveats``).
"""

from __future__ import annotations

import math

import numpy as np

from lipsdp.activations.base import JUMP_TOTAL, NotExpressible, SlopeActivation, TorchModule, sigmoid

#: The largest jump of torch's threshold switch that is accepted as the smooth softplus.
MAX_JUMP = 1e-6


def jump(beta: float, threshold: float) -> float:
    """The jump ``log(1 + e^{-threshold}) / |beta|`` of torch's Softplus at ``x = threshold / beta``."""
    return float(np.logaddexp(0.0, -threshold) / abs(beta))


def smallest_threshold(beta: float) -> float:
    """The smallest threshold (rounded up to an integer) whose jump is below :data:`MAX_JUMP`."""
    # log(1 + e^{-t}) < MAX_JUMP |beta|  <=>  t > -log(expm1(MAX_JUMP |beta|))
    return float(math.ceil(-math.log(math.expm1(MAX_JUMP * abs(beta)))))


def _refusal(beta: float, threshold: float) -> str:
    return (f"with threshold={threshold:g} (beta={beta:g}): torch's Softplus jumps by "
            f"{jump(beta, threshold):.3g} at x = {threshold / beta:g}, and a discontinuous function has no "
            f"Lipschitz constant; use threshold >= {smallest_threshold(beta):g} (jump below {MAX_JUMP:g})")


def _params(beta=1.0, threshold=20.0) -> dict:
    beta, threshold = float(beta), float(threshold)
    if beta != 0.0 and math.isfinite(beta) and math.isfinite(threshold) and jump(beta, threshold) >= MAX_JUMP:
        raise NotExpressible(_refusal(beta, threshold))
    return {"beta": beta, "threshold": threshold}


class Softplus(SlopeActivation):
    """:math:`\\phi(x) = \\log(1 + e^{\\beta x}) / \\beta` (``x`` where :math:`\\beta x` > ``threshold``)."""

    name = "softplus"
    defaults = {"beta": 1.0, "threshold": 20.0}
    torch_modules = (TorchModule("torch.nn.modules.activation.Softplus", "softplus", ("beta", "threshold")),)
    aten = {"softplus": _params}
    # ONNX Softplus is log(1 + e^x), no switch: above x = 1000, log(1 + e^x) = x in float64 (e^-1000
    # underflows), so threshold 1000 is that function exactly, with no jump and no caveat.
    onnx = {"Softplus": lambda attrs: {"beta": 1.0, "threshold": 1000.0}}
    implicit = True
    implicit_param = "beta"

    def evaluate(self, x, params):
        b, thr = self.param(params, "beta"), self.param(params, "threshold")
        return np.where(b * x > thr, x, np.logaddexp(0.0, b * x) / b)

    def derivative(self, x, params):
        b, thr = self.param(params, "beta"), self.param(params, "threshold")
        return np.where(b * x > thr, 1.0, sigmoid(b * x))

    def sector(self, params):
        b, thr = self.real(params, "beta"), self.real(params, "threshold")
        if b == 0.0:
            raise ValueError("softplus: beta = 0 does not define a function")
        if jump(b, thr) >= MAX_JUMP:
            raise ValueError(f"softplus {_refusal(b, thr)}")
        return 0.0, 1.0

    def discontinuity(self, params):
        b, thr = self.real(params, "beta"), self.real(params, "threshold")
        return jump(b, thr) if b else 0.0

    def caveat(self, params, neurons):
        b, thr = self.real(params, "beta"), self.real(params, "threshold")
        if not b or not jump(b, thr) > 0:
            return None
        side = ">" if b > 0 else "<"
        return (f"Softplus(beta={b:g}, threshold={thr:g}), {neurons} neurons: torch switches to the identity at "
                f"x {side} {thr / b:g} with a jump of {jump(b, thr):.2g} per neuron; the bound L holds for the smooth "
                f"softplus; for torch's function |f(x) - f(y)| <= L |x - y| + 2 J, {JUMP_TOTAL}")

    def breakpoints(self, params):
        b, thr = self.real(params, "beta"), self.real(params, "threshold")
        return (0.0, thr / b) if b else (0.0,)
