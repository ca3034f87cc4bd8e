"""ONNX models -> :class:`~lipsdp.network.Network`.

The graph is walked in order; nodes whose inputs are all constants are
evaluated (with numpy, or ``onnx.reference`` for the rest), the others are
translated by :data:`ONNX_OPS` on top of the same helpers as the ATen table
(:mod:`lipsdp.io.aten_ops`): Gemm, MatMul(+Add), Conv, BatchNormalization, the
activations of the catalogue :mod:`lipsdp.activations` (Relu, LeakyRelu, PRelu,
Tanh, Sigmoid, Elu, Softplus, Gelu, ...), Clip, ``x * Sigmoid(x)`` = SiLU,
Flatten/Reshape/Transpose/Squeeze/Unsqueeze, Slice/Split/Gather/Concat,
AveragePool, ReduceMean/Sum, Pad.

Tensors stored in external data files are read only from the model's folder
(a ``location`` that leaves it is refused), and tensors over
:data:`MAX_ELEMENTS` are refused before anything is allocated.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from lipsdp import activations
from lipsdp.activations import NotExpressible
from lipsdp.errors import ModelLoadError
from lipsdp.io import aten_ops as A
from lipsdp.io.aten_ops import Poison, Translator, leaves
from lipsdp.io.builder import GraphBuilder, Label, Sym, Unsupported
from lipsdp.io.formats import first_line

#: Largest tensor (elements) a model file may declare.
MAX_ELEMENTS = 10**8


def read_onnx(path: str):
    """``onnx.load`` with external data confined to the model's folder and declared sizes checked."""
    import onnx
    from onnx import external_data_helper

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({first_line(exc)})") from exc
    folder = os.path.dirname(os.path.realpath(path))
    for tensor in _all_tensors(model):
        n = int(np.prod([int(d) for d in tensor.dims], dtype=object)) if len(tensor.dims) else 1
        if n > MAX_ELEMENTS or any(int(d) < 0 for d in tensor.dims):
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} declares shape {tuple(tensor.dims)} "
                                 f"({n} elements, more than {MAX_ELEMENTS}); refusing to load it")
        if external_data_helper.uses_external_data(tensor):
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            target = os.path.realpath(os.path.join(folder, location))
            if os.path.isabs(location) or os.path.commonpath([folder, target]) != folder:
                raise ModelLoadError(f"{path}: tensor {tensor.name!r} points to external data {location!r} "
                                     "outside the model's folder; refusing to read it")
            if not os.path.isfile(target):
                raise ModelLoadError(f"{path}: the external data file {location!r} of tensor {tensor.name!r} "
                                     "is missing; keep it next to the model")
    try:
        external_data_helper.load_external_data_for_model(model, folder)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the external data ({first_line(exc)})") from exc
    return model


def _all_tensors(model):
    graph = model.graph
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors


def load_onnx(path: str, input_shape=None):
    """Read an ONNX file (see :func:`read_onnx`) and translate it."""
    return network_from_onnx(read_onnx(path), input_shape=input_shape, source=path)


def network_from_onnx(model, input_shape=None, source: str = ""):
    """Translate an ``onnx.ModelProto`` with one (non-initializer) input and one output.

    Parameters
    ----------
    model : onnx.ModelProto
    input_shape : tuple of int, optional
        Sample shape without batch axis; needed when the model's input has
        symbolic dimensions other than the batch.
    source : str
        Name used in messages.
    """
    from onnx import numpy_helper

    graph = model.graph
    consts: dict[str, Any] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise ModelLoadError(f"{source}: the graph takes {len(inputs)} inputs; lipsdp certifies models with exactly one")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if not dims:
        raise ModelLoadError(f"{source}: the input {inputs[0].name!r} has no declared shape; pass input_shape")
    batch = dims[0] or 1
    if input_shape is not None:
        sample = tuple(int(s) for s in input_shape)
        if len(sample) != len(dims) - 1 or any(d not in (None, s) for d, s in zip(dims[1:], sample)):
            raise ModelLoadError(f"{source}: input_shape {sample} does not match the model's input "
                                 f"{tuple('?' if d is None else d for d in dims)}")
    elif any(d is None for d in dims[1:]):
        raise ModelLoadError(f"{source}: the input shape {tuple('?' if d is None else d for d in dims)} has "
                             "symbolic dimensions; pass input_shape")
    else:
        sample = tuple(int(d) for d in dims[1:])
    if int(np.prod(sample)) > MAX_ELEMENTS:
        raise ModelLoadError(f"{source}: the input shape {sample} is larger than {MAX_ELEMENTS} elements")

    builder = GraphBuilder(source)
    t = Translator(builder, batch)
    env: dict[str, Any] = dict(consts)
    env[""] = None  # omitted optional inputs
    env[inputs[0].name] = builder.input(sample, name=inputs[0].name)
    for position, node in enumerate(graph.node):
        t.label, t.position = _label(node), position
        ins = [env.get(name) for name in node.input]
        attrs = _attributes(node)
        if any(isinstance(v, Poison) for v in leaves(ins)):
            for v in leaves(ins):
                if isinstance(v, Poison) and v.error is not None:
                    t.report(v.error)
                    v.error = None
            if node.op_type not in ONNX_OPS:
                t.report(t.entry(node.op_type))
            results = _shadow(t, node, ins)
        elif not any(isinstance(v, (Sym, A.Extreme)) for v in leaves(ins)):
            results = _fold(t, node, ins, attrs)
        elif node.op_type not in ONNX_OPS:
            t.report(t.entry(node.op_type))
            results = _shadow(t, node, ins)
        else:
            try:
                if node.op_type != "Concat" and any(isinstance(v, A.Extreme) for v in ins):
                    raise Unsupported("of a max/min over an axis (only GroupSort's pattern is supported)")
                out = ONNX_OPS[node.op_type](t, ins, attrs)
                results = out if isinstance(out, list) else [out]
            except Unsupported as exc:
                t.report(t.entry(f"{node.op_type} {exc}"))
                results = _shadow(t, node, ins)
        for name, value in zip(node.output, results):
            env[name] = value
    t.raise_errors()
    if len(graph.output) != 1:
        raise ModelLoadError(f"{source}: the graph has {len(graph.output)} outputs; lipsdp certifies one output tensor")
    result = env.get(graph.output[0].name)
    if not isinstance(result, Sym):
        raise ModelLoadError(f"{source}: the output does not depend on the input")
    return builder.finish(result)


def _label(node) -> Label:
    path = node.name.strip("/").rsplit("/", 1)[0].replace("/", ".") if "/" in node.name.strip("/") else ""
    return Label(path or node.name or (node.output[0] if node.output else node.op_type), node.op_type)


def _attributes(node) -> dict:
    from onnx import helper

    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _fold(t: Translator, node, ins: list, attrs: dict) -> list:
    """Evaluate a node whose inputs are all constants."""
    from onnx import numpy_helper

    op = node.op_type
    if op == "Constant":
        if "value" in attrs:
            return [numpy_helper.to_array(attrs["value"])]
        for key in ("value_float", "value_floats", "value_int", "value_ints"):
            if key in attrs:
                return [np.asarray(attrs[key])]
        return [t.report(t.entry("Constant of an unsupported kind"))]
    if op in ("Identity", "Dropout"):
        return [ins[0], None][:len(node.output)]
    try:
        from onnx.reference import ReferenceEvaluator

        feeds = {name: value for name, value in zip(node.input, ins) if name}
        return list(ReferenceEvaluator(node).run(None, feeds))
    except Exception as exc:
        return [t.report(t.entry(f"{op} on constants ({first_line(exc)})"))] * len(node.output)


def _shadow(t: Translator, node, ins: list) -> list:
    """Outputs of a node that cannot be translated: :class:`Poison` values with their shapes.

    The node runs on zeros standing for input-dependent values (``onnx.reference``),
    so shapes stay exact for the rest of the walk and later errors are found too.
    """
    def concrete(v):
        if isinstance(v, Sym):
            return np.zeros(t.full_shape(v), dtype=np.float32)
        if isinstance(v, A.Extreme):
            return np.zeros(t.full_shape(v.x), dtype=np.float32)
        if isinstance(v, Poison):
            if v.shape is None:
                raise LookupError
            return np.zeros(v.shape, dtype=np.float32)
        return v

    try:
        from onnx.reference import ReferenceEvaluator

        feeds = {name: concrete(v) for name, v in zip(node.input, ins) if name}
        outs = ReferenceEvaluator(node).run(None, feeds)
    except Exception:
        return [Poison() for _ in node.output]
    if node.op_type in ("Shape", "Size"):
        return list(outs)
    return [Poison(shape=tuple(np.shape(o))) for o in outs]


# ---------------------------------------------------------------------------
# handlers: (translator, inputs, attributes) -> value or list of values
# ---------------------------------------------------------------------------

ONNX_OPS: dict[str, Callable[..., Any]] = {}


def register_onnx(*names: str):
    """Register a handler for ONNX operator types ``names`` (``handler(t, inputs, attributes)``)."""

    def deco(fn):
        for n in names:
            ONNX_OPS[n] = fn
        return fn

    return deco


def _sym(x) -> Sym:
    if not isinstance(x, Sym):
        raise Unsupported("needs its first input to depend on the network input")
    return x


@register_onnx("Identity", "Cast", "CastLike")
def _identity(t, ins, attrs):
    return _sym(ins[0])


@register_onnx("Dropout")
def _dropout(t, ins, attrs):
    return [_sym(ins[0]), Poison(t.entry("Dropout mask"))]


@register_onnx("Gemm")
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


@register_onnx("MatMul")
def _matmul(t, ins, attrs):
    return A.matmul(t, ins[0], ins[1])


@register_onnx("Add")
def _add(t, ins, attrs):
    return A.sum_terms(t, ins[0], ins[1])


@register_onnx("Sub")
def _sub(t, ins, attrs):
    return A.sum_terms(t, ins[0], ins[1], -1.0)


@register_onnx("Mul")
def _mul(t, ins, attrs):
    return A.product(t, ins[0], ins[1])


@register_onnx("Div")
def _div(t, ins, attrs):
    if isinstance(ins[1], Sym):
        raise Unsupported("divides by an input-dependent tensor")
    return A.scale_by(t, ins[0], 1.0 / np.asarray(ins[1], dtype=np.float64))


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


for _op, (_entry, _mapping) in activations.onnx_table().items():
    register_onnx(_op)(activation_handler(_entry.name, _mapping))


@register_onnx("Clip")
def _clip(t, ins, attrs):
    lo = ins[1] if len(ins) > 1 else attrs.get("min")
    hi = ins[2] if len(ins) > 2 else attrs.get("max")
    if isinstance(lo, Sym) or isinstance(hi, Sym):
        raise Unsupported("with input-dependent bounds")
    lo = None if lo is None else float(np.asarray(lo).ravel()[0])
    hi = None if hi is None else float(np.asarray(hi).ravel()[0])
    return A.clamp(t, _sym(ins[0]), lo, hi)


@register_onnx("Flatten")
def _flatten(t, ins, attrs):
    x = _sym(ins[0])
    full = t.full_shape(x)
    axis = int(attrs.get("axis", 1))
    axis = axis + len(full) if axis < 0 else axis
    return t.reshape(x, [int(np.prod(full[:axis])), int(np.prod(full[axis:]))])


@register_onnx("Reshape")
def _reshape(t, ins, attrs):
    x = _sym(ins[0])
    if isinstance(ins[1], Sym):
        raise Unsupported("to an input-dependent shape")
    shape = [int(s) for s in np.asarray(ins[1]).ravel()]
    full = t.full_shape(x)
    if not attrs.get("allowzero", 0):
        shape = [full[i] if s == 0 else s for i, s in enumerate(shape)]
    return t.reshape(x, shape)


@register_onnx("Transpose")
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


@register_onnx("Unsqueeze")
def _unsqueeze(t, ins, attrs):
    x = _sym(ins[0])
    axes = _axes(ins, attrs)
    ndim = len(x.shape) + 1 + len(axes)
    for a in sorted(a % ndim for a in axes):
        x = A.unsqueeze(t, x, a)
    return x


@register_onnx("Squeeze")
def _squeeze(t, ins, attrs):
    return A.ATEN_OPS["squeeze"](t, _sym(ins[0]), _axes(ins, attrs))


@register_onnx("Concat")
def _concat(t, ins, attrs):
    return A.cat(t, ins, int(attrs.get("axis", 0)))


@register_onnx("Slice")
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


@register_onnx("Split")
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


@register_onnx("Gather")
def _gather(t, ins, attrs):
    x = _sym(ins[0])
    if isinstance(ins[1], Sym):
        raise Unsupported("with input-dependent indices")
    idx = np.asarray(ins[1]).astype(np.int64)
    axis = t.axis(x, int(attrs.get("axis", 0)))
    n = x.shape[axis]
    idx = np.where(idx < 0, idx + n, idx)
    sel = np.take(A.linmaps.grid(x.shape), idx, axis=axis)
    return t.b.select(x, sel, t.label)


@register_onnx("BatchNormalization")
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
    return pads[:nd], pads[nd:]


@register_onnx("Conv")
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


@register_onnx("AveragePool")
def _average_pool(t, ins, attrs):
    x = _sym(ins[0])
    kernel = [int(k) for k in attrs["kernel_shape"]]
    nd = len(kernel)
    stride = [int(s) for s in attrs.get("strides", [1] * nd)]
    if attrs.get("ceil_mode", 0):
        raise Unsupported("with ceil_mode")
    begin, end = _pads(x, attrs, kernel, stride, [1] * nd)
    return A.avg_pool(t, x, kernel, stride, begin, end, bool(attrs.get("count_include_pad", 0)))


@register_onnx("GlobalAveragePool")
def _global_average_pool(t, ins, attrs):
    x = _sym(ins[0])
    return A.reduce(t, x, list(range(2, len(x.shape) + 1)), True, mean=True)


@register_onnx("ReduceMean", "ReduceSum")
def _reduce(t, ins, attrs):
    x = _sym(ins[0])
    axes = _axes(ins, attrs)
    if axes is None and attrs.get("noop_with_empty_axes", 0):
        return x
    return A.reduce(t, x, axes, bool(attrs.get("keepdims", 1)), mean=t.label.kind == "ReduceMean")


@register_onnx("Pad")
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


@register_onnx("Shape")
def _shape(t, ins, attrs):
    full = t.full_shape(_sym(ins[0]))
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    return np.asarray(full[start:None if end is None else int(end)], dtype=np.int64)


@register_onnx("Size")
def _size(t, ins, attrs):
    return np.asarray(t.batch * _sym(ins[0]).size, dtype=np.int64)


@register_onnx("TopK")
def _top_k(t, ins, attrs):
    x = _sym(ins[0])
    axis = t.axis(x, int(attrs.get("axis", -1)))
    k = int(np.asarray(ins[1]).ravel()[0])
    if k != x.shape[axis]:
        raise Unsupported(f"keeps {k} of {x.shape[axis]} values (only a full sort is supported)")
    values = A.group_sort(t, x, axis, descending=bool(attrs.get("largest", 1)))
    return [values, Poison(t.entry("TopK indices"))]


@register_onnx("ReduceMin", "ReduceMax")
def _reduce_extreme(t, ins, attrs):
    x = _sym(ins[0])
    axes = _axes(ins, attrs)
    if axes is None or len(axes) != 1 or not attrs.get("keepdims", 1):
        raise Unsupported("over several axes (only GroupSort's pattern is supported)")
    kind = "min" if t.label.kind == "ReduceMin" else "max"
    return A.Extreme(kind, x, t.axis(x, axes[0]), True)
