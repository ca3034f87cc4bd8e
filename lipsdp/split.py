"""Network splitting: certify a chain network piece by piece (docs/math.md §8.2).

Write ``f = f_k o ... o f_1`` with every piece but the last ending at an
activation's output.  Each piece is a smaller network whose LipSDP bound
``L_i`` lipsdp certifies on its own, and by composition

.. math:: \\|f(x) - f(y)\\|_2 \\le \\Big(\\prod_i L_i\\Big) \\|x - y\\|_2 .

This is sound but looser than the SDP on the whole network (the pieces cannot
share multipliers): on the 3-5-5-5-2 net of docs/math.md §8.2 the full SDP gives
1.509 and two pieces 1.933.  lipsdp uses it only as a fallback, for nets whose
full LMI does not fit in memory, or when asked (``--split K``), and labels the
result.  l2 only: the pieces' norms must chain.

Reference: M. Fazlyab et al., "Efficient and Accurate Estimation of Lipschitz
Constants for Deep Neural Networks", NeurIPS 2019 (section on splitting).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp.network import Activation, Affine, Equilibrium, Input, Network, Reshape


def is_chain(network: Network) -> bool:
    """Whether the network is one path of affine maps, reshapes and (explicit) activations."""
    for node in network.graph.nodes:
        op = network.op(node)
        if not isinstance(op, (Input, Affine, Reshape, Activation)) or isinstance(op, Equilibrium):
            return False
        if len(network.parents(node)) > 1 or network.graph.out_degree(node) > 1:
            return False
    return True


def split_chain(network: Network, *, layers: int | None = None, max_size: int | None = None) -> list[Network]:
    """Pieces of a chain network, each cut after an activation.

    Parameters
    ----------
    layers : int, optional
        At most this many activation nodes per piece.
    max_size : int, optional
        At most this LMI size (piece input size + its hidden neurons) per piece,
        as far as single activation nodes allow.

    Every piece but the last ends with an identity :class:`Affine` so that its
    output is the activation's value; the last one ends where the network does.
    """
    if not is_chain(network):
        raise ValueError("only chain networks (no skip connections, concatenations or implicit layers) split")
    order = list(network.graph.nodes)  # insertion order is topological, and a chain is one path
    groups, current, hidden, n_in = [], [], 0, network.input_dim
    for node in order[1:]:
        op = network.op(node)
        current.append(node)
        if isinstance(op, Activation):
            hidden += op.size
            count = sum(isinstance(network.op(n), Activation) for n in current)
            if (layers is not None and count >= layers) or (max_size is not None and n_in + hidden >= max_size):
                groups.append(current)
                current, hidden, n_in = [], 0, op.size
    if current:
        groups.append(current)
    if len(groups) > 1 and not any(isinstance(network.op(n), Activation) for n in groups[-1]):
        groups[-2].extend(groups.pop())  # the read-out alone is linear: keep it with the last activations
    pieces = []
    for k, group in enumerate(groups):
        parent = network.parents(group[0])[0]
        piece = Network(source=f"{network.source} [piece {k + 1}/{len(groups)}]")
        node = piece.add(Input("input", "Input", network.op(parent).shape))
        for n in group:
            node = piece.add(network.op(n), [node])
        if k < len(groups) - 1:
            size = network.op(group[-1]).size
            node = piece.add(Affine(f"split.{k}", "Identity", (size,), weight=sp.identity(size, format="csr")), [node])
        pieces.append(piece)
    return pieces


def compose_bounds(bounds) -> float:
    """``prod(bounds)`` rounded upwards (each product one ulp up), so the composition stays an upper bound."""
    value = 1.0
    for b in bounds:
        value = float(np.nextafter(value * float(b), np.inf))
    return value
