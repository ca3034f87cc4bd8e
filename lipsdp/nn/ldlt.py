r"""LDL^T residual layers: an L-Lipschitz layer read off a block LDL^T factorisation of its LipSDP matrix.

After Juston, Sreenivas, Nottage and Soylemezoglu ("LDLT L-Lipschitz Network", arXiv:2512.05915), who
parameterise Lipschitz residual networks by factorising the LipSDP matrix.  The paper's exact
parameterisation could not be pinned down from the material available here; this module implements the
closest construction proved L-Lipschitz in docs/math.md §5.3:

.. math::

    y = c\,\bigl(H x + G\,\sigma(W x + b)\bigr),\qquad [H\ G] = Q R,\qquad
    R = \begin{bmatrix} I & -W^T\Lambda\\ 0 & L_S^T\end{bmatrix},\qquad
    L_S L_S^T = S = 2\Lambda - \Lambda W W^T \Lambda,

with :math:`\Lambda = \operatorname{diag}(e^{\ell})` learned, ``W`` rescaled so that
:math:`\|\Lambda^{1/2} W\|_2 \le 1` (then :math:`S \succeq \Lambda \succ 0` and the Cholesky factor exists),
and ``Q`` (``n x (n + m)``) with orthonormal rows from the QR factorisation of a learned matrix.
:math:`R^T R = N = \begin{bmatrix} I & -W^T\Lambda\\ -\Lambda W & 2\Lambda\end{bmatrix}` is the block
:math:`LDL^T` factorisation of the LipSDP matrix of the layer, so for ``sigma`` with slopes in ``[0, 1]``
:math:`\|\Delta y\|^2 \le c^2 z^T N z \le c^2 \|\Delta x\|^2` (``z = (Δx, Δσ)``, the slope QC).  With
``Q = [I 0]`` (the start) this is the residual layer ``x - W^T Λ relu(W x + b)``; training ``Q`` mixes in the
``S`` part.  Every matrix is computed in ``forward`` (spectral norm, Cholesky, QR), as in parameterised
layers; lipsdp's loaders evaluate that parameter-only part to constants.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def ldlt_weights(weight: Tensor, log_lam: Tensor, mix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(W, H, G)`` of the layer from its parameters (see the module docstring)."""
    n = weight.shape[1]
    lam = torch.exp(log_lam)
    k = torch.sqrt(lam)[:, None] * weight
    w = weight / torch.clamp(torch.linalg.matrix_norm(k, ord=2), min=1.0)
    lw = lam[:, None] * w                                   # Lambda W
    s = 2.0 * torch.diag(lam) - lw @ lw.T                   # >= Lambda > 0
    ls = torch.linalg.cholesky(s)
    q = torch.linalg.qr(mix).Q.T                            # (n, n + m), orthonormal rows
    h = q[:, :n]
    g = -h @ lw.T + q[:, n:] @ ls.T
    return w, h, g


class LDLTResidual(nn.Module):
    """L-Lipschitz layer ``y = scale (H x + G relu(W x + b))`` with ``[H G]`` from an LDL^T factorisation.

    Parameters
    ----------
    features : int
        Input and output width ``n``.
    inner : int, optional
        Rows ``m`` of ``W`` (default ``features``).
    scale : float
        The Lipschitz constant the construction promises (``c``).
    """

    def __init__(self, features: int, inner: int | None = None, scale: float = 1.0):
        super().__init__()
        inner = features if inner is None else int(inner)
        self.weight = nn.Parameter(torch.empty(inner, features))
        self.bias = nn.Parameter(torch.empty(inner))
        self.log_lam = nn.Parameter(0.1 * torch.randn(inner))
        mix = torch.cat([torch.eye(features), torch.zeros(inner, features)])
        self.mix = nn.Parameter(mix + 0.01 * torch.randn(features + inner, features))
        self.scale = float(scale)
        nn.init.xavier_normal_(self.weight)
        bound = 1.0 / math.sqrt(features)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        w, h, g = ldlt_weights(self.weight, self.log_lam, self.mix)
        hidden = torch.relu(F.linear(x, w, self.bias))
        return self.scale * (F.linear(x, h) + F.linear(hidden, g))


__all__ = ["LDLTResidual", "ldlt_weights"]
