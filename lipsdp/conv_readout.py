"""The conv chain's flatten + linear read-out, proven in floating point (docs/math.md §7.4, "Verification").

The read-out ``W`` (``q`` rows, ``C`` channels times the last image's positions) is bounded by a channel
supply: ``W^T W <= t X_L (x) I_space``.  With any ``Y > 0`` it follows from two small proofs,
``t I_q - W (Y (x) I) W^T > 0`` (``q x q``) and ``[[X_L, I], [I, Y]] > 0`` (``2C x 2C``, so ``X_L > Y^-1``).
The solver's ``Y`` is only a guess: when it is (nearly) singular or indefinite the proofs are tried again
on a regularised ``Y'`` (its eigenvalues clipped from below); ``t`` and ``X_L`` are derived from ``Y'``,
so the bound stays rigorous whichever ``Y'`` is used.  The ``Y`` that passed is returned with ``t`` and
``X_L``: ``lipsdp verify`` proves the same two matrices again (:func:`prove_read_out`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lipsdp.floatproof import SAFETY, dense_shifted_cholesky, gamma


def prove_negative_definite(M: np.ndarray, abs_M: np.ndarray, terms: int) -> bool:
    """Prove the exact matrix ``M`` (computed as the float ``M`` within ``2 gamma_terms abs_M`` entrywise)
    negative definite: the shifted Cholesky test of docs/math.md §10 (Higham, Thm 10.3), as
    :func:`lipsdp.verify.rigorous_negative_definite` does on the unrolled LMI."""
    H = -M
    n = H.shape[0]
    if not np.all(np.isfinite(H)):
        return False
    delta_f = float(np.linalg.norm(2.0 * gamma(terms) * abs_M)) * SAFETY
    c = 2.0 * (gamma(n + 1) * float(np.abs(np.diag(H)).sum()) + delta_f) * SAFETY + np.finfo(float).tiny
    return dense_shifted_cholesky(H, delta_f, c)


def _sym(P: np.ndarray) -> np.ndarray:
    return 0.5 * (P + P.T)


def tail_matrix(chain, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W (Y (x) I) W^T = sum_cd Y_cd W_c W_d^T`` and the same with absolute values."""
    C = chain.layers[-1].out_shape[0]
    Wc = chain.tail.reshape(chain.tail.shape[0], C, -1)
    A = np.einsum("icn,cd,jdn->ij", Wc, Y, Wc, optimize=True)
    abs_A = np.einsum("icn,cd,jdn->ij", np.abs(Wc), np.abs(Y), np.abs(Wc), optimize=True)
    return 0.5 * (A + A.T), abs_A


def _tail_terms(chain) -> int:
    """Longest chain of roundings in one entry of ``W (Y (x) I) W^T``: the sum over channels and positions."""
    return chain.tail.shape[1] + chain.layers[-1].out_shape[0] + 8


def _balance(Y: np.ndarray) -> float:
    """The power of two ``s`` nearest ``sqrt(lambda_min(Y) lambda_max(Y))`` (1 unless ``Y > 0``): the
    congruence ``diag(sqrt(s) I, I / sqrt(s))`` maps ``[[X, I], [I, Y]]`` to ``[[s X, I], [I, Y / s]]``, exact in
    floating point, with both diagonal blocks' spectra around 1 when ``X`` is near ``Y^-1``."""
    mu = np.linalg.eigvalsh(Y)
    if not (mu[0] > 0 and np.all(np.isfinite(mu))):
        return 1.0
    return 2.0 ** int(np.clip(round(0.5 * (np.log2(mu[0]) + np.log2(mu[-1]))), -500, 500))


def _coupled(X_L: np.ndarray, Y: np.ndarray, s: float) -> bool:
    """Whether ``[[s X_L, I], [I, Y / s]] > 0`` is proven (``s`` a power of two), hence ``X_L > Y^-1``."""
    Xs, Ys = X_L * s, Y / s
    if not (np.array_equal(Xs / s, X_L) and np.array_equal(Ys * s, Y)):  # under- or overflow: not exact
        return False
    eye = np.eye(Y.shape[0])
    block = np.block([[Xs, eye], [eye, Ys]])
    return prove_negative_definite(-block, np.abs(block), 8)


@dataclass
class ReadOut:
    """A proven read-out bound ``W^T W <= t X_L (x) I_space``, with the ``Y`` both proofs used."""

    t: float
    X_L: np.ndarray
    Y: np.ndarray


def prove_read_out(chain, Y: np.ndarray, X_L: np.ndarray, t: float) -> str | None:
    """Prove ``[[X_L, I], [I, Y]] > 0`` and ``t I - W (Y (x) I) W^T > 0`` for the float matrices as given;
    None when both hold, else the reason."""
    q = chain.tail.shape[0]
    if not any(_coupled(X_L, Y, s) for s in (1.0, *(_balance(Y) * f for f in (1.0, 0.5, 2.0)))):
        return "the read-out's supply X_L >= Y^-1 is not proven"
    A, abs_A = tail_matrix(chain, Y)
    if not prove_negative_definite(A - t * np.eye(q), abs_A + t * np.eye(q), _tail_terms(chain)):
        return "the read-out's Gram bound W^T W <= t X_L (x) I is not proven"
    return None


def least_proving(prove, etas) -> object | None:
    """The first ``eta`` of the grid whose candidate proves, refined to within 2x of the least that does
    (the excess of the read-out's supply is what the last layer's block must absorb)."""
    for eta in etas:
        if (found := prove(eta)) is not None:
            return next((x for x in map(prove, eta / 2.0 ** np.arange(6, 0, -1)) if x is not None), found)
    return None


def _supply(Y: np.ndarray) -> np.ndarray | None:
    """A proven ``X_L`` with ``X_L > Y^-1``: ``(1 + eta) Y^-1`` (relative, so every direction keeps its size),
    proven on ``[[s X_L, I], [I, Y / s]]`` with ``s`` a power of two balancing the two blocks (an exact
    congruence, ``diag(sqrt(s) I, I / sqrt(s))``)."""
    mu, V = np.linalg.eigh(Y)
    if not mu[0] > 0:
        return None
    X = _sym((V / mu) @ V.T)
    s = _balance(Y)

    def prove(eta: float) -> np.ndarray | None:
        X_try = X * (1.0 + eta)
        return X_try if _coupled(X_try, Y, s) else None
    return least_proving(prove, (1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2))


def _gain(chain, Y: np.ndarray) -> float | None:
    """A proven ``t`` with ``t I - W (Y (x) I) W^T > 0``, within 2x (in its excess) of the least that proves."""
    A, abs_A = tail_matrix(chain, Y)
    q, terms = A.shape[0], _tail_terms(chain)
    t = max(float(np.linalg.eigvalsh(A)[-1]), 0.0)

    def prove(eta: float) -> float | None:
        t_try = t * (1.0 + eta) + np.finfo(float).tiny
        return t_try if prove_negative_definite(A - t_try * np.eye(q), abs_A + t_try * np.eye(q), terms) else None
    return least_proving(prove, (1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2))


def regularised(Y: np.ndarray, floor: float) -> np.ndarray:
    """``Y`` with its eigenvalues raised to at least ``floor`` times the largest (symmetric, positive
    definite when the largest is positive).  Raising ``Y`` raises ``W (Y (x) I) W^T`` by at most
    ``floor lambda_max(Y) ||W||^2``, so a small floor costs as little in ``t``."""
    mu, V = np.linalg.eigh(Y)
    return _sym((V * np.maximum(mu, floor * mu[-1])) @ V.T)


def _direct(chain, Y: np.ndarray) -> ReadOut | None:
    """The solver's ``Y`` as it is: ``X_L = Y^-1 + eta max|Y^-1| I`` and ``t = lambda_max (1 + eta)``, the
    least ``eta`` of a 100x grid that proves (what every net that verified before this module got)."""
    C, q = Y.shape[0], chain.tail.shape[0]
    try:
        X = _sym(np.linalg.inv(Y))
    except np.linalg.LinAlgError:
        return None
    eye = np.eye(C)
    X_L = None
    for eta in (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        X_try = X + eta * float(np.abs(X).max()) * eye
        block = np.block([[X_try, eye], [eye, Y]])
        if prove_negative_definite(-block, np.abs(block), 8):
            X_L = X_try
            break
    if X_L is None:
        return None
    A, abs_A = tail_matrix(chain, Y)
    t = max(float(np.linalg.eigvalsh(A)[-1]), 0.0)
    for eta in (1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        t_try = t * (1.0 + eta) + np.finfo(float).tiny
        if prove_negative_definite(A - t_try * np.eye(q), abs_A + t_try * np.eye(q), _tail_terms(chain)):
            return ReadOut(t_try, X_L, Y)
    return None


#: Floors (relative to the largest eigenvalue) tried on the solver's ``Y`` when it does not prove as it is.
FLOORS = (1e-14, 1e-12, 1e-10, 1e-8, 1e-6)


def _inverse(X_sol: np.ndarray) -> np.ndarray | None:
    """``X^-1`` of the solver's read-out supply (eigenvalues floored at ``1e-14`` of the largest), or None."""
    X = _sym(np.asarray(X_sol, dtype=np.float64))
    if not (np.all(np.isfinite(X)) and X.size):
        return None
    nu, V = np.linalg.eigh(X)
    if not nu[-1] > 0:
        return None
    return _sym((V / np.maximum(nu, 1e-14 * nu[-1])) @ V.T)


def read_outs(chain, Y_sol: np.ndarray, X_sol: np.ndarray | None = None):
    """Proven read-outs ``W^T W <= t X_L (x) I_space`` (:class:`ReadOut`), best guess first, derived lazily.

    1. The solver's ``Y`` (symmetrised) as it is (:func:`_direct`): every net that verified before.
    2. Candidate ``Y'``, each with the balanced, relative proofs (:func:`_supply`, :func:`_gain`): the
       solver's ``Y``; the inverse of the solver's read-out supply ``X_sol`` (the ``X_L`` the layers' blocks
       were solved for, when the solver's ``Y`` and ``X_L`` do not match); the solver's ``Y`` with its
       eigenvalues floored (:data:`FLOORS`).  Every one is proven for the ``Y'`` it uses, so the caller may
       take any of them (:func:`lipsdp.conv_lmi.verify_chain` takes the first whose layers also prove).
    """
    Y = _sym(np.asarray(Y_sol, dtype=np.float64))
    if not np.all(np.isfinite(Y)):
        return
    if (got := _direct(chain, Y)) is not None:
        yield got
    if not np.linalg.eigvalsh(Y)[-1] > 0:
        return
    candidates = [lambda: Y, lambda: None if X_sol is None else _inverse(X_sol)]
    candidates += [lambda f=f: regularised(Y, f) for f in FLOORS]
    for make in candidates:
        Yr = make()
        if Yr is not None and (X_L := _supply(Yr)) is not None and (t := _gain(chain, Yr)) is not None:
            yield ReadOut(t, X_L, Yr)


def read_out(chain, Y_sol: np.ndarray, X_sol: np.ndarray | None = None) -> ReadOut | None:
    """The first of :func:`read_outs`, None when none proves."""
    return next(read_outs(chain, Y_sol, X_sol), None)


def tail_gain(chain, Y_sol: np.ndarray) -> tuple[float, np.ndarray] | None:
    """``(t, X_L)`` of :func:`read_out` (None when it fails)."""
    got = read_out(chain, Y_sol)
    return None if got is None else (got.t, got.X_L)
