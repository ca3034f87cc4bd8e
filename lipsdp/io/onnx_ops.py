"""ONNX operators -> network nodes: the handlers of :data:`ONNX_OPS`, on top of the ATen helpers.

Each handler receives the :class:`~lipsdp.io.translator.Translator`, the node's
inputs (constants as numpy arrays, input-dependent values as
:class:`~lipsdp.io.builder.Sym`) and its attributes.  The activations are
generated from the catalogue :mod:`lipsdp.activations`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lipsdp import activations
from lipsdp.activations import NotExpressible
from lipsdp.io import aten_ops as A
from lipsdp.io import fold_error, linmaps
from lipsdp.io.aten_ops import Poison
from lipsdp.io.aten_order import top_values
from lipsdp.io.aten_pool import max_pool
from lipsdp.io.builder import Sym, Unsupported
from lipsdp.io.onnx_registry import ANY, ONNX_OPS, register_onnx


# ---------------------------------------------------------------------------
# handlers: (translator, inputs, attributes) -> value or list of values
# ---------------------------------------------------------------------------

#: ONNX ``TensorProto`` codes of the floating types (FLOAT, FLOAT16, DOUBLE, BFLOAT16): casts between
#: them are the identity up to rounding; a cast to any other type is a step function.
FLOATING_TYPES = (1, 10, 11, 16)

AUTO_PAD = ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")


def _ones(value) -> bool:
    return all(int(v) == 1 for v in value)


def _positive(value) -> bool:
    return all(int(v) >= 1 for v in value)


def _sym(x) -> Sym:
    if not isinstance(x, Sym):
        raise Unsupported("needs its first input to depend on the network input")
    return x


@register_onnx("Identity")
def _identity(t, ins, attrs):
    return _sym(ins[0])


@register_onnx("Cast", attributes={"to": FLOATING_TYPES, "saturate": ANY})
def _cast(t, ins, attrs):
    return _sym(ins[0])


@register_onnx("CastLike", attributes={"saturate": ANY}, inputs=2)
def _cast_like(t, ins, attrs):
    like = ins[1]
    if not isinstance(like, Sym) and np.asarray(like).dtype.kind != "f":
        raise Unsupported(f"casts to {np.asarray(like).dtype} (a step function; only casts between floating "
                          "types are the identity)")
    return _sym(ins[0])


@register_onnx("Dropout", attributes={"ratio": ANY, "seed": ANY}, inputs=3)
def _dropout(t, ins, attrs):
    training = ins[2] if len(ins) > 2 else None
    if isinstance(training, Sym) or (training is not None and bool(np.asarray(training).ravel()[0])):
        raise Unsupported("in training mode (random masks)")
    return [_sym(ins[0]), Poison(t.entry("Dropout mask"))]


@register_onnx("Gemm", attributes={"alpha": ANY, "beta": ANY, "transA": (0,), "transB": ANY}, inputs=3)
def _gemm(t, ins, attrs):
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    if attrs.get("transA", 0) or not isinstance(a, Sym) or isinstance(b, Sym) or isinstance(c, Sym):
        raise Unsupported("with a transposed or constant first input")
    B = np.asarray(b, dtype=np.float64)
    if attrs.get("transB", 0):
        B = B.T
    y = A.apply_last(t, a, float(attrs.get("alpha", 1.0)) * B.T)
    if c is not None:
        y = t.b.linear(y, bias=float(attrs.get("beta", 1.0)) * t.broadcast_const(c, y), label=t.label)
    return y


@register_onnx("MatMul", inputs=2)
def _matmul(t, ins, attrs):
    return A.matmul(t, ins[0], ins[1])


@register_onnx("Add", inputs=2)
def _add(t, ins, attrs):
    return A.sum_terms(t, ins[0], ins[1])


@register_onnx("Sub", inputs=2)
def _sub(t, ins, attrs):
    return A.sum_terms(t, ins[0], ins[1], -1.0)


@register_onnx("Mul", inputs=2)
def _mul(t, ins, attrs):
    return A.product(t, ins[0], ins[1])


@register_onnx("Div", inputs=2)
def _div(t, ins, attrs):
    if isinstance(ins[1], Sym):
        raise Unsupported("divides by an input-dependent tensor")
    b = np.asarray(ins[1], dtype=np.float64)
    return A.scale_by(t, ins[0], 1.0 / b, rel_err=fold_error.reciprocal_error(b))  # docs/math.md §10.3


@register_onnx("Neg")
def _neg(t, ins, attrs):
    return t.b.scale(_sym(ins[0]), -1.0, t.label)


def activation_handler(function: str, mapping: Callable[..., dict]):
    """The ONNX handler of a catalogue activation: ``mapping(attributes, *constant inputs)`` gives its params."""

    def handler(t, ins, attrs):
        x = _sym(ins[0])
        if any(isinstance(v, Sym) for v in ins[1:]):
            raise Unsupported("with input-dependent parameters")
        try:
            params = mapping(attrs, *ins[1:])
        except NotExpressible as exc:
            raise Unsupported(str(exc)) from None
        return t.act(x, function, params)

    return handler


#: The attributes the catalogue's ONNX mappings read (an activation not listed reads none).
ACTIVATION_ATTRIBUTES = {"Elu": {"alpha": ANY}, "Gelu": {"approximate": ("none", "tanh")},
                         "LeakyRelu": {"alpha": ANY}}

for _op, (_entry, _mapping) in activations.onnx_table().items():
    register_onnx(_op, attributes=ACTIVATION_ATTRIBUTES.get(_op), inputs=2 if _op == "PRelu" else 1)(
        activation_handler(_entry.name, _mapping))


@register_onnx("Clip", attributes={"min": ANY, "max": ANY}, inputs=3)
def _clip(t, ins, attrs):
    lo = ins[1] if len(ins) > 1 else attrs.get("min")
    hi = ins[2] if len(ins) > 2 else attrs.get("max")
    if isinstance(lo, Sym) or isinstance(hi, Sym):
        raise Unsupported("with input-dependent bounds")
    lo = None if lo is None else float(np.asarray(lo).ravel()[0])
    hi = None if hi is None else float(np.asarray(hi).ravel()[0])
    return A.clamp(t, _sym(ins[0]), lo, hi)


@register_onnx("Flatten", attributes={"axis": ANY})
def _flatten(t, ins, attrs):
    x = _sym(ins[0])
    full = t.full_shape(x)
    axis = int(attrs.get("axis", 1))
    axis = axis + len(full) if axis < 0 else axis
    return t.reshape(x, [int(np.prod(full[:axis])), int(np.prod(full[axis:]))])


@register_onnx("Reshape", attributes={"allowzero": ANY}, inputs=2)
def _reshape(t, ins, attrs):
    x = _sym(ins[0])
    if isinstance(ins[1], Sym):
        raise Unsupported("to an input-dependent shape")
    shape = [int(s) for s in np.asarray(ins[1]).ravel()]
    full = t.full_shape(x)
    if not attrs.get("allowzero", 0):
        shape = [full[i] if s == 0 else s for i, s in enumerate(shape)]
    return t.reshape(x, shape)


@register_onnx("Transpose", attributes={"perm": ANY})
def _transpose(t, ins, attrs):
    x = _sym(ins[0])
    ndim = len(x.shape) + 1
    perm = [int(p) for p in attrs.get("perm", list(range(ndim))[::-1])]
    if perm[0] != 0:
        raise Unsupported("moves the batch axis")
    return A.permute(t, x, [p - 1 for p in perm[1:]])


def _axes(ins, attrs, position: int = 1):
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(ins) > position and ins[position] is not None:
        return [int(a) for a in np.asarray(ins[position]).ravel()]
    return None


@register_onnx("Unsqueeze", attributes={"axes": ANY}, inputs=2)
def _unsqueeze(t, ins, attrs):
    x = _sym(ins[0])
    axes = _axes(ins, attrs)
    ndim = len(x.shape) + 1 + len(axes)
    for a in sorted(a % ndim for a in axes):
        x = A.unsqueeze(t, x, a)
    return x


@register_onnx("Squeeze", attributes={"axes": ANY}, inputs=2)
def _squeeze(t, ins, attrs):
    return A.ATEN_OPS["squeeze"](t, _sym(ins[0]), _axes(ins, attrs))


@register_onnx("Concat", attributes={"axis": ANY}, inputs=None)
def _concat(t, ins, attrs):
    return A.cat(t, ins, int(attrs.get("axis", 0)))


@register_onnx("Slice", attributes={"starts": ANY, "ends": ANY, "axes": ANY}, inputs=5)
def _slice(t, ins, attrs):
    x = _sym(ins[0])
    if any(isinstance(v, Sym) for v in ins[1:]):
        raise Unsupported("with input-dependent bounds")
    starts = np.asarray(ins[1] if len(ins) > 1 else attrs["starts"]).ravel()
    ends = np.asarray(ins[2] if len(ins) > 2 else attrs["ends"]).ravel()
    axes = _axes(ins, attrs, 3) or list(range(len(starts)))
    steps = np.asarray(ins[4]).ravel() if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), int)
    for s, e, a, st in zip(starts, ends, axes, steps):
        axis = t.axis(x, int(a))
        n = x.shape[axis]
        s, e, st = int(s), int(e), int(st)
        x = A.take(t, x, axis, slice(max(min(s, n), -n - 1), max(min(e, n), -n - 1), st))
    return x


@register_onnx("Split", attributes={"axis": ANY, "split": ANY, "num_outputs": ANY}, inputs=2)
def _split(t, ins, attrs):
    x = _sym(ins[0])
    axis = t.axis(x, int(attrs.get("axis", 0)))
    sizes = attrs.get("split")
    if sizes is None and len(ins) > 1 and ins[1] is not None:
        sizes = [int(s) for s in np.asarray(ins[1]).ravel()]
    if sizes is None:
        parts = int(attrs.get("num_outputs", 0)) or None
        n = x.shape[axis]
        if parts is None:
            raise Unsupported("without split sizes")
        k = -(-n // parts)
        sizes = [min(k, n - i * k) for i in range(parts)]
    bounds = np.cumsum([0] + list(sizes))
    return [A.take(t, x, axis, slice(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]


@register_onnx("Gather", attributes={"axis": ANY}, inputs=2)
def _gather(t, ins, attrs):
    x = _sym(ins[0])
    if isinstance(ins[1], Sym):
        raise Unsupported("with input-dependent indices")
    idx = np.asarray(ins[1]).astype(np.int64)
    axis = t.axis(x, int(attrs.get("axis", 0)))
    n = x.shape[axis]
    idx = np.where(idx < 0, idx + n, idx)
    sel = np.take(linmaps.grid(x.shape), idx, axis=axis)
    return t.b.select(x, sel, t.label)


@register_onnx("BatchNormalization", attributes={"epsilon": ANY, "momentum": ANY, "training_mode": (0,),
                                              "spatial": (1,)}, inputs=5)
def _batch_norm(t, ins, attrs):
    if attrs.get("training_mode", 0):
        raise Unsupported("in training mode")
    x, scale, bias, mean, var = ins[:5]
    return A.batch_norm(t, _sym(x), scale, bias, mean, var, float(attrs.get("epsilon", 1e-5)))


def _pads(x: Sym, attrs: dict, kernel, stride, dilation) -> tuple[list[int], list[int]]:
    nd = len(kernel)
    mode = attrs.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        spatial = x.shape[1:]
        total = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
                 for n, k, s, d in zip(spatial, kernel, stride, dilation)]
        small = [p // 2 for p in total]
        big = [p - q for p, q in zip(total, small)]
        return (small, big) if mode == "SAME_UPPER" else (big, small)
    if mode == "VALID":
        return [0] * nd, [0] * nd
    pads = [int(p) for p in attrs.get("pads", [0] * (2 * nd))]
    if len(pads) != 2 * nd or min(pads, default=0) < 0:
        raise Unsupported(f"with pads {pads} ({2 * nd} non-negative values expected)")
    return pads[:nd], pads[nd:]


@register_onnx("Conv", attributes={"kernel_shape": ANY, "strides": ANY, "dilations": ANY, "pads": ANY,
                                "auto_pad": AUTO_PAD, "group": ANY}, inputs=3)
def _conv(t, ins, attrs):
    x = _sym(ins[0])
    w = np.asarray(ins[1], dtype=np.float64)
    nd = w.ndim - 2
    kernel = [int(k) for k in attrs.get("kernel_shape", w.shape[2:])]
    stride = [int(s) for s in attrs.get("strides", [1] * nd)]
    dilation = [int(d) for d in attrs.get("dilations", [1] * nd)]
    begin, end = _pads(x, attrs, kernel, stride, dilation)
    bias = ins[2] if len(ins) > 2 else None
    return A.conv(t, x, w, bias, stride, begin, end, dilation, int(attrs.get("group", 1)))


@register_onnx("AveragePool", attributes={"kernel_shape": ANY, "strides": ANY, "pads": ANY, "auto_pad": AUTO_PAD,
                                       "ceil_mode": (0, 1), "count_include_pad": (0, 1), "dilations": _positive})
def _average_pool(t, ins, attrs):
    x = _sym(ins[0])
    kernel = [int(k) for k in attrs["kernel_shape"]]
    nd = len(kernel)
    stride = [int(s) for s in attrs.get("strides", [1] * nd)]
    dilation = [int(d) for d in attrs.get("dilations", [1] * nd)]
    if min(dilation + stride + kernel, default=1) < 1:
        raise Unsupported(f"with kernel {kernel}, strides {stride}, dilations {dilation} (must be positive)")
    if attrs.get("auto_pad", "NOTSET") != "NOTSET" and not _ones(dilation):
        # The spec's automatic padding and output size count the dilated window; onnx's reference
        # evaluator does not: refused rather than picking one reading of the file.
        raise Unsupported(f"with auto_pad={attrs['auto_pad']} and dilations {dilation} (implementations differ)")
    begin, end = _pads(x, attrs, kernel, stride, dilation)
    if attrs.get("ceil_mode", 0):
        # ceil_mode only adds a partial last window; where none exists it changes nothing.
        span = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
        floor = linmaps.conv_output_shape(x.shape[1:], kernel, stride, begin, end, dilation)
        ceil = tuple(-(-(n + b + e - w) // s) + 1 for n, b, e, w, s in zip(x.shape[1:], begin, end, span, stride))
        if floor != ceil:
            raise Unsupported("with ceil_mode=1 and a partial last window")
    return A.avg_pool(t, x, kernel, stride, begin, end, bool(attrs.get("count_include_pad", 0)), None, dilation)


@register_onnx("MaxPool", attributes={"kernel_shape": ANY, "strides": ANY, "pads": ANY, "auto_pad": AUTO_PAD,
                                   "ceil_mode": (0, 1), "dilations": _positive, "storage_order": (0, 1)})
def _max_pool(t, ins, attrs):
    """Values exactly (:mod:`lipsdp.io.aten_pool`); the Indices output is refused if used."""
    x, kernel = _sym(ins[0]), [int(k) for k in attrs["kernel_shape"]]
    stride = [int(s) for s in attrs.get("strides", [1] * len(kernel))]
    dilation = [int(d) for d in attrs.get("dilations", [1] * len(kernel))]
    if attrs.get("auto_pad", "NOTSET") != "NOTSET" and not _ones(dilation):
        raise Unsupported(f"with auto_pad={attrs['auto_pad']} and dilations {dilation} (implementations differ)")
    begin, end = _pads(x, attrs, kernel, stride, dilation)
    values = max_pool(t, x, kernel, stride, begin, end, dilation, bool(attrs.get("ceil_mode", 0)), onnx_ceil=True)
    return [values, Poison(t.entry("MaxPool indices"))]


@register_onnx("GlobalAveragePool")
def _global_average_pool(t, ins, attrs):
    x = _sym(ins[0])
    return A.reduce(t, x, list(range(2, len(x.shape) + 1)), True, mean=True)


@register_onnx("ReduceMean", "ReduceSum", attributes={"axes": ANY, "keepdims": ANY, "noop_with_empty_axes": ANY},
               inputs=2)
def _reduce(t, ins, attrs):
    x = _sym(ins[0])
    axes = _axes(ins, attrs)
    if axes is None and attrs.get("noop_with_empty_axes", 0):
        return x
    return A.reduce(t, x, axes, bool(attrs.get("keepdims", 1)), mean=t.label.kind == "ReduceMean")


@register_onnx("Pad", attributes={"mode": ("constant",), "pads": ANY, "value": ANY}, inputs=4)
def _pad(t, ins, attrs):
    x = _sym(ins[0])
    mode = attrs.get("mode", "constant")
    pads = [int(p) for p in (attrs["pads"] if "pads" in attrs else np.asarray(ins[1]).ravel())]
    value = float(np.asarray(ins[2]).ravel()[0]) if len(ins) > 2 and ins[2] is not None else float(
        attrs.get("value", 0.0))
    ndim = len(x.shape) + 1
    axes = _axes(ins, attrs, 3) or list(range(ndim))
    begin, end = pads[:len(axes)], pads[len(axes):]
    torch_pads = [0] * (2 * ndim)
    for a, lo, hi in zip(axes, begin, end):
        a = a % ndim
        k = ndim - 1 - a
        torch_pads[2 * k], torch_pads[2 * k + 1] = lo, hi
    while torch_pads and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    return A.ATEN_OPS["pad"](t, x, torch_pads, mode, value)


@register_onnx("Shape", attributes={"start": ANY, "end": ANY})
def _shape(t, ins, attrs):
    full = t.full_shape(_sym(ins[0]))
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    return np.asarray(full[start:None if end is None else int(end)], dtype=np.int64)


@register_onnx("Size")
def _size(t, ins, attrs):
    return np.asarray(t.batch * _sym(ins[0]).size, dtype=np.int64)


@register_onnx("TopK", attributes={"axis": ANY, "largest": ANY, "sorted": (1,)}, inputs=2)
def _top_k(t, ins, attrs):
    x = _sym(ins[0])
    axis = t.axis(x, int(attrs.get("axis", -1)))
    k = int(np.asarray(ins[1]).ravel()[0])
    if k != x.shape[axis]:  # the k largest (smallest): SortNet's order statistics
        return [top_values(t, x, [axis], k, bool(attrs.get("largest", 1))), Poison(t.entry("TopK indices"))]
    values = A.group_sort(t, x, axis, descending=bool(attrs.get("largest", 1)))
    return [values, Poison(t.entry("TopK indices"))]


@register_onnx("ReduceMin", "ReduceMax", attributes={"axes": ANY, "keepdims": ANY, "noop_with_empty_axes": ANY},
               inputs=2)
def _reduce_extreme(t, ins, attrs):
    x = _sym(ins[0])
    axes = _axes(ins, attrs)
    if axes is None:
        raise Unsupported("over the whole tensor (the batch axis too)")
    kind = "min" if t.label.kind == "ReduceMin" else "max"
    if len(axes) != 1 or not attrs.get("keepdims", 1):  # amax / an l_inf norm: the extreme itself
        return top_values(t, x, [t.axis(x, a) for a in axes], 1, kind == "max", bool(attrs.get("keepdims", 1)))
    return A.Extreme(kind, x, t.axis(x, axes[0]), True)
