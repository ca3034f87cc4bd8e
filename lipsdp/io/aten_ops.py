"""ATen operators -> network nodes: the table shared by the ``torch.export`` and TorchScript frontends.

A frontend walks its graph and, for every operator call, hands
:meth:`Translator.call` the ``OpOverload`` (``torch.ops.aten.linear.default``),
its arguments in schema order and a :class:`~lipsdp.io.builder.Label` naming the
user's layer.  Calls whose arguments do not depend on the network input are
evaluated with torch (constant folding: shapes, weight transposes, ...); the
others go to the handler registered for the operator name in :data:`ATEN_OPS`.

An unsupported operator does not stop the walk: it is recorded and its result
is a :class:`Poison` that keeps its shape (the operator runs on zeros, see
:meth:`Translator.shadow`), so shape arithmetic further down stays exact and
the final :class:`~lipsdp.errors.UnsupportedLayerError` lists every offending
layer at once.

Whole modules that no operator-level rule can recover (deel-torchlip
``HouseHolder``) are translated from their parameters by
:data:`MODULE_HANDLERS`, keyed by class name.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from lipsdp import activations
from lipsdp.activations import NotExpressible
from lipsdp.errors import UnsupportedLayerError
from lipsdp.io import linmaps
from lipsdp.io.builder import GraphBuilder, Label, Sym, Unsupported


class Poison:
    """A value computed from an operator that could not be translated.

    ``shape`` (with batch axis, when known) keeps shape arithmetic downstream
    working, so later unsupported layers are found too; ``error`` holds a
    deferred entry (e.g. the indices output of ``sort``) that is reported only
    if something consumes it.
    """

    __slots__ = ("error", "shape")

    def __init__(self, error: tuple | None = None, shape: tuple | None = None):
        self.error = error
        self.shape = shape


class Extreme:
    """``min``/``max`` over one axis, kept until a ``cat`` shows it is GroupSort-2."""

    __slots__ = ("kind", "x", "axis", "keepdim")

    def __init__(self, kind: str, x: Sym, axis: int, keepdim: bool):
        self.kind, self.x, self.axis, self.keepdim = kind, x, axis, keepdim


def leaves(value):
    """Yield the non-container values nested in lists, tuples and dicts."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    else:
        yield value


def to_numpy(value) -> np.ndarray:
    """A constant (torch tensor, number, list) as a float64 array that shares no memory with the model."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().to(dtype=_torch().float64).numpy()
    return np.array(value, dtype=np.float64, copy=True)


def _torch():
    import torch

    return torch


class Translator:
    """State of one graph walk: the builder, the batch size, and the errors found so far.

    Handlers read ``t.b`` (the :class:`~lipsdp.io.builder.GraphBuilder`),
    ``t.label`` (the layer being translated) and ``t.batch``.

    Parameters
    ----------
    builder : GraphBuilder
    batch : int
        The batch size the graph was traced with (shapes in the graph include it).
    """

    def __init__(self, builder: GraphBuilder, batch: int = 1):
        self.b = builder
        self.batch = int(batch)
        self.errors: list[tuple[str, int, str]] = []
        self._reported: set = set()
        self.label = Label("", "")
        self.position = 0
        self.op_name = ""

    # -- errors ---------------------------------------------------------
    def entry(self, what: str) -> tuple[str, int, str]:
        """The :class:`UnsupportedLayerError` entry for ``what`` at the current operator.

        ``what`` names the operator and the reason (``"mul multiplies two ..."``);
        it follows the layer type unless it already starts with it.
        """
        kind = what if what.split(" ")[0] == self.label.kind else f"{self.label.kind}: {what}"
        return (self.label.name, self.position, kind)

    def report(self, entry: tuple[str, int, str]) -> Poison:
        key = (entry[0], entry[2].split(":")[0])
        if key not in self._reported:
            self._reported.add(key)
            self.errors.append(entry)
        return Poison()

    def raise_errors(self) -> None:
        if self.errors:
            raise UnsupportedLayerError(self.errors)

    # -- the dispatcher -------------------------------------------------
    def call(self, op, args: list, label: Label, position: int):
        """Translate one call of the ATen ``OpOverload`` ``op`` with ``args`` in schema order."""
        self.label, self.position = label, position
        name = op._schema.name.split("::", 1)[-1]
        self.op_name = name
        flat = list(leaves(args))
        poisoned = [v for v in flat if isinstance(v, Poison)]
        if poisoned:
            for v in poisoned:
                if v.error is not None:
                    self.report(v.error)
                    v.error = None
            if handler_for(name) is None:
                self.report(self.entry(name))
            return self.shadow(op, args)
        if not any(isinstance(v, (Sym, Extreme)) for v in flat):
            return self.fold(op, args)
        handler = handler_for(name)
        if handler is None:
            self.report(self.entry(name))
            return self.shadow(op, args)
        if name not in ("cat", "concat", "concatenate") and any(isinstance(v, Extreme) for v in flat):
            self.report(self.entry(f"{name} of a max/min over an axis (only GroupSort's pattern is supported)"))
            return self.shadow(op, args)
        try:
            return handler(self, *args)
        except Unsupported as exc:
            self.report(self.entry(f"{name} {exc}"))
            return self.shadow(op, args)

    def shadow(self, op, args: list):
        """Result of ``op`` when it cannot be translated: :class:`Poison` values of the right shapes.

        The operator runs on zeros standing for the input-dependent values, so
        sizes, shapes and other non-tensor results stay exact for the rest of
        the walk.
        """
        torch = _torch()

        def concrete(v):
            if isinstance(v, (list, tuple)):
                return type(v)(concrete(u) for u in v)
            if isinstance(v, Sym):
                return torch.zeros(self.full_shape(v))
            if isinstance(v, Extreme):
                return torch.zeros(self.full_shape(v.x))
            if isinstance(v, Poison):
                if v.shape is None:
                    raise LookupError
                return torch.zeros(v.shape)
            return v

        def poison(out):
            if isinstance(out, torch.Tensor):
                return Poison(shape=tuple(out.shape))
            if isinstance(out, (list, tuple)):
                return type(out)(poison(o) for o in out)
            return out

        try:
            positional, keywords = _split_arguments(op, [concrete(a) for a in args])
            return poison(op(*positional, **keywords))
        except Exception:  # shape unknown from here on
            return Poison()

    def fold(self, op, args: list):
        """Evaluate ``op`` on constant arguments with torch."""
        positional, keywords = _split_arguments(op, args)
        try:
            return op(*positional, **keywords)
        except Exception as exc:  # an operator that cannot run here (device, custom kernel)
            self.report(self.entry(f"{op._schema.name} ({type(exc).__name__})"))
            return Poison()

    # -- helpers for handlers --------------------------------------------
    def axis(self, x: Sym, dim: int) -> int:
        """Axis of ``x.shape`` (no batch axis) for the torch dimension ``dim``."""
        ndim = len(x.shape) + 1
        d = int(dim) + ndim if int(dim) < 0 else int(dim)
        if d == 0:
            raise Unsupported("acts on the batch axis")
        if not 0 < d < ndim:
            raise Unsupported(f"has dimension {dim} out of range for shape {x.shape}")
        return d - 1

    def full_shape(self, x: Sym) -> tuple:
        return (self.batch,) + x.shape

    def broadcast_const(self, value, x: Sym) -> np.ndarray:
        """A constant broadcast against ``x``, flattened to ``(x.size,)``; it may not enlarge ``x``."""
        c = to_numpy(value)
        full = self.full_shape(x)
        if c.ndim > len(full):
            raise Unsupported(f"broadcasts a constant of shape {c.shape} against {full}")
        c = c.reshape((1,) * (len(full) - c.ndim) + c.shape)
        if c.shape[0] != 1 and not (c.shape[0] == self.batch and np.all(c == c[:1])):
            raise Unsupported("uses a constant that differs between samples")
        try:
            if np.broadcast_shapes(c.shape, full) != full:
                raise ValueError
        except ValueError:
            raise Unsupported(f"broadcasts a constant of shape {c.shape} against {full}") from None
        return np.broadcast_to(c[:1], (1,) + x.shape)[0].ravel()

    def reshape(self, x: Sym, shape) -> Sym:
        """``x.view(shape)`` where ``shape`` includes the batch axis."""
        shape = [int(s) for s in shape]
        total = self.batch * x.size
        if shape.count(-1) == 1:
            known = linmaps.size([s for s in shape if s != -1])
            shape[shape.index(-1)] = total // known if known else 0
        if linmaps.size(shape) != total or not shape or shape[0] != self.batch:
            raise Unsupported(f"reshapes {self.full_shape(x)} to {tuple(shape)}, which mixes the batch axis")
        return self.b.linear(x, shape=shape[1:])

    def act(self, x: Sym, function: str, params: dict | None = None) -> Sym:
        return self.b.activation(x, function, params, self.label)


def _split_arguments(op, args: list) -> tuple[list, dict]:
    """Schema-ordered ``args`` -> ``(positional, keyword-only)`` for calling ``op``."""
    positional, keywords = [], {}
    for arg, value in zip(op._schema.arguments, args):
        if arg.kwarg_only:
            keywords[arg.name] = value
        else:
            positional.append(value)
    return positional, keywords


# ---------------------------------------------------------------------------
# handlers: (translator, *args in schema order) -> value
# ---------------------------------------------------------------------------

ATEN_OPS: dict[str, Callable[..., Any]] = {}


def register_aten(*names: str):
    """Register a handler for the ATen operators ``names`` (without the ``aten::`` namespace).

    A handler receives the :class:`Translator` and the operator's arguments in
    schema order (defaults filled in); at least one argument is a :class:`Sym`.
    It returns the result (a :class:`Sym`, a constant, or a tuple for operators
    with several outputs) or raises :class:`~lipsdp.io.builder.Unsupported`.
    """

    def deco(fn):
        for n in names:
            ATEN_OPS[n] = fn
        return fn

    return deco


#: In-place variants (``relu_``) map to the functional handler.
def handler_for(name: str):
    if name in ATEN_OPS:
        return ATEN_OPS[name]
    if name.endswith("_") and not name.startswith("_") and name[:-1] in ATEN_OPS:
        return ATEN_OPS[name[:-1]]
    return None


def _is_sym(v) -> bool:
    return isinstance(v, Sym)


# -- identity-like ------------------------------------------------------------
@register_aten("contiguous", "clone", "detach", "alias", "lift_fresh_copy", "_to_copy", "to", "type_as",
               "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "_assert_tensor_metadata")
def _identity(t, x, *rest):
    if not _is_sym(x):
        raise Unsupported("passes an input-dependent value to a constant")
    return x


@register_aten("native_dropout")
def _native_dropout(t, x, p, train):
    if train:
        raise Unsupported("in training mode")
    return x, Poison(t.entry("dropout mask"))


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
    return _torch().full(t.full_shape(x), 1.0 if t.op_name == "ones_like" else 0.0)


# -- reshapes and permutations -------------------------------------------------
@register_aten("view", "reshape", "_unsafe_view", "_reshape_copy")
def _view(t, x, shape):
    if isinstance(shape, _torch().dtype):
        raise Unsupported("reinterprets the dtype")
    return t.reshape(x, shape)


@register_aten("view_as", "reshape_as")
def _view_as(t, x, other):
    shape = t.full_shape(other) if _is_sym(other) else tuple(other.shape)
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
    if _is_sym(index):
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


# -- linear layers -------------------------------------------------------------
def apply_last(t, x: Sym, W: np.ndarray, bias=None) -> Sym:
    """``x @ W.T + bias`` on the last axis of ``x``."""
    if not x.shape:
        raise Unsupported("applies a matrix to a tensor without feature axes")
    if W.shape[1] != x.shape[-1]:
        raise Unsupported(f"multiplies shape {x.shape} by a {W.shape[1]}-column matrix")
    M, shape = linmaps.along_axis(x.shape, len(x.shape) - 1, W)
    b = None if bias is None else np.tile(to_numpy(bias).ravel(), linmaps.size(x.shape[:-1]))
    return t.b.linear(x, M, b, shape, t.label)


@register_aten("linear")
def _linear(t, x, weight, bias=None):
    if not _is_sym(x) or _is_sym(weight) or _is_sym(bias):
        raise Unsupported("has input-dependent weights")
    return apply_last(t, x, to_numpy(weight), bias)


@register_aten("matmul", "mm")
def matmul(t, a, b):
    if _is_sym(a) and not _is_sym(b):
        c = to_numpy(b)
        if c.ndim == 1:
            y = apply_last(t, a, c.reshape(1, -1))
            return t.b.linear(y, shape=y.shape[:-1])
        if c.ndim == 2:
            return apply_last(t, a, c.T)
        raise Unsupported(f"multiplies by a {c.ndim}-D constant")
    if _is_sym(b) and not _is_sym(a):
        c = to_numpy(a)
        if c.ndim == 2 and len(b.shape) >= 2:
            M, shape = linmaps.along_axis(b.shape, len(b.shape) - 2, c)
            return t.b.linear(b, M, None, shape, t.label)
        raise Unsupported("multiplies a constant by the batch axis")
    raise Unsupported("multiplies two tensors that both depend on the input")


@register_aten("addmm")
def _addmm(t, bias, a, b, beta=1, alpha=1):
    if not _is_sym(a) or _is_sym(b) or _is_sym(bias):
        raise Unsupported("has input-dependent weights")
    y = t.b.scale(apply_last(t, a, to_numpy(b).T), alpha, t.label)
    return t.b.linear(y, bias=float(beta) * t.broadcast_const(bias, y), label=t.label)


def expand_tuple(v, n: int) -> list[int]:
    v = [int(v)] if isinstance(v, (int, float)) else [int(u) for u in v]
    return v * n if len(v) == 1 else v


def conv(t, x, weight, bias, stride, pad_begin, pad_end, dilation, groups) -> Sym:
    """A zero-padded convolution of ``x`` (``(C, *spatial)``), unrolled exactly into a sparse matrix."""
    if not _is_sym(x) or _is_sym(weight) or _is_sym(bias):
        raise Unsupported("has input-dependent weights")
    w = to_numpy(weight)
    if len(x.shape) != w.ndim - 1:
        raise Unsupported(f"expects {w.ndim - 1}-D samples, got shape {x.shape}")
    try:
        M, shape = linmaps.conv_matrix(x.shape, w, stride, pad_begin, pad_end, dilation, int(groups))
    except ValueError as exc:
        raise Unsupported(str(exc)) from None
    b = None if bias is None else np.repeat(to_numpy(bias), linmaps.size(shape[1:]))
    return t.b.linear(x, M, b, shape, t.label)


def _conv(t, x, weight, bias, stride, padding, dilation, groups, transposed=False):
    if transposed:
        raise Unsupported("(transposed convolution)")
    nd = len(weight.shape) - 2
    stride, dilation = expand_tuple(stride, nd), expand_tuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            begin = end = [0] * nd
        else:  # "same", as torch: the extra padding goes to the end
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            begin = [p // 2 for p in total]
            end = [p - q for p, q in zip(total, begin)]
    else:
        begin = end = expand_tuple(padding, nd)
    return conv(t, x, weight, bias, stride, begin, end, dilation, groups)


@register_aten("conv1d", "conv2d", "conv3d")
def _convnd(t, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(t, x, weight, bias, stride, padding, dilation, groups)


@register_aten("convolution", "_convolution")
def _convolution(t, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *rest):
    return _conv(t, x, weight, bias, stride, padding, dilation, groups, transposed)


def avg_pool(t, x, kernel, stride, pad_begin, pad_end, count_include_pad=True, divisor=None) -> Sym:
    """Average pooling of ``x`` (``(C, *spatial)``), unrolled exactly into a sparse matrix."""
    M, shape = linmaps.avg_pool_matrix(x.shape, kernel, stride, pad_begin, pad_end, bool(count_include_pad),
                                       None if divisor is None else int(divisor))
    return t.b.linear(x, M, None, shape, t.label)


def _avg_pool(t, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override=None):
    nd = len(x.shape) - 1
    kernel = expand_tuple(kernel_size, nd)
    stride = expand_tuple(stride, nd) if stride else kernel
    pad = expand_tuple(padding, nd)
    if ceil_mode:
        floor = linmaps.conv_output_shape(x.shape[1:], kernel, stride, pad, pad, [1] * nd)
        ceil = tuple(-(-(n + 2 * p - k) // s) + 1 for n, k, s, p in zip(x.shape[1:], kernel, stride, pad))
        if floor != ceil:
            raise Unsupported("with ceil_mode=True and a partial last window")
    return avg_pool(t, x, kernel, stride, pad, pad, count_include_pad, divisor_override)


@register_aten("avg_pool1d", "avg_pool2d", "avg_pool3d")
def _avg_pool_op(t, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
    return _avg_pool(t, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@register_aten("adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool3d")
def _adaptive_avg_pool(t, x, output_size):
    spatial = x.shape[1:]
    out = [n if o is None else int(o) for o, n in zip(expand_tuple(output_size, len(spatial))
                                                       if output_size is not None else spatial, spatial)]
    if any(n % o for n, o in zip(spatial, out)):
        raise Unsupported(f"pools {spatial} to {tuple(out)}, which does not divide evenly")
    kernel = [n // o for n, o in zip(spatial, out)]
    return _avg_pool(t, x, kernel, kernel, 0, False, True)


def reduce(t, x, dims, keepdim, mean: bool):
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise Unsupported("reduces over the batch axis")
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    axes = sorted({t.axis(x, d) for d in dims})
    y = x
    shape = list(x.shape)
    for a in axes:
        n = shape[a]
        row = np.full((1, n), 1.0 / n if mean else 1.0)
        M, new = linmaps.along_axis(tuple(shape), a, row)
        y = t.b.linear(y, M, None, new, t.label)
        shape = list(new)
    if not keepdim:
        shape = [n for a, n in enumerate(shape) if a not in axes]
    return t.b.linear(y, shape=tuple(shape))


@register_aten("mean")
def _mean(t, x, dim=None, keepdim=False, dtype=None):
    return reduce(t, x, dim, keepdim, mean=True)


@register_aten("sum")
def _sum(t, x, dim=None, keepdim=False, dtype=None):
    return reduce(t, x, dim, keepdim, mean=False)


def batch_norm(t, x, weight, bias, mean, var, eps) -> Sym:
    """Eval-mode batch normalisation over axis 1 (channels), folded into a diagonal affine map."""
    if any(_is_sym(v) for v in (weight, bias, mean, var)):
        raise Unsupported("has input-dependent statistics")
    if mean is None or var is None:
        raise Unsupported("uses batch statistics (no running mean/var)")
    if not x.shape:
        raise Unsupported("on a tensor without channel axis")
    scale = 1.0 / np.sqrt(to_numpy(var) + float(eps))
    if weight is not None:
        scale = scale * to_numpy(weight)
    shift = -to_numpy(mean) * scale
    if bias is not None:
        shift = shift + to_numpy(bias)
    return t.b.linear(x, sp.diags(linmaps.channel_scale(x.shape, scale), format="csr"),
                      linmaps.channel_scale(x.shape, shift), label=t.label)


@register_aten("batch_norm")
def _batch_norm_op(t, x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn=False):
    if training:
        raise Unsupported("in training mode (batch statistics)")
    return batch_norm(t, x, weight, bias, running_mean, running_var, eps)


@register_aten("_native_batch_norm_legit_no_training")
def _bn_no_training(t, x, weight, bias, running_mean, running_var, momentum, eps):
    return batch_norm(t, x, weight, bias, running_mean, running_var, eps), None, None


@register_aten("native_batch_norm", "_native_batch_norm_legit")
def _native_bn(t, x, weight, bias, running_mean, running_var, training, momentum, eps):
    if training:
        raise Unsupported("in training mode (batch statistics)")
    return batch_norm(t, x, weight, bias, running_mean, running_var, eps), None, None


# -- sums and products --------------------------------------------------------
def sum_terms(t, a, b, alpha=1.0):
    """``a + alpha * b`` with either side constant."""
    alpha = float(alpha)
    if _is_sym(a) and _is_sym(b):
        return t.b.add([a, t.b.scale(b, alpha, t.label)], t.label)
    if _is_sym(a):
        return t.b.linear(a, bias=alpha * t.broadcast_const(b, a), label=t.label)
    return t.b.linear(t.b.scale(b, alpha, t.label), bias=t.broadcast_const(a, b), label=t.label)


@register_aten("add")
def _add(t, a, b, alpha=1):
    return sum_terms(t, a, b, alpha)


@register_aten("sub")
def _sub(t, a, b, alpha=1):
    return sum_terms(t, a, b, -float(alpha))


@register_aten("rsub")
def _rsub(t, a, b, alpha=1):
    return sum_terms(t, b, a, -float(alpha))


@register_aten("neg")
def _neg(t, x):
    return t.b.scale(x, -1.0, t.label)


def scale_by(t, x: Sym, c) -> Sym:
    """``x * c`` for a constant ``c`` broadcast against ``x``."""
    arr = to_numpy(c)
    if arr.size == 1 and arr.ndim <= len(x.shape) + 1:
        return t.b.scale(x, float(arr.ravel()[0]), t.label)
    return t.b.linear(x, sp.diags(t.broadcast_const(arr, x), format="csr"), label=t.label)


def product(t, a, b):
    """``a * b``: a constant scaling, or ``x * sigmoid(x)`` (SiLU)."""
    if _is_sym(a) and _is_sym(b):
        for s, other in ((a, b), (b, a)):
            if s.act is not None and s.act[0] == "sigmoid" and s.act[2] is other:
                return t.act(other, "silu")
        raise Unsupported("multiplies two tensors that both depend on the input")
    return scale_by(t, a, b) if _is_sym(a) else scale_by(t, b, a)


@register_aten("mul")
def _mul(t, a, b):
    return product(t, a, b)


@register_aten("div")
def _div(t, a, b, rounding_mode=None):
    if _is_sym(b):
        raise Unsupported("divides by an input-dependent tensor")
    if rounding_mode is not None:
        raise Unsupported(f"rounds ({rounding_mode})")
    return scale_by(t, a, 1.0 / to_numpy(b))


# -- activations: generated from the catalogue ----------------------------------
def activation_handler(function: str, mapping: Callable[..., dict]):
    """The ATen handler of a catalogue activation: ``mapping`` turns the operator's arguments
    after the input (tensors as numpy arrays) into ``Activation.params``."""

    def handler(t, x, *args):
        if not _is_sym(x) or any(_is_sym(a) for a in args):
            raise Unsupported("with input-dependent parameters")
        try:
            params = mapping(*(to_numpy(a) if hasattr(a, "detach") else a for a in args))
        except NotExpressible as exc:
            raise Unsupported(str(exc)) from None
        return t.act(x, function, params)

    return handler


for _op, (_entry, _mapping) in activations.aten_table().items():
    register_aten(_op)(activation_handler(_entry.name, _mapping))


def clamp(t, x: Sym, lo, hi) -> Sym:
    """``clamp(x, lo, hi)``: hardtanh, or a shifted ReLU when one side is open."""
    lo = None if lo is None else float(to_numpy(lo).ravel()[0]) if not isinstance(lo, (int, float)) else float(lo)
    hi = None if hi is None else float(to_numpy(hi).ravel()[0]) if not isinstance(hi, (int, float)) else float(hi)
    if lo is not None and hi is not None:
        return t.act(x, "hardtanh", {"min_val": lo, "max_val": hi})
    if lo is not None:  # relu(x - lo) + lo
        y = t.act(t.b.linear(x, bias=np.full(x.size, -lo), label=t.label), "relu")
        return t.b.linear(y, bias=np.full(x.size, lo), label=t.label)
    if hi is not None:  # hi - relu(hi - x)
        y = t.act(t.b.linear(t.b.scale(x, -1.0, t.label), bias=np.full(x.size, hi), label=t.label), "relu")
        return t.b.linear(t.b.scale(y, -1.0, t.label), bias=np.full(x.size, hi), label=t.label)
    return x


def _scalar_bound(t, v):
    if v is None or isinstance(v, (int, float)):
        return v
    arr = to_numpy(v)
    if arr.size != 1:
        raise Unsupported("with tensor bounds")
    return float(arr.ravel()[0])


@register_aten("clamp", "clip")
def _clamp(t, x, lo=None, hi=None):
    return clamp(t, x, _scalar_bound(t, lo), _scalar_bound(t, hi))


@register_aten("clamp_min")
def _clamp_min(t, x, lo):
    return clamp(t, x, _scalar_bound(t, lo), None)


@register_aten("clamp_max")
def _clamp_max(t, x, hi):
    return clamp(t, x, None, _scalar_bound(t, hi))


# -- sorting: deel-torchlip GroupSort / FullSort -------------------------------
def group_sort(t, x: Sym, axis: int, descending: bool = False) -> Sym:
    """Sort ``x`` along ``axis``: a ``groupsort`` activation on groups of ``x.shape[axis]`` consecutive values.

    Axes after ``axis`` are moved in front of it first (a permutation), so each
    group is contiguous in the flattened vector, then moved back.
    """
    g = x.shape[axis]
    if g == 1:
        return x
    order = [a for a in range(len(x.shape)) if a != axis] + [axis]
    y = permute(t, x, order)
    y = t.act(y, "groupsort", {"group_size": int(g)})
    if descending:
        y = t.b.select(y, linmaps.grid(y.shape)[..., ::-1], t.label)
    return permute(t, y, list(np.argsort(order)))


@register_aten("sort")
def _sort(t, x, *args):
    # sort(self, dim=-1, descending=False) and sort.stable(self, *, stable, dim=-1, descending=False)
    dim, descending = args[-2:]
    values = group_sort(t, x, t.axis(x, dim), bool(descending))
    return values, Poison(t.entry("sort indices"))


@register_aten("min", "max")
def _extreme(t, x, dim=None, keepdim=False):
    if dim is None:
        raise Unsupported("over the whole tensor")
    kind = t.op_name
    return Extreme(kind, x, t.axis(x, dim), bool(keepdim)), Poison(t.entry(f"{kind} indices"))


@register_aten("cat", "concat", "concatenate")
def cat(t, tensors, dim=0):
    parts = [p for p in tensors if not (hasattr(p, "numel") and p.numel() == 0)]
    if any(isinstance(p, Extreme) for p in parts):
        if (len(parts) == 2 and all(isinstance(p, Extreme) for p in parts) and parts[0].x is parts[1].x
                and parts[0].axis == parts[1].axis and parts[0].keepdim and parts[1].keepdim
                and parts[0].x.shape[parts[0].axis] == 2 and t.axis(parts[0].x, dim) == parts[0].axis
                and {parts[0].kind, parts[1].kind} == {"min", "max"}):
            return group_sort(t, parts[0].x, parts[0].axis, descending=parts[0].kind == "max")
        raise Unsupported("of max/min values that is not GroupSort-2")
    if not all(_is_sym(p) for p in parts):
        raise Unsupported("concatenates constants with input-dependent tensors")
    ref = parts[0]
    return t.b.concat(parts, t.axis(ref, dim), t.label)


@register_aten("stack")
def _stack(t, tensors, dim=0):
    if not all(_is_sym(p) for p in tensors):
        raise Unsupported("stacks constants with input-dependent tensors")
    ndim = len(tensors[0].shape) + 2
    d = int(dim) + ndim if int(dim) < 0 else int(dim)
    return cat(t, [unsqueeze(t, p, d) for p in tensors], d)


# -- implicit layers: lipsdp.nn.ImplicitLayer ------------------------------------
@register_aten("equilibrium")
def _equilibrium(t, u, W, activation, param, tol=None, max_iter=None):
    """``torch.ops.lipsdp.equilibrium(u, W, ...)``: the solution of ``z = phi(W z + u)`` (docs/math.md §5.2)."""
    if not _is_sym(u) or _is_sym(W):
        raise Unsupported("has an input-dependent feedback matrix")
    if len(u.shape) != 1:
        raise Unsupported(f"on samples of shape {u.shape} (implicit layers take (N, features) inputs)")
    F = to_numpy(W)
    if F.shape != (u.size, u.size):
        raise Unsupported(f"with a {F.shape} feedback matrix for {u.size} features")
    try:
        params = activations.implicit_params(str(activation), float(param))
    except ValueError as exc:
        raise Unsupported(str(exc)) from None
    return t.b.equilibrium(u, F, str(activation), params, t.label)


# -- whole modules -------------------------------------------------------------
def _householder(t, x: Sym, params: dict) -> Sym:
    """deel-torchlip ``HouseHolder``: pairs channel ``c`` with ``c + C/2`` (the two halves of axis 1).

    For ``z = (x_i, y_i)`` with ``u_i = (sin(theta_i/2), -cos(theta_i/2))``:
    ``z`` is kept where ``u_i . z <= 0`` and reflected to ``(I - 2 u_i u_i^T) z`` elsewhere.
    On the flattened sample, coordinate ``k < n/2`` pairs with ``k + n/2`` and
    ``params["theta"][k]`` is its angle (one per pair; channels repeat over space).
    """
    theta = to_numpy(params["theta"]).ravel()
    channels = x.shape[0] if x.shape else 0
    if channels % 2 or theta.size != channels // 2:
        raise Unsupported(f"with {theta.size} angles for {channels} channels")
    theta = np.repeat(theta, linmaps.size(x.shape[1:]))
    return t.act(x, "householder", {"theta": theta, "pairing": "halves"})


#: Modules translated as a whole, by class name: handler(translator, input Sym, parameters) -> Sym.
MODULE_HANDLERS: dict[str, Callable[..., Sym]] = {"HouseHolder": _householder}
