"""Sound bounds on the Clarke Jacobian of a network over an input box, and the l_inf local bound.

Over a box ``X = [lower, upper]`` every element of the Clarke generalized Jacobian of the network
is a product of the layers' linear maps and diagonal matrices of activation slopes; each slope lies
in the range of ``phi'`` (the Clarke derivative at kinks) over the neuron's pre-activation interval.
Propagating intervals of matrices through the graph gives elementwise bounds ``Jlo <= J <= Jhi``
valid for every Jacobian in the box (Shi et al., NeurIPS 2022, treat the Jacobian as a network in
the same way; docs/monotone.md, docs/math.md §6.3).  From them:

* ``linf``: ``L_inf(X) <= max_i sum_j max(|Jlo_ij|, |Jhi_ij|)`` (Lebourg's mean value theorem), and
  where few neurons are unstable, the exact maximum over the vertices of the slope box (tighter);
* ``l2``: ``L_2(X) <= min(||A||_2, ||C||_2 + ||R||_2)`` with ``A = max(|Jlo|, |Jhi|)`` entrywise
  (``|J| <= A``), ``C`` the midpoint and ``R`` the radius of the interval matrix (``|J - C| <= R``).

Every operation rounds outward (matrix products with Higham's ``gamma_n`` bound, sums and
products one ulp outward, activation values and slopes with the catalogue's ``MARGIN``), so the
bounds hold for the real numbers, not only for float64 evaluation.  Branch and bound splits the
box along its widest input under a time budget and keeps the worst sub-box bound.
"""

from __future__ import annotations

import heapq
import math
import time
from typing import Callable

import numpy as np
import scipy.sparse as sp

from lipsdp import activations
from lipsdp.activations import MARGIN
from lipsdp.bounds import jacobians, proven_spectral_norm
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.network import Activation, Add, Affine, Concat, Input, Network, Reshape, concat_permutation
from lipsdp.preact import preactivation_bounds

__all__ = ["jacobian_bounds", "interval_values", "local_lipschitz_jacobian", "norm_of_bounds",
           "slope_ranges", "supported", "vertex_jacobians"]

_U = 2.0 ** -53        # unit roundoff of float64
_ETA = 2.0 ** -1074    # smallest subnormal: the absolute error floor of a product under underflow
#: Activations whose slope range on an interval is computed exactly; the rest use their sector.
_EVEN_BELL = ("tanh", "sigmoid")  # phi' even and decreasing in |x|


def _down(x):  # the next float below: a lower bound on the exact result of one rounded operation
    return np.nextafter(x, -np.inf)


def _up(x):
    return np.nextafter(x, np.inf)


def _split_signs(W):
    if sp.issparse(W):
        W = sp.csr_matrix(W)
        return W.maximum(0), W.minimum(0), abs(W)
    W = np.asarray(W, dtype=np.float64)
    return np.maximum(W, 0.0), np.minimum(W, 0.0), np.abs(W)


def _signed(lo, hi, nonneg, nonpos):
    """Undo the outward step where the exact value's sign is known: a sum of non-negative terms is >= 0.

    Outward rounding moves an exact 0 to -5e-324; without this, a lower bound that is exactly 0
    (a monotone model's Jacobian) could never prove ``>= 0``.
    """
    return np.where(nonneg, np.maximum(lo, 0.0), lo), np.where(nonpos, np.minimum(hi, 0.0), hi)


def _matmul_interval(W, lo: np.ndarray, hi: np.ndarray, E=None) -> tuple[np.ndarray, np.ndarray]:
    """Sound ``[W lo', W hi']`` hull of ``{W* X : lo <= X <= hi}``, ``|W* - W| <= E`` (docs/math.md §10.3; 0 if None).

    ``W+ lo + W- hi`` is the exact lower end; float64 evaluation of these dot products of length
    ``2n`` errs by at most ``gamma_2n |W| max(|lo|, |hi|) + 2n eta`` (Higham, Accuracy and Stability,
    §3.1 and 3.5); the bound is doubled to cover the rounding of the error term itself.  Where no
    term of the lower (upper) end is negative (positive), that end keeps its sign exactly.
    """
    Wp, Wn, Wa = _split_signs(W)
    n = W.shape[1]
    low = np.asarray(Wp @ lo + Wn @ hi)
    high = np.asarray(Wp @ hi + Wn @ lo)
    k = 2 * n + 2
    gamma = 2.0 * k * _U / (1.0 - k * _U)
    err = gamma * np.asarray(Wa @ np.maximum(np.abs(lo), np.abs(hi))) + 2.0 * k * _ETA + (
        0.0 if E is None else 2.0 * np.asarray(abs(E) @ np.maximum(np.abs(lo), np.abs(hi))))
    P, N = (Wp != 0).astype(np.float64), (Wn != 0).astype(np.float64)  # counts of terms of each sign
    nonneg = np.asarray(P @ (lo < 0) + N @ (hi > 0)) == 0
    nonpos = np.asarray(P @ (hi > 0) + N @ (lo < 0)) == 0
    return _signed(_down(low - err), _up(high + err), nonneg & (E is None), nonpos & (E is None))  # E: signs unknown


def _add_interval(pairs) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = pairs[0]
    for a, b in pairs[1:]:  # exact signs kept where every term has one
        lo, hi = _signed(_down(lo + a), _up(hi + b), (lo >= 0) & (a >= 0), (hi <= 0) & (b <= 0))
    return lo, hi


def _mul_interval(slo, shi, lo, hi) -> tuple[np.ndarray, np.ndarray]:
    """Hull of ``{s x}`` for ``s`` in ``[slo, shi]`` (a column per row) and ``x`` in ``[lo, hi]``, outward."""
    pairs = [(slo, lo), (slo, hi), (shi, lo), (shi, hi)]
    products = np.stack([a * b for a, b in pairs])
    # the exact sign of each product from its factors' signs (a rounded product may underflow to 0)
    pos = np.stack([(a == 0) | (b == 0) | ((a > 0) == (b > 0)) for a, b in pairs]).all(axis=0)
    neg = np.stack([(a == 0) | (b == 0) | ((a > 0) != (b > 0)) for a, b in pairs]).all(axis=0)
    return _signed(_down(products.min(axis=0)), _up(products.max(axis=0)), pos, neg)


def _widen(lo, hi):
    """Outward by the catalogue's margin: activation values and slopes are computed by libm."""
    return lo - MARGIN * (1.0 + np.abs(lo)), hi + MARGIN * (1.0 + np.abs(hi))


def supported(network: Network) -> list[tuple[str, int, str]]:
    """The nodes the Jacobian bounds cannot handle, as ``(name, node, kind)`` (empty when none)."""
    known = set(activations.names())
    out = []
    for n in network.graph.nodes:
        op = network.op(n)
        if op.implicit:
            out.append((op.name, n, f"{op.kind} (implicit layer: no Jacobian bounds)"))
        elif isinstance(op, Activation) and op.function not in known:
            out.append((op.name, n, f"{op.kind} ({op.function}: not an elementwise activation; "
                                    "Jacobian bounds need one slope per neuron)"))
        elif not isinstance(op, (Input, Affine, Reshape, Add, Concat, Activation)):
            out.append((op.name, n, f"{op.kind} (no Jacobian bound rule)"))
    return out


def _activation_values(op: Activation, lo, hi):
    entry = activations.get(op.function)
    alpha, beta = entry.sector(op.params)
    jump = entry.discontinuity(op.params)  # a framework's switch of formula (torch's Softplus threshold)
    if alpha >= 0.0:  # nondecreasing: the ends map to the ends
        low, high = _widen(entry.evaluate(lo, op.params), entry.evaluate(hi, op.params))
        return _down(low - jump), _up(high + jump)
    # Not monotone: phi(x) lies within K |x - c| of phi(c), K = max(|alpha|, |beta|).
    c = 0.5 * lo + 0.5 * hi
    r = _up(_up(np.maximum(_up(hi - c), _up(c - lo)) * max(abs(alpha), abs(beta))) + jump)
    mid = entry.evaluate(c, op.params)
    return _widen(_down(mid - r), _up(mid + r))


def interval_values(network: Network, lower, upper) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Sound elementwise bounds ``{node: (lo, hi)}`` on every node's value over the box (interval propagation)."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for n in network.graph.nodes:
        op, ps = network.op(n), network.parents(n)
        if isinstance(op, Input):
            out[n] = (np.asarray(lower, np.float64).ravel(), np.asarray(upper, np.float64).ravel())
        elif isinstance(op, Affine):
            lo, hi = _matmul_interval(op.weight, *out[ps[0]], op.weight_err)
            out[n] = (lo, hi) if op.bias is None else _add_interval([(lo, hi), (op.bias, op.bias)])
        elif isinstance(op, Reshape):
            out[n] = out[ps[0]]
        elif isinstance(op, Add):
            out[n] = _add_interval([out[p] for p in ps])
        elif isinstance(op, Concat):
            perm = concat_permutation([network.op(p).shape for p in ps], op.axis)
            out[n] = tuple(np.concatenate([out[p][i] for p in ps])[perm] for i in (0, 1))
        else:
            out[n] = _activation_values(op, *out[ps[0]])
    return out


def slope_ranges(op: Activation, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron ``[slo, shi]`` containing every Clarke derivative of ``phi`` on ``[lo_i, hi_i]``.

    Exact for piecewise-linear activations (stable neurons get their one slope) and for tanh and
    sigmoid (``phi'`` is even and decreasing in ``|x|``); the activation's global sector otherwise
    (a slope-restricted function's Clarke derivatives lie in its sector).
    """
    entry, f, params = activations.get(op.function), op.function, op.params
    alpha, beta = entry.sector(params)
    slo, shi = np.full(lo.shape, float(alpha)), np.full(lo.shape, float(beta))
    if f in ("relu", "leaky_relu"):
        a = 0.0 if f == "relu" else entry.param(params, "negative_slope")
        a = np.broadcast_to(np.asarray(a, np.float64), lo.shape)
        pos, neg = lo > 0, hi < 0
        slo, shi = np.minimum(a, 1.0), np.maximum(a, 1.0)
        slo, shi = np.where(pos, 1.0, np.where(neg, a, slo)), np.where(pos, 1.0, np.where(neg, a, shi))
    elif f == "abs":
        sign = np.where(lo > 0, 1.0, np.where(hi < 0, -1.0, np.nan))
        slo, shi = np.where(np.isnan(sign), -1.0, sign), np.where(np.isnan(sign), 1.0, sign)
    elif f == "hardtanh":
        a, b = entry.param(params, "min_val"), entry.param(params, "max_val")
        inside, outside = (lo > a) & (hi < b), (hi < a) | (lo > b)
        slo, shi = np.where(inside, shi, slo), np.where(outside, slo, shi)
    elif f in _EVEN_BELL:
        near = np.clip(0.0, lo, hi)
        top = entry.derivative(near, params)
        bottom = np.minimum(entry.derivative(lo, params), entry.derivative(hi, params))
        bottom, top = _widen(bottom, top)
        slo, shi = np.clip(bottom, alpha, beta), np.clip(top, alpha, beta)
    return slo, shi


def _values(network: Network, lower, upper, values):
    own, values = interval_values(network, lower, upper), values or {}
    return {n: (np.maximum(b[0], values[n][0]), np.minimum(b[1], values[n][1])) if n in values else b
            for n, b in own.items()}


def _forward(network: Network, slopes: dict, copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Intervals of ``d node / d x`` from the input forward (columns: the inputs, ``copies`` times over;
    a slope array of shape ``(size, copies * n0)`` gives each copy its own slopes)."""
    d = network.input_dim
    J: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for n in network.graph.nodes:
        op, ps = network.op(n), network.parents(n)
        if isinstance(op, Input):
            J[n] = (np.tile(np.eye(d), (1, copies)),) * 2
        elif isinstance(op, Affine):
            J[n] = _matmul_interval(op.weight, *J[ps[0]], op.weight_err)
        elif isinstance(op, Reshape):
            J[n] = J[ps[0]]
        elif isinstance(op, Add):
            J[n] = _add_interval([J[p] for p in ps])
        elif isinstance(op, Concat):
            perm = concat_permutation([network.op(p).shape for p in ps], op.axis)
            J[n] = tuple(np.vstack([J[p][i] for p in ps])[perm] for i in (0, 1))
        else:
            slo, shi = (s if s.ndim == 2 else s[:, None] for s in slopes[n])
            J[n] = _mul_interval(slo, shi, *J[ps[0]])
    return J[network.output]


def _pullback(network: Network, n: int, G, slopes: dict) -> list:
    """The intervals of ``d out / d parent`` through node ``n``, one per parent, from ``G = d out / d n``."""
    op, ps = network.op(n), network.parents(n)
    if isinstance(op, Affine):
        lo, hi = _matmul_interval(op.weight.T, G[0].T, G[1].T, None if op.weight_err is None else op.weight_err.T)
        return [(lo.T, hi.T)]
    if isinstance(op, Concat):
        perm = concat_permutation([network.op(p).shape for p in ps], op.axis)
        inv = np.empty_like(perm)
        inv[perm] = np.arange(len(perm))
        offsets = np.cumsum([0] + [network.op(p).size for p in ps])
        return [tuple(g[:, inv][:, offsets[i]:offsets[i + 1]] for g in G) for i in range(len(ps))]
    if isinstance(op, Activation):
        slo, shi = slopes[n]
        return [_mul_interval(slo[None, :], shi[None, :], *G)]
    return [G for _ in ps]  # Reshape, Add


def _backward(network: Network, slopes: dict) -> tuple[np.ndarray, np.ndarray]:
    """Intervals of ``d out / d node`` from the output back (rows: the outputs), read at the input."""
    m = network.output_dim
    adj: dict[int, list] = {network.output: [(np.eye(m), np.eye(m))]}
    for n in sorted(network.graph.nodes, reverse=True):
        if n not in adj:
            continue  # the output does not depend on this node
        G = _add_interval(adj.pop(n))
        if n == network.input:
            return G
        for p, g in zip(network.parents(n), _pullback(network, n, G, slopes)):
            adj.setdefault(p, []).append(g)
    d = network.input_dim
    return np.zeros((m, d)), np.zeros((m, d))


def _slopes(network: Network, lower, upper, values, method: str) -> dict:
    bad = supported(network)
    if bad:
        raise UnsupportedLayerError(bad)
    if values is None and method == "crown":
        values = preactivation_bounds(network, lower, upper, "crown")
    elif values is None and method != "interval":
        raise LipSDPError(f"unknown bounding method {method!r}; choose crown or interval")
    own = _values(network, lower, upper, values)
    return {n: slope_ranges(network.op(n), *own[network.parents(n)[0]]) for n in network.activations()}


def jacobian_bounds(network: Network, lower, upper, values=None, method: str = "crown",
                    vertex_budget: int = 2 ** 16) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise ``(Jlo, Jhi)``, shape ``(m, n0)``, containing every Clarke Jacobian of the network on the box.

    Interval products lose different correlations when evaluated from the input forward and from
    the output back; both hulls are sound, so their intersection is returned, intersected again with
    the hull of the Jacobians at the slope box's vertices where those are few enough
    (:func:`vertex_jacobians`).  ``values`` are sound bounds ``{node: (lo, hi)}`` on the nodes' values,
    intersected with :func:`interval_values`; when None, ``method`` ``"crown"`` takes them from linear
    bound propagation (:func:`lipsdp.preact.preactivation_bounds`), ``"interval"`` uses those alone.
    """
    return _box(network, _slopes(network, lower, upper, values, method), vertex_budget)[:2]


def _box(network: Network, slopes: dict, budget: int):
    flo, fhi = _forward(network, slopes)
    blo, bhi = _backward(network, slopes)
    Jlo, Jhi = np.maximum(flo, blo), np.minimum(fhi, bhi)
    vertices = vertex_jacobians(network, slopes, budget)
    if vertices is not None:
        Jlo, Jhi = np.maximum(Jlo, vertices[0].min(axis=1)), np.minimum(Jhi, vertices[1].max(axis=1))
    return Jlo, Jhi, vertices


def vertex_jacobians(network: Network, slopes: dict, budget: int = 2 ** 16):
    """Enclosures ``(lo, hi)``, shape ``(m, vertices, n0)``, of the Jacobian at each vertex of the slope box.

    ``J`` is affine in each activation's slope matrix ``D_k`` with the others fixed (every path passes
    a node once): each entry's extremes, and the maximum of any norm (convex in each ``D_k``), over the
    product of slope boxes are at its vertices (docs/math.md §6.3).  Only neurons whose slope range is
    not one point double the count; None when the vertices times the inputs exceed ``budget`` (the
    batch is that many columns).
    """
    free = [(n, i) for n, (lo, hi) in slopes.items() for i in np.flatnonzero(lo < hi)]
    d, count = network.input_dim, 2 ** len(free)
    if count * d > budget:
        return None
    bits = (np.arange(count)[:, None] >> np.arange(len(free))) & 1 == 1  # (vertex, free neuron)
    batch = {n: np.repeat(lo[:, None], count, axis=1) for n, (lo, _) in slopes.items()}
    for k, (n, i) in enumerate(free):
        batch[n][i, bits[:, k]] = slopes[n][1][i]
    batch = {n: (np.repeat(S, d, axis=1),) * 2 for n, S in batch.items()}  # column b * d + j: vertex b, input j
    Jlo, Jhi = _forward(network, batch, copies=count)
    return Jlo.reshape(len(Jlo), count, d), Jhi.reshape(len(Jhi), count, d)


def _vertex_norm(vertices) -> float:
    """``max`` over the vertices of the largest row sum of ``max(|lo|, |hi|)``, rounded up."""
    d = vertices[0].shape[2]
    total = float(np.maximum(np.abs(vertices[0]), np.abs(vertices[1])).sum(axis=2).max(initial=0.0))
    # a float sum of d non-negative terms is within gamma_d of the exact one
    return float(_up(total * (1.0 + 2.0 * d * _U / (1.0 - d * _U)))) if math.isfinite(total) else math.inf


def norm_of_bounds(Jlo: np.ndarray, Jhi: np.ndarray, norm: str = "linf") -> float:
    """An upper bound, rounded up, on ``||J||`` for every ``J`` with ``Jlo <= J <= Jhi`` (l_inf->l_inf or l2)."""
    A = np.maximum(np.abs(Jlo), np.abs(Jhi))
    if not np.all(np.isfinite(A)):
        return math.inf
    if norm == "linf":  # fsum rounds each row's sum to nearest: one step up makes it an upper bound
        return max((float(_up(math.fsum(row))) for row in A), default=0.0)
    if norm == "l2":  # |J| <= A, and J = C + E with |E| <= R: both bound ||J||_2; the second tends to ||J||
        C = 0.5 * Jlo + 0.5 * Jhi
        R = _up(np.maximum(_up(Jhi - C), _up(C - Jlo)))
        whole, centre, spread = (proven_spectral_norm(M) for M in (A, C, R))
        split = math.inf if centre is None or spread is None else float(_up(centre + spread))
        return min(math.inf if whole is None else float(whole), split)
    raise LipSDPError(f"unknown norm {norm!r} for Jacobian bounds; choose linf or l2")


def _box_norm(network, lo, hi, norm, values, budget):
    slopes = _slopes(network, lo, hi, None, values) if isinstance(values, str) else \
        _slopes(network, lo, hi, values(network, lo, hi), "interval")
    Jlo, Jhi, vertices = _box(network, slopes, budget)
    bound = norm_of_bounds(Jlo, Jhi, norm)
    if norm == "linf" and vertices is not None:
        bound = min(bound, _vertex_norm(vertices))
    return bound, Jlo, Jhi


def _point_norm(network: Network, x: np.ndarray, norm: str) -> float:
    J = jacobians(network, x[None, :])[0]
    return float(np.abs(J).sum(axis=1).max()) if norm == "linf" else float(np.linalg.norm(J, 2))


def local_lipschitz_jacobian(network: Network, lower, upper, norm: str = "linf", time_limit: float | None = None,
                             *, values: Callable | str = "crown", max_boxes: int = 100_000,
                             rtol: float = 1e-6, vertex_budget: int = 2 ** 16) -> tuple[float, dict]:
    """A sound bound on the local Lipschitz constant of ``network`` on the box ``[lower, upper]``.

    Parameters
    ----------
    network : Network
    lower, upper : array_like
        The box, flat ``(input_dim,)``, ``lower <= upper``.
    norm : {"linf", "l2"}
        The same norm on inputs and outputs.
    time_limit : float, optional
        Seconds for branch and bound (split the worst box along its widest input until the budget,
        ``max_boxes`` or a gap of ``rtol`` to the sampled lower bound is reached); None: one pass.
    values : {"crown", "interval"} or callable
        How the nodes' value bounds on each box are found: linear bound propagation (default), interval
        propagation, or ``values(network, lo, hi) -> {node: (lo, hi)}`` (intersected with the interval ones).
    vertex_budget : int
        ``linf``: where (slope vertices) x (inputs) is at most this, the bound is also taken as the
        maximum over the vertices (:func:`vertex_jacobians`), and the smaller of the two is kept.

    Returns
    -------
    bound : float
        Upper bound on ``sup ||f(x) - f(y)|| / ||x - y||`` over ``x != y`` in the box.
    details : dict
        ``method``, ``boxes`` (leaves), ``lower_bound`` (largest Jacobian norm at a box centre),
        ``Jlo``/``Jhi`` of the unsplit box, ``seconds``, ``complete`` (False when the budget stopped it).
    """
    lo, hi = (np.asarray(a, np.float64).ravel() for a in (lower, upper))
    if lo.shape != (network.input_dim,) or hi.shape != lo.shape or not np.all(lo <= hi):
        raise LipSDPError(f"the box must be two arrays of {network.input_dim} values with lower <= upper")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise LipSDPError("the box must be finite")
    start = time.monotonic()
    bound, Jlo, Jhi = _box_norm(network, lo, hi, norm, values, vertex_budget)
    found = _point_norm(network, 0.5 * lo + 0.5 * hi, norm)
    heap, count, complete = [(-bound, 0, lo, hi)], 1, True
    while time_limit is not None and heap and -heap[0][0] > found * (1.0 + rtol):
        if time.monotonic() - start > time_limit or count >= max_boxes:
            complete = False
            break
        parent, _, blo, bhi = heapq.heappop(heap)
        k = int(np.argmax(bhi - blo))
        mid = 0.5 * blo[k] + 0.5 * bhi[k]
        for a, b in ((blo[k], mid), (mid, bhi[k])):
            slo, shi = blo.copy(), bhi.copy()
            slo[k], shi[k] = a, b
            value = min(-parent, _box_norm(network, slo, shi, norm, values, vertex_budget)[0])  # both hold on the sub-box
            found = max(found, _point_norm(network, 0.5 * slo + 0.5 * shi, norm))
            count += 1
            heapq.heappush(heap, (-value, count, slo, shi))
    if time_limit is not None:
        bound = min(bound, -heap[0][0])
    name = values if isinstance(values, str) else "custom"
    return bound, {"method": f"jacobian-interval({name})" + ("+bab" if time_limit is not None else ""),
                   "norm": norm, "boxes": len(heap), "lower_bound": found, "Jlo": Jlo, "Jhi": Jhi,
                   "seconds": time.monotonic() - start, "complete": complete,
                   "caveats": activations.caveats(network)}
