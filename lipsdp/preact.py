"""Sound elementwise bounds on the value of every node of a network over an input region.

For inputs in a box ``[lower, upper]`` (or a ball ``||x - center|| <= radius`` in l2 or l_inf),
:func:`preactivation_bounds` gives ``lo_k <= value_k(x) <= hi_k`` for every node ``k`` of the graph
(flattened, float64), by one of two methods (docs/math.md §6.1):

* ``"interval"``: interval bound propagation, node by node in topological order;
* ``"crown"``: linear bound propagation (CROWN, Zhang et al. 2018): each elementwise activation is
  enclosed between two lines on its pre-activation interval, and every Affine / Add / Concat node's
  value is written as a linear function of the input through them (back-substitution through Affine,
  Add, Concat, Reshape and the activations' lines), which is then bounded over the region with the
  dual norm.  The result is intersected with the interval bounds, so it is never looser.

Both are written against :mod:`lipsdp.network`'s node types, so every network a loader produces is
covered, except nodes whose values cannot be enclosed here (implicit layers, GroupSort /
Householder activations): those are refused with :class:`~lipsdp.errors.UnsupportedLayerError`.

Rounding: every bound is widened by a relative slack (:data:`SLACK` times the absolute magnitude the
node's value is computed from), far above float64's accumulated rounding error for sums of up to
10^6 terms per node and depth up to 100 (docs/math.md §6.1), and by the largest jump a framework's
activation makes (:meth:`~lipsdp.activations.SlopeActivation.discontinuity`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lipsdp import activations
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.network import Activation, Add, Affine, Concat, Equilibrium, Input, Network, Reshape, \
    concat_permutation

#: Relative widening of every computed bound (see the module docstring).
SLACK = 1e-9
#: Methods of :func:`preactivation_bounds`.
METHODS = ("crown", "interval")
#: Norms of the input ball in :func:`preactivation_bounds_ball`.
BALL_NORMS = ("l2", "linf")

Bounds = dict[int, tuple[np.ndarray, np.ndarray]]


@dataclass
class Region:
    """The input set: the box ``[lower, upper]``, and within it the ball ``||x - center||_norm <= radius``
    when ``norm`` is ``"l2"`` (for ``"box"`` / ``"linf"`` the box is the region)."""

    lower: np.ndarray
    upper: np.ndarray
    norm: str = "box"
    center: np.ndarray | None = None
    radius: float = 0.0

    def support(self, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(min, max)`` of ``A @ x`` over the region, rowwise (before slack)."""
        if self.norm == "l2":
            mid, spread = A @ self.center, self.radius * np.linalg.norm(A, axis=1)
        else:
            c, r = (self.upper + self.lower) / 2, (self.upper - self.lower) / 2
            mid, spread = A @ c, np.abs(A) @ r
        return mid - spread, mid + spread


# -- elementwise activations: enclosing lines --------------------------------------------------

def _entry(op: Activation):
    if isinstance(op, Equilibrium) or op.function not in activations.names():
        raise UnsupportedLayerError([(op.name, -1, f"{op.kind} ({op.function!r}: no pre-activation bounds "
                                      "through it; local bounds support elementwise activations)")])
    return activations.get(op.function)


def _tent_max(A, B, a, b, w):
    """Largest value of ``g`` on ``[0, w]`` given ``g(t) <= A + a t`` and ``g(t) <= B + b (w - t)``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(a + b > 0, (B - A + b * w) / (a + b), 0.0)
    t = np.clip(np.nan_to_num(t), 0.0, w)
    return np.minimum(A + a * t, B + b * (w - t))


def relaxation(op: Activation, lo: np.ndarray, hi: np.ndarray):
    """Lines ``s_l x + c_l <= phi(x) <= s_u x + c_u`` valid for ``x`` in ``[lo, hi]``, elementwise.

    Returns ``(s_l, c_l, s_u, c_u)``.  ReLU and leaky ReLU get CROWN's lines (chord above, an adaptive
    tangent below).  Every other activation gets lines of the chord's slope ``s`` with intercepts from
    its derivative range ``[d_lo, d_hi]`` on the interval: ``g = phi - s x`` has ``g' in [d_lo - s,
    d_hi - s]``, so ``g`` lies under the two lines from its end values with those slopes (a tent) and
    above the two mirrored ones (docs/math.md §6.1).
    """
    entry = _entry(op)
    params = op.params
    d_lo, d_hi = entry.derivative_range(lo, hi, params)
    f_lo, f_hi = entry.evaluate(lo, params), entry.evaluate(hi, params)
    w = hi - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        chord = np.where(w > 0, (f_hi - f_lo) / np.where(w > 0, w, 1.0), d_lo)
    s = np.clip(chord, d_lo, d_hi)
    A, B = f_lo - s * lo, f_hi - s * hi
    c_u = _tent_max(A, B, d_hi - s, s - d_lo, w)
    c_l = -_tent_max(-A, -B, s - d_lo, d_hi - s, w)
    s_l, s_u = s.copy(), s.copy()
    if op.function in ("relu", "leaky_relu"):
        a = 0.0 if op.function == "relu" else entry.real(params, "negative_slope")
        cross = (lo < 0) & (hi > 0)
        adaptive = np.where(hi >= -lo, 1.0, a)  # the tangent line closer to the function
        if a <= 1.0:  # convex: the chord is the best upper line, any subgradient line a lower one
            s_l, c_l = np.where(cross, adaptive, s_l), np.where(cross, 0.0, c_l)
            c_u = np.where(cross, A, c_u)
        else:  # concave: the mirror image
            s_u, c_u = np.where(cross, adaptive, s_u), np.where(cross, 0.0, c_u)
            c_l = np.where(cross, A, c_l)
    widen = SLACK * (np.abs(A) + np.abs(B) + np.abs(s) * np.maximum(np.abs(lo), np.abs(hi))) \
        + entry.discontinuity(params)
    return s_l, c_l - widen, s_u, c_u + widen


def activation_image(op: Activation, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounds on ``phi(x)`` for ``x`` in ``[lo, hi]``: the end values where ``phi`` is monotone there,
    else the lines of :func:`relaxation` at their worst end."""
    entry = _entry(op)
    d_lo, d_hi = entry.derivative_range(lo, hi, op.params)
    f_lo, f_hi = entry.evaluate(lo, op.params), entry.evaluate(hi, op.params)
    s_l, c_l, s_u, c_u = relaxation(op, lo, hi)
    low = np.minimum(s_l * lo, s_l * hi) + c_l
    high = np.maximum(s_u * lo, s_u * hi) + c_u
    jump = entry.discontinuity(op.params)
    widen = SLACK * (np.abs(f_lo) + np.abs(f_hi)) + jump
    up, down = d_lo >= 0, d_hi <= 0
    low = np.where(up, np.maximum(low, f_lo - widen), np.where(down, np.maximum(low, f_hi - widen), low))
    high = np.where(up, np.minimum(high, f_hi + widen), np.where(down, np.minimum(high, f_lo + widen), high))
    return low, high


# -- interval propagation -----------------------------------------------------------------------

def _linear_interval(W, b, lo, hi):
    c, r = (hi + lo) / 2, (hi - lo) / 2
    absW = abs(W)
    mid = np.asarray(W @ c).ravel()
    spread = np.asarray(absW @ r).ravel()
    magnitude = np.asarray(absW @ np.maximum(np.abs(lo), np.abs(hi))).ravel()
    if b is not None:
        mid, magnitude = mid + b, magnitude + np.abs(b)
    widen = SLACK * magnitude
    return mid - spread - widen, mid + spread + widen


def _interval_node(network: Network, node: int, bounds: Bounds) -> tuple[np.ndarray, np.ndarray]:
    op, parents = network.op(node), network.parents(node)
    ins = [bounds[p] for p in parents]
    if isinstance(op, Activation):
        return activation_image(op, *ins[0])
    if isinstance(op, Affine):
        lo, hi = _linear_interval(op.weight, op.bias, *ins[0])
        if op.weight_err is not None:  # a weight folded at load: |(W* - W) x| <= E |x| (docs/math.md §10.3)
            e = 2.0 * np.asarray(abs(op.weight_err) @ np.maximum(np.abs(ins[0][0]), np.abs(ins[0][1]))).ravel()
            lo, hi = lo - e, hi + e
        return lo, hi
    if isinstance(op, Reshape):
        return ins[0]
    if isinstance(op, Add):
        lo, hi = sum(b[0] for b in ins), sum(b[1] for b in ins)
        widen = SLACK * sum(np.maximum(np.abs(b[0]), np.abs(b[1])) for b in ins)
        return lo - widen, hi + widen
    if isinstance(op, Concat):
        perm = concat_permutation([network.op(p).shape for p in parents], op.axis)
        return np.concatenate([b[0] for b in ins])[perm], np.concatenate([b[1] for b in ins])[perm]
    raise UnsupportedLayerError([(op.name, node, f"{op.kind} (no pre-activation bounds through it)")])


# -- linear bound propagation (CROWN) ------------------------------------------------------------

def _crown_node(network: Network, node: int, region: Region, bounds: Bounds, lines: dict):
    """Bounds on node ``node``'s value by back-substitution to the input (module docstring)."""
    size = network.op(node).size
    coef: dict[int, np.ndarray] = {node: np.vstack([np.eye(size), -np.eye(size)])}  # upper, then -lower
    const = np.zeros(2 * size)
    magnitude = np.zeros(2 * size)  # sum of |terms|, for the rounding slack
    for n in sorted(ancestors(network, node) | {node}, reverse=True):
        if n not in coef:
            continue
        A, op, parents = coef.pop(n), network.op(n), network.parents(n)
        if isinstance(op, Input):
            lo, hi = region.support(A)
            mag_in = np.abs(A) @ np.maximum(np.abs(region.lower), np.abs(region.upper))
            top = hi + const + SLACK * (magnitude + mag_in)
            return -top[size:], top[:size]
        if isinstance(op, Affine):
            W = op.weight
            passed = np.asarray((W.T @ A.T).T) if sp.issparse(W) else A @ W
            if op.weight_err is not None:  # A (W* - W) z, |.| <= |A| E max|z| (docs/math.md §10.3), both ends
                z = np.maximum(np.abs(bounds[parents[0]][0]), np.abs(bounds[parents[0]][1]))
                const += 2.0 * (np.abs(A) @ np.asarray(abs(op.weight_err) @ z).ravel())
            if op.bias is not None:
                const += A @ op.bias
                magnitude += np.abs(A) @ np.abs(op.bias)
            _push(coef, parents[0], passed)
        elif isinstance(op, Reshape):
            _push(coef, parents[0], A)
        elif isinstance(op, Add):
            for p in parents:
                _push(coef, p, A)
        elif isinstance(op, Concat):
            perm = concat_permutation([network.op(p).shape for p in parents], op.axis)
            stacked = np.empty_like(A)
            stacked[:, perm] = A
            offsets = np.cumsum([0] + [network.op(p).size for p in parents])
            for k, p in enumerate(parents):
                _push(coef, p, stacked[:, offsets[k]:offsets[k + 1]])
        elif isinstance(op, Activation):
            s_l, c_l, s_u, c_u = lines[n]
            pos, neg = np.maximum(A, 0.0), np.minimum(A, 0.0)
            const += pos @ c_u + neg @ c_l
            magnitude += pos @ np.abs(c_u) - neg @ np.abs(c_l)
            _push(coef, parents[0], pos * s_u + neg * s_l)
        else:
            raise UnsupportedLayerError([(op.name, n, f"{op.kind} (no pre-activation bounds through it)")])
    # No path to the input: the value is constant.
    top = const + SLACK * magnitude
    return -top[size:], top[:size]


def ancestors(network: Network, node: int) -> set[int]:
    """The nodes ``node`` depends on."""
    seen, todo = set(), list(network.parents(node))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(network.parents(n))
    return seen


def _push(coef: dict, node: int, A: np.ndarray) -> None:
    coef[node] = coef[node] + A if node in coef else A


# -- entry points ---------------------------------------------------------------------------------

def _check(network: Network, method: str) -> None:
    if method not in METHODS:
        raise LipSDPError(f"unknown pre-activation bound method {method!r}; choose from {', '.join(METHODS)}")
    bad = [(network.op(n).name, n, f"{network.op(n).kind} ({network.op(n).function!r}: no pre-activation "
            "bounds through it)") for n in network.activations()
           if isinstance(network.op(n), Equilibrium) or network.op(n).function not in activations.names()]
    if bad:
        raise UnsupportedLayerError(bad)


def _propagate(network: Network, region: Region, method: str) -> Bounds:
    _check(network, method)
    bounds: Bounds = {}
    lines: dict = {}
    for n in network.graph.nodes:
        op = network.op(n)
        if isinstance(op, Input):
            bounds[n] = (region.lower.copy(), region.upper.copy())
            continue
        lo, hi = _interval_node(network, n, bounds)
        if method == "crown" and isinstance(op, (Affine, Add, Concat)):
            c_lo, c_hi = _crown_node(network, n, region, bounds, lines)
            lo, hi = np.maximum(lo, c_lo), np.minimum(hi, c_hi)
        if isinstance(op, Activation) and method == "crown":
            lines[n] = relaxation(op, *bounds[network.parents(n)[0]])
        bounds[n] = (lo, hi)
    return bounds


def _region_box(network: Network, lower, upper) -> tuple[np.ndarray, np.ndarray]:
    lower = np.asarray(lower, dtype=np.float64).ravel()
    upper = np.asarray(upper, dtype=np.float64).ravel()
    n = network.input_dim
    if lower.shape != (n,) or upper.shape != (n,):
        raise LipSDPError(f"the input box has {lower.size} and {upper.size} entries; the network has {n} inputs")
    if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))) or np.any(lower > upper):
        raise LipSDPError("the input box needs finite bounds with lower <= upper")
    return lower, upper


def preactivation_bounds(network: Network, lower, upper, method: str = "crown") -> Bounds:
    """Sound bounds ``{node: (lo, hi)}`` on every node's value (flat float64) for inputs in ``[lower, upper]``.

    Parameters
    ----------
    network : Network
        Any graph of Affine, Reshape, Add, Concat and elementwise Activation nodes.
    lower, upper : array_like
        The input box, ``network.input_dim`` entries each (any shape that flattens to it).
    method : {"crown", "interval"}
        Linear bound propagation (tighter) or interval propagation (cheaper).

    Raises
    ------
    UnsupportedLayerError
        For implicit layers and activations that are not elementwise (GroupSort, Householder).
    """
    lower, upper = _region_box(network, lower, upper)
    return _propagate(network, Region(lower, upper), method)


def preactivation_bounds_ball(network: Network, center, radius: float, norm: str = "l2",
                              method: str = "crown") -> Bounds:
    """:func:`preactivation_bounds` on the ball ``||x - center||_norm <= radius`` (``norm`` "l2" or "linf").

    An l2 ball is bounded as a ball by CROWN (the dual norm of each linear bound's coefficients), not only
    as its bounding box.
    """
    if norm not in BALL_NORMS:
        raise LipSDPError(f"unknown region norm {norm!r}; choose from {', '.join(BALL_NORMS)}")
    radius = float(radius)
    if not (np.isfinite(radius) and radius >= 0):
        raise LipSDPError(f"the region's radius must be a finite number >= 0, got {radius}")
    center = np.asarray(center, dtype=np.float64).ravel()
    lower, upper = _region_box(network, center - radius, center + radius)
    # The box is rounded outwards so it holds the whole ball despite the subtraction's rounding.
    lower, upper = np.nextafter(lower, -np.inf), np.nextafter(upper, np.inf)
    region = Region(lower, upper, norm, center, radius) if norm == "l2" else Region(lower, upper)
    return _propagate(network, region, method)
