r"""GroupSort, MaxMin and Householder activations with deel-torchlip's semantics.

These are the activations of orthogonal / 1-Lipschitz networks (Anil et al.,
ICML 2019; Singla et al., ICLR 2022).  lipsdp certifies them with the quadratic
constraints of Pauli et al. (ICLR 2024, docs/math.md §4): GroupSort preserves
the sum of each group and is incrementally 1-Lipschitz on it; Householder is the
identity on :math:`u^\perp` and shrinks :math:`|u^T \Delta z|`.

Layout, as in ``deel.torchlip`` 0.x (checked against its source):

- the channel axis is axis 1 (``(N, C)`` or ``(N, C, *spatial)``);
- ``GroupSort(g)`` sorts groups of ``g`` *consecutive* channels ascending
  (``g = None``: all channels, FullSort); the channel count must be a multiple of ``g``;
- ``MaxMin`` returns ``cat([relu(x), relu(-x)], dim)``: twice the channels;
- ``HouseHolder(C)`` pairs channel ``c`` with ``c + C/2`` (the two halves), with one
  angle ``theta[c]`` per pair (parameter ``theta`` of shape ``(C/2,)``, default
  :math:`\pi/2`): with :math:`u = (\sin(\theta/2), -\cos(\theta/2))`, a pair ``z`` is kept
  where :math:`u^T z \le 0` and reflected to :math:`(I - 2uu^T) z` elsewhere.

``k_coef_lip`` scales the output of GroupSort and MaxMin as in deel-torchlip.
deel-torchlip's HouseHolder stores ``k_coef_lip`` but ignores it; here a value
other than 1 is refused rather than silently ignored.

References
----------
C. Anil, J. Lucas, R. Grosse, "Sorting out Lipschitz function approximation", ICML 2019.
M. Blot, M. Cord, N. Thome, "Max-min convolutional neural networks for image classification", ICIP 2016.
S. Singla, S. Singla, S. Feizi, "Improved deterministic l2 robustness on CIFAR-10 and CIFAR-100", ICLR 2022.
P. Pauli et al., "Novel Quadratic Constraints for Extending LipSDP beyond Slope-Restricted
Activations", ICLR 2024, arXiv:2401.14033.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def group_sort(x: torch.Tensor, group_size: Optional[int] = None, dim: int = 1) -> torch.Tensor:
    """Sort consecutive groups of ``group_size`` entries of ``x`` along ``dim`` (ascending).

    Groups of two use ``min``/``max`` (as deel-torchlip does), which every lipsdp
    loader recognises as GroupSort-2; larger groups use ``sort``.
    """
    n = x.shape[dim]
    g = n if group_size is None or group_size > n else group_size
    if n % g != 0:
        raise ValueError(f"GroupSort: {n} channels are not a multiple of the group size {g}")
    shape = x.shape[:dim] + (n // g, g) + x.shape[dim + 1:]
    if g == 2:
        pairs = x.view(shape)
        lo = torch.min(pairs, dim + 1, keepdim=True)[0]
        hi = torch.max(pairs, dim + 1, keepdim=True)[0]
        return torch.cat([lo, hi], dim=dim + 1).view(x.shape)
    return torch.sort(x.reshape(shape), dim=dim + 1)[0].reshape(x.shape)


class GroupSort(nn.Module):
    r"""Sort consecutive groups of ``group_size`` channels in ascending order.

    Parameters
    ----------
    group_size : int, optional
        Channels per group; ``None`` sorts all channels (FullSort).
    k_coef_lip : float
        The output is multiplied by it (a ``k_coef_lip``-Lipschitz activation).

    Shape:
        - Input: ``(N, C, *)``, ``C`` a multiple of ``group_size``.
        - Output: ``(N, C, *)``.

    Note:
        Same map as ``deel.torchlip.GroupSort`` (Anil et al., ICML 2019); lipsdp
        certifies it with the QC of Pauli et al., ICLR 2024 (docs/math.md §4).
    """

    def __init__(self, group_size: Optional[int] = None, k_coef_lip: float = 1.0):
        super().__init__()
        if group_size is not None and int(group_size) < 1:
            raise ValueError(f"GroupSort: group_size must be positive, got {group_size}")
        self.group_size = None if group_size is None else int(group_size)
        self.k_coef_lip = float(k_coef_lip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = group_sort(x, self.group_size)
        if self.k_coef_lip != 1.0:
            y = y * self.k_coef_lip
        return y

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}" + (f", k_coef_lip={self.k_coef_lip}" if self.k_coef_lip != 1.0 else "")


class GroupSort2(GroupSort):
    """``GroupSort(2)``: sorts consecutive channel pairs (``[min, max]``)."""

    def __init__(self, k_coef_lip: float = 1.0):
        super().__init__(group_size=2, k_coef_lip=k_coef_lip)


class FullSort(GroupSort):
    """``GroupSort(None)``: sorts all channels."""

    def __init__(self, k_coef_lip: float = 1.0):
        super().__init__(group_size=None, k_coef_lip=k_coef_lip)


class MaxMin(nn.Module):
    r"""``cat([relu(x), relu(-x)], dim)``: doubles the channels (deel-torchlip's MaxMin).

    This is *not* GroupSort-2: it is a fixed linear duplication ``x -> [x; -x]``
    followed by ReLU, which lipsdp certifies as such.

    Parameters
    ----------
    dim : int, optional
        Axis to duplicate; default 0 for 1-D inputs, else 1 (channels).
    k_coef_lip : float
        The output is multiplied by it.

    Shape:
        - Input: ``(N, C, *)`` (or ``(C,)``).
        - Output: ``(N, 2C, *)`` (or ``(2C,)``).

    Note:
        Blot, Cord, Thome, ICIP 2016; same map as ``deel.torchlip.MaxMin``.
    """

    def __init__(self, dim: Optional[int] = None, k_coef_lip: float = 1.0):
        super().__init__()
        self.dim = dim
        self.k_coef_lip = float(k_coef_lip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim
        if dim is None:
            dim = 0 if x.dim() == 1 else 1
        y = torch.cat((torch.relu(x), torch.relu(-x)), dim=dim)
        if self.k_coef_lip != 1.0:
            y = y * self.k_coef_lip
        return y


class HouseHolder(nn.Module):
    r"""Householder activation on channel pairs ``(c, c + C/2)`` (Singla et al., ICLR 2022).

    With :math:`u_c = (\sin(\theta_c/2), -\cos(\theta_c/2))` and :math:`z = (x_c, y_c)`:

    .. math::

        \sigma(z) = \begin{cases} z & u_c^T z \le 0 \\
        \begin{bmatrix}\cos\theta_c & \sin\theta_c\\ \sin\theta_c & -\cos\theta_c\end{bmatrix} z
        & u_c^T z > 0 .\end{cases}

    Parameters
    ----------
    channels : int
        ``C``, even.
    k_coef_lip : float
        Must be 1 (deel-torchlip stores but ignores it; lipsdp refuses to guess).
    theta_initializer : float or {"zeros", "ones", "normal"}, optional
        Initial angles; default :math:`\pi/2` for every pair, as deel-torchlip.

    Shape:
        - Input: ``(N, C, *)``.
        - Output: ``(N, C, *)``.

    Note:
        Same map and parameter (``theta``, shape ``(C/2,)``) as
        ``deel.torchlip.HouseHolder``; certified with the QC of Pauli et al., ICLR 2024.
    """

    def __init__(self, channels: int, k_coef_lip: float = 1.0, theta_initializer=None):
        super().__init__()
        if int(channels) % 2:
            raise ValueError(f"HouseHolder: channels must be even, got {channels}")
        if float(k_coef_lip) != 1.0:
            raise ValueError("HouseHolder: k_coef_lip must be 1 (deel-torchlip ignores it in forward)")
        coef = float(theta_initializer) if isinstance(theta_initializer, float) else 0.5 * math.pi
        self.theta = nn.Parameter(coef * torch.ones(int(channels) // 2))
        if isinstance(theta_initializer, str):
            inits = {"zeros": nn.init.zeros_, "ones": nn.init.ones_, "normal": nn.init.normal_}
            if theta_initializer not in inits:
                raise ValueError(f"HouseHolder: unknown theta_initializer {theta_initializer!r}; "
                                 f"use a float or one of {', '.join(inits)}")
            with torch.no_grad():
                inits[theta_initializer](self.theta)
        elif theta_initializer is not None and not isinstance(theta_initializer, float):
            raise ValueError(f"HouseHolder: unknown theta_initializer {theta_initializer!r}")

    def forward(self, z: torch.Tensor, axis: int = 1) -> torch.Tensor:
        # Written as deel-torchlip writes it, so the exported graphs are the same.
        theta_shape = [1, -1] + [1] * (z.dim() - 2)
        theta = self.theta.view(theta_shape)
        x, y = z.split(z.shape[axis] // 2, axis)
        selector = (x * torch.sin(0.5 * theta)) - (y * torch.cos(0.5 * theta))
        a_2 = x * torch.cos(theta) + y * torch.sin(theta)
        b_2 = x * torch.sin(theta) - y * torch.cos(theta)
        a = x * (selector <= 0) + a_2 * (selector > 0)
        b = y * (selector <= 0) + b_2 * (selector > 0)
        return torch.cat([a, b], dim=axis)
