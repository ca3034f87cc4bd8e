r"""SDP-based Lipschitz layers (SLL, Araujo et al., ICLR 2023): residual layers 1-Lipschitz by construction.

.. math::

    y = c\,\bigl(x - 2 W^T T^{-1} \sigma(W x + b)\bigr),\qquad
    T = \operatorname{diag}\Bigl(\sum_j \bigl|W W^T\bigr|_{ij}\, \frac{q_j}{q_i}\Bigr),

with ``W`` of shape ``(inner, features)`` (the paper's :math:`W^T`), ``sigma`` = ReLU (any activation with
slopes in ``[0, 1]`` works) and ``q`` learned.  :math:`T \succeq W W^T` (Gershgorin on the congruence by
``diag(q)``), which is the LipSDP inequality of the residual layer with multiplier :math:`2T^{-1}`, so the
layer is ``c``-Lipschitz in l2 (docs/math.md §5.3).  ``T`` and the rescaled weight are computed in
``forward`` from the parameters, as the authors' code does; lipsdp's loaders evaluate that
parameter-only part to constants.

References
----------
A. Araujo, A. Havens, B. Delattre, A. Allauzen, B. Hu, "A Unified Algebraic Perspective on Lipschitz
Neural Networks", ICLR 2023.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: Added to ``|q|`` and to ``T`` before dividing by them: keeps the scaling finite where a row of ``W`` is
#: zero.  Any positive ``q`` gives a valid ``T`` and a smaller multiplier ``2 / (T + eps)`` only makes the
#: layer more contractive (docs/math.md §5.3), so it never breaks the bound.
EPS = 1e-6


def sll_scaling(gram: Tensor, q: Tensor, eps: float = 1e-6) -> Tensor:
    r"""``2 / T_ii`` with :math:`T_{ii} = \sum_j |G_{ij}| q_j / q_i` for the Gram matrix ``G`` (``(inner, inner)``).

    ``q`` enters as ``|q| + eps`` and ``T`` as ``T + eps`` (:data:`EPS`).
    """
    q_abs = torch.abs(q) + eps
    t = (torch.abs(gram) * q_abs[None, :] / q_abs[:, None]).sum(dim=1)
    return 2.0 / (t + eps)


class SLL(nn.Module):
    """Dense SDP-based Lipschitz residual layer ``y = scale (x - 2 W^T T^{-1} relu(W x + b))``.

    Parameters
    ----------
    features : int
        Input and output width.
    inner : int, optional
        Rows of ``W`` (default ``features``).
    scale : float
        The Lipschitz constant the construction promises (``c``).
    """

    def __init__(self, features: int, inner: int | None = None, scale: float = 1.0):
        super().__init__()
        inner = features if inner is None else int(inner)
        self.weight = nn.Parameter(torch.empty(inner, features))
        self.bias = nn.Parameter(torch.empty(inner))
        self.q = nn.Parameter(torch.randn(inner))
        self.scale = float(scale)
        nn.init.xavier_normal_(self.weight)
        bound = 1.0 / math.sqrt(features)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        t = sll_scaling(self.weight @ self.weight.T, self.q)
        res = F.linear(x, self.weight, self.bias)
        res = t * torch.relu(res)
        res = F.linear(res, self.weight.T)
        return self.scale * (x - res)


__all__ = ["EPS", "SLL", "sll_scaling"]
