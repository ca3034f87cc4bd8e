"""l_inf-distance neurons and SortNet neurons: layers 1-Lipschitz in l_inf by construction.

- :class:`LinfDistance` (Zhang et al., ICML 2021; ICML 2022): ``y_i = ||x - w_i||_inf + b_i``.
- :class:`SortNet` (Zhang, Jiang, He and Wang, "Rethinking Lipschitz Neural Networks and Certified
  Robustness: A Boolean Function Perspective", NeurIPS 2022): ``y_i = sum_k a_k s_k(|x - w_i|) + b_i``
  with ``s_1 >= s_2 >= ...`` the order statistics of ``|x - w_i|`` (largest first) and
  ``sum_k |a_k| <= 1``.  The paper's weights are a truncated geometric series,
  ``a_k = q (1 - q)^(k-1) / (1 - (1 - q)^K)`` for ``k <= K = min(n_in, truncate)`` (they sum to 1);
  ``q = 1`` is the l_inf-distance neuron.

Why the constant is what the construction promises (docs/math.md §2.5): ``x -> x - w_i`` copies ``x``,
``|.|`` is 1-Lipschitz elementwise, each order statistic is 1-Lipschitz in l_inf, and a weighted sum of
them changes by at most ``sum |a_k|`` times the largest change.  So every output is
``sum |a_k|``-Lipschitz from l_inf (1 for :class:`LinfDistance`), and stacking such layers, or mixing them
with ``nn.Linear`` layers, multiplies the constants (the l_inf gain of a linear layer is its largest
absolute row sum).

``forward`` uses only operators lipsdp translates exactly (``unsqueeze``, a broadcast ``sub``, ``abs``,
``amax`` / ``topk``, ``matmul`` by a constant vector), so the layers load from a whole-module pickle,
TorchScript, ``torch.export`` and ONNX.  lipsdp reads them as: an affine map copying ``x - w_i`` for
every ``i``, the ``abs`` activation, GroupSort over each group of ``n_in`` values, and an affine map
selecting the maximum (or weighting the largest ``K``).
"""

from __future__ import annotations

import torch
from torch import nn


def geometric_weights(q: float, k: int) -> torch.Tensor:
    """SortNet's order-statistic weights ``q (1 - q)^j / (1 - (1 - q)^k)``, ``j < k``: positive, summing to 1."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must lie in (0, 1], got {q}")
    j = torch.arange(k, dtype=torch.float64)
    a = q * (1.0 - q) ** j
    return at_most_one(a / a.sum())


def at_most_one(a: torch.Tensor) -> torch.Tensor:
    """``a`` in the default dtype, scaled down where ``sum |a| > 1``, with ``sum |a| <= 1`` exactly for the
    stored values (rounding to the dtype may add an ulp: the largest weight is lowered until it holds)."""
    a = a.to(torch.float64)
    a = (a / max(1.0, float(a.abs().sum()))).to(torch.get_default_dtype())
    while float(a.to(torch.float64).abs().sum()) > 1.0:
        i = int(a.abs().argmax())
        a[i] = torch.nextafter(a[i], torch.zeros_like(a[i]))
    return a


class LinfDistance(nn.Module):
    """``y_i = ||x - w_i||_inf + b_i``: ``out_features`` l_inf-distance neurons on ``(N, in_features)`` inputs.

    Every output is 1-Lipschitz from l_inf (docs/math.md §2.5).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
        Learn the offsets ``b_i`` (zeros at first).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.randn(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.unsqueeze(-2) - self.weight).abs().amax(dim=-1)
        return y if self.bias is None else y + self.bias

    def lipschitz(self) -> float:
        """The l_inf -> l_inf constant promised by construction: 1."""
        return 1.0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class SortNet(nn.Module):
    """SortNet neurons: ``y_i = sum_k a_k s_k(|x - w_i|) + b_i``, order statistics largest first.

    Parameters
    ----------
    in_features, out_features : int
    q : float
        The geometric ratio of the paper's weights (``0 < q <= 1``; 1 gives the l_inf-distance neuron).
    truncate : int
        How many of the largest order statistics are weighted (the paper's default is 10).
    order_weights : sequence of float, optional
        Other weights ``a_1..a_K`` (``K <= in_features``), scaled down where ``sum |a_k| > 1``.
    bias : bool

    The weights are a buffer: fixed by the construction, so the constant :meth:`lipschitz`,
    ``sum |a_k| <= 1``, holds whatever training does to ``w`` and ``b``.
    """

    def __init__(self, in_features: int, out_features: int, q: float = 0.5, truncate: int = 10,
                 order_weights=None, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if order_weights is None:
            a = geometric_weights(float(q), max(1, min(self.in_features, int(truncate))))
        else:
            a = torch.as_tensor(order_weights, dtype=torch.get_default_dtype()).flatten()
            if not 0 < len(a) <= self.in_features or not bool(torch.isfinite(a).all()):
                raise ValueError(f"order_weights must be 1 to {self.in_features} finite numbers, got {len(a)}")
            a = at_most_one(a)
        self.k = len(a)
        self.register_buffer("order_weights", a)
        self.weight = nn.Parameter(torch.randn(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x.unsqueeze(-2) - self.weight).abs()
        y = torch.topk(d, self.k, dim=-1).values @ self.order_weights
        return y if self.bias is None else y + self.bias

    def lipschitz(self) -> float:
        """The l_inf -> l_inf constant promised by construction: ``sum |a_k|`` (at most 1)."""
        return float(self.order_weights.to(torch.float64).abs().sum())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"bias={self.bias is not None}")


__all__ = ["LinfDistance", "SortNet", "at_most_one", "geometric_weights"]
