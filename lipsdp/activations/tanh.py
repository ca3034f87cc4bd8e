"""Tanh: slope sector [0, 1] (its derivative ``1 - tanh^2`` ranges over (0, 1])."""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import SlopeActivation, TorchModule, unimodal_range


class Tanh(SlopeActivation):
    """:math:`\\phi(x) = \\tanh x`."""

    name = "tanh"
    torch_modules = (TorchModule("torch.nn.modules.activation.Tanh", "tanh"),)
    aten = {"tanh": lambda: {}}
    onnx = {"Tanh": lambda attrs: {}}
    implicit = True

    def evaluate(self, x, params):
        return np.tanh(x)

    def derivative(self, x, params):
        return 1.0 - np.tanh(x) ** 2

    def derivative_range(self, lo, hi, params):
        low, high = unimodal_range(lambda x: 1.0 - np.tanh(x) ** 2, lo, hi)
        return np.maximum(low, 0.0), np.minimum(high, 1.0)

    def sector(self, params):
        return 0.0, 1.0
