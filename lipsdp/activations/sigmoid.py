"""The logistic sigmoid: slope sector [0, 1/4] (``s (1 - s)`` peaks at 1/4 at 0)."""

from __future__ import annotations

from lipsdp.activations.base import SlopeActivation, TorchModule, sigmoid


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

    def sector(self, params):
        return 0.0, 0.25
