r"""Recognise an Elman recurrence in a network unrolled from a Python loop over time (docs/math.md §13.4).

A model such as :class:`lipsdp.nn.ICLRNN` runs its cell in a ``for`` loop; ``torch.export`` and
``torch.jit.trace`` unroll it, so the loaded network holds ``T`` copies of the cell and no
``network.meta["recurrent"]`` record.  :func:`recognise` reads the recurrence back from the graph, exactly:

1. every node's value is written as a linear map of the *sources* (the input and the activation nodes),
   biases dropped, by composing the ``Affine`` / ``Add`` / ``Reshape`` / ``Concat`` nodes between them
   (each a fixed matrix, so the maps are exact up to the float products of 0/1 selections and weights);
2. each activation node is placed at a layer ``l`` and step ``k``: layer 0 reads the input block ``x_k``
   only (and its own previous step), layer ``l > 0`` reads exactly one node of layer ``l - 1`` at the
   same step (and its own previous step);
3. the maps must be the same at every step: ``U_l`` on the input (or the layer below), ``W_l`` on the
   previous step (absent at ``k = 0``: the initial state is a constant, part of the bias), one
   activation function of sector ``[0, 1]`` with no parameters, and the output must be ``C h^L_T``
   (**last**) or ``(C h^L_1, ..., C h^L_T)`` (**all**).

Anything else (a skip connection, a step that differs, an output that reads the input or a lower
layer) is refused with the reason.  The result is the state-space form of :mod:`lipsdp.recurrent`;
the network is then exactly that recurrence run for ``T`` steps from a constant initial state, the
same statement the ``nn.RNN`` loader's record makes.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp.bounds import proven_spectral_norm
from lipsdp.errors import LipSDPError
from lipsdp.network import Activation, Add, Affine, Concat, Input, Network, Reshape, concat_permutation

__all__ = ["all_horizon_trivial_bound", "linear_forms", "recognise"]

#: Largest number of scalar sources (input plus activation outputs) read with dense maps.
MAX_SOURCES = 20000


def _refuse(network: Network, why: str):
    raise LipSDPError(f"{network.source or 'model'}: no all-horizon bound: {why}; certify a horizon "
                      "(horizon=T, --horizon T) instead")


def linear_forms(network: Network) -> dict[int, dict[int, np.ndarray]]:
    """Per node, ``{source: M}`` with ``value(node) = sum M @ value(source) + constant``; the sources are
    the input and the activation nodes (an activation's own form is its pre-activation's)."""
    forms: dict[int, dict[int, np.ndarray]] = {}
    pre: dict[int, dict[int, np.ndarray]] = {}
    for node in sorted(network.graph.nodes):
        op, parents = network.op(node), network.parents(node)
        if isinstance(op, (Input, Activation)):
            if isinstance(op, Activation):
                pre[node] = forms[parents[0]] if type(op) is Activation else _refuse(network, f"{op.name} "
                                                                                    "is an implicit layer")
            forms[node] = {node: np.eye(op.size)}
        elif isinstance(op, Affine):
            W = op.weight.toarray() if sp.issparse(op.weight) else np.asarray(op.weight, dtype=np.float64)
            forms[node] = {s: W @ M for s, M in forms[parents[0]].items()}
        elif isinstance(op, Reshape):
            forms[node] = forms[parents[0]]
        elif isinstance(op, Add):
            out: dict[int, np.ndarray] = {}
            for p in parents:
                for s, M in forms[p].items():
                    out[s] = out[s] + M if s in out else M
            forms[node] = out
        elif isinstance(op, Concat):
            sources = sorted(set().union(*(forms[p] for p in parents)))
            perm = concat_permutation([network.op(p).shape for p in parents], op.axis)
            forms[node] = {s: np.vstack([forms[p].get(s, np.zeros((network.op(p).size, _width(network, s))))
                                         for p in parents])[perm] for s in sources}
        else:
            _refuse(network, f"{op.name} ({op.kind}) is not part of an Elman recurrence")
    forms.update({-node - 1: f for node, f in pre.items()})  # pre-activation forms under negative keys
    return forms


def _width(network: Network, source: int) -> int:
    return network.op(source).size


def _place(network: Network, forms, steps: int, n_in: int) -> dict[int, tuple[int, int]]:
    """``node -> (layer, step)`` for every activation node, or refuse."""
    where: dict[int, tuple[int, int]] = {}
    for node in sorted(network.activations()):
        form = {s: M for s, M in forms[-node - 1].items() if np.any(M)}
        acts = [s for s in form if s != network.input]
        if network.input in form:
            blocks = [k for k in range(steps) if np.any(form[network.input][:, k * n_in:(k + 1) * n_in])]
            if len(blocks) != 1 or len(acts) > 1:
                _refuse(network, f"{network.op(node).name} reads {len(blocks)} input steps and {len(acts)} states")
            layer, step = 0, blocks[0]
        elif len(acts) in (1, 2) and all(s in where for s in acts):
            below = [s for s in acts if len(acts) == 1 or where[s][0] < max(where[a][0] for a in acts)]
            if len(below) != 1:
                _refuse(network, f"{network.op(node).name} reads two states of one layer")
            layer, step = where[below[0]][0] + 1, where[below[0]][1]
        else:
            _refuse(network, f"{network.op(node).name} does not read the input or the layer below")
        where[node] = (layer, step)
    return where


def recognise(network: Network) -> tuple[list, list, str, np.ndarray, str]:
    """``(U, W, activation, C, mode)`` of the Elman recurrence unrolled in ``network`` (see the module
    docstring), or a :class:`~lipsdp.errors.LipSDPError` that says why there is none."""
    shape = network.op(network.input).shape
    if len(shape) != 2 or shape[0] < 2:
        _refuse(network, f"the input {tuple(shape)} is not a sequence of two steps or more")
    steps, n_in = shape
    if network.input_dim + sum(network.op(a).size for a in network.activations()) > MAX_SOURCES:
        _refuse(network, "the unrolled network is too large to read its recurrence")
    functions = {(network.op(a).function, bool(network.op(a).params)) for a in network.activations()}
    if len(functions) != 1 or next(iter(functions)) not in (("tanh", False), ("relu", False)):
        _refuse(network, f"the activations are {sorted(functions)}, not one of tanh or relu")
    forms = linear_forms(network)
    where = _place(network, forms, steps, n_in)
    cell = {lk: node for node, lk in where.items()}
    layers = 1 + max(layer for layer, _ in where.values())
    if len(cell) != len(where) or set(cell) != {(l, k) for l in range(layers) for k in range(steps)}:
        _refuse(network, "the activations do not form one state per layer and step")
    U, W = [], []
    for layer in range(layers):
        for k in range(steps):
            form = forms[-cell[layer, k] - 1]
            src = network.input if layer == 0 else cell[layer - 1, k]
            u = form[src][:, k * n_in:(k + 1) * n_in] if layer == 0 else form[src]
            w = form.get(cell[layer, k - 1]) if k else None
            rest = set(form) - {src} - ({cell[layer, k - 1]} if k else set())
            if k == 0:
                U.append(u)
                W.append(np.zeros((u.shape[0], u.shape[0])))
            if any(np.any(form[s]) for s in rest) or not np.array_equal(u, U[layer]) or \
                    (k and (w is None or (k > 1 and not np.array_equal(w, W[layer])))):
                _refuse(network, f"step {k} of layer {layer} is not the cell of the other steps")
            if k == 1:
                W[layer] = w
    C, mode = _readout(network, forms, [cell[layers - 1, k] for k in range(steps)])
    return U, W, next(iter(functions))[0], C, mode


def _readout(network: Network, forms, top: list[int]) -> tuple[np.ndarray, str]:
    """``(C, mode)``: the output as ``C h_T`` or ``C h_t`` at every step, read from its form."""
    form = {s: M for s, M in forms[network.output].items() if np.any(M)}
    if set(form) - set(top):
        _refuse(network, "the output reads more than the top layer's states")
    H, T = network.op(top[0]).size, len(top)
    blocks = [form.get(node, np.zeros((network.output_dim, H))) for node in top]
    if set(form) == {top[-1]}:
        return blocks[-1], "last"
    m = network.output_dim // T
    C = blocks[0][:m]
    if network.output_dim == m * T and np.array_equal(np.hstack(blocks), np.kron(np.eye(T), C)):
        return C, "all"
    _refuse(network, "the read-out mixes time steps (neither the last state nor the same map at every step)")


def all_horizon_trivial_bound(ss) -> float | None:
    """A bound for every horizon from norms alone (docs/math.md §13.3) for a state-space form ``ss``
    (:class:`lipsdp.recurrent.StateSpace`), or None when some
    ``||W_l|| >= 1`` (no finite bound from norms).

    Layer ``l`` maps its input sequence to its state sequence with gain ``||U_l|| / (1 - ||W_l||)``;
    the last state of the top layer alone has gain ``||U_L|| / sqrt(1 - ||W_L||^2)``.
    """
    norms = [(proven_spectral_norm(U), proven_spectral_norm(W)) for U, W in zip(ss.U, ss.W)]
    c = proven_spectral_norm(ss.C)
    if c is None or any(u is None or w is None or w >= 1.0 for u, w in norms):
        return None
    gain = c
    for k, (u, w) in enumerate(norms):
        last = ss.mode == "last" and k == len(norms) - 1
        # (1 - w) is exact for w >= 1/2 (Sterbenz) and (1 - w)(1 + w) avoids cancelling in 1 - w^2, so
        # every factor is within a few units of roundoff and the final 1e-12 covers them all.
        gain *= u / (np.sqrt((1.0 - w) * (1.0 + w)) if last else 1.0 - w)
    return float(np.nextafter(gain * (1.0 + 1e-12), np.inf))
