"""Order statistics over an axis -> GroupSort and a selection: ``amax`` / ``amin``, ``topk``, l_inf norms.

The largest ``k`` values of ``x`` along an axis are the last ``k`` entries of ``x`` sorted ascending
along it, so they are a ``groupsort`` activation on groups of ``x.shape[axis]`` values followed by an
exact selection (docs/math.md §2.5).  The maximum is ``k = 1``; ``||x||_inf`` over an axis is the
maximum of ``abs(x)``.  These are what l_inf-distance and SortNet layers compute
(:mod:`lipsdp.nn.linf`).  Importing :mod:`lipsdp.io.aten_ops` registers the ATen handlers here;
the ONNX ``ReduceMax`` / ``ReduceMin`` / ``TopK`` handlers call :func:`top_values`.
"""

from __future__ import annotations

import math

import numpy as np

from lipsdp.io import linmaps
from lipsdp.io.aten_shapes import permute
from lipsdp.io.builder import Sym, Unsupported
from lipsdp.io.translator import EXTREME_VALUE, Poison, register_aten


def top_values(t, x: Sym, axes, k: int, largest: bool = True, keepdim: bool = True) -> Sym:
    """The ``k`` largest (``largest``) or smallest values of ``x`` over ``axes`` (axes of ``x.shape``), in order.

    The axes are moved to the end (a permutation) and flattened into one group per remaining
    coordinate; a ``groupsort`` activation sorts each group ascending and a selection keeps its last
    ``k`` entries reversed (largest first, as ``topk``) or its first ``k``.  The result has ``k`` values in
    place of the first reduced axis (the other reduced axes dropped or, with ``keepdim``, kept as 1).
    """
    axes = sorted(set(int(a) for a in axes))
    g = linmaps.size([x.shape[a] for a in axes])
    if not 1 <= k <= g:
        raise Unsupported(f"keeps {k} of {g} values")
    rest = [a for a in range(len(x.shape)) if a not in axes]
    y = permute(t, x, rest + axes)
    flat = linmaps.size([x.shape[a] for a in rest])
    if g > 1:
        y = t.act(t.b.linear(y, shape=(flat, g)), "groupsort", {"group_size": int(g)})
    cols = np.arange(g - 1, g - 1 - k, -1) if largest else np.arange(k)
    index = linmaps.grid((flat, g))[:, cols]                       # (flat, k)
    kept = [1 if a in axes else x.shape[a] for a in range(len(x.shape))]
    kept[axes[0]] = k
    # The selection is in (rest..., k) order; move the k axis back to where the first reduced axis was.
    shape_rest = [x.shape[a] for a in rest]
    pos = sum(1 for a in rest if a < axes[0])
    index = np.moveaxis(index.reshape(shape_rest + [k]), -1, pos)
    y = t.b.select(y, index, t.label)
    if keepdim:
        return t.b.linear(y, shape=tuple(kept))
    return t.b.linear(y, shape=tuple(n for a, n in enumerate(kept) if a not in axes[1:] and (a != axes[0] or k > 1)))


def _axes(t, x: Sym, dim) -> list[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        raise Unsupported("over the whole tensor (the batch axis too)")
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return [t.axis(x, d) for d in dims]


@register_aten("amax", "amin")
def _amax(t, x, dim=(), keepdim=False):
    return top_values(t, x, _axes(t, x, dim), 1, t.op_name == "amax", bool(keepdim))


@register_aten("topk")
def _topk(t, x, k, dim=-1, largest=True, sorted=True):
    if not sorted:
        raise Unsupported("with sorted=False (the order of the values is unspecified)")
    values = top_values(t, x, [t.axis(x, dim)], int(k), bool(largest), keepdim=True)
    return values, Poison(t.entry("topk indices"))


def _inf_norm(t, x, order, dim, keepdim, dtype) -> Sym:
    """``||x||_inf`` (``max |x|``) or ``-inf`` (``min |x|``) over ``dim``; other orders are refused."""
    order = float(order)
    if dtype is not None or not math.isinf(order):
        raise Unsupported(f"with ord={order:g} (only the l_inf norm, a maximum of |x|, is translated)")
    return top_values(t, t.act(x, "abs"), _axes(t, x, dim), 1, order > 0, bool(keepdim))


@register_aten("linalg_vector_norm")
def _vector_norm(t, x, ord=2, dim=None, keepdim=False, dtype=None):
    return _inf_norm(t, x, ord, dim, keepdim, dtype)


@register_aten("norm")
def _norm(t, x, p=2, dim=None, keepdim=False, dtype=None):
    if t.op._overloadname not in ("Scalar", "ScalarOpt_dim", "ScalarOpt_dim_dtype"):
        raise Unsupported(f"(overload {t.op._overloadname!r}), which lipsdp does not model")
    return _inf_norm(t, x, 2 if p is None else p, dim, keepdim, dtype)


def extreme_value(t, e) -> Sym:
    """The values of a max/min over one axis (:class:`~lipsdp.io.translator.Extreme`) that no
    GroupSort pattern consumed."""
    return top_values(t, e.x, [e.axis], 1, e.kind == "max", e.keepdim)


EXTREME_VALUE[:] = [extreme_value]

__all__ = ["extreme_value", "top_values"]
