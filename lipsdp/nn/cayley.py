r"""Orthogonal linear layers from a skew-symmetric parameter: the Cayley transform (Trockman & Kolter, ICLR 2021)
and the matrix exponential.

.. math::

    A = Z - Z^T,\qquad Q = (I - A)(I + A)^{-1}\ \text{(Cayley)}\quad\text{or}\quad Q = e^{A},\qquad
    y = c\, Q_{[:m]}\, x + b .

``Q`` is orthogonal for every ``Z`` (``I + A`` is invertible since ``A`` has imaginary eigenvalues), so
the first ``m <= n`` rows have spectral norm 1 and the layer is ``c``-Lipschitz in l2
(docs/math.md §5.3).  ``Q`` is computed in ``forward`` with ``torch.linalg.inv`` (as the authors' code
does with ``torch.inverse``), ``torch.linalg.solve`` or ``torch.matrix_exp`` (``method``); lipsdp's
loaders evaluate that parameter-only part to constants.  ONNX has no operator for the inverse, the
solve or the matrix exponential: ``torch.onnx.export`` of these layers fails, and lipsdp refuses any
ONNX graph whose remaining operators it does not model.

References
----------
A. Trockman, J. Z. Kolter, "Orthogonalizing Convolutional Layers with the Cayley Transform", ICLR 2021.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

METHODS = ("inverse", "solve", "exp")


def orthogonal_matrix(z: Tensor, method: str = "inverse") -> Tensor:
    """The orthogonal matrix of the square parameter ``z`` (see the module docstring)."""
    a = z - z.T
    eye = torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
    if method == "exp":
        return torch.matrix_exp(a)
    if method == "solve":
        return torch.linalg.solve(eye + a, eye - a)  # (I + A)^{-1} (I - A) = (I - A)(I + A)^{-1}: they commute
    return (eye - a) @ torch.linalg.inv(eye + a)


class CayleyLinear(nn.Module):
    """Orthogonal linear layer ``y = scale Q[:out] x + b``, ``Q`` from ``Z`` of shape ``(in, in)``.

    Parameters
    ----------
    in_features, out_features : int
        ``out_features <= in_features``.
    scale : float
        The Lipschitz constant the construction promises (``c``).
    method : {"inverse", "solve", "exp"}
        How ``Q`` is computed (Cayley with an inverse or a solve, or the matrix exponential).
    bias : bool
    """

    def __init__(self, in_features: int, out_features: int | None = None, scale: float = 1.0,
                 method: str = "inverse", bias: bool = True):
        super().__init__()
        out_features = in_features if out_features is None else int(out_features)
        if out_features > in_features:
            raise ValueError(f"CayleyLinear keeps rows of an orthogonal {in_features} x {in_features} matrix: "
                             f"out_features {out_features} > in_features {in_features}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        self.weight = nn.Parameter(torch.randn(in_features, in_features) / in_features ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.out_features = out_features
        self.scale = float(scale)
        self.method = method

    def forward(self, x: Tensor) -> Tensor:
        q = orthogonal_matrix(self.weight, self.method)[: self.out_features]
        return F.linear(x, self.scale * q, self.bias)


__all__ = ["CayleyLinear", "METHODS", "orthogonal_matrix"]
