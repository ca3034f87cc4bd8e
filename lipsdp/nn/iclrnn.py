r"""Input-convex Lipschitz RNN (ICLRNN): an Elman RNN convex in its input sequence and Lipschitz by construction.

From the paper (Z. Wang, Z. Wu, "Input Convex Lipschitz RNN: A Fast and Robust Approach for Engineering
Tasks", arXiv:2401.07494): the cell is a plain RNN, :math:`h_t = g(W x_t + U h_{t-1} + b)`, made **input
convex** by non-negative weights on every term that is a convex function of the input (the recurrent
weights, the input weights of the layers above the first, the read-out) with a convex non-decreasing
activation (ReLU), and **Lipschitz** by normalising the weights' spectral norms.

This reference implementation is lipsdp's own reading of that recipe (the paper's code was not at hand):

* layer ``l``: ``h^l_t = relu(U_l h^{l-1}_t + W_l h^l_{t-1} + b_l)``, ``h^0_t = x_t``, ``h^l_0 = 0``;
  the first layer's ``U_0`` has any sign (``x_t`` enters affinely), every other ``U_l``, every ``W_l`` and
  the read-out ``V`` are entrywise non-negative (``|P|`` of a free parameter ``P``);
* the norms are set by **Schur's bound** :math:`\|A\|_2\le\sqrt{\|A\|_1\|A\|_\infty}` instead of power
  iterations: ``A / sqrt(||A||_1 ||A||_inf)`` has spectral norm at most 1, exactly and without iterating;
  ``||U_l|| <= 1``, ``||W_l|| <= gamma < 1`` (a contraction), ``||V|| <= scale``;
* the read-out is ``y = V h^L_T + c`` (``read="last"``) or ``y_t = V h^L_t + c`` at every step (``"all"``).

**Convex**: by induction over ``t`` and ``l`` each ``h^l_t`` is a non-negative combination of convex
functions of ``x`` plus an affine one, through the convex non-decreasing ReLU; so is ``y``.

**Lipschitz** (docs/math.md §13.3, in the l2 norm of the flattened sequence, for every horizon):
:meth:`ICLRNN.lipschitz_constant` is ``scale (1 - gamma)^{-(L-1)}`` times ``(1 - gamma^2)^{-1/2}``
(last state) or ``(1 - gamma)^{-1}`` (every state): each layer maps its input sequence to its state
sequence with gain ``||U|| / (1 - ||W||)``, and the last state alone with gain ``||U|| / sqrt(1 - ||W||^2)``.

``forward`` is a Python loop over time: ``torch.export`` and ``torch.jit.trace`` unroll it over the traced
horizon, and lipsdp certifies that unrolled graph (``horizon=T``); ``torch.jit.script`` keeps the loop
(``prim::Loop``), which lipsdp refuses.  The all-horizon bound recognises the unrolled cell
(:mod:`lipsdp.recurrent_cell`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ICLRNN", "schur_normalised"]


def schur_normalised(a: Tensor) -> Tensor:
    r"""``a / sqrt(||a||_1 ||a||_inf)``: spectral norm at most 1 (Schur's bound), computed without iterating."""
    bound = torch.sqrt(a.abs().sum(dim=0).max() * a.abs().sum(dim=1).max())
    return a / torch.clamp(bound, min=1e-12)


class ICLRNN(nn.Module):
    """Input-convex Lipschitz RNN on ``(batch, T, input_size)`` sequences, ReLU cells.

    Parameters
    ----------
    input_size, hidden_size, output_size : int
    num_layers : int
    gamma : float
        Spectral-norm bound of each recurrent matrix, in ``(0, 1)``.
    scale : float
        Spectral-norm bound of the read-out.
    read : {"last", "all"}
        Read the last state, or every state.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1,
                 gamma: float = 0.5, scale: float = 1.0, read: str = "last"):
        super().__init__()
        if not 0.0 < gamma < 1.0 or read not in ("last", "all") or scale <= 0:
            raise ValueError(f"need 0 < gamma < 1, scale > 0 and read in ('last', 'all'), not {gamma}, {scale}, "
                             f"{read!r}")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.gamma, self.scale, self.read = float(gamma), float(scale), read
        sizes = [self.input_size] + [self.hidden_size] * self.num_layers
        for layer in range(self.num_layers):
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.randn(hidden_size, sizes[layer])))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.rand(hidden_size, hidden_size)))
            self.register_parameter(f"bias_l{layer}", nn.Parameter(0.1 * torch.randn(hidden_size)))
        self.readout = nn.Parameter(torch.rand(output_size, hidden_size))
        self.readout_bias = nn.Parameter(torch.zeros(output_size))

    def weights(self) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``(U_l, W_l, b_l)`` per layer, as ``forward`` uses them."""
        out = []
        for layer in range(self.num_layers):
            u = getattr(self, f"weight_ih_l{layer}")
            u = schur_normalised(u if layer == 0 else u.abs())
            w = self.gamma * schur_normalised(getattr(self, f"weight_hh_l{layer}").abs())
            out.append((u, w, getattr(self, f"bias_l{layer}")))
        return out

    def readout_weight(self) -> Tensor:
        return self.scale * schur_normalised(self.readout.abs())

    def forward(self, x: Tensor) -> Tensor:
        weights, v = self.weights(), self.readout_weight()
        states: list = [None] * self.num_layers
        outputs = []
        for t in range(x.shape[1]):
            inp = x[:, t]
            for layer, (u, w, b) in enumerate(weights):
                pre = F.linear(inp, u, b)
                if states[layer] is not None:  # h_0 = 0
                    pre = pre + F.linear(states[layer], w)
                states[layer] = torch.relu(pre)
                inp = states[layer]
            outputs.append(inp)
        if self.read == "last":
            return F.linear(outputs[-1], v, self.readout_bias)
        return F.linear(torch.stack(outputs, dim=1), v, self.readout_bias)

    def lipschitz_constant(self) -> float:
        """The l2 Lipschitz constant the construction promises, for every horizon (see the module docstring)."""
        g = self.gamma
        last = 1.0 / math.sqrt((1.0 - g) * (1.0 + g)) if self.read == "last" else 1.0 / (1.0 - g)
        return self.scale * last / (1.0 - g) ** (self.num_layers - 1)
