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
docs/math.md §1.2 has a two-neuron counterexample.

The activations, their evaluation and their exact sectors come from the
catalogue :mod:`lipsdp.activations` (one module per activation); this class
only turns a sector into the lifted constraint.

References
----------
M. Fazlyab, A. Robey, H. Hassani, M. Morari, G. Pappas, "Efficient and Accurate
Estimation of Lipschitz Constants for Deep Neural Networks", NeurIPS 2019.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp import activations
from lipsdp.constraints.base import QCTerms, QuadraticConstraint, joined_outer_terms


class SlopeRestricted(QuadraticConstraint):
    """Elementwise activations with a slope sector ``[alpha, beta]`` (see module docstring).

    One instance serves every entry of :mod:`lipsdp.activations`.
    Shape: the node's pre-activation and output both have ``op.size`` entries.
    """

    functions = activations.names()
    citation = "Fazlyab et al., NeurIPS 2019 (LipSDP)"

    # -- the activation ------------------------------------------------
    def evaluate(self, x, op):
        return activations.get(op.function).evaluate(np.asarray(x, dtype=np.float64), op.params)

    def derivative(self, x, op):
        """``phi'(x)`` elementwise (a one-sided value at kinks), for sampled Jacobians."""
        return activations.get(op.function).derivative(np.asarray(x, dtype=np.float64), op.params)

    def sector(self, op) -> tuple[float, float]:
        """The slope sector ``(alpha, beta)`` of ``op``'s activation.

        ``op.params`` may override it with ``"sector": (alpha, beta)``, scalars or
        arrays of shape ``(op.size,)`` (per-neuron sectors, e.g. from local bounds).
        """
        if "sector" in op.params:
            lo, hi = op.params["sector"]
            return lo, hi
        return activations.get(op.function).sector(op.params)

    def lipschitz(self, op) -> float:
        lo, hi = self.sector(op)
        return float(np.max(np.maximum(np.abs(lo), np.abs(hi))))

    # -- the lifted QC -------------------------------------------------
    def entry_count(self, op, P, Q) -> int:
        """How many COO entries :meth:`terms` stores (at most): ``2 nnz(p) nnz(q) + nnz(q)^2`` per neuron, and
        ``nnz(p)^2`` more where ``alpha beta != 0`` (one entry per place, :func:`outer_terms`)."""
        nP, nQ = (np.diff(sp.csr_matrix(X).indptr).astype(np.int64) for X in (P, Q))
        lo, hi = self.sector(op)
        square = np.broadcast_to(np.asarray(lo, dtype=np.float64) * np.asarray(hi, dtype=np.float64) != 0, nP.shape)
        return int(np.sum(2 * nP * nQ + nQ * nQ + np.where(square, nP * nP, 0)))

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
        parts = [(P, Q, alpha + beta, mult), (Q, Q, -np.ones(n), mult)]
        if np.any(alpha * beta != 0):
            parts.append((P, P, -alpha * beta, mult))
        rows, cols, vals, mults = joined_outer_terms(parts)
        # Factored: F_i = a_i b_i^T + b_i a_i^T with a = q - alpha p, b = beta p - q (rank 2).
        Da, Db = sp.diags(alpha), sp.diags(beta)
        factors = [((Q - Da @ P).tocsr(), (Db @ P - Q).tocsr(), np.ones(n), np.asarray(mult))]
        return QCTerms(rows, cols, vals, mults, n_mult, np.ones(n_mult, dtype=bool), labels, factors)
