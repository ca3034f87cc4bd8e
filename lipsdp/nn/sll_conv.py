r"""Convolutional SDP-based Lipschitz layer (SLL, Araujo et al., ICLR 2023): 1-Lipschitz by construction.

.. math::

    y = c\,\bigl(x - 2 K^T T^{-1} \sigma(K x + b)\bigr),\qquad
    T = \operatorname{diag}\Bigl(\sum_j \sum_{o} \bigl|(K K^T)_{ij}[o]\bigr|\, \frac{q_j}{q_i}\Bigr),

with ``K`` the zero-padded, stride-1 ("same") convolution by a kernel of shape
``(inner, channels, k, k)`` (``k`` odd), ``K^T`` its adjoint, ``(K K^T)_{ij}[o]`` the coefficients of the
convolution ``K K^T`` between inner channels ``i`` and ``j`` at offset ``o`` (the paper's
``conv2d(kernel, kernel, padding=k - 1)``), ``T`` constant over pixels, ``sigma`` = ReLU and ``q``
learned.  On an image of any size ``K K^T \preceq T`` (Gershgorin on the principal submatrix of the
infinite convolution, docs/math.md §5.4), which is the LipSDP inequality of the residual layer with
multiplier :math:`2T^{-1}`: the layer is ``c``-Lipschitz in l2.

``K^T`` is written as the convolution by the flipped kernel with input and output channels swapped
(the adjoint of a "same" convolution with an odd kernel), so the layer uses only ``conv2d``, which every
format lipsdp reads translates; the authors' ``conv_transpose2d`` computes the same map.

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

from lipsdp.nn.sll import sll_scaling


def conv_gram_abs(kernel: Tensor) -> Tensor:
    r"""``A_ij = sum_o |(K K^T)_ij[o]|`` (``(inner, inner)``) for a kernel ``(inner, channels, k, k)``.

    ``conv2d(kernel, kernel, padding=k - 1)`` holds the coefficients of ``K K^T`` at every offset
    ``|o| < k`` (zero elsewhere).
    """
    size = kernel.shape[-1]
    return torch.abs(F.conv2d(kernel, kernel, padding=size - 1)).sum(dim=(2, 3))


class SLLConv2d(nn.Module):
    """Convolutional SDP-based Lipschitz residual layer ``y = scale (x - 2 K^T T^{-1} relu(K x + b))``.

    Parameters
    ----------
    channels : int
        Input and output channels.
    inner : int, optional
        Channels of ``K x`` (default ``channels``).
    kernel_size : int
        Odd size of the square kernel; the convolution keeps the image size (zero padding).
    scale : float
        The Lipschitz constant the construction promises (``c``).
    """

    def __init__(self, channels: int, inner: int | None = None, kernel_size: int = 3, scale: float = 1.0):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"SLLConv2d needs an odd kernel_size (a 'same' convolution), got {kernel_size}")
        inner = channels if inner is None else int(inner)
        self.kernel = nn.Parameter(torch.empty(inner, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(inner))
        self.q = nn.Parameter(torch.randn(inner))
        self.scale = float(scale)
        self.padding = kernel_size // 2
        nn.init.xavier_normal_(self.kernel)
        bound = 1.0 / math.sqrt(channels * kernel_size ** 2)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        t = sll_scaling(conv_gram_abs(self.kernel), self.q)[:, None, None]
        res = F.conv2d(x, self.kernel, self.bias, padding=self.padding)
        res = t * torch.relu(res)
        adjoint = torch.flip(self.kernel, dims=(2, 3)).transpose(0, 1)  # K^T: flipped, channels swapped
        res = F.conv2d(res, adjoint, padding=self.padding)
        return self.scale * (x - res)


__all__ = ["SLLConv2d", "conv_gram_abs"]
