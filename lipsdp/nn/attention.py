r"""Self-attention blocks with certified Lipschitz bounds (docs/math.md §11).

=============================== ==============================================================
module                          what it computes, and the bound lipsdp certifies for it
=============================== ==============================================================
``L2MultiheadSelfAttention``    L2-distance attention with tied query and key (Kim, Papamakarios,
                                Mnih, ICML 2021): **globally** Lipschitz, bound of §11.1
``DotMultiheadSelfAttention``   scaled dot-product attention (Vaswani et al.): not globally
                                Lipschitz; a **local** bound over a stated input box, §11.2
``Residual(block)``             ``x + block(x)``: bound ``1 + L(block)``
=============================== ==============================================================

Inputs are sequences ``X`` of shape ``(N, D)`` (or batches ``(B, N, D)``); the norm is the l2 norm
of the whole sequence (Frobenius), so a token-wise MLP keeps its own l2 constant in a stack and
:func:`lipsdp.compose` multiplies the blocks' bounds.  Every bound is computed from spectral norms
proven in floating point (:func:`lipsdp.bounds.proven_spectral_norm`) and rounded upwards.

Blocks certify themselves through ``lipsdp_bound(certify, **options)``, the hook :func:`lipsdp.compose` calls:
it returns a record (``bound``, ``trivial_bound``, ``verified``, ``method``, ``message``, ``network``) that
:mod:`lipsdp.composition` turns into a certificate (``certify`` gives an inner block's record, for :class:`Residual`).
This module builds no certificate itself: it is loaded with :mod:`lipsdp.nn`, below the certificate stage.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import lambertw
from torch import Tensor, nn

from lipsdp.bounds import proven_spectral_norm
from lipsdp.errors import LipSDPError, UnsupportedLayerError

__all__ = ["DotMultiheadSelfAttention", "L2MultiheadSelfAttention", "Residual", "attention_bound",
           "dot_attention_local_bound", "l2_attention_bound", "softmax_entropy_bound", "softmax_norm_bound"]

_EPS = np.finfo(float).eps


def _up(value: float, ops: int = 8) -> float:
    """``value`` raised past the rounding error of ``ops`` float operations (relative ``ops * eps`` each way)."""
    return float(np.nextafter(value * (1.0 + 4.0 * ops * _EPS), np.inf))


def _norm(W) -> float:
    """A proven upper bound on ``||W||_2``; the Frobenius norm (rounded up) where the proof is out of reach."""
    W = np.asarray(W, dtype=np.float64)
    proven = proven_spectral_norm(W)
    return proven if proven is not None else _up(math.sqrt(float(np.sum(W * W))), W.size)


def softmax_entropy_bound(n: int) -> float:
    r"""``w(n) = W_0((n - 1)/e)`` rounded up: the largest ``sum_j p_j t_j`` over softmax weights
    ``p_j \propto e^{-t_j}``, ``t_j >= 0``, with one ``t_i = 0`` among ``n`` (docs/math.md §11.1)."""
    if n <= 1:
        return 0.0
    target = (n - 1) / math.e
    w = float(np.real(lambertw(target)))
    w = _up(w, 64)
    while w * math.exp(w) < target * (1.0 + 1e-12):  # w e^w is increasing: w now lies above W_0
        w = _up(w * (1.0 + 1e-9), 64)
    return w


class L2MultiheadSelfAttention(nn.Module):
    r"""L2-distance multi-head self-attention with tied query and key (Kim et al. 2021).

    Head ``h``, with ``q_i = x_i W_h`` (``W_h``: ``D x d``, ``d = D / H``) and ``s = 1 / sqrt(d)``::

        P_ij = softmax_j(-s ||q_i - q_j||^2),    head_h(X) = P X (s W_h W_h^T) V_h,

    and ``F(X) = [head_1, ..., head_H] W_O + b``.  The value map ``s W_h W_h^T V_h`` is the one the paper
    ties to the query: with a free value map the block is not Lipschitz (docs/math.md §11.1).
    """

    def __init__(self, dim: int, heads: int = 1, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise LipSDPError(f"dim {dim} is not a multiple of heads {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        scale = 1.0 / math.sqrt(dim)
        self.query = nn.Parameter(torch.randn(heads, dim, self.head_dim) * scale)
        self.value = nn.Parameter(torch.randn(heads, dim, self.head_dim) * scale)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        s = 1.0 / math.sqrt(self.head_dim)
        q = torch.einsum("...nd,hde->...hne", x, self.query)                 # (.., H, N, d)
        sq = (q * q).sum(-1)
        logits = -s * (sq.unsqueeze(-1) - 2.0 * q @ q.transpose(-1, -2) + sq.unsqueeze(-2))
        p = torch.softmax(logits, dim=-1)
        value_map = s * self.query.transpose(-1, -2) @ self.value           # (H, d, d): s W_h^T V_h
        heads = p @ (q @ value_map)                                          # P X s W_h W_h^T V_h
        return self.out(torch.cat(heads.unbind(-3), dim=-1))

    def lipsdp_bound(self, certify=None, seq_len: int | None = None, index: int = 0, **_) -> dict:
        """The global bound record of this block for sequences of ``seq_len`` tokens (see :func:`l2_attention_bound`)."""
        if seq_len is None:
            raise LipSDPError("the L2-attention bound grows with the sequence length: give seq_len")
        return attention_bound(self, seq_len=seq_len, index=index)


class DotMultiheadSelfAttention(nn.Module):
    r"""Scaled dot-product multi-head self-attention: ``softmax(s Q K^T) V`` per head, then ``W_O``.

    Not globally Lipschitz (Kim et al. 2021, Theorem 3.1); :func:`dot_attention_local_bound` bounds it
    over a box of inputs.
    """

    def __init__(self, dim: int, heads: int = 1, bias: bool = True):
        super().__init__()
        if dim % heads:
            raise LipSDPError(f"dim {dim} is not a multiple of heads {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        scale = 1.0 / math.sqrt(dim)
        self.query = nn.Parameter(torch.randn(heads, dim, self.head_dim) * scale)
        self.key = nn.Parameter(torch.randn(heads, dim, self.head_dim) * scale)
        self.value = nn.Parameter(torch.randn(heads, dim, self.head_dim) * scale)
        self.out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        s = 1.0 / math.sqrt(self.head_dim)
        q = torch.einsum("...nd,hde->...hne", x, self.query)
        k = torch.einsum("...nd,hde->...hne", x, self.key)
        v = torch.einsum("...nd,hde->...hne", x, self.value)
        p = torch.softmax(s * q @ k.transpose(-1, -2), dim=-1)
        return self.out(torch.cat((p @ v).unbind(-3), dim=-1))

    def lipsdp_bound(self, certify=None, box=None, seq_len: int | None = None, index: int = 0, **_) -> dict:
        """A local bound record over ``box = (lo, hi)``; without a box, refused (not globally Lipschitz)."""
        return attention_bound(self, box=box, seq_len=seq_len, index=index)


class Residual(nn.Module):
    """``x + block(x)``; certified as ``1 + L(block)`` (triangle inequality)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)

    def lipsdp_bound(self, certify, **options) -> dict:
        inner = certify(self.block, **options)
        if not inner["verified"]:
            return dict(inner, message=f"residual block: the inner block failed: {inner['message']}")
        up = lambda v: None if v is None else float(np.nextafter(1.0 + v, np.inf))  # noqa: E731
        return {"bound": up(inner["bound"]), "trivial_bound": up(inner["trivial_bound"]), "verified": True,
                "method": "residual", "message": f"verified: x + f(x) with f certified at {inner['bound']:.6g} "
                f"({inner['message']})", "network": {"block": "Residual", "inner": inner["network"]}}


def _weights(module) -> dict:
    return {name: p.detach().double().numpy() for name, p in module.named_parameters()}


def l2_attention_bound(module: L2MultiheadSelfAttention, seq_len: int) -> tuple[float, list[float]]:
    r"""Global l2 bound of an :class:`L2MultiheadSelfAttention` block on sequences of ``seq_len`` tokens.

    ``||W_O|| sqrt(sum_h L_h^2)`` with ``L_h = s ||W_h|| ||W_h^T V_h|| G(N)`` and
    ``G(N) = sqrt(N) + 4 w + 2 sqrt(2 w N (1/e + sqrt(w / (2e))))``, ``w = W_0((N-1)/e)``
    (docs/math.md §11.1).  Returns the bound and the per-head ``L_h``.
    """
    n = int(seq_len)
    if n < 1:
        raise LipSDPError(f"seq_len must be at least 1, got {seq_len}")
    w = softmax_entropy_bound(n)
    column = _up(1.0 / math.e + math.sqrt(w / (2.0 * math.e)))
    gain = _up(math.sqrt(n) + 4.0 * w + 2.0 * math.sqrt(_up(2.0 * w * n * column)))
    p = _weights(module)
    s = 1.0 / math.sqrt(module.head_dim)
    heads = [_up(_up(s) * _norm(Wq) * _norm(Wq.T @ Wv) * gain) for Wq, Wv in zip(p["query"], p["value"])]
    # ||W_h^T V_h|| is proven for the float product; its own rounding is covered by _up on a tiny margin.
    heads = [_up(h, 4 * module.dim) for h in heads]
    total = _up(_norm(p["out.weight"]) * math.sqrt(_up(sum(h * h for h in heads))))
    return total, heads


def _box(box, seq_len: int | None, dim: int):
    """``(lo, hi, R)`` of the box, broadcast to ``(N, D)``; ``R >= ||X||_F >= ||X||_2`` for every ``X`` in it."""
    lo, hi = (np.asarray(b, dtype=np.float64) for b in box)
    if max(lo.ndim, hi.ndim) < 2:  # a scalar or per-feature box: the sequence length must be stated
        if seq_len is None:
            raise LipSDPError("a scalar or per-feature box needs seq_len (the number of tokens)")
        shape = (int(seq_len), dim)
    else:
        shape = np.broadcast_shapes(lo.shape, hi.shape)
    if len(shape) != 2 or shape[1] != dim or shape[0] < 1:
        raise LipSDPError(f"the box must broadcast to (N, {dim}); got shape {shape}")
    lo, hi = np.broadcast_to(lo, shape), np.broadcast_to(hi, shape)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
        raise LipSDPError("the box needs finite lo <= hi")
    corner = np.maximum(lo * lo, hi * hi)
    return lo, hi, _up(math.sqrt(_up(float(corner.sum()), corner.size)))


def softmax_norm_bound(lo, hi, M, s: float) -> float:
    r"""An upper bound on ``||P||_2`` over the box, ``P = softmax(s X M X^T)`` by rows (docs/math.md §11.2).

    Rows of ``P`` sum to 1; interval bounds on the logits bound every ``P_ij`` and so the column sums, and
    ``||P||_2 <= sqrt(||P||_1 ||P||_inf)``.  Never above ``sqrt(N)``.
    """
    n = lo.shape[0]
    c, r = (lo + hi) / 2, (hi - lo) / 2
    cm, rm = c @ M, r @ np.abs(M)
    center = s * (cm @ c.T)
    radius = s * (np.abs(cm) @ r.T + rm @ np.abs(c).T + rm @ r.T)
    magnitude = s * ((np.abs(c) + r) @ np.abs(M) @ (np.abs(c) + r).T)
    radius = radius + 1e-10 * magnitude + 1e-300  # the float products' rounding, generously
    s_lo, s_hi = center - radius, center + radius
    top = s_hi.max(axis=1, keepdims=True)  # a common shift per row keeps exp in range
    e_hi, e_lo = np.exp(s_hi - top), np.exp(s_lo - top)
    # sum over k != j of e_lo, rounded down (the subtraction cancels when one term dominates)
    rest = np.maximum(0.0, e_lo.sum(axis=1, keepdims=True) - e_lo - 4 * n * _EPS * e_lo.sum(axis=1, keepdims=True))
    upper = np.minimum(1.0, e_hi / (e_hi + rest) * (1.0 + 1e-12))
    column = _up(float(upper.sum(axis=0).max()), n)
    return _up(math.sqrt(min(float(n), column)))


def dot_attention_local_bound(module: DotMultiheadSelfAttention, box, seq_len: int | None = None
                              ) -> tuple[float, list[float]]:
    r"""l2 bound of a dot-product attention block over the box ``lo <= X <= hi`` (entrywise, ``(N, D)``).

    ``||W_O|| sqrt(sum_h L_h^2)`` with ``L_h = ||V_h|| (p_h + s R^2 ||Q_h K_h^T||)``, ``R`` the largest Frobenius
    norm in the box and ``p_h <= sqrt(N)`` the bound of :func:`softmax_norm_bound` on ``||P_h||_2``
    (docs/math.md §11.2).  Valid for pairs of inputs both in the box.
    """
    lo, hi, radius = _box(box, seq_len, module.dim)
    p = _weights(module)
    s = 1.0 / math.sqrt(module.head_dim)
    heads = []
    for Wq, Wk, Wv in zip(p["query"], p["key"], p["value"]):
        M = Wq @ Wk.T
        quad = _up(_up(s) * radius * radius * _up(_norm(M), 4 * module.dim))
        heads.append(_up(_norm(Wv) * _up(softmax_norm_bound(lo, hi, M, s) + quad)))
    total = _up(_norm(p["out.weight"]) * math.sqrt(_up(sum(h * h for h in heads))))
    return total, heads


def attention_bound(module, *, seq_len: int | None = None, box=None, index: int = 0) -> dict:
    """The bound record of an attention block: global (L2 attention) or over ``box`` (dot-product attention).

    Raises :class:`~lipsdp.errors.UnsupportedLayerError` for a global request on dot-product attention
    (``index``: the block's position, for the message).
    """
    if isinstance(module, DotMultiheadSelfAttention):
        if box is None:
            raise UnsupportedLayerError([(type(module).__name__, index, (
                "dot-product self-attention is not globally Lipschitz (its Jacobian grows without bound with the "
                "input: Kim et al. 2021, Theorem 3.1); give an input box (box=(lo, hi)) for a local bound, or use "
                "L2MultiheadSelfAttention"))])
        bound, heads = dot_attention_local_bound(module, box, seq_len)
        seq_len = _box(box, seq_len, module.dim)[0].shape[0]
        domain, method = {"box": [np.asarray(b).tolist() for b in box]}, "closed-form local (docs/math.md §11.2)"
    elif isinstance(module, L2MultiheadSelfAttention):
        bound, heads = l2_attention_bound(module, seq_len)
        domain, method = "global", "closed-form global (docs/math.md §11.1)"
    else:
        raise UnsupportedLayerError([(type(module).__name__, index, "not an attention block lipsdp certifies")])
    return {"bound": bound, "trivial_bound": bound, "verified": True, "method": method, "heads": heads,
            "message": f"verified: {type(module).__name__}, {method}",
            "network": {"block": type(module).__name__, "heads": module.heads, "dim": module.dim,
                        "seq_len": seq_len, "domain": domain}}
