"""The logistic sigmoid: slope sector [0, 1/4] (``s (1 - s)`` peaks at 1/4 at 0)."""

from __future__ import annotations

import numpy as np

from lipsdp.activations.base import SlopeActivation, TorchModule, sigmoid, unimodal_range


class Sigmoid(SlopeActivation):
    """:math:`\\phi(x) = 1 / (1 + e^{-x})`."""

    name = "sigmoid"
    torch_modules = (TorchModule("torch.nn.modules.activation.Sigmoid", "sigmoid"),)
    aten = {"sigmoid": lambda: {}}
    onnx = {"Sigmoid": lambda attrs: {}}
    implicit = True

    def evaluate(self, x, params):
        return sigmoid(x)

    def derivative(self, x, params):
        s = sigmoid(x)
        return s * (1.0 - s)

    def derivative_range(self, lo, hi, params):
        low, high = unimodal_range(lambda x: sigmoid(x) * (1.0 - sigmoid(x)), lo, hi)
        return np.maximum(low, 0.0), np.minimum(high, 0.25)

    def sector(self, params):
        return 0.0, 0.25
