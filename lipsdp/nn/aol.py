r"""Almost-orthogonal layers (AOL, Prach & Lampert, ECCV 2022): linear layers 1-Lipschitz by construction.

.. math::

    y = c\, W D x + b,\qquad D = \operatorname{diag}\Bigl(\sum_j \bigl|W^T W\bigr|_{ij}\Bigr)^{-1/2},

so :math:`\|W D\|_2 \le 1` (Prach & Lampert, Thm 1: :math:`D^{-2} \succeq W^T W` by Gershgorin) and the layer is
``c``-Lipschitz in l2 (docs/math.md §5.3).  ``D`` is computed in ``forward`` from ``W``, as in the authors'
code; lipsdp's loaders evaluate that parameter-only part to constants.  Between AOL layers any activation
with slopes in ``[-1, 1]`` keeps the network ``prod c``-Lipschitz.

References
----------
B. Prach, C. H. Lampert, "Almost-Orthogonal Layers for Efficient General-Purpose Lipschitz Networks",
ECCV 2022.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def aol_rescaling(weight: Tensor, eps: float = 1e-6) -> Tensor:
    r"""``diag(D)``: :math:`(\sum_j |W^T W|_{ij} + \epsilon)^{-1/2}` per input column of ``weight`` ``(out, in)``.

    ``eps`` keeps a zero column finite; it only shrinks ``D``, which keeps :math:`\|W D\|_2 \le 1`.
    """
    gram = torch.abs(weight.T @ weight)
    return torch.rsqrt(gram.sum(dim=1) + eps)


class AOL(nn.Module):
    """AOL linear layer ``y = scale W diag(D) x + b`` (``W`` of shape ``(out_features, in_features)``).

    Parameters
    ----------
    in_features, out_features : int
    scale : float
        The Lipschitz constant the construction promises (``c``).
    bias : bool
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight * aol_rescaling(self.weight)[None, :]
        return F.linear(x, self.scale * w, self.bias)


__all__ = ["AOL", "aol_rescaling"]
