r"""ONNX's ``RNN`` operator (what ``torch.onnx.export`` writes for ``nn.RNN``), and time-first tensors in ONNX.

ONNX's ``RNN`` (opsets 7, 14, 22) computes, with ``X`` of shape ``(T, batch, n)`` (``layout=0``) or
``(batch, T, n)`` (``layout=1``), weights ``W`` ``(1, H, n)``, ``R`` ``(1, H, H)`` and ``B = [Wb; Rb]``,

.. math:: H_t = f(X_t W^T + H_{t-1} R^T + W_b + R_b),

and returns ``Y`` (every state, ``(T, 1, batch, H)`` or ``(batch, T, 1, H)``) and ``Y_h`` (the last).
That is one Elman layer of ``nn.RNN`` (docs/math.md §13): it is unrolled exactly by
:func:`lipsdp.io.rnn.unroll_rnn` and recorded like ``aten::rnn_tanh``.  Modelled: ``activations`` one of
``Tanh`` / ``Relu``, ``direction="forward"``, ``layout`` 0 or 1, ``hidden_size``; ``initial_h`` a
constant equal for every sample; ``sequence_lens`` absent or ``T`` for every sample.  Refused by name:
``direction="reverse"`` or ``"bidirectional"``, ``clip`` (a clipped pre-activation is another function),
``activation_alpha`` / ``activation_beta`` and any other activation, an input-dependent ``W``, ``R``,
``B`` or ``initial_h``.  ``Y_h`` is the last state.

``torch.onnx.export`` writes the sequence time first, so most tensors around an ``RNN`` have their batch
on the second (or third) axis: they are :class:`~lipsdp.io.translator.BatchAt` values, translated by the
handlers of :data:`ONNX_BATCH_AT` with the batch where it is (:mod:`lipsdp.io.batch_axis`); any other
operator on them is refused.  The dynamo exporter (``torch.onnx.export``'s default) writes no ``RNN``
node but the unrolled layer, ``MatMul`` / ``Slice`` / ``Squeeze`` / ``Concat`` on time-first tensors (and
constants with a leading axis, which move the batch back): translated by the same handlers.
"""

from __future__ import annotations

import numpy as np

from lipsdp import activations
from lipsdp.io import aten_shapes
from lipsdp.io.batch_axis import (add_terms, drop_axis, move_axes, on_sample, registrar, squeeze_axes,
                                  unsqueeze_axis)
from lipsdp.io.builder import Sym, Unsupported
from lipsdp.io.onnx_registry import ANY, ONNX_OPS, register_onnx
from lipsdp.io.rnn import final_state, record_rnn
from lipsdp.io.translator import BatchAt, Poison, handler_for

__all__ = ["ONNX_BATCH_AT", "batch_first_view", "time_first_input"]

#: ONNX operator type -> handler ``(t, inputs, attributes)`` for nodes with a :class:`BatchAt` input.
ONNX_BATCH_AT: dict = {}

#: ONNX activation name -> lipsdp activation (the two ``nn.RNN`` has).
_FUNCTIONS = {"Tanh": "tanh", "Relu": "relu"}


def _names(value) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in value]


def _rnn_attributes() -> dict:
    return {"activations": lambda v: len(_names(v)) == 1 and _names(v)[0] in _FUNCTIONS,
            "direction": ("forward",), "layout": (0, 1), "hidden_size": ANY}


def _constant(value, what: str) -> np.ndarray:
    if isinstance(value, (Sym, BatchAt, Poison)):
        raise Unsupported(f"with an input-dependent {what}")
    return np.asarray(value, dtype=np.float64)


@register_onnx("RNN", attributes=_rnn_attributes(), inputs=6)
def _rnn(t, ins, attrs):
    """One forward Elman layer; ``Y`` keeps ONNX's layout (batch on axis 2 for ``layout=0``)."""
    ins = list(ins) + [None] * (6 - len(ins))
    x, layout = ins[0], int(attrs.get("layout", 0))
    if layout == 0 and isinstance(x, BatchAt) and x.axis == 1:
        x = x.sym
    elif layout == 0 or not isinstance(x, Sym):
        raise Unsupported(f"with layout={layout} on a tensor whose batch axis is not the "
                          f"{'second' if layout == 0 else 'first'}")
    if len(x.shape) != 2:
        raise Unsupported("on inputs that are not sequences")
    W, R = _constant(ins[1], "W"), _constant(ins[2], "R")
    H = int(attrs.get("hidden_size", R.shape[-1]))
    if W.shape != (1, H, x.shape[1]) or R.shape != (1, H, H):
        raise Unsupported(f"with W {W.shape}, R {R.shape} on sequences of {x.shape[1]} features")
    B = np.zeros(2 * H) if ins[3] is None else _constant(ins[3], "B").reshape(-1)
    if ins[4] is not None and not np.all(_constant(ins[4], "sequence_lens") == x.shape[0]):
        raise Unsupported("with sequence_lens other than the full length (packed sequences)")
    h0 = np.zeros((1, H))
    if ins[5] is not None:
        h = _constant(ins[5], "initial_h")
        h = h if layout == 0 else np.swapaxes(h, 0, 1)
        if h.shape[0] != 1 or h.shape[-1] != H or not np.all(h == h[:, :1]):
            raise Unsupported("with an initial state that differs between samples")
        h0 = h[:, 0, :]
    out, lasts = record_rnn(t, x, [(W[0], R[0], B[:H] + B[H:])], h0,
                            _FUNCTIONS[_names(attrs.get("activations", ["Tanh"]))[0]])
    y = t.b.linear(out, shape=(x.shape[0], 1, H))
    y_h = final_state(t, lasts)  # (1, batch, H)
    return [BatchAt(y, 2) if layout == 0 else y, y_h if layout == 0 else y_h.sym]


ONNX_BATCH_AT["RNN"] = _rnn


# -- time-first tensors -------------------------------------------------------------
_batch_at = registrar(ONNX_BATCH_AT)


@_batch_at("Identity")
def _identity(t, ins, attrs):
    return ins[0]


@_batch_at("Shape")
def _shape(t, ins, attrs):
    full = ins[0].full_shape(t.batch)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    return np.asarray(full[start:None if end is None else int(end)], dtype=np.int64)


@_batch_at("Size")
def _size(t, ins, attrs):
    return np.asarray(t.batch * ins[0].sym.size, dtype=np.int64)


def _perm(x, attrs) -> list[int]:
    ndim = len((x.sym if isinstance(x, BatchAt) else x).shape) + 1
    return [int(p) for p in attrs.get("perm", list(range(ndim))[::-1])]


@_batch_at("Transpose")
def _transpose(t, ins, attrs):
    return move_axes(t, ins[0], _perm(ins[0], attrs))


_SYM_TRANSPOSE = ONNX_OPS["Transpose"]


@register_onnx("Transpose", attributes={"perm": ANY})
def _any_transpose(t, ins, attrs):
    """A ``Transpose`` that may move the batch axis (the time-first layout before an ``RNN``)."""
    if isinstance(ins[0], Sym) and _perm(ins[0], attrs)[0] != 0:
        return move_axes(t, ins[0], _perm(ins[0], attrs))
    return _SYM_TRANSPOSE(t, ins, attrs)


def _axes(ins, attrs) -> list[int] | None:
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(ins) > 1 and ins[1] is not None:
        return [int(a) for a in np.asarray(_constant(ins[1], "axes")).ravel()]
    return None


@_batch_at("Squeeze")
def _squeeze(t, ins, attrs):
    return squeeze_axes(t, ins[0], _axes(ins, attrs))


@_batch_at("Unsqueeze")
def _unsqueeze(t, ins, attrs):
    x = ins[0]
    axes = _axes(ins, attrs)
    ndim = len(x.sym.shape) + 1 + len(axes)
    for a in sorted(a % ndim for a in axes):
        x = unsqueeze_axis(t, x, a)
    return x


@_batch_at("Gather")
def _gather(t, ins, attrs):
    x, idx = ins[0], np.asarray(_constant(ins[1], "index")).astype(np.int64)
    axis = int(attrs.get("axis", 0))
    if idx.ndim == 0:
        return drop_axis(t, x, axis, int(idx))
    if idx.ndim != 1:
        raise Unsupported("with a multi-dimensional index")
    d = axis % (len(x.sym.shape) + 1)
    if d == x.axis:
        raise Unsupported("gathers along the batch axis")
    a = d if d < x.axis else d - 1
    n = x.sym.shape[a]
    return BatchAt(aten_shapes.take(t, x.sym, a, np.where(idx < 0, idx + n, idx)), x.axis)


@_batch_at("Slice")
def _slice(t, ins, attrs):
    x = ins[0]
    starts, ends = (np.asarray(_constant(v, "bound")).astype(np.int64).ravel() for v in ins[1:3])
    axes = _axes([None, ins[3]] if len(ins) > 3 else [None], {}) or list(range(len(starts)))
    steps = np.asarray(_constant(ins[4], "step")).astype(np.int64).ravel() if len(ins) > 4 and \
        ins[4] is not None else np.ones(len(starts), np.int64)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        full = x.full_shape(t.batch)
        d = int(axis) % len(full)
        n = full[d]
        bounds = slice(max(min(int(start), n), -n - 1), max(min(int(end), n), -n - 1), int(step))
        if d == x.axis:
            if range(n)[bounds] != range(n):
                raise Unsupported("slices the batch axis")
            continue
        x = BatchAt(aten_shapes.take(t, x.sym, d if d < x.axis else d - 1, bounds), x.axis)
    return x


@_batch_at("Concat")
def _concat(t, ins, attrs):
    """Time-first tensors stacked along another axis (the states of every step: ``(T, batch, H)``)."""
    if not all(isinstance(v, BatchAt) and v.axis == ins[0].axis for v in ins):
        raise Unsupported("concatenates tensors whose batch axes differ")
    x = ins[0]
    d = int(attrs.get("axis", 0)) % (len(x.sym.shape) + 1)
    if d == x.axis:
        raise Unsupported("concatenates along the batch axis")
    return BatchAt(t.b.concat([v.sym for v in ins], d if d < x.axis else d - 1, t.label), x.axis)


def _leading_constant(t, ins, sign: float):
    """``Sym + c`` with a constant of more axes than the Sym, all of size 1 in front: the batch moves back."""
    x, c = (ins[0], ins[1]) if isinstance(ins[0], Sym) else (ins[1], ins[0])
    c = np.asarray(c, dtype=np.float64)
    extra = c.ndim - len(x.shape) - 1
    if any(n != 1 for n in c.shape[:extra]):
        raise Unsupported(f"broadcasts a constant of shape {c.shape} against {t.full_shape(x)}")
    if x is ins[1]:  # c - x = (-x) + c
        x, sign = (t.b.scale(x, sign, t.label), 1.0)
    tail = c.reshape(c.shape[extra:])
    y = t.b.linear(x, bias=sign * t.broadcast_const(tail, x), label=t.label)
    return BatchAt(t.b.linear(y, shape=(1,) * extra + x.shape), extra)


def _with_leading_constant(name: str, sign: float):
    plain = ONNX_OPS[name]

    def handler(t, ins, attrs):
        syms = [v for v in ins if isinstance(v, Sym)]
        const = [v for v in ins if not isinstance(v, Sym)]
        if len(syms) == 1 and len(const) == 1 and np.ndim(const[0]) > len(syms[0].shape) + 1:
            return _leading_constant(t, ins, sign)
        return plain(t, ins, attrs)
    return handler


for _name, _sign in (("Add", 1.0), ("Sub", -1.0)):
    register_onnx(_name, inputs=2)(_with_leading_constant(_name, _sign))


@_batch_at("MatMul")
def _matmul(t, ins, attrs):
    if not isinstance(ins[0], BatchAt) or isinstance(ins[1], (Sym, BatchAt)):
        raise Unsupported("with a time-first tensor as the second factor")
    return on_sample(ins[0], lambda s: handler_for("matmul")(t, s, ins[1]))


@_batch_at("Add")
def _add(t, ins, attrs):
    return add_terms(t, ins[0], ins[1], 1.0)


@_batch_at("Sub")
def _sub(t, ins, attrs):
    return add_terms(t, ins[0], ins[1], -1.0)


def _elementwise(function: str, mapping):
    def handler(t, ins, attrs):
        x = ins[0]
        if not isinstance(x, BatchAt) or any(isinstance(v, (Sym, BatchAt)) for v in ins[1:]):
            raise Unsupported("with input-dependent parameters")
        return BatchAt(t.act(x.sym, function, mapping(attrs, *ins[1:])), x.axis)
    return handler


for _op, (_entry, _mapping) in activations.onnx_table().items():
    if _op != "PRelu":  # a slope tensor broadcasts against the layout, not one sample
        ONNX_BATCH_AT[_op] = _elementwise(_entry.name, _mapping)


def time_first_input(graph, name: str) -> bool:
    """Whether the graph input ``name`` goes straight into an ``RNN`` with ``layout=0`` (time first)."""
    from onnx import helper

    for node in graph.node:
        if node.op_type == "RNN" and node.input and node.input[0] == name:
            layout = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "layout"), 0)
            return int(layout) == 0
    return False


def batch_first_view(graph_input):
    """A copy of the ``ValueInfoProto`` ``graph_input`` with its first two dimensions swapped."""
    view = type(graph_input)()
    view.CopyFrom(graph_input)
    dims = view.type.tensor_type.shape.dim
    if len(dims) >= 2:
        first, second = type(dims[0])(), type(dims[0])()
        first.CopyFrom(dims[1])
        second.CopyFrom(dims[0])
        dims[0].CopyFrom(first)
        dims[1].CopyFrom(second)
    return view

