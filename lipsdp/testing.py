"""Conformance checks for third-party quadratic constraints (like scikit-learn's ``check_estimator``).

>>> from lipsdp.constraints import get_constraint
>>> from lipsdp.network import Activation
>>> check_constraint(get_constraint("relu"), Activation("a", "ReLU", (4,), function="relu"))
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _unit_rows(n: int, offset: int, total: int) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(n), (np.arange(n), offset + np.arange(n))), shape=(n, total))


def constraint_values(qc, op, v1: np.ndarray, v2: np.ndarray, formulation: str = "neuron") -> np.ndarray:
    """``z^T F_j z`` for every multiplier ``j``, with ``z = [v1 - v2; phi(v1) - phi(v2)]``.

    ``v1, v2`` have shape ``(batch, op.size)``; the result ``(batch, n_mult)``.
    """
    n = op.size
    terms = qc.terms(op, _unit_rows(n, 0, 2 * n), _unit_rows(n, n, 2 * n), formulation)
    dz = np.hstack([v1 - v2, qc.evaluate(v1, op) - qc.evaluate(v2, op)])
    return np.stack([np.bincount(terms.mult, weights=terms.vals * d[terms.rows] * d[terms.cols],
                                 minlength=terms.n_mult) for d in dz])


def check_constraint(qc, op, samples: int = 2000, seed: int = 0, scale: float = 3.0, rtol: float = 1e-9,
                     formulation: str = "neuron") -> None:
    """Raise ``AssertionError`` unless ``qc`` holds on sampled true (input, output) pairs of ``op``.

    Checks, for random pairs ``v1, v2`` (Gaussian, near-equal, equal-in-some-coordinates):

    - each sign-constrained multiplier's form ``z^T F_j z >= 0``;
    - each free multiplier's form ``z^T F_j z == 0`` (both signs are allowed, so it must vanish);
    - every ``F_j`` is symmetric and the terms have consistent shapes.
    """
    rng = np.random.default_rng(seed)
    n = op.size
    terms = qc.terms(op, _unit_rows(n, 0, 2 * n), _unit_rows(n, n, 2 * n), formulation)
    for name in ("rows", "cols", "vals", "mult"):
        arr = getattr(terms, name)
        if arr.shape != terms.rows.shape:
            raise AssertionError(f"{qc!r}: terms.{name} has shape {arr.shape}, expected {terms.rows.shape}")
    if terms.mult.size and (terms.mult.min() < 0 or terms.mult.max() >= terms.n_mult):
        raise AssertionError(f"{qc!r}: multiplier index out of range")
    if len(terms.nonneg) != terms.n_mult:
        raise AssertionError(f"{qc!r}: nonneg has {len(terms.nonneg)} entries for {terms.n_mult} multipliers")
    F = sp.csr_matrix((terms.vals, (terms.rows, terms.mult * 2 * n + terms.cols)),
                      shape=(2 * n, 2 * n * terms.n_mult)).toarray().reshape(2 * n, terms.n_mult, 2 * n)
    if not np.allclose(F, F.transpose(2, 1, 0), atol=1e-12):
        raise AssertionError(f"{qc!r}: a multiplier matrix F_j is not symmetric")
    v1 = scale * rng.standard_normal((samples, n))
    v2 = np.concatenate([
        scale * rng.standard_normal((samples // 2, n)),
        v1[samples // 2:] + 1e-3 * rng.standard_normal((samples - samples // 2, n)),
    ])
    # Ties and shared coordinates are where sorting-type activations are most fragile.
    mask = rng.random((samples, n)) < 0.2
    v2 = np.where(mask, v1, v2)
    vals = constraint_values(qc, op, v1, v2, formulation)
    size = (np.abs(v1 - v2).sum(axis=1, keepdims=True) ** 2 + 1.0)
    tol = rtol * size * (1 + np.abs(terms.vals).max(initial=0))
    bad_nonneg = (vals < -tol) & terms.nonneg[None, :]
    bad_free = (np.abs(vals) > tol) & ~terms.nonneg[None, :]
    if bad_nonneg.any():
        i, j = np.argwhere(bad_nonneg)[0]
        raise AssertionError(f"{qc!r} violated for {op.function}: multiplier {terms.labels[j]} gives "
                             f"{vals[i, j]:.3e} < 0 at v1={v1[i][:4]}, v2={v2[i][:4]}")
    if bad_free.any():
        i, j = np.argwhere(bad_free)[0]
        raise AssertionError(f"{qc!r} violated for {op.function}: free multiplier {terms.labels[j]} gives "
                             f"{vals[i, j]:.3e} != 0")
