r"""``ImplicitLayer``: an equilibrium (DEQ) layer that lipsdp loads and certifies.

.. math::

    z = \phi(W z + U x + b), \qquad y = C z + c\ (+ D x),

with ``phi`` elementwise and slope-restricted (ReLU, LeakyReLU, Tanh, ...).
The equilibrium is computed by the custom operator ``torch.ops.lipsdp.equilibrium``
(Picard iteration and semismooth Newton steps to a tolerance, in float64, by
:func:`lipsdp.equilibrium.solve`); its backward pass uses the implicit function
theorem, :math:`\partial z/\partial u = (I - D W)^{-1} D` with
:math:`D = \operatorname{diag}\phi'(Wz + u)`, so autograd gives the exact
Jacobians of the equilibrium map (and gradients for training in ``W``, ``U``, ``b``).

Because the equilibrium is one operator, ``torch.export`` and
``torch.jit.trace/script`` keep it as one node; lipsdp's loaders turn that node
into an :class:`~lipsdp.network.Equilibrium` (the LFT form of docs/math.md §5.2).
Files that contain it need ``import lipsdp.nn`` before ``torch.export.load`` /
``torch.jit.load`` in other programs (lipsdp's own loaders do it).  ONNX has no
such operator: export these models with ``torch.save``, ``torch.export`` or TorchScript.

References
----------
S. Bai, J. Z. Kolter, V. Koltun, "Deep Equilibrium Models", NeurIPS 2019.
M. Revay, R. Wang, I. R. Manchester, "Lipschitz Bounded Equilibrium Networks", arXiv:2010.01732, 2020.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from lipsdp.activations import (IMPLICIT_DEFAULTS, IMPLICIT_PARAMS as ACTIVATION_PARAMS,
                                implicit_params as activation_params)
from lipsdp.equilibrium import equilibrium as solve_equilibrium
from lipsdp.network import Equilibrium, activation_function

_DEFAULT_PARAM = IMPLICIT_DEFAULTS


def _layer(u: Tensor, W: Tensor, activation: str, param: float) -> Equilibrium:
    n = W.shape[0]
    return Equilibrium("ImplicitLayer", "ImplicitLayer", (n,), function=activation,
                       params=activation_params(activation, param),
                       feedback=W.detach().cpu().to(torch.float64).numpy())


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().to(torch.float64).reshape(-1, t.shape[-1]).numpy()


@torch.library.custom_op("lipsdp::equilibrium", mutates_args=())
def equilibrium(u: Tensor, W: Tensor, activation: str, param: float, tol: float, max_iter: int) -> Tensor:
    """``z`` with ``z = phi(z W^T + u)`` along the last axis of ``u`` (every other axis is a batch axis)."""
    op = _layer(u, W, activation, param)
    z = solve_equilibrium(op, _numpy(u), activation_function(activation), strict=True, tol=tol, max_iter=max_iter)
    return torch.from_numpy(z).to(dtype=u.dtype, device=u.device).reshape(u.shape)


@equilibrium.register_fake
def _(u, W, activation, param, tol, max_iter):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output):
    u, W, activation, param, _, _ = inputs
    ctx.save_for_backward(u, W, output)
    ctx.activation, ctx.param = activation, param


def _backward(ctx, grad):
    """``g -> D (I - W^T D)^{-1} g`` for ``u`` and its outer product with ``z`` for ``W`` (IFT)."""
    u, W, z = ctx.saved_tensors
    op = _layer(u, W, ctx.activation, ctx.param)
    n = W.shape[0]
    zf, uf = z.reshape(-1, n), u.reshape(-1, n)
    v = _numpy(zf) @ op.feedback.T + _numpy(uf)
    d = torch.from_numpy(activation_function(op.function).derivative(v, op)).to(dtype=grad.dtype, device=grad.device)
    A = torch.eye(n, dtype=grad.dtype, device=grad.device) - W.T.to(grad.dtype)[None] * d[:, None, :]
    a = torch.linalg.solve(A, grad.reshape(-1, n, 1)).squeeze(-1)
    gu = d * a
    gW = gu.T @ zf.to(grad.dtype)
    return gu.reshape(u.shape), gW.to(W.dtype), None, None, None, None


equilibrium.register_autograd(_backward, setup_context=_setup_context)


class ImplicitLayer(nn.Module):
    r"""Equilibrium layer ``z = phi(W z + U x + b)``, output ``z`` or ``y = C z + c (+ D x)``.

    Parameters
    ----------
    in_features : int
        Size of ``x``.
    state_features : int
        Size of the equilibrium ``z``.
    out_features : int, optional
        With it, the layer returns ``y = C z + c`` (``C``: ``nn.Linear(state, out)``);
        without it, ``z``.
    activation : str
        ``phi``: one of ``relu``, ``leaky_relu``, ``tanh``, ``sigmoid``, ``elu``,
        ``softplus``, ``silu``, ``gelu``.
    activation_param : float, optional
        ``negative_slope`` (leaky_relu, default 0.01), ``alpha`` (elu, 1) or ``beta`` (softplus, 1).
    bias : bool
        Bias ``b`` in ``U`` (``nn.Linear(in, state)``).
    direct : bool
        Add the feed-through ``D x`` (``nn.Linear(in, out, bias=False)``) to ``y``.
    tol : float
        Residual tolerance: ``max|z - phi(W z + u)| <= tol (1 + max|z|)`` per sample.
    max_iter : int
        Newton / Picard iterations before giving up with :class:`~lipsdp.errors.WellPosednessError`.

    Attributes
    ----------
    U, W, C, D : nn.Linear or None
        ``W.weight`` is the feedback matrix (``W.bias`` is None; ``W`` is never called as a layer).
        ``W`` starts with spectral norm 1/2, so the untrained layer is a contraction.

    Shape:
        - Input: ``(N, in_features)``.
        - Output: ``(N, out_features)``, or ``(N, state_features)`` without ``out_features``.

    Note:
        Deep equilibrium models (Bai, Kolter, Koltun, NeurIPS 2019).  lipsdp certifies
        ``y`` with the slope QC on the non-triangular LFT of docs/math.md §5.2 and proves the
        equilibrium well-posed from the same multipliers (Revay, Wang, Manchester 2020;
        :mod:`lipsdp.wellposed`).

    Examples
    --------
    >>> layer = ImplicitLayer(4, 8, 2)
    >>> layer(torch.randn(3, 4)).shape
    torch.Size([3, 2])
    """

    def __init__(self, in_features: int, state_features: int, out_features: Optional[int] = None,
                 activation: str = "relu", activation_param: Optional[float] = None, bias: bool = True,
                 direct: bool = False, tol: float = 1e-10, max_iter: int = 200):
        super().__init__()
        if activation not in ACTIVATION_PARAMS:
            raise ValueError(f"ImplicitLayer: activation {activation!r} is not one of {', '.join(ACTIVATION_PARAMS)}")
        if direct and out_features is None:
            raise ValueError("ImplicitLayer: direct=True needs out_features")
        self.activation = activation
        self.activation_param = float(_DEFAULT_PARAM.get(activation, 0.0) if activation_param is None
                                      else activation_param)
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        # U first: lipsdp reads the input size from the first Linear.
        self.U = nn.Linear(in_features, state_features, bias=bias)
        self.W = nn.Linear(state_features, state_features, bias=False)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / max(float(torch.linalg.matrix_norm(self.W.weight, 2)), 1e-12))
        self.C = None if out_features is None else nn.Linear(state_features, out_features)
        self.D = nn.Linear(in_features, out_features, bias=False) if direct else None

    def equilibrium(self, x: Tensor) -> Tensor:
        """The equilibrium ``z`` for inputs ``x``."""
        return torch.ops.lipsdp.equilibrium(self.U(x), self.W.weight, self.activation, self.activation_param,
                                            self.tol, self.max_iter)

    def forward(self, x: Tensor) -> Tensor:
        z = self.equilibrium(x)
        if self.C is None:
            return z
        y = self.C(z)
        if self.D is not None:
            y = y + self.D(x)
        return y

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, tol={self.tol:g}, max_iter={self.max_iter}"
