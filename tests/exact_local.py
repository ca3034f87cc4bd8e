"""The exact local l_inf Lipschitz constant of a tiny ReLU MLP on a box, by enumerating activation patterns.

On the box the network is piecewise linear: each activation pattern ``s`` (one bit per hidden
neuron) whose region ``{x in box : sign of every pre-activation agrees with s}`` has an interior
gives the Jacobian ``W_L D_s ... D_1 W_0``.  The l_inf -> l_inf constant on the (convex) box is the
largest ``max_i sum_j |J_ij|`` over the patterns with a full-dimensional region: one LP per pattern
(``scipy.optimize.linprog``: maximise a margin ``t`` with ``sigma_k (w_k x + b_k) >= t`` in the box),
pruned layer by layer so that only prefixes feasible so far are extended.  Exponential; for nets with
at most ~24 hidden neurons.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog


def _interior(A: np.ndarray, c: np.ndarray, lower, upper) -> bool:
    """Whether ``{x in [lower, upper] : A x + c > 0}`` has an interior point (margin t > tiny)."""
    if len(A) == 0:
        return True
    d = A.shape[1]
    scale = np.maximum(np.abs(A).sum(axis=1), 1.0)
    # variables (x, t); maximise t subject to -(A x + c)/scale + t <= 0, t <= 1
    A_ub = np.hstack([-A / scale[:, None], np.ones((len(A), 1))])
    res = linprog(np.r_[np.zeros(d), -1.0], A_ub=A_ub, b_ub=c / scale,
                  bounds=[(lo, hi) for lo, hi in zip(lower, upper)] + [(None, 1.0)], method="highs")
    return res.status == 0 and -res.fun > 1e-9


def exact_local_linf(weights, biases, lower, upper) -> float:
    """``max over x in the box of ||J(x)||_inf`` for ``W_L relu(... relu(W_0 x + b_0)) + b_L``."""
    lower, upper = np.asarray(lower, float), np.asarray(upper, float)
    d = len(lower)
    # a partial pattern: (affine map of the current layer's input: M x + m, constraints A x + c > 0)
    frontier = [(np.eye(d), np.zeros(d), np.zeros((0, d)), np.zeros(0))]
    for W, b in zip(weights[:-1], biases[:-1]):
        nxt = []
        for M, m, A, c in frontier:
            P, p = W @ M, W @ m + b  # pre-activations as affine maps of x
            partial = [(np.zeros((0, d)), np.zeros(0), [])]
            for k in range(len(P)):  # extend neuron by neuron, keeping feasible prefixes only
                grown = []
                for A2, c2, signs in partial:
                    for s in (1.0, -1.0):
                        A3, c3 = np.vstack([A2, s * P[k]]), np.r_[c2, s * p[k]]
                        if _interior(np.vstack([A, A3]), np.r_[c, c3], lower, upper):
                            grown.append((A3, c3, signs + [s > 0]))
                partial = grown
            for A3, c3, signs in partial:
                D = np.array(signs, float)
                nxt.append((D[:, None] * P, D * p, np.vstack([A, A3]), np.r_[c, c3]))
        frontier = nxt
    return max(float(np.abs(weights[-1] @ M).sum(axis=1).max()) for M, _, _, _ in frontier)
