r"""Elman RNNs (``torch.nn.RNN``, tanh or ReLU) unrolled over the traced horizon.

``aten::rnn_tanh`` / ``aten::rnn_relu`` (what ``nn.RNN`` becomes in ``torch.export``
and TorchScript graphs, and so in whole-module pickles, which are exported) compute,
for each layer ``l`` and step ``t = 1..T``,

.. math:: h^l_t = \phi(W^l_{ih} h^{l-1}_t + b^l_{ih} + W^l_{hh} h^l_{t-1} + b^l_{hh}),
          \qquad h^0_t = x_t,

and return the top layer's states ``(h^L_1, ..., h^L_T)`` and the final states.  With the
horizon ``T`` fixed by the traced input shape ``(T, input_size)`` this is a feed-forward
network: ``T`` copies of one ``Affine`` + ``Activation`` per layer, sharing weights
(docs/math.md §11.1).  The initial state ``h_0`` is a constant of the graph (zeros unless
the model passes one) and folds into the biases; every global bound ignores it.

What each call unrolled is recorded in ``network.meta["recurrent"]`` (the weights, the
activation, the names of each step's activation nodes, whether the RNN reads the network input
directly), which the all-horizon bound of :mod:`lipsdp.recurrent` reads.

Refused, with the reason: ``batch_first=False`` (the time axis is where lipsdp reads
samples), bidirectional RNNs, packed sequences, an input-dependent initial state, and the
final-state output ``h_n`` (its batch axis is the second; use ``output[:, -1]``, the same
values for a unidirectional RNN).
"""

from __future__ import annotations

import numpy as np

from lipsdp.io.builder import Label, Sym, Unsupported
from lipsdp.io.translator import Poison, is_sym, register_aten, to_numpy

__all__ = ["unroll_rnn"]

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


def unroll_rnn(t, x: Sym, weights: list[tuple], h0: np.ndarray, function: str) -> tuple[Sym, list]:
    """Unroll a stack of Elman layers over the horizon ``x.shape[0]``; returns the top layer's outputs
    ``(T, hidden)`` and, per layer, the names of its steps' activation nodes (for ``network.meta``)."""
    steps, n_in = x.shape
    b = t.b
    inputs = [b.select(x, np.arange(k * n_in, (k + 1) * n_in)) for k in range(steps)]
    ops = []
    for layer, (W_ih, W_hh, bias) in enumerate(weights):
        hidden, states, layer_ops = W_hh.shape[0], [], []
        for k in range(steps):
            label = Label(f"{t.label.name}.l{layer}.t{k}", t.label.kind)
            pre = b.linear(inputs[k], W_ih, bias=bias, shape=(hidden,), label=label)
            if k == 0:  # h_0 is a constant: its contribution is a bias
                pre = b.linear(pre, bias=W_hh @ h0[layer])
            else:
                pre = b.add([pre, b.linear(states[-1], W_hh, shape=(hidden,), label=label)], label)
            h = b.activation(pre, function, {}, label)
            states.append(h)
            layer_ops.append(label.name)
        ops.append(layer_ops)
        inputs = states
    flat = [b.linear(h, shape=(1, h.size)) for h in inputs]
    return (b.concat(flat, 0, Label(t.label.name, t.label.kind)) if steps > 1 else flat[0]), ops


def _rnn(t, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    function = _FUNCTIONS[t.op_name]
    if t.op._overloadname != "input":
        raise Unsupported("on packed sequences")
    if not is_sym(x) or len(x.shape) != 2:
        raise Unsupported("on inputs that are not sequences (batch, time, features)")
    if bidirectional:
        raise Unsupported("bidirectional (lipsdp unrolls one direction)")
    if train and dropout:
        raise Unsupported("with dropout in training mode")
    if not batch_first:
        raise Unsupported("with batch_first=False: its first axis is time, where lipsdp reads samples; "
                          "save the model with batch_first=True")
    weights = _layer_weights(list(params), bool(has_biases), int(num_layers))
    if weights[0][0].shape[1] != x.shape[1]:
        raise Unsupported(f"with input_size {weights[0][0].shape[1]} on sequences of {x.shape[1]} features")
    h0 = _initial_state(hx, int(num_layers), weights[0][1].shape[0])
    out, ops = unroll_rnn(t, x, weights, h0, function)
    record = {"name": t.label.name, "activation": function, "weights": [(a, c) for a, c, _ in weights],
              "steps": ops, "reads_input": x.base == 0 and x.W is None and x.b is None}
    t.b.meta.setdefault("recurrent", []).append(record)
    h_n = Poison(t.entry(f"{t.op_name} final state h_n (its batch axis is the second; "
                         "use output[:, -1], the same values)"))
    return out, h_n


register_aten(*_FUNCTIONS)(_rnn)
