r"""Elman RNNs (``torch.nn.RNN``, tanh or ReLU) unrolled over the traced horizon.

``aten::rnn_tanh`` / ``aten::rnn_relu`` (what ``nn.RNN`` becomes in ``torch.export``
and TorchScript graphs, and so in whole-module pickles, which are exported) compute,
for each layer ``l`` and step ``t = 1..T``,

.. math:: h^l_t = \phi(W^l_{ih} h^{l-1}_t + b^l_{ih} + W^l_{hh} h^l_{t-1} + b^l_{hh}),
          \qquad h^0_t = x_t,

and return the top layer's states ``(h^L_1, ..., h^L_T)`` and the final states.  With the
horizon ``T`` fixed by the traced input shape ``(T, input_size)`` this is a feed-forward
network: ``T`` copies of one ``Affine`` + ``Activation`` per layer, sharing weights
(docs/math.md §13.1).  The initial state ``h_0`` is a constant of the graph (zeros unless
the model passes one) and folds into the biases; every global bound ignores it.

What each call unrolled is recorded in ``network.meta["recurrent"]`` (the weights, the
activation, the names of each step's activation nodes, whether the RNN reads the network input
directly), which the all-horizon bound of :mod:`lipsdp.recurrent` reads.

``batch_first=False`` (time first, ``(T, batch, n)``) is read with the batch on the second axis
(:mod:`lipsdp.io.batch_axis`): the sample is ``x[:, b]``, the same sequence as the ``batch_first=True``
twin's ``x[b]``, so both translate to the same network.  ONNX's ``RNN`` operator is
:mod:`lipsdp.io.onnx_rnn`.

The final state ``h_n`` (``(num_layers, batch, hidden)``, batch second in either layout) is each layer's
last state.  Refused, with the reason: bidirectional RNNs, packed sequences, an input-dependent initial state.
"""

from __future__ import annotations

import os
import re

import numpy as np

from lipsdp.errors import LipSDPError, ModelLoadError
from lipsdp.io.builder import Label, Sym, Unsupported
from lipsdp.io.checkpoint import find_in_checkpoint
from lipsdp.io.formats import detect_format
from lipsdp.io.safe_pickle import load_torch_file
from lipsdp.io.batch_axis import time_first_program
from lipsdp.io.translator import BATCH_AT_OPS, BatchAt, Poison, is_sym, register_aten, to_numpy
from lipsdp.network import Network

__all__ = ["check_horizon", "final_state", "fixed_horizon", "horizon_shape", "is_program", "record_rnn", "rnn_input_size", "unroll_rnn"]

#: ATen operator -> lipsdp activation.
_FUNCTIONS = {"rnn_tanh": "tanh", "rnn_relu": "relu"}


def _layer_weights(params: list, has_biases: bool, num_layers: int) -> list[tuple]:
    """``(W_ih, W_hh, b)`` per layer from the flat parameter list (``b = b_ih + b_hh``)."""
    per = 4 if has_biases else 2
    if len(params) != per * num_layers or any(is_sym(p) or isinstance(p, Poison) for p in params):
        raise Unsupported("with input-dependent or missing weights")
    out = []
    for k in range(num_layers):
        w = [to_numpy(p) for p in params[per * k: per * (k + 1)]]
        b = w[2] + w[3] if has_biases else np.zeros(w[0].shape[0])
        out.append((w[0], w[1], b))
    return out


def _initial_state(hx, num_layers: int, hidden: int) -> np.ndarray:
    """``h_0`` of every layer, shape ``(num_layers, hidden)``: one constant for all samples."""
    if is_sym(hx) or isinstance(hx, Poison):
        raise Unsupported("with an input-dependent initial state h0")
    h = to_numpy(hx)
    if h.ndim == 2:
        h = h[:, None, :]
    if h.shape[0] != num_layers or h.shape[2] != hidden or not np.all(h == h[:, :1]):
        raise Unsupported("with an initial state h0 that differs between samples")
    return h[:, 0, :]


def unroll_rnn(t, x: Sym, weights: list[tuple], h0: np.ndarray, function: str,
               inputs: list | None = None, first: int = 0) -> tuple[Sym, list, list, list]:
    """Unroll a stack of Elman layers over the horizon ``x.shape[0]`` (or over the per-step ``inputs``, the
    states of layers ``0..first-1`` unrolled before); returns the top layer's outputs ``(T, hidden)``, per
    layer the names of its steps' activation nodes (for ``network.meta``), the top layer's states, and each
    layer's last state."""
    b = t.b
    if inputs is None:
        steps, n_in = x.shape
        inputs = [b.select(x, np.arange(k * n_in, (k + 1) * n_in)) for k in range(steps)]
    steps = len(inputs)
    ops, lasts = [], []
    for layer, (W_ih, W_hh, bias) in enumerate(weights):
        hidden, states, layer_ops = W_hh.shape[0], [], []
        for k in range(steps):
            label = Label(f"{t.label.name}.l{first + layer}.t{k}", t.label.kind)
            pre = b.linear(inputs[k], W_ih, bias=bias, shape=(hidden,), label=label)
            if k == 0:  # h_0 is a constant: its contribution is a bias
                pre = b.linear(pre, bias=W_hh @ h0[layer])
            else:
                pre = b.add([pre, b.linear(states[-1], W_hh, shape=(hidden,), label=label)], label)
            h = b.activation(pre, function, {}, label)
            states.append(h)
            layer_ops.append(label.name)
        ops.append(layer_ops)
        lasts.append(states[-1])
        inputs = states
    flat = [b.linear(h, shape=(1, h.size)) for h in inputs]
    return (b.concat(flat, 0, Label(t.label.name, t.label.kind)) if steps > 1 else flat[0]), ops, inputs, lasts


def record_rnn(t, x: Sym, weights: list[tuple], h0: np.ndarray, function: str) -> tuple[Sym, list]:
    """:func:`unroll_rnn` (its output and each layer's last state), recorded in ``network.meta["recurrent"]``
    (one record per call, named uniquely)."""
    records = t.b.meta.setdefault("recurrent", [])
    # An RNN reading exactly the states of the one before (ONNX writes one RNN node per layer) is a
    # further layer of it: one record, so that the all-horizon bound sees the whole stack.
    tops = t.__dict__.setdefault("rnn_outputs", {})
    below = tops.get(x.base) if x.W is None and x.b is None else None
    if below is not None and below[0]["activation"] == function and len(below[1]) > 1 \
            and x.shape == (len(below[1]), below[1][0].size):
        record, states = below
        t.label = Label(record["name"], t.label.kind)
        out, ops, top, lasts = unroll_rnn(t, None, weights, h0, function, inputs=states,
                                          first=len(record["steps"]))
    else:
        if any(r["name"] == t.label.name for r in records):
            t.label = Label(f"{t.label.name}.{len(records)}", t.label.kind)
        out, ops, top, lasts = unroll_rnn(t, x, weights, h0, function)
        record = {"name": t.label.name, "activation": function, "weights": [],
                  "steps": [], "reads_input": x.base == 0 and x.W is None and x.b is None}
        records.append(record)
    record["weights"] += [(a, c) for a, c, _ in weights]
    record["steps"] += ops
    tops[out.base] = (record, top)
    return out, lasts


def final_state(t, lasts: list) -> BatchAt:
    """``h_n``, shape ``(num_layers, batch, hidden)`` in either layout: each layer's last state, batch second."""
    parts = [t.b.linear(h, shape=(1, h.size)) for h in lasts]
    return BatchAt(t.b.concat(parts, 0, t.label) if len(parts) > 1 else parts[0], 1)


def _rnn(t, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    function = _FUNCTIONS[t.op_name]
    if t.op._overloadname != "input":
        raise Unsupported("on packed sequences")
    if not batch_first:  # time first: the batch must be the sequence's second axis (lipsdp.io.batch_axis)
        if not (isinstance(x, BatchAt) and x.axis == 1):
            raise Unsupported("with batch_first=False on a tensor whose batch axis is not the second")
        x = x.sym
    if not is_sym(x) or len(x.shape) != 2:
        raise Unsupported("on inputs that are not sequences (batch, time, features)")
    if bidirectional:
        raise Unsupported("bidirectional (lipsdp unrolls one direction)")
    if train and dropout:
        raise Unsupported("with dropout in training mode")
    weights = _layer_weights(list(params), bool(has_biases), int(num_layers))
    if weights[0][0].shape[1] != x.shape[1]:
        raise Unsupported(f"with input_size {weights[0][0].shape[1]} on sequences of {x.shape[1]} features")
    h0 = _initial_state(hx, int(num_layers), weights[0][1].shape[0])
    out, lasts = record_rnn(t, x, weights, h0, function)
    return (out if batch_first else BatchAt(out, 1)), final_state(t, lasts)


register_aten(*_FUNCTIONS)(_rnn)
for _name in _FUNCTIONS:
    BATCH_AT_OPS[_name] = _rnn


#: Recurrent module classes whose ``input_size`` (or ``weight_ih_l0``) gives the sequences' feature size.
_RECURRENT = ("RNN", "ICLRNN")


def rnn_input_size(module) -> int | None:
    """``input_size`` of the first ``nn.RNN`` or :class:`lipsdp.nn.ICLRNN` in ``module`` (an ``nn.Module`` or a
    TorchScript module), None when it has none."""
    for _, m in module.named_modules():
        cls = getattr(m, "original_name", None) or type(m).__name__
        if cls in _RECURRENT and hasattr(m, "input_size"):
            return int(m.input_size)
        if cls in _RECURRENT and hasattr(m, "weight_ih_l0"):  # a traced module keeps parameters, not attributes
            return int(m.weight_ih_l0.shape[1])
    return None


def _horizon(horizon) -> int:
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise LipSDPError(f"horizon must be a whole number >= 1 or 'all', not {horizon!r}")
    return int(horizon)


def is_program(model) -> bool:
    """Whether ``model`` is a ``torch.export`` program, or a file holding one: its traced shape is fixed."""
    if isinstance(model, (str, os.PathLike)):
        return detect_format(os.fspath(model)) == "export"
    return hasattr(model, "graph_signature") and hasattr(model, "graph_module")


def _unrolled_recurrent(graph) -> bool:
    """Whether a ``torch.export`` graph calls a recurrent module whose loop over time it unrolled (ICLRNN)."""
    return any(str(cls).rsplit(".", 1)[-1] in _RECURRENT for n in graph.nodes
               for _, cls in (n.meta.get("nn_module_stack") or {}).values())


def _exported_sample(program) -> tuple | None:
    """The traced sample shape of a ``torch.export`` program that calls an RNN, else None."""
    from torch.export.graph_signature import InputKind

    graph = program.graph_module.graph
    if not any(n.op == "call_function" and str(n.target).split(".")[1] in ("rnn_tanh", "rnn_relu")
               for n in graph.nodes if "." in str(n.target)) and not _unrolled_recurrent(graph):
        return None
    user = {s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
    node = next(n for n in graph.nodes if n.op == "placeholder" and n.name in user)
    shape = [int(d) for d in node.meta["val"].shape]
    del shape[1 if time_first_program(program) else 0]  # the batch axis
    return tuple(shape)


def _onnx_sample(path: str) -> tuple | None:
    """``(T, input_size)`` of an ONNX file whose graph has an ``RNN`` node (``T = 0`` where symbolic)."""
    import onnx

    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({type(exc).__name__})") from exc
    rnns = [n for n in graph.node if n.op_type == "RNN"]
    inputs = [i for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    # The dynamo exporter unrolls nn.RNN (and loops): its nodes name the module classes they come from.
    unrolled = any(p.key == "pkg.torch.onnx.class_hierarchy" and re.search(r"\.(RNN|ICLRNN)'", p.value)
                   for n in graph.node for p in n.metadata_props)
    if not (rnns or unrolled) or len(inputs) != 1:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim]
    layout = next((a.i for a in rnns[0].attribute if a.name == "layout"), 0) if rnns else 1
    del dims[1 if rnns and rnns[0].input[0] == inputs[0].name and layout == 0 else 0]  # the batch axis
    return tuple(dims)


def fixed_horizon(model) -> bool:
    """Whether ``model`` fixes its horizon: a ``torch.export`` program, or an ONNX file of fixed length."""
    if is_program(model):
        return True
    if isinstance(model, (str, os.PathLike)) and detect_format(os.fspath(model)) == "onnx":
        sample = _onnx_sample(os.fspath(model))
        return sample is not None and sample[0] > 0
    return False


def _rnn_sample(model, trust_pickle: bool) -> tuple | None:
    """``(input_size,)``-ending sample shape of ``model``'s RNN (a path or a module), None without one."""
    if is_program(model) and not isinstance(model, (str, os.PathLike)):
        return _exported_sample(model)
    if not isinstance(model, (str, os.PathLike)):
        size = rnn_input_size(model) if hasattr(model, "named_modules") else None
        return None if size is None else (0, size)
    path = os.fspath(model)
    fmt = detect_format(path)
    if fmt == "export":
        import torch

        return _exported_sample(torch.export.load(path))
    if fmt == "onnx":
        return _onnx_sample(path)
    if fmt == "torchscript":
        import torch

        return _rnn_sample(torch.jit.load(path, map_location="cpu"), trust_pickle)
    if fmt != "pickle":
        raise ModelLoadError(f"{path}: a {fmt} file holds MLP weights, not a recurrent model")
    kind, content, _ = find_in_checkpoint(load_torch_file(path, trust_pickle=trust_pickle), path)
    if kind != "module":
        raise ModelLoadError(f"{path}: holds weights only; a recurrent model needs its architecture "
                             "(save the whole module, TorchScript or torch.export)")
    return _rnn_sample(content, trust_pickle)


def horizon_shape(model, horizon, input_shape=None, trust_pickle: bool = False) -> tuple | None:
    """The sample shape ``(T, input_size)`` that unrolls ``model``'s RNN over ``horizon`` steps.

    ``horizon=None`` returns ``input_shape`` unchanged.  A ``torch.export`` file fixes its
    horizon: a different ``T`` is refused by the loader.  A :class:`~lipsdp.network.Network`
    must already be an RNN unrolled over ``T`` steps (``input_shape`` is returned).

    Raises
    ------
    LipSDPError
        ``horizon`` is not a whole number >= 1, disagrees with ``input_shape``, or the model has
        no ``nn.RNN``.
    """
    if horizon is None:
        return input_shape
    T = _horizon(horizon)
    if isinstance(model, Network):
        check_horizon(model, T)
        return input_shape
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if not shape or shape[0] != T:
            raise LipSDPError(f"the input shape {shape} does not start with the horizon {T}")
        return shape
    sample = _rnn_sample(model, trust_pickle)
    if sample is None:
        name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
        raise LipSDPError(f"{name}: no nn.RNN in the model; a horizon applies to recurrent models only")
    return (T,) + tuple(sample[1:])


def check_horizon(network: Network, horizon) -> None:
    """Refuse a network that is not an RNN unrolled over ``horizon`` steps."""
    T = _horizon(horizon)
    if not network.meta.get("recurrent"):
        raise LipSDPError(f"{network.source or 'network'}: no nn.RNN in the model; a horizon applies to "
                          "recurrent models only")
    steps = network.op(network.input).shape[0]
    if steps != T:
        raise LipSDPError(f"{network.source or 'network'}: unrolled over {steps} steps, not {T}")
