"""Monotonicity of outputs in inputs over a region: proved from Clarke-Jacobian bounds, or refuted by a witness.

``lipsdp.monotone(model, inputs=[0, 3], outputs=[1], center=x0, radius=0.1)`` asks whether
``d f_j / d x_i >= 0`` for every listed pair on the box (an l_inf ball ``center +- radius`` or
``[lower, upper]``).  A pair is

* **proved** when the lower Jacobian bound of :func:`lipsdp.jacobian.jacobian_bounds` is ``>= 0``
  on every leaf of a branch and bound over the box (every Clarke derivative is then ``>= 0``, so
  ``f_j`` is nondecreasing in ``x_i`` along every segment in the box: Lebourg's mean value theorem);
* **refuted** only with a concrete witness: an input ``x`` in the box where the network's derivative
  is negative *and* a pair ``x, x + h e_i`` in the box with ``f_j(x + h e_i) < f_j(x)``;
* **unknown** when neither happened within the time budget.

Witnesses are searched by sampling the box, a few finite-difference descent steps on the
derivative from the worst samples, and the centres of the boxes branch and bound could not prove.
docs/monotone.md has the method and the command line (:mod:`lipsdp.monotone_cli`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from lipsdp.bounds import jacobians
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.jacobian import jacobian_bounds, supported
from lipsdp.network import Network
from lipsdp.pipeline import load_model

__all__ = ["MonotoneResult", "monotone", "region_box"]


@dataclass
class MonotoneResult:
    """The answer for every ``(output, input)`` pair asked about.

    Attributes
    ----------
    status : str
        ``"proved"`` (every pair), ``"refuted"`` (some pair has a witness) or ``"unknown"``.
    pairs : list of dict
        Per pair: ``output``, ``input``, ``status``, ``min_lower_bound`` (smallest ``Jlo`` over the
        leaves, for proved pairs ``>= 0``), and for refuted ones ``witness`` (the input, flat),
        ``derivative`` (the network's ``d f_j / d x_i`` there) and ``secant`` (``h`` and
        ``f_j(x + h e_i) - f_j(x) < 0``).
    lower, upper : numpy.ndarray
        The box.
    boxes : int
        Boxes bounded by branch and bound.
    seconds : float
    complete : bool
        False when the time or box budget ended the search with pairs still unknown.
    """

    status: str
    pairs: list = field(default_factory=list)
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    boxes: int = 0
    seconds: float = 0.0
    complete: bool = True

    def to_dict(self) -> dict:
        """JSON-ready form (the box as lists)."""
        return {"status": self.status, "pairs": self.pairs, "boxes": self.boxes, "seconds": self.seconds,
                "complete": self.complete, "region": {"lower": self.lower.tolist(), "upper": self.upper.tolist()}}


def region_box(network: Network, center=None, radius=None, lower=None, upper=None) -> tuple[np.ndarray, np.ndarray]:
    """The box ``(lower, upper)``, flat, from an l_inf ball ``center +- radius`` or explicit ends (checked)."""
    d = network.input_dim
    if (center is None) == (lower is None) or (center is None) != (radius is None) or (lower is None) != (upper is None):
        raise LipSDPError("give the region as center and radius, or as lower and upper (one of the two)")
    if center is not None:
        c = np.asarray(center, np.float64).ravel()
        r = float(radius)
        if not (np.isfinite(r) and r >= 0):
            raise LipSDPError(f"the radius must be finite and >= 0, got {radius}")
        lower, upper = c - r, c + r
    lo, hi = (np.asarray(a, np.float64).ravel() for a in (lower, upper))
    if lo.shape != (d,) or hi.shape != (d,):
        raise LipSDPError(f"the region has {lo.size} and {hi.size} values but the model takes {d} inputs")
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
        raise LipSDPError("the region must be finite with lower <= upper")
    return lo, hi


def _indices(values, size: int, what: str) -> list[int]:
    given = np.atleast_1d(np.asarray(values))
    if given.size == 0 or not np.issubdtype(given.dtype, np.integer):
        raise LipSDPError(f"{what} indices must be whole numbers, got {values!r}")
    out = sorted({int(v) for v in given})
    if any(not 0 <= v < size for v in out):
        raise LipSDPError(f"{what} indices must lie in 0..{size - 1}, got {out}")
    return out


def _derivatives(network: Network, X: np.ndarray, pairs) -> np.ndarray:
    """``d f_j / d x_i`` at the rows of ``X``, one column per pair."""
    J = jacobians(network, X)
    return np.stack([J[:, j, i] for j, i in pairs], axis=1)


def _secant(network: Network, x, j: int, i: int, lo, hi) -> dict | None:
    """A step ``h`` along input ``i`` inside the box where ``f_j`` strictly decreases, or None."""
    width = hi[i] - lo[i]
    for frac in (1e-2, 1e-4, 1e-6):
        h = frac * width
        a, b = x.copy(), x.copy()
        if x[i] + h <= hi[i]:
            b[i] = x[i] + h
        else:
            a[i] = x[i] - h
        fa, fb = network.numpy_forward(np.stack([a, b]))[:, j]
        if h > 0 and fb - fa < -1e-12 * (1.0 + abs(fa)):
            return {"x": a.tolist(), "h": float(b[i] - a[i]), "difference": float(fb - fa)}
    return None


def _refute(network, X, pairs, open_pairs, lo, hi, found) -> None:
    """Record a confirmed witness in ``found`` for each open pair negative at some row of ``X``."""
    D = _derivatives(network, X, pairs)
    for k in list(open_pairs):
        for r in np.argsort(D[:, k])[:5]:
            if D[r, k] < 0 and k not in found:
                j, i = pairs[k]
                sec = _secant(network, X[r], j, i, lo, hi)
                if sec is not None:
                    found[k] = {"witness": X[r].tolist(), "derivative": float(D[r, k]), "secant": sec}
                    open_pairs.discard(k)


def _descend(network, X, pairs, open_pairs, lo, hi, found, steps: int = 20) -> None:
    """Finite-difference descent on each open pair's derivative from the worst sample (smooth models)."""
    D = _derivatives(network, X, pairs)
    eye, h = np.eye(len(lo)), 1e-5 * np.maximum(hi - lo, 1e-12)
    for k in list(open_pairs):
        x, step = X[int(np.argmin(D[:, k]))].copy(), 0.1 * (hi - lo)
        for _ in range(steps):
            probe = np.vstack([x + eye * h, x - eye * h])
            g = _derivatives(network, np.clip(probe, lo, hi), [pairs[k]])[:, 0]
            x = np.clip(x - step * np.sign(g[:len(x)] - g[len(x):]), lo, hi)
            step *= 0.8
        _refute(network, x[None, :], pairs, {k} & open_pairs, lo, hi, found)
        open_pairs -= set(found)


def _branch_and_bound(network, pairs, open_pairs, lo, hi, found, deadline, max_boxes):
    """Prove the open pairs box by box; returns (least Jlo per pair, boxes, pairs left unresolved)."""
    least = {k: np.inf for k in range(len(pairs))}
    queue, boxes = [(lo, hi, set(open_pairs))], 0
    while queue:
        if time.monotonic() > deadline or boxes >= max_boxes:
            return least, boxes, set().union(*(t for _, _, t in queue)) & open_pairs
        blo, bhi, todo = queue.pop(0)
        todo &= open_pairs
        if not todo:
            continue
        Jlo, _ = jacobian_bounds(network, blo, bhi)
        boxes += 1
        for k in todo:
            least[k] = min(least[k], float(Jlo[pairs[k]]))
        todo = {k for k in todo if Jlo[pairs[k]] < 0}
        if not todo:
            continue
        _refute(network, (0.5 * blo + 0.5 * bhi)[None, :], pairs, todo & open_pairs, lo, hi, found)
        open_pairs -= set(found)
        k = int(np.argmax(bhi - blo))
        mid = 0.5 * blo[k] + 0.5 * bhi[k]
        if not blo[k] < mid < bhi[k]:  # cannot split further in float64
            return least, boxes, (set().union(todo, *(t for _, _, t in queue))) & open_pairs
        queue.append((blo, np.where(np.arange(len(lo)) == k, mid, bhi), set(todo)))
        queue.append((np.where(np.arange(len(lo)) == k, mid, blo), bhi, set(todo)))
    return least, boxes, set()


def monotone(model, inputs, outputs, *, center=None, radius=None, lower=None, upper=None,
             time_limit: float = 10.0, samples: int = 512, max_boxes: int = 50_000, seed: int = 0,
             **load_options) -> MonotoneResult:
    """Prove or refute ``d f_j / d x_i >= 0`` on a box for every ``i`` in ``inputs``, ``j`` in ``outputs``.

    Parameters
    ----------
    model : path, torch module or Network
        As for :func:`lipsdp.certify` (``load_options``: ``activation``, ``input_shape``, ``trust_pickle``).
    inputs, outputs : int or sequence of int
        Indices into the flattened input and output.
    center, radius : array_like and float
        The l_inf ball ``[center - radius, center + radius]``; or
    lower, upper : array_like
        the box itself.
    time_limit : float
        Seconds for the search and the branch and bound together.
    samples, max_boxes, seed
        Random points tried as witnesses; the branch and bound's box budget; the sampling seed.

    Returns
    -------
    MonotoneResult
    """
    network, _ = load_model(model, **load_options)
    start = time.monotonic()  # the budget is for the search and the proof, not for loading
    network.validate()
    bad = supported(network)
    if bad:
        raise UnsupportedLayerError(bad)
    lo, hi = region_box(network, center, radius, lower, upper)
    ins, outs = _indices(inputs, network.input_dim, "input"), _indices(outputs, network.output_dim, "output")
    pairs = [(j, i) for j in outs for i in ins]
    open_pairs, found = set(range(len(pairs))), {}
    X = lo + (hi - lo) * np.random.default_rng(seed).random((samples, len(lo)))
    X = np.vstack([0.5 * lo + 0.5 * hi, X])
    _refute(network, X, pairs, open_pairs, lo, hi, found)
    least, boxes, unresolved = _branch_and_bound(network, pairs, open_pairs, lo, hi, found,
                                               start + time_limit, max_boxes)
    if unresolved:
        _descend(network, X, pairs, open_pairs, lo, hi, found)
    rows = []
    for k, (j, i) in enumerate(pairs):
        row = {"output": j, "input": i, "min_lower_bound": least[k] if np.isfinite(least[k]) else None}
        if k in found:
            row.update(status="refuted", **found[k])
        else:
            row["status"] = "unknown" if k in unresolved else "proved"
        rows.append(row)
    statuses = {r["status"] for r in rows}
    status = "refuted" if "refuted" in statuses else ("proved" if statuses == {"proved"} else "unknown")
    return MonotoneResult(status, rows, lo, hi, boxes, time.monotonic() - start,
                          not (unresolved - set(found)))

