"""Equivalent networks with GroupSort-2 (MaxMin) written through ReLUs.

LipSDP's original setting is slope-restricted activations; before the
quadratic constraint of Pauli et al. (ICLR 2024) for GroupSort, the way to
certify a MaxMin network with LipSDP was to rewrite every pair sort as a small
residual ReLU map.  :func:`maxmin_as_relu` produces such rewritings, so the
bound of the dedicated GroupSort constraint can be compared with the ReLU
baselines on *the same function* (docs/math.md §4.4).
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.sparse as sp

from lipsdp.constraints import get_constraint
from lipsdp.network import Activation, Add, Affine, Network

__all__ = ["maxmin_as_relu", "VARIANTS"]

#: Per-pair matrices of each rewriting: ``sort(u) = H u + G relu(W u)``
#: (``H``, ``G``, ``W``; ``H = None`` means the identity, added as a skip connection).
_PAIR = {
    # Pauli et al.'s baseline: two ReLUs per pair, relu(u2 - u1) and relu(u1 - u2).
    "two": (np.array([[0.0, 1.0], [0.0, 1.0]]),   # H: both outputs start from u2
            np.array([[-1.0, 0.0], [0.0, 1.0]]),  # G
            np.array([[-1.0, 1.0], [1.0, -1.0]])),  # W1
    # One ReLU per pair: relu(u1 - u2), with J = I.
    "one": (None,                                  # J = I
            np.array([[-1.0], [1.0]]),             # E
            np.array([[1.0, -1.0]])),              # F
}
VARIANTS = tuple(_PAIR)


def _blocks(pair: np.ndarray, m: int) -> sp.csr_matrix:
    """``kron(I_m, pair)``: the pair matrix on each of ``m`` consecutive pairs."""
    return sp.kron(sp.identity(m, format="csr"), sp.csr_matrix(pair), format="csr")


def _group_size(op: Activation) -> int:
    return get_constraint("groupsort").group_size(op)


def maxmin_as_relu(network: Network, variant: str = "two") -> Network:
    r"""Replace every GroupSort-2 (MaxMin) node by an equivalent ReLU subgraph.

    Every ``Activation`` with ``function="groupsort"`` sorts consecutive pairs
    :math:`u = (u_1, u_2)` of its flattened input in ascending order,
    :math:`\operatorname{sort}(u) = (\min(u_1, u_2), \max(u_1, u_2))`.  It is
    rewritten over the whole vector with block-diagonal sparse matrices
    (:math:`\operatorname{kron}(I_m, \cdot)` for :math:`m` pairs); the returned
    network computes the same function, so its true Lipschitz constant is the same.

    ``variant="two"`` -- the two-ReLU residual map of Pauli et al.'s baseline code:

    .. math::

        \operatorname{sort}(u) = H u + G\,\mathrm{ReLU}(W_1 u),\quad
        W_1 = \begin{bmatrix}-1 & 1\\ 1 & -1\end{bmatrix},\
        H = \begin{bmatrix}0 & 1\\ 0 & 1\end{bmatrix},\
        G = \begin{bmatrix}-1 & 0\\ 0 & 1\end{bmatrix},

    since :math:`\min = u_2 - \mathrm{ReLU}(u_2 - u_1)` and
    :math:`\max = u_2 + \mathrm{ReLU}(u_1 - u_2)`.  Subgraph: ``Affine(W1) ->
    ReLU -> Affine(G)`` plus ``Affine(H)``, summed by an ``Add``.

    ``variant="one"`` -- one ReLU per pair:

    .. math::

        \operatorname{sort}(u) = J u + E\,\mathrm{ReLU}(F u),\quad
        J = I_2,\ E = \begin{bmatrix}-1\\ 1\end{bmatrix},\ F = [1,\ -1],

    since :math:`\min = u_1 - \mathrm{ReLU}(u_1 - u_2)` and
    :math:`\max = u_2 + \mathrm{ReLU}(u_1 - u_2)`.  Subgraph: ``Affine(F) ->
    ReLU -> Affine(E)`` added to the input (the skip connection is :math:`J = I`).
    (docs/math.md §4.4 writes :math:`J = \begin{bmatrix}0&1\\1&0\end{bmatrix}`,
    :math:`E = [1; -1]`: that is the descending order :math:`(\max, \min)`.)

    LipSDP's ReLU constraint is a different relaxation of each rewriting.  On
    networks with orthogonal weights (true constant 1) the two-ReLU form gives
    bounds of about 2, the motivating example of Pauli et al.; the one-ReLU form's
    constraint is equivalent to sum preservation plus 1-Lipschitzness of the pair
    (P1 + P2) and recovers 1, like the dedicated GroupSort constraint.

    Parameters
    ----------
    network : Network
        Any network; nodes other than GroupSort are copied unchanged (their
        operators are shallow copies, sharing weight arrays).
    variant : {"two", "one"}
        Which rewriting.

    Returns
    -------
    Network
        A new network with the same input, output and ``numpy_forward``; each
        GroupSort node becomes ``Affine`` (kind ``"Linear"``), ``Activation("relu")``
        and ``Add`` nodes: the ``Add`` keeps the node's name and shape, the others are
        named ``"<name>.pre"``, ``"<name>.relu"``, ``"<name>.post"`` (and ``"<name>.skip"``).

    Raises
    ------
    ValueError
        For an unknown ``variant``, or a GroupSort node whose group size is not 2
        (GroupSort-4, FullSort of more than two values).

    Notes
    -----
    Shape: the rewritten node's input and output have ``2 m`` values, sorted in
    consecutive pairs of the row-major flattening (as :class:`~lipsdp.constraints.GroupSort`);
    the ReLU layer has ``2 m`` (``"two"``) or ``m`` (``"one"``) neurons.

    References
    ----------
    P. Pauli, A. Havens, A. Araujo, S. Garg, F. Khorrami, F. Allgöwer, B. Hu,
    "Novel Quadratic Constraints for Extending LipSDP beyond Slope-Restricted
    Activations", ICLR 2024, arXiv:2401.14033.

    Examples
    --------
    >>> import numpy as np
    >>> net = Network.sequential([np.eye(2), np.eye(2)], activation="groupsort", params={"group_size": 2})
    >>> relu_net = maxmin_as_relu(net, "one")
    >>> relu_net.numpy_forward(np.array([[3.0, -1.0]]))
    array([[-1.,  3.]])
    """
    if variant not in _PAIR:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(map(repr, VARIANTS))}")
    H_pair, G_pair, W_pair = _PAIR[variant]
    out = Network(source=network.source)
    new: dict[int, int] = {}
    for n in network.graph.nodes:
        op, parents = network.op(n), [new[p] for p in network.parents(n)]
        if not (isinstance(op, Activation) and op.function == "groupsort"):
            new[n] = out.add(copy.copy(op), parents)
            continue
        g = _group_size(op)
        if g != 2:
            raise ValueError(f"{op.name} ({op.kind}): only GroupSort with group_size 2 (MaxMin) can be "
                             f"rewritten with ReLUs, this one sorts groups of {g}")
        size, m = op.size, op.size // 2
        hidden = W_pair.shape[0] * m
        name = op.name
        r = out.add(Affine(f"{name}.pre", "Linear", (hidden,), weight=_blocks(W_pair, m)), parents)
        r = out.add(Activation(f"{name}.relu", "ReLU", (hidden,), function="relu"), [r])
        r = out.add(Affine(f"{name}.post", "Linear", (size,), weight=_blocks(G_pair, m)), [r])
        if H_pair is None:
            skip = parents[0]
        else:
            skip = out.add(Affine(f"{name}.skip", "Linear", (size,), weight=_blocks(H_pair, m)), parents)
        new[n] = out.add(Add(name, "Add", tuple(op.shape)), [skip, r])
    out.output = new[network.output]
    return out
