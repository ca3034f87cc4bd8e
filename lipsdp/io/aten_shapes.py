"""ATen handlers that move values without arithmetic: identities, shape queries, reshapes,
permutations, slicing and padding (each an exact selection matrix, :mod:`lipsdp.io.linmaps`)."""

from __future__ import annotations

import numpy as np

from lipsdp.io import linmaps
from lipsdp.io.builder import Sym, Unsupported
from lipsdp.io.translator import Poison, is_sym, register_aten, require_floating, to_numpy, torch_lib


# -- identity-like ------------------------------------------------------------
@register_aten("contiguous", "clone", "detach", "alias", "lift_fresh_copy", "_assert_tensor_metadata")
def _identity(t, x, *rest):
    if not is_sym(x):
        raise Unsupported("passes an input-dependent value to a constant")
    return x


@register_aten("_to_copy", "to", "type_as")
def _cast(t, x, *rest):
    """``x.to(dtype)``, ``x.type_as(other)``, ``_to_copy(x, dtype=...)``: the identity between floating
    types, refused otherwise (every overload names its target ``dtype`` or ``other``)."""
    if not is_sym(x):
        raise Unsupported("passes an input-dependent value to a constant")
    for arg, value in zip(t.op._schema.arguments[1:], rest):
        if arg.name in ("dtype", "other"):
            require_floating(value)
    return x


@register_aten("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
def _dropout(t, x, p, train):
    if train:
        raise Unsupported("in training mode (random masks; save the model after model.eval())")
    return _identity(t, x)


@register_aten("native_dropout")
def _native_dropout(t, x, p, train):
    if train is None or train:
        raise Unsupported("in training mode (random masks; save the model after model.eval())")
    return _identity(t, x), Poison(t.entry("dropout mask"))


# -- shape queries ------------------------------------------------------------
@register_aten("size", "sym_size")
def _size(t, x, dim=None):
    full = t.full_shape(x)
    return list(full) if dim is None else full[int(dim)]


@register_aten("dim")
def _dim(t, x):
    return len(x.shape) + 1


@register_aten("numel", "sym_numel")
def _numel(t, x):
    return t.batch * x.size


@register_aten("zeros_like", "ones_like")
def _like(t, x, *rest):
    return torch_lib().full(t.full_shape(x), 1.0 if t.op_name == "ones_like" else 0.0)


# -- reshapes and permutations -------------------------------------------------
@register_aten("view", "reshape", "_unsafe_view", "_reshape_copy")
def _view(t, x, shape):
    if isinstance(shape, torch_lib().dtype):
        raise Unsupported("reinterprets the dtype")
    return t.reshape(x, shape)


@register_aten("view_as", "reshape_as")
def _view_as(t, x, other):
    shape = t.full_shape(other) if is_sym(other) else tuple(other.shape)
    return t.reshape(x, shape)


@register_aten("flatten")
def _flatten(t, x, start_dim=0, end_dim=-1):
    ndim = len(x.shape) + 1
    s = int(start_dim) % ndim
    e = int(end_dim) % ndim
    if s == 0 and e == 0:
        return x
    if s == 0:
        raise Unsupported("flattens the batch axis")
    shape = x.shape[:s - 1] + (linmaps.size(x.shape[s - 1:e]),) + x.shape[e:]
    return t.b.linear(x, shape=shape)


@register_aten("unflatten")
def _unflatten(t, x, dim, sizes):
    a = t.axis(x, dim)
    sizes = [int(s) for s in sizes]
    if -1 in sizes:
        known = linmaps.size([s for s in sizes if s != -1])
        sizes[sizes.index(-1)] = x.shape[a] // known
    return t.b.linear(x, shape=x.shape[:a] + tuple(sizes) + x.shape[a + 1:])


@register_aten("unsqueeze")
def unsqueeze(t, x, dim):
    ndim = len(x.shape) + 2
    d = int(dim) + ndim if int(dim) < 0 else int(dim)
    if d == 0:
        raise Unsupported("inserts an axis before the batch axis")
    return t.b.linear(x, shape=x.shape[:d - 1] + (1,) + x.shape[d - 1:])


@register_aten("squeeze")
def _squeeze(t, x, dim=None):
    if dim is None:
        axes = [a for a, n in enumerate(x.shape) if n == 1]
    else:
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        axes = [t.axis(x, d) for d in dims]
    shape = tuple(n for a, n in enumerate(x.shape) if not (a in axes and n == 1))
    return t.b.linear(x, shape=shape)


def permute(t, x: Sym, order: list[int]) -> Sym:
    index = np.transpose(linmaps.grid(x.shape), order)
    return t.b.select(x, index, t.label)


@register_aten("permute")
def _permute(t, x, dims):
    ndim = len(x.shape) + 1
    dims = [int(d) % ndim for d in dims]
    if dims[0] != 0:
        raise Unsupported("moves the batch axis")
    return permute(t, x, [d - 1 for d in dims[1:]])


@register_aten("transpose")
def _transpose(t, x, dim0, dim1):
    a, b = t.axis(x, dim0), t.axis(x, dim1)
    order = list(range(len(x.shape)))
    order[a], order[b] = order[b], order[a]
    return permute(t, x, order)


@register_aten("t", "numpy_T")
def _t(t, x):
    if len(x.shape) == 0:
        return x
    raise Unsupported("transposes the batch axis")


@register_aten("expand")
def _expand(t, x, size, implicit=False):
    full = t.full_shape(x)
    size = [int(s) for s in size]
    if len(size) != len(full) or size[0] not in (-1, t.batch):
        raise Unsupported(f"expands {full} to {tuple(size)}")
    shape = tuple(n if s == -1 else s for s, n in zip(size[1:], x.shape))
    index = np.broadcast_to(linmaps.grid(x.shape), shape)
    return t.b.select(x, index, t.label)


# -- slicing -----------------------------------------------------------------------
def take(t, x: Sym, axis: int, sl) -> Sym:
    idx = [slice(None)] * len(x.shape)
    idx[axis] = sl
    return t.b.select(x, linmaps.grid(x.shape)[tuple(idx)], t.label)


@register_aten("slice")
def _slice(t, x, dim=0, start=None, end=None, step=1):
    if int(dim) % (len(x.shape) + 1) == 0 and range(t.batch)[slice(start, end, step)] == range(t.batch):
        return x  # x[:, ...] in a traced graph: the whole batch
    return take(t, x, t.axis(x, dim), slice(start, end, step))


@register_aten("select")
def _select(t, x, dim, index):
    return take(t, x, t.axis(x, dim), int(index))


@register_aten("narrow")
def _narrow(t, x, dim, start, length):
    return take(t, x, t.axis(x, dim), slice(int(start), int(start) + int(length)))


@register_aten("index_select")
def _index_select(t, x, dim, index):
    if is_sym(index):
        raise Unsupported("indexes with input-dependent indices")
    return take(t, x, t.axis(x, dim), to_numpy(index).astype(np.int64))


def _split_sizes(n: int, sizes) -> list[slice]:
    bounds = np.cumsum([0] + list(sizes))
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


@register_aten("split")
def _split(t, x, split_size, dim=0):
    a = t.axis(x, dim)
    n = x.shape[a]
    if isinstance(split_size, (list, tuple)):
        sizes = list(split_size)
    else:
        k = int(split_size)
        sizes = [k] * (n // k) + ([n % k] if n % k else [])
    return [take(t, x, a, s) for s in _split_sizes(n, sizes)]


@register_aten("split_with_sizes")
def _split_with_sizes(t, x, split_sizes, dim=0):
    return _split(t, x, list(split_sizes), dim)


@register_aten("chunk")
def _chunk(t, x, chunks, dim=0):
    n = x.shape[t.axis(x, dim)]
    k = -(-n // int(chunks))
    return _split(t, x, k, dim)


@register_aten("unbind")
def _unbind(t, x, dim=0):
    a = t.axis(x, dim)
    return [take(t, x, a, i) for i in range(x.shape[a])]


@register_aten("constant_pad_nd", "pad")
def _pad(t, x, pad, mode_or_value=0.0, value=None):
    if isinstance(mode_or_value, str):
        if mode_or_value != "constant":
            raise Unsupported(f"pads in mode {mode_or_value!r}")
        fill = 0.0 if value is None else float(value)
    else:
        fill = float(mode_or_value or 0.0)
    pad = [int(p) for p in pad]
    if len(pad) // 2 > len(x.shape):
        raise Unsupported("pads the batch axis")
    index = linmaps.grid(x.shape)
    widths = [(0, 0)] * len(x.shape)
    crop = [slice(None)] * len(x.shape)
    for k in range(len(pad) // 2):
        axis = len(x.shape) - 1 - k
        lo, hi = pad[2 * k], pad[2 * k + 1]
        widths[axis] = (max(lo, 0), max(hi, 0))
        crop[axis] = slice(max(-lo, 0), index.shape[axis] - max(-hi, 0))
    index = np.pad(index[tuple(crop)], widths, constant_values=-1)
    y = t.b.select(x, index, t.label)
    if fill != 0.0:
        y = t.b.linear(y, bias=np.where(index.ravel() < 0, fill, 0.0), label=t.label)
    return y
