"""ONNX models -> :class:`~lipsdp.network.Network`.

The graph is walked in order; nodes whose inputs are all constants are
evaluated (with numpy, or ``onnx.reference`` for the rest), the others are
translated by :data:`~lipsdp.io.onnx_registry.ONNX_OPS` (each handler declares the
attributes and inputs it models; any other is refused) on top of the same helpers
as the ATen table (:mod:`lipsdp.io.aten_ops`): Gemm, MatMul(+Add), Conv,
BatchNormalization, the activations of the catalogue :mod:`lipsdp.activations`
(Relu, LeakyRelu, PRelu, Tanh, Sigmoid, Elu, Softplus, Gelu, ...), Clip,
``x * Sigmoid(x)`` = SiLU, Flatten/Reshape/Transpose/Squeeze/Unsqueeze,
Slice/Split/Gather/Concat, AveragePool, ReduceMean/Sum, Pad.

Tensors stored in external data files are read only from the model's folder
(a ``location`` that leaves it is refused), and tensors over
:data:`MAX_ELEMENTS` are refused before anything is allocated.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lipsdp.errors import ModelLoadError
from lipsdp.io import aten_ops as A
from lipsdp.io.aten_ops import Poison, Translator, leaves
from lipsdp.io.builder import GraphBuilder, Label, Sym, Unsupported
from lipsdp.io.folding import float_cast, promote_onnx_inputs
from lipsdp.io.formats import first_line
from lipsdp.io import onnx_ops  # noqa: F401  (registers the handlers)
from lipsdp.io import onnx_rnn  # noqa: F401  (registers RNN and the time-first handlers)
from lipsdp.io.batch_axis import wrap
from lipsdp.io.translator import BatchAt
from lipsdp.io.onnx_registry import ONNX_OPS, register_onnx, undeclared

#: Largest tensor (elements) a model file may declare.
MAX_ELEMENTS = 10**8


#: Opsets of the default ONNX domain whose operators the handlers model (older opsets
#: carry legacy attributes such as ``broadcast`` and ``consumed_inputs``).
MIN_OPSET = 7


def read_onnx(path: str):
    """``onnx.load`` with external data confined to the model's folder and declared sizes checked."""
    onnx = import_onnx()
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


def import_onnx():
    """The ``onnx`` package, or a :class:`ModelLoadError` that says how to install it."""
    try:
        import onnx
    except ImportError as exc:
        raise ModelLoadError(NEED_ONNX) from exc
    return onnx


NEED_ONNX = "ONNX files need the onnx extra: pip install 'lipsdp[onnx]'"


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

    _check_opset(model, source)
    graph = model.graph
    consts: dict[str, Any] = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise ModelLoadError(f"{source}: the graph takes {len(inputs)} inputs; lipsdp certifies models with exactly one")
    axis = 1 if onnx_rnn.time_first_input(graph, inputs[0].name) else 0  # (T, batch, n) into an RNN
    batch, sample = _input_shape(onnx_rnn.batch_first_view(inputs[0]) if axis else inputs[0], input_shape, source)

    builder = GraphBuilder(source)
    t = Translator(builder, batch)
    env: dict[str, Any] = dict(consts)
    env[""] = None  # omitted optional inputs
    env[inputs[0].name] = wrap(builder.input(sample, name=inputs[0].name), axis)
    for position, node in enumerate(graph.node):
        t.label, t.position = _label(node), position
        ins = [env.get(name) for name in node.input]
        results = _translate(t, node, ins)
        for name, value in zip(node.output, results):
            env[name] = value
    t.raise_errors()
    if len(graph.output) != 1:
        raise ModelLoadError(f"{source}: the graph has {len(graph.output)} outputs; lipsdp certifies one output tensor")
    result = t.resolve(env.get(graph.output[0].name))
    if not isinstance(result, Sym):
        raise ModelLoadError(f"{source}: the output does not depend on the input")
    return builder.finish(result)


def _check_opset(model, source: str) -> None:
    """Refuse default-domain opsets outside ``MIN_OPSET`` .. the installed onnx's newest."""
    from onnx import defs

    newest = defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not MIN_OPSET <= entry.version <= newest:
            raise ModelLoadError(f"{source}: ONNX opset {entry.version} is not supported (lipsdp reads opsets "
                                 f"{MIN_OPSET} to {newest}); convert it with onnx.version_converter")


def _input_shape(graph_input, input_shape, source: str) -> tuple[int, tuple]:
    """``(batch, sample shape)`` of the graph's input, checked against ``input_shape``."""
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim]
    if not dims:
        raise ModelLoadError(f"{source}: the input {graph_input.name!r} has no declared shape; pass input_shape")
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
    return batch, sample


def _translate(t: Translator, node, ins: list) -> list:
    """The outputs of one node: folded, translated by its handler, or :class:`Poison` (recorded)."""
    attrs = _attributes(node)
    if node.domain not in ("", "ai.onnx"):
        # Another domain's operator may share a name with a standard one but not its meaning.
        t.report(t.entry(f"{node.op_type} of domain {node.domain!r} (only the default ONNX domain is read)"))
        results = _shadow(t, node, ins)
    elif any(isinstance(v, Poison) for v in leaves(ins)):
        for v in leaves(ins):
            if isinstance(v, Poison) and v.error is not None:
                t.report(v.error)
                v.error = None
        _report_undeclared(t, node, attrs)
        results = _shadow(t, node, ins)
    elif any(isinstance(v, BatchAt) for v in leaves(ins)):
        results = _translate_batch_at(t, node, ins, attrs)
    elif not any(isinstance(v, (Sym, A.Extreme)) for v in leaves(ins)):
        results = _fold(t, node, ins, attrs)
    elif _report_undeclared(t, node, attrs):
        results = _shadow(t, node, ins)
    else:
        try:
            if node.op_type != "Concat" and any(isinstance(v, A.Extreme) for v in ins):
                ins = t.resolve(ins)  # a max/min that is not GroupSort's pattern: its values
            out = ONNX_OPS[node.op_type](t, ins, attrs)
            results = out if isinstance(out, list) else [out]
        except Unsupported as exc:
            t.report(t.entry(f"{node.op_type} {exc}"))
            results = _shadow(t, node, ins)
    return results


def _translate_batch_at(t: Translator, node, ins: list, attrs: dict) -> list:
    """A node with a time-first input (:mod:`lipsdp.io.onnx_rnn`): its handler there, or refused."""
    handler = onnx_rnn.ONNX_BATCH_AT.get(node.op_type)
    if handler is None:
        t.report(t.entry(f"{node.op_type} on a tensor whose batch axis is not the first (a time-first sequence)"))
        return _shadow(t, node, ins)
    if _report_undeclared(t, node, attrs):
        return _shadow(t, node, ins)
    try:
        out = handler(t, ins, attrs)
    except Unsupported as exc:
        t.report(t.entry(f"{node.op_type} {exc}"))
        return _shadow(t, node, ins)
    return out if isinstance(out, list) else [out]


def _report_undeclared(t: Translator, node, attrs: dict) -> bool:
    """Report a node without a handler, or using what its handler does not declare; whether it did."""
    if node.op_type not in ONNX_OPS:
        t.report(t.entry(node.op_type))
        return True
    problems = undeclared(node.op_type, attrs, len(node.input))
    if problems:
        t.report(t.entry(f"{node.op_type} with {', '.join(problems)}, which lipsdp does not model"))
    return bool(problems)


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
    ins = promote_onnx_inputs(ins)  # parameter-only subgraphs in float64 (lipsdp.io.folding)
    if float_cast(node, ins, attrs):
        return [ins[0]]
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
        if isinstance(v, BatchAt):
            return np.zeros(v.full_shape(t.batch), dtype=np.float32)
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


__all__ = ["MAX_ELEMENTS", "MIN_OPSET", "NEED_ONNX", "ONNX_OPS", "import_onnx", "load_onnx", "network_from_onnx",
           "read_onnx", "register_onnx"]
