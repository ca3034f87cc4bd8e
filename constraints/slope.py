"""Slope-restricted activations: the quadratic constraint of LipSDP.

An activation is slope-restricted in :math:`[\\alpha, \\beta]` when
:math:`\\alpha \\le (\\phi(a) - \\phi(b)) / (a - b) \\le \\beta` for all
:math:`a \\ne b`; for a differentiable :math:`\\phi` the sector is the range of
:math:`\\phi'` (mean value theorem).  Each neuron ``i`` then satisfies

.. math::

    (\\Delta w_i - \\alpha \\Delta v_i)(\\beta \\Delta v_i - \\Delta w_i) \\ge 0 ,

and with a multiplier :math:`t_i \\ge 0` it adds to the LMI

.. math::

    t_i F_i, \\qquad F_i = -2\\alpha\\beta\\, p_i p_i^T
        + (\\alpha+\\beta)(p_i q_i^T + q_i p_i^T) - 2 q_i q_i^T .

``neuron`` gives each neuron its own :math:`t_i` (LipSDP-Neuron, diagonal
:math:`T`); ``layer`` shares one per activation node (LipSDP-Layer).  Coupled
multipliers between neurons (LipSDP-Network) are unsound and not offered:
MATH.md section 1.2 has a two-neuron counterexample.

Sectors (exact, rounded outwards by 1e-10 where computed numerically):

=============== =====================================================
ReLU            [0, 1]
LeakyReLU(a)    [min(a, 1), max(a, 1)]
Tanh, Hardtanh  [0, 1]
Sigmoid         [0, 1/4]
ELU(a)          [min(0, a), max(1, a)]
Softplus        [0, 1]
SiLU            [-0.0998393..., 1.0998393...]  (phi'(x) + phi'(-x) = 1)
GELU (erf)      [Phi(-sqrt2) - sqrt2 phi(sqrt2), 1 - that] = [-0.1289..., 1.1289...]
GELU (tanh)     [-0.1289931..., 1.1289931...]
=============== =====================================================

References
----------
M. Fazlyab, A. Robey, H. Hassani, M. Morari, G. Pappas, "Efficient and Accurate
Estimation of Lipschitz Constants for Deep Neural Networks", NeurIPS 2019.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

from lipsdp.constraints.base import QCTerms, QuadraticConstraint, outer_terms

_MARGIN = 1e-10


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


@lru_cache(maxsize=None)
def _derivative_range(name: str) -> tuple[float, float]:
    """Min and max of phi' for the non-monotone smooth activations, rounded outwards."""
    from scipy.optimize import minimize_scalar

    if name == "gelu":
        # phi'(x) = Phi(x) + x phi(x); phi''(x) = phi(x)(2 - x^2) vanishes at +-sqrt(2).
        r2 = math.sqrt(2.0)
        lo = 0.5 * (1.0 + math.erf(-1.0)) - r2 * math.exp(-1.0) / math.sqrt(2.0 * math.pi)
        return lo - _MARGIN, 1.0 - lo + _MARGIN
    if name == "silu":
        def d(x):
            s = _sigmoid(x)
            return s * (1.0 + x * (1.0 - s))
    elif name == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)

        def d(x):
            t = np.tanh(c * (x + 0.044715 * x ** 3))
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
    else:  # pragma: no cover - programming error
        raise KeyError(name)
    res = minimize_scalar(d, bounds=(-4.0, -0.5), method="bounded", options={"xatol": 1e-12})
    lo = float(res.fun)
    # Both functions satisfy phi(x) - phi(-x) = x, so phi'(x) + phi'(-x) = 1.
    return lo - _MARGIN, 1.0 - lo + _MARGIN


class SlopeRestricted(QuadraticConstraint):
    """Elementwise activations with a slope sector ``[alpha, beta]`` (see module docstring).

    Shape: the node's pre-activation and output both have ``op.size`` entries.
    """

    functions = ("relu", "leaky_relu", "tanh", "sigmoid", "elu", "softplus", "hardtanh",
                 "silu", "gelu", "abs", "identity")
    citation = "Fazlyab et al., NeurIPS 2019 (LipSDP)"

    # -- the activation ------------------------------------------------
    def evaluate(self, x, op):
        f, p = op.function, op.params
        x = np.asarray(x, dtype=np.float64)
        if f == "relu":
            return np.maximum(x, 0.0)
        if f == "leaky_relu":
            return np.where(x >= 0, x, p.get("negative_slope", 0.01) * x)
        if f == "tanh":
            return np.tanh(x)
        if f == "sigmoid":
            return _sigmoid(x)
        if f == "elu":
            a = p.get("alpha", 1.0)
            return np.where(x > 0, x, a * np.expm1(np.minimum(x, 0.0)))
        if f == "softplus":
            b, thr = p.get("beta", 1.0), p.get("threshold", 20.0)
            return np.where(b * x > thr, x, np.logaddexp(0.0, b * x) / b)
        if f == "hardtanh":
            return np.clip(x, p.get("min_val", -1.0), p.get("max_val", 1.0))
        if f == "silu":
            return x * _sigmoid(x)
        if f == "gelu":
            if p.get("approximate", "none") == "tanh":
                return _gelu_tanh(x)
            from scipy.special import erf
            return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
        if f == "abs":
            return np.abs(x)
        if f == "identity":
            return x
        raise KeyError(f)

    def derivative(self, x, op):
        """``phi'(x)`` elementwise (a one-sided value at kinks), for sampled Jacobians."""
        f, p = op.function, op.params
        x = np.asarray(x, dtype=np.float64)
        if f == "relu":
            return (x > 0).astype(np.float64)
        if f == "leaky_relu":
            return np.where(x >= 0, 1.0, p.get("negative_slope", 0.01))
        if f == "tanh":
            return 1.0 - np.tanh(x) ** 2
        if f == "sigmoid":
            s = _sigmoid(x)
            return s * (1.0 - s)
        if f == "elu":
            return np.where(x > 0, 1.0, p.get("alpha", 1.0) * np.exp(np.minimum(x, 0.0)))
        if f == "softplus":
            b, thr = p.get("beta", 1.0), p.get("threshold", 20.0)
            return np.where(b * x > thr, 1.0, _sigmoid(b * x))
        if f == "hardtanh":
            return ((x > p.get("min_val", -1.0)) & (x < p.get("max_val", 1.0))).astype(np.float64)
        if f == "silu":
            s = _sigmoid(x)
            return s * (1.0 + x * (1.0 - s))
        if f == "gelu":
            if p.get("approximate", "none") == "tanh":
                c = math.sqrt(2.0 / math.pi)
                t = np.tanh(c * (x + 0.044715 * x ** 3))
                return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)
            from scipy.special import erf
            return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        if f == "abs":
            return np.sign(x)
        if f == "identity":
            return np.ones_like(x)
        raise KeyError(f)

    def sector(self, op) -> tuple[float, float]:
        """The slope sector ``(alpha, beta)`` of ``op``'s activation.

        ``op.params`` may override it with ``"alpha"``/``"beta"`` arrays of shape
        ``(op.size,)`` (per-neuron sectors, e.g. from local bounds).
        """
        f, p = op.function, op.params
        if "sector" in p:
            lo, hi = p["sector"]
            return lo, hi
        if f == "relu":
            return 0.0, 1.0
        if f == "leaky_relu":
            a = float(p.get("negative_slope", 0.01))
            return min(a, 1.0), max(a, 1.0)
        if f in ("tanh", "softplus"):
            return 0.0, 1.0
        if f == "hardtanh":
            return 0.0, (1.0 if p.get("max_val", 1.0) > p.get("min_val", -1.0) else 0.0)
        if f == "sigmoid":
            return 0.0, 0.25
        if f == "elu":
            a = float(p.get("alpha", 1.0))
            return min(0.0, a), max(1.0, a)
        if f == "silu":
            return _derivative_range("silu")
        if f == "gelu":
            return _derivative_range("gelu_tanh" if p.get("approximate", "none") == "tanh" else "gelu")
        if f == "abs":
            return -1.0, 1.0
        if f == "identity":
            return 1.0, 1.0
        raise KeyError(f)

    def lipschitz(self, op) -> float:
        lo, hi = self.sector(op)
        return float(np.max(np.maximum(np.abs(lo), np.abs(hi))))

    # -- the lifted QC -------------------------------------------------
    def terms(self, op, P, Q, formulation="neuron"):
        n = P.shape[0]
        lo, hi = self.sector(op)
        alpha = np.broadcast_to(np.asarray(lo, dtype=np.float64), (n,))
        beta = np.broadcast_to(np.asarray(hi, dtype=np.float64), (n,))
        if formulation == "neuron":
            mult, n_mult = np.arange(n), n
            labels = [f"{op.name}[{i}]" for i in range(n)]
        elif formulation == "layer":
            mult, n_mult, labels = np.zeros(n, dtype=np.int64), 1, [op.name]
        else:
            raise ValueError(f"unknown formulation {formulation!r}; use 'neuron' or 'layer'")
        parts = [outer_terms(P, Q, alpha + beta, mult), outer_terms(Q, Q, -np.ones(n), mult)]
        if np.any(alpha * beta != 0):
            parts.append(outer_terms(P, P, -alpha * beta, mult))
        rows, cols, vals, mults = (np.concatenate(x) for x in zip(*parts))
        # Factored: F_i = a_i b_i^T + b_i a_i^T with a = q - alpha p, b = beta p - q (rank 2).
        Da, Db = sp.diags(alpha), sp.diags(beta)
        factors = [((Q - Da @ P).tocsr(), (Db @ P - Q).tocsr(), np.ones(n), np.asarray(mult))]
        return QCTerms(rows, cols, vals, mults, n_mult, np.ones(n_mult, dtype=bool), labels, factors)
