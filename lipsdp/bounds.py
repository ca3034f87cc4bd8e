"""Cheap bounds that bracket the certified one.

- :func:`trivial_bound`: an upper bound anyone can check, the product of
  spectral norms times the activations' slope bounds, composed along the graph
  (sums over residual branches).  A certified bound above it would be useless.
- :func:`sampled_lower_bound`: the largest Jacobian spectral norm seen at random
  inputs.  The true constant is at least this, so a "certified" bound below it
  is unsound.

Together they form the sanity chain of docs/math.md §1.5:
``sampled <= true L <= certified <= trivial``.

Each node type registers here, once, its composed norm bound
(:func:`node_gain`, in float (:class:`Estimate`) or upward-rounded, proven
(:class:`Proven`) arithmetic) and its local Jacobian, forward
(:func:`node_jacobian`) and reverse (:func:`node_pullback`).
"""

from __future__ import annotations

import math
from functools import singledispatch

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import svds

from lipsdp import accel
from lipsdp.constraints import QuadraticConstraint, get_constraint
from lipsdp.equilibrium import equilibrium, jacobian
from lipsdp.floatproof import UNIT_ROUNDOFF, proven_positive_definite
from lipsdp.gains import activation_gain, up_product, up_row_sum, up_sum
from lipsdp.network import (Activation, Add, Affine, Concat, Equilibrium, Input, Network, Op, Reshape,
                            activation_function, concat_permutation)


def spectral_norm(W) -> float:
    """``||W||_2`` of a dense or sparse matrix (largest singular value)."""
    if sp.issparse(W):
        if min(W.shape) <= 1000:
            W = W.toarray()
        else:
            return float(svds(W, k=1, return_singular_vectors=False)[0]) * (1 + 1e-8)
    return accel.spectral_norm(W)


def implicit_gain(op: Equilibrium, slope: float, feedback_norm: float | None = None) -> float:
    """``slope / (1 - slope ||F||)`` (inf when ``slope ||F|| >= 1``): an implicit layer's gain from ``u`` to ``z``.

    From :math:`\\|\\Delta z\\| \\le s (\\|F\\| \\|\\Delta z\\| + \\|\\Delta u\\|)`, in any norm whose induced
    norm of ``F`` is ``feedback_norm`` (default: the spectral norm, l2).
    """
    k = slope * (spectral_norm(op.feedback) if feedback_norm is None else feedback_norm) * (1 + 1e-12)
    return slope / (1.0 - k) if k < 1.0 else float("inf")


def trivial_bound(network: Network) -> float:
    """Product of layer norms and slope bounds, composed over the DAG.

    For node values ``u(x)``: Affine ``||W|| L_parent``; activation ``s L_parent``
    with ``s`` the largest absolute slope; Add ``sum L_parents``; Concat
    ``sqrt(sum L_parents^2)``; implicit layer ``z = phi(F z + u)`` with slope bound ``s``:
    ``s L_parent / (1 - s ||F||)``, infinite when ``s ||F|| >= 1``.  Valid for any DAG.
    """
    return node_lipschitz(network)[network.output]


# -- proven norms ---------------------------------------------------------------
#: Affine layers with more rows plus columns than this get no proven norm (a dense Cholesky of that size).
PROVEN_NORM_SIZE = 4000


class Unprovable(ArithmeticError):
    """A composed bound that :class:`Proven` arithmetic cannot prove (a huge layer, an implicit one)."""


def _up(value: float) -> float:
    """The next float above ``value``: an upper bound on the exact result of the one rounded operation
    (to nearest) that produced ``value``."""
    return float(np.nextafter(value, np.inf))


def proven_spectral_norm(W) -> float | None:
    """A float ``s`` proven to satisfy ``||W||_2 <= s``; None for a matrix too large to prove.

    ``||W||_2 < s`` exactly when ``[[s I, W], [W^T, s I]]`` is positive definite (its Schur
    complement is ``s I - W^T W / s``).  That matrix holds ``s`` and ``W``'s own floats, so it is
    built without error, and :func:`lipsdp.floatproof.proven_positive_definite` proves it.  ``s`` starts at the
    float SVD's ``sigma_max`` raised by the Cholesky test's shift (relative ``~4 (m+n)^2 u``) and
    doubles its margin until the proof goes through.
    """
    m, n = W.shape
    if m + n > PROVEN_NORM_SIZE or not np.all(np.isfinite(W.data if sp.issparse(W) else W)):
        return None
    W = W.toarray() if sp.issparse(W) else np.asarray(W, dtype=np.float64)
    if not np.any(W):
        return 0.0
    sigma = float(np.linalg.norm(W, 2))
    margin = 8.0 * (m + n + 1) ** 2 * UNIT_ROUNDOFF
    for _ in range(40):
        s = _up(sigma * (1.0 + margin))
        H = np.block([[s * np.eye(m), W], [W.T, s * np.eye(n)]])
        if proven_positive_definite(H):
            return s
        margin *= 2.0
    return None


def proven_row_sum(W) -> float:
    """``max_i sum_j |W_ij|`` rounded up (exact where the float sum is: :func:`lipsdp.gains.up_row_sum`)."""
    return up_row_sum(W)


# -- composed norm bounds: one dispatch, two arithmetics ---------------------------
class Estimate:
    """Float arithmetic for :func:`node_gain`, in ``norm`` "l2" (spectral norms) or "linf" (row sums)."""

    def __init__(self, norm: str = "l2"):
        self.norm = norm

    def matrix(self, W) -> float:
        return spectral_norm(W) if self.norm == "l2" else float(np.asarray(abs(W).sum(axis=1)).max(initial=0.0))

    def mul(self, a: float, b: float) -> float:
        return a * b

    def total(self, values: list[float]) -> float:
        return sum(values)

    def hypot(self, values: list[float]) -> float:
        return float(np.sqrt(sum(p ** 2 for p in values))) if self.norm == "l2" else max(values)

    def implicit(self, op: Equilibrium, slope: float) -> float:
        return implicit_gain(op, slope, None if self.norm == "l2" else self.matrix(op.feedback))  # linf: row sums


class Proven(Estimate):
    """Upward-rounded arithmetic for :func:`node_gain`: every value is a proven upper bound.

    Norms by :func:`proven_spectral_norm` or :func:`proven_row_sum`; products and sums rounded up, exact
    results kept as they are (:mod:`lipsdp.gains`); :class:`Unprovable` otherwise.
    """

    def matrix(self, W) -> float:
        w = proven_spectral_norm(W) if self.norm == "l2" else proven_row_sum(W)
        if w is None:
            raise Unprovable(f"no proven norm for a {W.shape[0]}x{W.shape[1]} matrix")
        return w

    def mul(self, a: float, b: float) -> float:
        return up_product(a, b)

    def total(self, values: list[float]) -> float:
        return up_sum(values)

    def hypot(self, values: list[float]) -> float:
        if self.norm != "l2":
            return max(values)
        return _up(math.sqrt(self.total([_up(p * p) for p in values])))

    def implicit(self, op: Equilibrium, slope: float) -> float:
        raise Unprovable("an implicit layer's gain needs a proven ||F||")


@singledispatch
def node_gain(op: Op, parents: list[float], arith: Estimate) -> float:
    """The norm bound of node ``op`` given its parents' bounds, composed in ``arith``'s arithmetic."""
    raise TypeError(f"unknown node kind {type(op).__name__}")


@node_gain.register(Input)
def _(op, parents, arith):
    return 1.0


@node_gain.register(Affine)
def _(op, parents, arith):
    w = arith.matrix(op.weight)
    if op.weight_err is not None and isinstance(arith, Proven):  # ||W*|| <= ||W|| + ||E||_F (docs/math.md §10.3)
        E = abs(sp.csr_matrix(op.weight_err))  # raised by 1e-10 for the rounding of its own norm
        w = arith.total([w, float(sp.linalg.norm(E) if arith.norm == "l2" else E.sum(axis=1).max()) * (1 + 1e-10)])
    return arith.mul(w, parents[0])


@node_gain.register(Reshape)
def _(op, parents, arith):
    return parents[0]


@node_gain.register(Add)
def _(op, parents, arith):
    return arith.total(parents)


@node_gain.register(Concat)
def _(op, parents, arith):
    return arith.hypot(parents)


@node_gain.register(Activation)
def _(op, parents, arith):
    return arith.mul(activation_gain(op, arith.norm), parents[0])  # l_inf: Householder is not 1 (gains)


@node_gain.register(Equilibrium)
def _(op, parents, arith):
    return arith.mul(arith.implicit(op, get_constraint(op.function).lipschitz(op)), parents[0])


def node_lipschitz(network: Network, norm: str = "l2", arith: Estimate | None = None) -> dict[int, float]:
    """The composed norm bound of :func:`trivial_bound` for every node (node id -> bound).

    ``norm="linf"`` composes induced infinity norms (max absolute row sum)
    instead: a bound on the l_inf -> l_inf gain, hence on every output's
    l_inf -> |.| constant.  ``arith`` (default ``Estimate(norm)``) picks the arithmetic.
    """
    arith = Estimate(norm) if arith is None else arith
    lip: dict[int, float] = {}
    for n in network.graph.nodes:
        lip[n] = node_gain(network.op(n), [lip[p] for p in network.parents(n)], arith)
    return lip


def proven_trivial_bound(network: Network, norm: str = "l2", output_map=None) -> float | None:
    """The trivial bound (products of norms and slopes, composed over the graph) proven in floating
    point: :func:`node_lipschitz` in :class:`Proven` arithmetic, then the read-out's proven norm;
    None where a part cannot be proven (implicit layers, huge layers).
    The slopes are the catalogue's (:meth:`~lipsdp.constraints.QuadraticConstraint.lipschitz`)."""
    arith = Proven(norm)
    try:
        out = node_lipschitz(network, norm, arith)[network.output]
        if output_map is not None:
            out = arith.mul(arith.matrix(np.atleast_2d(np.asarray(output_map, dtype=np.float64))), out)
    except Unprovable:
        return None
    return out if math.isfinite(out) else None


# -- Jacobians ----------------------------------------------------------------
def jacobians(network: Network, x: np.ndarray) -> np.ndarray:
    """Jacobians of the network at a batch of inputs, shape ``(batch, m, n0)``.

    Reverse mode (``m`` rows carried from the output back) where the network has fewer outputs
    than inputs and every node has a transposable local Jacobian (elementwise activations, no
    implicit layers); forward mode (``n0`` columns carried from the input) otherwise.  Reverse
    mode costs ``m / n0`` of forward mode, which matters for classifiers (10 outputs, 784 inputs).
    """
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if network.output_dim < network.input_dim and _reversible(network):
        return _jacobians_reverse(network, x)
    return _jacobians_forward(network, x)


def _reversible(network: Network) -> bool:
    for n in network.activations():
        op = network.op(n)
        if op.implicit or type(get_constraint(op.function)).jacobian is not QuadraticConstraint.jacobian:
            return False
    return True


@singledispatch
def node_pullback(op: Op, G: np.ndarray, ins: list[np.ndarray], shapes: list[tuple]) -> list[np.ndarray]:
    """``G J_p`` for each parent ``p``: ``G`` (``(b, m, size)``) pulled back through the node's local Jacobian.

    ``ins`` are the parents' values.  The default is the identity on every parent
    (Reshape keeps flat values; Add passes the whole gradient to each term).
    """
    return [G] * len(ins)


@node_pullback.register(Affine)
def _(op, G, ins, shapes):
    W = op.weight
    b, m = G.shape[:2]
    flat = G.reshape(b * m, -1)
    return [np.asarray((W.T @ flat.T).T if sp.issparse(W) else flat @ W).reshape(b, m, -1)]


@node_pullback.register(Activation)
def _(op, G, ins, shapes):
    return [G * activation_function(op.function).derivative(ins[0], op)[:, None, :]]


@node_pullback.register(Equilibrium)
def _(op, G, ins, shapes):
    raise TypeError("implicit layers have no transposable local Jacobian: use forward mode")


@node_pullback.register(Concat)
def _(op, G, ins, shapes):
    stacked = np.empty_like(G)
    stacked[:, :, concat_permutation(shapes, op.axis)] = G
    return np.split(stacked, np.cumsum([int(np.prod(s)) if len(s) else 1 for s in shapes])[:-1], axis=2)


def _jacobians_reverse(network: Network, x: np.ndarray) -> np.ndarray:
    """``J = dy/dx`` by back-propagating the ``m`` rows of ``I_m`` (elementwise activations only)."""
    b = len(x)
    values = network.node_values(x)
    m = network.output_dim
    grads = {network.output: np.broadcast_to(np.eye(m), (b, m, m)).copy()}
    for n in reversed(list(network.graph.nodes)):
        if n not in grads or n == network.input:
            continue
        G = grads.pop(n)  # (b, m, size of n): d output / d node n
        parents = network.parents(n)
        back = node_pullback(network.op(n), G, [values[p] for p in parents], [network.op(p).shape for p in parents])
        for p, g in zip(parents, back):
            grads[p] = grads[p] + g if p in grads else g
    return grads.get(network.input, np.zeros((b, m, network.input_dim)))


@singledispatch
def node_jacobian(op: Op, ins: list[np.ndarray], js: list[np.ndarray],
                  shapes: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """The node's value and Jacobian ``(v, J)`` from its parents' values ``ins`` and Jacobians ``js``."""
    raise TypeError(f"unknown node kind {type(op).__name__}")


@node_jacobian.register(Input)
def _(op, ins, js, shapes):
    x = ins[0]
    b, n0 = x.shape
    return x, np.broadcast_to(np.eye(n0), (b, n0, n0))


@node_jacobian.register(Affine)
def _(op, ins, js, shapes):
    return op.evaluate(ins, shapes), np.stack([np.asarray(op.weight @ j) for j in js[0]])


@node_jacobian.register(Reshape)
def _(op, ins, js, shapes):
    return ins[0], js[0]


@node_jacobian.register(Add)
def _(op, ins, js, shapes):
    return sum(ins), sum(js)


@node_jacobian.register(Concat)
def _(op, ins, js, shapes):
    perm = concat_permutation(shapes, op.axis)
    return np.concatenate(ins, axis=1)[:, perm], np.concatenate(js, axis=1)[:, perm]


@node_jacobian.register(Activation)
def _(op, ins, js, shapes):
    phi = activation_function(op.function)
    return phi.evaluate(ins[0], op), phi.jacobian(ins[0], js[0], op)


@node_jacobian.register(Equilibrium)
def _(op, ins, js, shapes):
    # True equilibria and implicit-function-theorem Jacobians; NaN where none was found.
    phi = activation_function(op.function)
    v = equilibrium(op, ins[0], phi)
    return v, jacobian(op, ins[0], v, js[0], phi)


def _jacobians_forward(network: Network, x: np.ndarray) -> np.ndarray:
    """``J = dy/dx`` by pushing the ``n0`` columns of ``I_{n0}`` through the network."""
    vals, jacs = {}, {}
    for n in network.graph.nodes:
        parents = network.parents(n)
        ins = [x] if n == network.input else [vals[p] for p in parents]
        vals[n], jacs[n] = node_jacobian(network.op(n), ins, [jacs[p] for p in parents],
                                         [network.op(p).shape for p in parents])
    return np.asarray(jacs[network.output])


def sampled_lower_bound(network: Network, samples: int = 256, seed: int = 0, scale: float = 1.0,
                        batch: int = 64, norm: str = "l2", output_map=None) -> float:
    """Largest Jacobian norm over random inputs ``x ~ N(0, scale^2)``: a lower bound on the true constant.

    ``l2``: spectral norm of ``J``; ``linf``: largest l1 norm of a row of ``J``
    (the l_inf -> |.| constant of that output).  ``output_map`` multiplies ``J`` on the left.
    """
    rng = np.random.default_rng(seed)
    best = 0.0
    done = 0
    while done < samples:
        k = min(batch, samples - done)
        x = scale * rng.standard_normal((k, network.input_dim))
        J = jacobians(network, x)
        if output_map is not None:
            J = np.einsum("km,bmn->bkn", np.atleast_2d(output_map), J)
        # Implicit layers give NaN Jacobians at inputs without an equilibrium: skip those samples.
        J = J[np.all(np.isfinite(J), axis=(1, 2))]
        if len(J):
            value = np.linalg.norm(J, 2, axis=(1, 2)) if norm == "l2" else np.abs(J).sum(axis=2).max(axis=1)
            best = max(best, float(value.max()))
        done += k
    return best
