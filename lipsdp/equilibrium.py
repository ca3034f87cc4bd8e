r"""Implicit (equilibrium / DEQ) layers: solving them and differentiating them.

An implicit layer maps its input ``u`` (an affine map ``U x + b`` of the
network's values) to the solution ``z`` of

.. math:: z = \phi(F z + u),

with ``phi`` elementwise and slope-restricted in :math:`[\alpha, \beta]` and
``F`` the feedback matrix (:class:`~lipsdp.network.Equilibrium`).  In the LFT
form of docs/math.md §3 the node's pre-activation rows read its own block,
``P_k = L_u + F Q_k`` (:func:`lipsdp.lifting.lift`), so ``C_vw`` is not
triangular (docs/math.md §5.2), and the slope QC of LipSDP enters the LMI unchanged.

This module is the numerical part only, low in the layering so that the graph
(:mod:`lipsdp.network`) and the cheap bounds (:mod:`lipsdp.bounds`) can evaluate
implicit layers.  The proof that an equilibrium exists and is unique, from the
verified multipliers, is certification and lives in :mod:`lipsdp.wellposed`.
The activation ``phi`` is passed in as an object with ``evaluate(v, op)`` and
``derivative(v, op)`` (what :func:`lipsdp.network.activation_function` returns),
so nothing here depends on where activations are defined.

The forward pass (:func:`solve`) is Picard iteration ``z <- phi(F z + u)`` with
semismooth Newton steps on ``z - phi(F z + u) = 0`` and a backtracking line search;
Jacobians follow from the implicit function theorem,
:math:`\partial z / \partial u = (I - D F)^{-1} D`, :math:`D = \operatorname{diag}\phi'(F z + u)`.

References
----------
M. Revay, R. Wang, I. R. Manchester, "Lipschitz Bounded Equilibrium Networks", arXiv:2010.01732, 2020.
E. Winston, J. Z. Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
S. Bai, J. Z. Kolter, V. Koltun, "Deep Equilibrium Models", NeurIPS 2019.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp.errors import WellPosednessError


def dense(F) -> np.ndarray:
    """The feedback matrix ``F`` as a dense float64 array (it may be stored sparse)."""
    return F.toarray() if sp.issparse(F) else np.asarray(F, dtype=np.float64)


def _max_abs(a: np.ndarray) -> np.ndarray:
    return np.abs(a).max(axis=1, initial=0.0)


def _converged(z: np.ndarray, norm: np.ndarray, tol: float) -> np.ndarray:
    """``max|r| <= tol (1 + max|z|)`` per sample (False where the residual is not finite)."""
    return np.isfinite(norm) & (norm <= tol * (1.0 + _max_abs(z)))


def _newton_steps(J: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``J_i s_i = r_i`` for every sample; ``ok`` is False where ``J_i`` is singular or ``s_i`` not finite."""
    ok = np.ones(len(r), dtype=bool)
    try:
        step = np.linalg.solve(J, r[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:  # one singular system must not spoil the others: per sample
        step = np.zeros_like(r)
        for i in range(len(r)):
            try:
                step[i] = np.linalg.solve(J[i], r[i])
            except np.linalg.LinAlgError:
                ok[i] = False
    ok &= np.all(np.isfinite(step), axis=1)
    return step, ok


def _line_search(z, r, norm, step, ok, residual_norm) -> np.ndarray:
    """The next iterates: ``z - a step`` for the largest ``a = 2^-i`` that decreases ``max|r|`` enough
    (Armijo, factor ``1 - 1e-4 a``), else the Picard step ``z - r = phi(F z + u)``."""
    new = z - r
    accepted = ~ok
    a = 1.0
    for _ in range(30):
        if accepted.all():
            break
        trial = z - a * step
        good = ~accepted & (residual_norm(trial) <= (1.0 - 1e-4 * a) * norm)
        new[good] = trial[good]
        accepted |= good
        a *= 0.5
    return new


def solve(op, u: np.ndarray, activation, tol: float = 1e-12,
          max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Equilibria ``z = phi(F z + u)`` of a batch ``u`` (shape ``(batch, size)``).

    Newton steps ``z <- z - a (I - D F)^{-1} r`` on the residual ``r = z - phi(F z + u)``
    with backtracking on ``||r||``, and a Picard step ``z <- phi(F z + u)`` wherever
    the Newton system is singular or the line search fails.  A sample has converged
    when ``max|r| <= tol (1 + max|z|)``.

    Parameters
    ----------
    op : Equilibrium
        The layer (``feedback``, ``params``, ``size``).
    u : ndarray, shape (batch, size)
    activation
        ``phi``: ``evaluate(v, op)`` and ``derivative(v, op)`` (:func:`lipsdp.network.activation_function`).

    Returns
    -------
    z : ndarray, shape (batch, size)
    converged : ndarray of bool, shape (batch,)
    """
    F = dense(op.feedback)
    u = np.asarray(u, dtype=np.float64).reshape(len(u), -1)
    eye = np.eye(u.shape[1])

    def residual(z, uu):
        v = z @ F.T + uu
        return v, z - activation.evaluate(v, op)

    z = np.zeros_like(u)
    v, r = residual(z, u)
    norm = _max_abs(r)
    done = norm <= tol * (1.0 + _max_abs(z))
    for _ in range(max_iter):
        if done.all():
            break
        act = ~done
        J = eye - activation.derivative(v[act], op)[:, :, None] * F[None]
        step, ok = _newton_steps(J, r[act])
        ua = u[act]
        z[act] = _line_search(z[act], r[act], norm[act], step, ok, lambda t: _max_abs(residual(t, ua)[1]))
        v, r = residual(z, u)
        norm = _max_abs(r)
        done = _converged(z, norm, tol)
    return z, done


def equilibrium(op, u: np.ndarray, activation, strict: bool = False, **options) -> np.ndarray:
    """The equilibria of :func:`solve`; rows that did not converge are NaN (``strict``: an error)."""
    z, done = solve(op, u, activation, **options)
    if not done.all():
        if strict:
            raise WellPosednessError(f"implicit layer {op.name!r}: no equilibrium found for "
                                     f"{int((~done).sum())} of {len(done)} inputs (is it well-posed?)")
        z[~done] = np.nan
    return z


def jacobian(op, u: np.ndarray, z: np.ndarray, Ju: np.ndarray, activation) -> np.ndarray:
    """Implicit function theorem: ``dz/dx = (I - D F)^{-1} D du/dx`` at equilibria ``z``.

    ``u``, ``z``: shape ``(batch, size)``; ``Ju``: ``(batch, size, n0)``; rows of ``z``
    that are NaN (no equilibrium) give NaN Jacobians.
    """
    F = dense(op.feedback)
    D = activation.derivative(z @ F.T + u, op)
    n = F.shape[0]
    J = np.full(np.shape(Ju), np.nan)
    ok = np.all(np.isfinite(z), axis=1)
    if ok.any():
        A = np.eye(n)[None] - D[ok][:, :, None] * F[None]
        J[ok] = np.linalg.solve(A, D[ok][:, :, None] * np.asarray(Ju)[ok])
    return J

