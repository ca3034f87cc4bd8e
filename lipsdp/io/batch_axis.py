"""Tensors whose batch axis is not the first: time-first sequences (``nn.RNN(batch_first=False)``, ONNX RNN).

A model that reads its input as ``(T, batch, features)`` computes, for each sample ``b``, a function of
the slice ``x[:, b, :]``; lipsdp's sample is that slice, shape ``(T, features)``.  The translator keeps
such a tensor as a :class:`~lipsdp.io.translator.BatchAt` (the per-sample :class:`Sym` and the torch axis
of the batch), so every operator on it is translated with the batch where it really is.  The handlers here
are those whose action on one sample is exact and known: moving axes (``transpose``, ``permute``: the
batch may move to the front, and the result is an ordinary :class:`Sym`), indexing and slicing any other
axis, squeezing and inserting axes, ``Linear`` / ``matmul`` on the last axis, elementwise activations,
and sums with constants that broadcast over the axes after the batch.  Any other operator on a
``BatchAt`` is refused (:meth:`~lipsdp.io.translator.Translator.call_batch_at`).  A model's output may be
time-first: its value for one sample is the output's slice at the batch index, so the translation is
exact (a fixed permutation of coordinates, which changes no Lipschitz constant).

:func:`time_first_model` and :func:`time_first_program` tell the loaders to trace a model on
``(T, batch, n)``: its first ``nn.RNN`` has ``batch_first=False``.
"""

from __future__ import annotations

import numpy as np

from lipsdp import activations
from lipsdp.io import aten_shapes
from lipsdp.io.builder import Sym, Unsupported
from lipsdp.io.translator import ATEN_OPS, BATCH_AT_OPS, BatchAt, handler_for, is_sym, to_numpy

__all__ = ["BatchAt", "add_terms", "drop_axis", "move_axes", "on_sample", "squeeze_axes", "time_first_model",
           "time_first_program", "unsqueeze_axis", "wrap"]


def wrap(sym: Sym, axis: int):
    """``sym`` with its batch at torch axis ``axis`` (0: the ordinary :class:`Sym` itself)."""
    return sym if int(axis) == 0 else BatchAt(sym, axis)


def _parts(x) -> tuple[Sym, int]:
    return (x.sym, x.axis) if isinstance(x, BatchAt) else (x, 0)


def _dim(x, dim) -> int:
    sym, _ = _parts(x)
    ndim = len(sym.shape) + 1
    d = int(dim) + ndim if int(dim) < 0 else int(dim)
    if not 0 <= d < ndim:
        raise Unsupported(f"has dimension {dim} out of range")
    return d


def _sym_axis(axis: int, d: int) -> int:
    """The axis of the per-sample value for torch axis ``d != axis`` (the batch's)."""
    return d if d < axis else d - 1


def move_axes(t, x, order) -> object:
    """``x.permute(order)`` (torch axes, batch included) for a :class:`Sym` or :class:`BatchAt`."""
    sym, axis = _parts(x)
    order = [_dim(x, d) for d in order]
    if sorted(order) != list(range(len(sym.shape) + 1)):
        raise Unsupported(f"permutes with {order}")
    inner = [_sym_axis(axis, d) for d in order if d != axis]
    out = sym if inner == sorted(inner) else aten_shapes.permute(t, sym, inner)
    return wrap(out, order.index(axis))


def drop_axis(t, x, dim, index) -> object:
    """``x.select(dim, index)`` on an axis other than the batch's."""
    sym, axis = _parts(x)
    d = _dim(x, dim)
    if d == axis:
        raise Unsupported("selects along the batch axis")
    return wrap(aten_shapes.take(t, sym, _sym_axis(axis, d), int(index)), axis - (d < axis))


def on_sample(x, fn) -> object:
    """``fn`` (an operator on the last axis, or elementwise) applied to each sample of ``x``."""
    sym, axis = _parts(x)
    if axis == len(sym.shape):
        raise Unsupported("acts on the batch axis (the last)")
    return wrap(fn(sym), axis)


# -- ATen handlers for BatchAt arguments ----------------------------------------
def registrar(table: dict):
    """``register(*names)``: a decorator putting a handler into ``table`` under each of ``names``."""
    def register(*names):
        def deco(fn):
            for n in names:
                table[n] = fn
            return fn
        return deco
    return register


_register = registrar(BATCH_AT_OPS)


@_register("size", "sym_size")
def _size(t, x, dim=None):
    full = x.full_shape(t.batch)
    return list(full) if dim is None else full[_dim(x, dim)]


@_register("dim")
def _ndim(t, x):
    return len(x.sym.shape) + 1


@_register("numel", "sym_numel")
def _numel(t, x):
    return t.batch * x.sym.size


@_register("contiguous", "clone", "detach", "alias", "lift_fresh_copy", "_assert_tensor_metadata")
def _identity(t, x, *rest):
    if not isinstance(x, BatchAt):
        raise Unsupported("passes an input-dependent value to a constant")
    return x


@_register("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
def _dropout(t, x, p, train):
    if train:
        raise Unsupported("in training mode (random masks; save the model after model.eval())")
    return _identity(t, x)


@_register("transpose", "swapaxes", "swapdims")
def _transpose(t, x, dim0, dim1):
    order = list(range(len(_parts(x)[0].shape) + 1))
    a, b = _dim(x, dim0), _dim(x, dim1)
    order[a], order[b] = order[b], order[a]
    return move_axes(t, x, order)


@_register("permute")
def _permute(t, x, dims):
    return move_axes(t, x, list(dims))


@_register("select")
def _select(t, x, dim, index):
    return drop_axis(t, x, dim, index)


@_register("slice")
def _slice(t, x, dim=0, start=None, end=None, step=1):
    d = _dim(x, dim)
    if d == x.axis:
        if range(t.batch)[slice(start, end, step)] == range(t.batch):
            return x
        raise Unsupported("slices the batch axis")
    sym = aten_shapes.take(t, x.sym, _sym_axis(x.axis, d), slice(start, end, step))
    return BatchAt(sym, x.axis)


def squeeze_axes(t, x, dims) -> object:
    """``x.squeeze(dims)`` (torch axes; None: every axis of size 1 but the batch's)."""
    sym, axis = _parts(x)
    full = list(sym.shape)
    full.insert(axis, t.batch)
    dims = [d for d, n in enumerate(full) if n == 1 and d != axis] if dims is None else [_dim(x, d) for d in dims]
    if axis in dims:
        raise Unsupported("squeezes the batch axis")
    gone = [d for d in dims if full[d] == 1]
    shape = tuple(n for d, n in enumerate(full) if d != axis and d not in gone)
    return wrap(t.b.linear(sym, shape=shape), axis - sum(1 for d in gone if d < axis))


@_register("squeeze")
def _squeeze(t, x, dim=None):
    return squeeze_axes(t, x, None if dim is None else list(dim) if isinstance(dim, (list, tuple)) else [dim])


def unsqueeze_axis(t, x, dim) -> object:
    """``x.unsqueeze(dim)``: a new axis of size 1 at torch axis ``dim``."""
    sym, axis = _parts(x)
    ndim = len(sym.shape) + 2
    d = int(dim) + ndim if int(dim) < 0 else int(dim)
    if not 0 <= d < ndim:
        raise Unsupported(f"has dimension {dim} out of range")
    a = d if d <= axis else d - 1  # the per-sample axis the new one takes
    return wrap(t.b.linear(sym, shape=sym.shape[:a] + (1,) + sym.shape[a:]), axis + (d <= axis))


@_register("unsqueeze")
def _unsqueeze(t, x, dim):
    return unsqueeze_axis(t, x, dim)


@_register("linear", "matmul", "mm")
def _last_axis(t, x, *rest):
    if not isinstance(x, BatchAt) or any(isinstance(v, (BatchAt, Sym)) for v in rest):
        raise Unsupported("has input-dependent weights")
    return on_sample(x, lambda s: handler_for(t.op_name)(t, s, *rest))


@_register("mean", "sum")
def _reduce(t, x, dim=None, keepdim=False, dtype=None):
    """A mean or sum over axes other than the batch's (``out.mean(0)``: the average over time)."""
    if dim is None or isinstance(x, Sym):
        raise Unsupported("reduces over the batch axis")
    dims = sorted({_dim(x, d) for d in (dim if isinstance(dim, (list, tuple)) else [dim])})
    if x.axis in dims:
        raise Unsupported("reduces over the batch axis")
    # the batch-first handler reads torch dims with the batch first: sym axis a is its dim a + 1
    out = handler_for(t.op_name)(t, x.sym, [_sym_axis(x.axis, d) + 1 for d in dims], keepdim, dtype)
    return wrap(out, x.axis if keepdim else x.axis - sum(1 for d in dims if d < x.axis))


def _elementwise(t, x, *rest):
    if not isinstance(x, BatchAt) or any(isinstance(v, (BatchAt, Sym)) for v in rest):
        raise Unsupported("has more than one input-dependent argument")
    return BatchAt(handler_for(t.op_name)(t, x.sym, *rest), x.axis)


for _op in activations.aten_table():
    if "prelu" not in _op:  # a slope tensor broadcasts against the layout, not against one sample
        BATCH_AT_OPS[_op] = _elementwise


def _trailing_constant(t, x: BatchAt, c) -> np.ndarray:
    """A constant that broadcasts over the axes after the batch only, flattened like one sample."""
    c = to_numpy(c)
    after = x.sym.shape[x.axis:]
    if c.ndim > len(after):
        raise Unsupported(f"broadcasts a constant of shape {c.shape} across the batch axis")
    try:
        return np.broadcast_to(c, x.sym.shape).ravel()
    except ValueError:
        raise Unsupported(f"broadcasts a constant of shape {c.shape} against {x.full_shape(t.batch)}") from None


def add_terms(t, x, y, sign: float = 1.0) -> object:
    """``x + sign * y`` for a :class:`BatchAt` ``x`` and a ``y`` of the same layout or a constant."""
    if isinstance(x, BatchAt) and isinstance(y, BatchAt):
        if x.axis != y.axis or x.sym.shape != y.sym.shape:
            raise Unsupported("adds tensors whose batch axes differ")
        return BatchAt(t.b.add([x.sym, t.b.scale(y.sym, sign, t.label)], t.label), x.axis)
    if isinstance(y, BatchAt) and not isinstance(x, BatchAt) and sign == 1.0:
        return add_terms(t, y, x)
    if isinstance(x, BatchAt) and is_sym(y):  # a batch-first tensor aligned (from the right) on x's batch axis
        if len(x.sym.shape) - len(y.shape) != x.axis or x.sym.shape[x.axis:] != y.shape or \
                any(n != 1 for n in x.sym.shape[:x.axis]):
            raise Unsupported(f"adds shapes {x.full_shape(t.batch)} and {t.full_shape(y)} across the batch axis")
        y = t.b.linear(y, shape=x.sym.shape)
        return BatchAt(t.b.add([x.sym, t.b.scale(y, sign, t.label)], t.label), x.axis)
    if isinstance(x, BatchAt) and not is_sym(y):
        return BatchAt(t.b.linear(x.sym, bias=sign * _trailing_constant(t, x, y)), x.axis)
    raise Unsupported("mixes a time-first tensor with another layout")


@_register("add", "sub")
def _add(t, x, y, alpha=1):
    return add_terms(t, x, y, (-1.0 if t.op_name == "sub" else 1.0) * float(alpha))


def time_first_model(module) -> bool:
    """Whether the first ``nn.RNN`` in ``module`` (an ``nn.Module`` or a TorchScript module) reads
    ``(T, batch, n)`` (``batch_first=False``): the loaders then trace the model on that layout."""
    for _, m in module.named_modules():
        cls = getattr(m, "original_name", None) or type(m).__name__
        if cls == "RNN" and hasattr(m, "batch_first"):
            return not bool(m.batch_first)
    graph = getattr(module, "inlined_graph", None)  # a traced module keeps no attributes: read its graph
    for node in graph.nodes() if graph is not None else ():
        if node.kind() in ("aten::rnn_tanh", "aten::rnn_relu") and node.inputsSize() == 9:
            flag = node.inputsAt(8)
            return flag.node().kind() == "prim::Constant" and flag.toIValue() is False
    return False


def time_first_program(program) -> bool:
    """Whether the first RNN call in a ``torch.export`` program has ``batch_first=False``."""
    for n in program.graph_module.graph.nodes:
        if n.op == "call_function" and "." in str(n.target) and str(n.target).split(".")[1] in ("rnn_tanh",
                                                                                                "rnn_relu"):
            return len(n.args) > 8 and not bool(n.args[8])
    return False


assert "transpose" in ATEN_OPS  # aten_shapes is loaded: batch-first handlers exist for the fallbacks below
_SYM_TRANSPOSE, _SYM_PERMUTE = ATEN_OPS["transpose"], ATEN_OPS["permute"]


def _sym_transpose(t, x, dim0, dim1):
    """``transpose`` that may move the batch axis (``x.transpose(0, 1)``: time first)."""
    if is_sym(x) and 0 in (_dim(x, dim0), _dim(x, dim1)):
        return _transpose(t, x, dim0, dim1)
    return _SYM_TRANSPOSE(t, x, dim0, dim1)


def _sym_permute(t, x, dims):
    if is_sym(x) and _dim(x, list(dims)[0]) != 0:
        return move_axes(t, x, list(dims))
    return _SYM_PERMUTE(t, x, dims)


ATEN_OPS["transpose"], ATEN_OPS["permute"] = _sym_transpose, _sym_permute
ATEN_OPS["swapaxes"] = ATEN_OPS["swapdims"] = _sym_transpose
