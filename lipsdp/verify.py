"""Turning a solver's multipliers into a verified bound (docs/math.md §1.4 and §10).

A solver's status and objective are never a certificate: SCS returns slightly
infeasible points and its objective can lie *below* the true optimum.  So:

1. **Project** sign-constrained multipliers onto ``y >= 0``.
2. **Repair** ``rho``: for fixed multipliers the best ``rho`` is an eigenvalue
   problem.  With ``M(0, y) = [[P, Q], [Q^T, R]]`` (input block first),
   ``M(rho, y) <= 0  iff  R < 0  and  rho >= lambda_max(P - Q R^{-1} Q^T)``.
3. **Inflate** ``rho_hat = rho (1 + eta)`` with growing ``eta`` until
4. a **rigorous floating-point test** proves ``-M(rho_hat, y) > 0``: a shifted
   Cholesky factorisation with Higham's backward-error bound (Thm 10.3 of
   *Accuracy and Stability of Numerical Algorithms*) plus a bound on the error
   of building ``M`` in floating point.  On a layer chain both the repair and the
   test run block by block along the chain (:class:`lipsdp.chain.Band`): time and
   memory linear in the depth, never a dense ``n x n`` matrix.
5. **Report** ``L = sqrt(rho_hat)`` rounded *up* to a float.

If no candidate passes, there is no certificate and no number.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from lipsdp.chain import Band, band_cholesky, band_first_schur
from lipsdp.floatproof import dense_shifted_cholesky
from lipsdp.lmi import LMIProblem

_U = 2.0 ** -53
_SAFETY = 2.0
#: Largest LMI (rows) tested densely when it is a chain: below it the dense factorisation is cheap
#: (a few hundred Mflop) and the band's one-off index work over every term would not pay for itself.
DENSE_MAX = 1024


def _gamma(k: int) -> float:
    return k * _U / (1.0 - k * _U)


@dataclass
class Verification:
    """Outcome of :func:`verify`.

    Attributes
    ----------
    verified : bool
    bound : float or None
        ``sqrt(rho)`` rounded up; None when nothing was verified.
    rho : float or None
        The verified ``rho_hat``.
    x : ndarray or None
        The verified variable vector (``rho_hat`` and the projected, possibly
        scaled multipliers): ``M(x) <= 0`` holds exactly.
    method : str
        ``"float-cholesky"`` (rigorous floating-point test).
    inflation : float
        Relative inflation ``eta`` that was needed.
    margin : float
        The shift ``c`` proven: ``-M(x) - c I`` has a Cholesky factor.
    message : str
    seconds : float
    """

    verified: bool
    bound: float | None
    rho: float | None
    x: np.ndarray | None
    method: str
    inflation: float
    margin: float
    message: str
    seconds: float


def round_up_sqrt(rho) -> float:
    """Smallest float ``L`` with ``L * L >= rho`` exactly (in rationals); ``rho`` a float or Fraction."""
    if rho <= 0:
        return 0.0
    target = Fraction(rho)
    L = math.sqrt(float(target))
    while Fraction(L) ** 2 < target:
        L = math.nextafter(L, math.inf)
    return L


def input_schur(lmi: LMIProblem, y: np.ndarray, band=None) -> np.ndarray | None:
    """``S = P - Q R^{-1} Q^T`` of ``M(0, y)`` on the input block, or None unless ``R < 0``.

    ``M(in, y) <= 0`` iff ``R < 0`` and the input-block term dominates ``S``:
    ``rho I >= S`` (l2) or ``diag(lambda_in) >= S`` (l_inf).  On a layer chain (``band``, or
    :func:`band_of` when omitted) ``R`` is eliminated block by block from the last one
    (:func:`lipsdp.chain.band_first_schur`): linear in the depth, no dense ``n x n`` matrix.
    """
    x = np.concatenate([np.zeros(lmi.n_in), y])
    n0 = lmi.input_dim
    band = chosen_band(lmi) if band is None else band
    if band:
        diagonal, off = band.chain.band_blocks(-band.matrix(x))  # blocks of -M(0, y)
        Z = band_first_schur(diagonal, off)
        return None if Z is None else -diagonal[0] + Z.T @ Z
    M0 = lmi.matrix(x)
    P = M0[:n0, :n0]
    if lmi.n == n0:
        return P
    try:
        Lc = sla.cholesky(-M0[n0:, n0:], lower=True)
    except sla.LinAlgError:
        return None
    Z = sla.solve_triangular(Lc, M0[n0:, :n0], lower=True)
    return P + Z.T @ Z


def best_rho(lmi: LMIProblem, y: np.ndarray, band=None) -> float | None:
    """Smallest ``rho`` with ``M(rho, y) <= 0`` (in floating point), or None if no ``rho`` works.

    ``y`` holds the multipliers (variables ``1:``); ``rho`` is variable 0.
    """
    S = input_schur(lmi, y, band)
    if S is None:
        return None
    try:  # rho G >= S with the input metric G (docs/math.md §10.1): a generalised eigenvalue
        top = _largest_eigenvalue(S, lmi.input_metric)
    except (sla.LinAlgError, ValueError):
        return None
    return max(top, 0.0)


def _largest_eigenvalue(S, G=None) -> float:
    """The largest eigenvalue of ``S`` (of ``S x = l G x`` with ``G``), by LAPACK's default subset driver, then
    its alternatives: ``dsyevr`` can fail with "Internal Error" on ill-conditioned input (the 20-layer SLL
    stack of tests/test_lipschitz_layers.py, scipy 1.17), where ``dsyevx`` and the full ``dsyevd`` do not.
    The value only sets ``rho`` before the rigorous test, which proves whatever is chosen."""
    n0 = S.shape[0]
    last = None
    for driver in (None, "evx", "evd") if G is None else (None, "gvd"):  # None: evr (gvx with G), on a subset
        subset = {"subset_by_index": [n0 - 1, n0 - 1]} if driver in (None, "evx") else {}
        try:
            return float(sla.eigh(S, G, eigvals_only=True, driver=driver, **subset)[-1])
        except sla.LinAlgError as exc:
            last = exc
    raise last


def _repair_input(lmi: LMIProblem, lam: np.ndarray, y: np.ndarray, band=None) -> np.ndarray | None:
    """Smallest input variables (``[rho]`` or ``lambda_in``, starting from ``lam``) that make ``M <= 0``."""
    if lmi.n_in == 1:
        rho = best_rho(lmi, y, band)
        return None if rho is None else np.array([rho])
    S = input_schur(lmi, y, band)
    if S is None:
        return None
    lam = np.maximum(lam, 0.0)
    shift = max(_largest_eigenvalue(S - np.diag(lam)), 0.0)
    return lam + shift


def chosen_band(lmi: LMIProblem) -> Band | None:
    """The :class:`Band` the tests use by default: :func:`band_of` above :data:`DENSE_MAX` rows, else None."""
    return band_of(lmi) if lmi.n > DENSE_MAX else None


def band_of(lmi: LMIProblem) -> Band | None:
    """The :class:`Band` of ``lmi`` when ``M(x)`` is block-tridiagonal for every ``x`` with at least two
    blocks, else None (the dense test then runs).  Kept on the LMI: later tests reuse it."""
    if len(lmi.blocks) < 2 or any(b.size == 0 for b in lmi.blocks):
        return None
    # Like LMIProblem's cached properties, valid while its arrays are not replaced (nothing edits them
    # in place); a replaced array means a new Band.
    parts = (lmi.rows, lmi.cols, lmi.var, lmi.vals, lmi.const, lmi.const_abs, lmi.lift_err)
    cached = lmi.__dict__.get("_band")
    if cached is None or any(a is not b for a, b in zip(cached[0], parts)):
        cached = (parts, Band(lmi))
        lmi.__dict__["_band"] = cached
    return cached[1] if cached[1].ok else None


def _error_terms(lmi: LMIProblem, x: np.ndarray, H: np.ndarray) -> tuple[float, float]:
    """``(||Delta_build||_F, shift c)`` for ``H = -M(x)`` (see :func:`rigorous_negative_definite`)."""
    n = lmi.n
    K = lmi.max_entry_terms + lmi.const_terms + 8
    delta = 2.0 * _gamma(K) * lmi.abs_matrix(x)
    lift = lmi.lifting_error(x)
    if lift is not None:
        delta = delta + lift
    delta_f = float(np.linalg.norm(delta)) * _SAFETY
    c = 2.0 * (_gamma(n + 1) * float(np.abs(np.diag(H)).sum()) + delta_f) * _SAFETY + np.finfo(float).tiny
    return delta_f, c


def _band_terms(lmi: LMIProblem, band: Band, x: np.ndarray, H: np.ndarray) -> tuple[float, float]:
    """:func:`_error_terms` on the band buffer ``H`` of ``-M(x)``: the same ``K`` and norms; the shift with
    ``gamma`` of the block factorisation's longest inner product (``Band.inner``) instead of ``n``."""
    delta = band.error(x, 2.0 * _gamma(band.terms + lmi.const_terms + 8))
    delta_f = float(np.sqrt(np.dot(band.weight, delta * delta))) * _SAFETY
    tr = float(np.abs(H[band.diagonal]).sum())
    return delta_f, 2.0 * (_gamma(band.inner + 1) * tr + delta_f) * _SAFETY + np.finfo(float).tiny


def shift_needed(lmi: LMIProblem, x: np.ndarray, band: Band | None | bool = None) -> float:
    """The shift ``c`` the rigorous test of ``M(x)`` uses (what the input block needs as margin)."""
    band = chosen_band(lmi) if band is None else band
    if band:
        return _band_terms(lmi, band, x, -band.matrix(x))[1]
    return _error_terms(lmi, x, -lmi.matrix(x))[1]


def rigorous_negative_definite(lmi: LMIProblem, x: np.ndarray,
                               band: Band | None | bool = None) -> tuple[bool, float]:
    """Prove that the exact ``M(x)`` is negative definite, or fail.

    ``H = -M(x)`` is built in float64; its construction error is bounded
    entrywise by ``2 gamma_K |M|_abs`` (plus the lifting's own rounding bound).
    With ``c > 2 (gamma_{n+1} tr|H| + ||Delta||_F)``, a successful float Cholesky
    ``R^T R = H - c I + E`` with ``|E| <= gamma_{n+1} |R^T||R|`` proves ``H > 0``
    whenever ``c > gamma_{n+1} ||R||_F^2 + ||Delta||_F + 4u(max H_ii + c)``.
    The error terms are doubled for safety (docs/math.md §10).

    On a layer chain the same test runs block by block along the chain
    (:func:`lipsdp.chain.band_cholesky`; docs/math.md §10): the same ``H`` and bound, with
    ``gamma_{m+1}`` for ``m`` the longest inner product of the block factorisation (two neighbouring
    blocks) in place of ``gamma_{n+1}``, in time and memory linear in the depth.  ``band``: the
    chain's :class:`Band` (None: :func:`chosen_band`; False forces the dense factorisation).

    Returns
    -------
    ok : bool
    c : float
        The proven shift (0 when not proven).
    """
    n = lmi.n
    x = np.asarray(x, dtype=np.float64)
    band = chosen_band(lmi) if band is None else (band or None)
    if band is not None:
        Hb = -band.matrix(x)
        if not np.all(np.isfinite(Hb)):
            return False, 0.0
        delta_f, c = _band_terms(lmi, band, x, Hb)
        fro2 = band_cholesky(*band.chain.band_blocks(Hb), c)
        if fro2 is None:
            return False, 0.0
        max_diag = float(np.abs(Hb[band.diagonal]).max())
        inner = band.inner  # Higham's gamma needs the longest inner product: two blocks, not n
    else:
        H = -lmi.matrix(x)
        if not np.all(np.isfinite(H)):
            return False, 0.0
        delta_f, c = _error_terms(lmi, x, H)
        ok = dense_shifted_cholesky(H, delta_f, c)
        return ok, (c if ok else 0.0)
    rhs = (_gamma(inner + 1) * fro2 + delta_f + 4.0 * _U * (max_diag + c)) * _SAFETY
    return bool(c > rhs), (c if c > rhs else 0.0)


def _lowest_passing(lmi, prepared, etas, max_inflation, v, k, t0, fast=False, band=None):
    """The lowest bound among the candidates, each at the smallest inflation in ``etas`` where it
    passes, or None.

    Each rigorous test is a dense Cholesky factorisation, the verifier's main cost, so a candidate is first
    tried at the largest inflation and dropped if it fails there, and otherwise its smallest passing
    inflation is bisected (more inflation only adds to the input block's margin).  With ``fast``
    the smallest inflation is tried first: most points pass there at once.
    """
    etas = [e for e in etas if e <= max_inflation]
    if not etas:
        return None

    def attempt(lam, yc, c_needed, eta):
        lam_hat = lam * (1.0 + eta) + 4.0 * c_needed
        xc = np.concatenate([lam_hat, yc])
        ok, c = rigorous_negative_definite(lmi, xc, band)
        if not ok:
            return None
        return sum((Fraction(a) * Fraction(b) for a, b in zip(lam_hat, v[:k])), Fraction(0)), xc, c, eta

    best = None
    for lam, yc, c_needed in prepared:
        found = attempt(lam, yc, c_needed, etas[0]) if fast else None
        if found is None:
            found = attempt(lam, yc, c_needed, etas[-1])
            if found is None:
                continue
            lo, hi = (0 if fast else -1), len(etas) - 1  # etas[lo] fails (or none tried), etas[hi] passes
            while hi - lo > 1:
                mid = (lo + hi) // 2
                trial = attempt(lam, yc, c_needed, etas[mid])
                if trial is None:
                    lo = mid
                else:
                    hi, found = mid, trial
        if best is None or found[0] < best[0]:
            best = found
    if best is None:
        return None
    total, xc, c, eta = best
    return Verification(True, round_up_sqrt(total), float(total), xc * v, "float-cholesky", eta, c,
                        f"verified: -M - {c:.2e} I has a Cholesky factor "
                        f"(input multipliers inflated by {eta:.0e})", time.perf_counter() - t0)


def verify(lmi: LMIProblem, x: np.ndarray, *, max_inflation: float = 1e-3,
           scale: np.ndarray | None = None, candidates: int | None = None) -> Verification:
    """Re-derive and rigorously verify a bound from a solver's variable vector ``x = (in, y)``.

    Only the multipliers ``y`` are trusted as a starting point; the input
    variables (``rho``, or ``lambda_in`` for l_inf) are recomputed.  Candidates
    ``y`` (as given, with a small positive floor on sign-constrained entries,
    and scaled up slightly) cover solutions on the boundary where the hidden
    block ``R`` is singular.

    Parameters
    ----------
    lmi : LMIProblem
    x : ndarray, shape (n_var,)
    max_inflation : float
        Largest relative inflation ``eta`` of the input variables tried.
    scale : ndarray, optional
        When ``lmi`` is :meth:`~lipsdp.lmi.LMIProblem.preconditioned` (powers of
        two), its ``v``: ``x`` is then in scaled variables, and the bound and
        ``Verification.x`` are mapped back exactly (``x_original = v * x``).
    candidates : int, optional
        Try only the first this many candidate multiplier vectors (1: as given).
    """
    t0 = time.perf_counter()
    v = np.ones(lmi.n_var) if scale is None else np.asarray(scale, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (lmi.n_var,) or not np.all(np.isfinite(x)):
        return Verification(False, None, None, None, "float-cholesky", 0.0, 0.0,
                            "solver returned no finite multipliers", time.perf_counter() - t0)
    band = chosen_band(lmi) or False  # the chain's blocks, found once for every test below
    k = lmi.n_in
    lam0 = x[:k]
    y = x[k:].copy()
    nn = lmi.nonneg[k:]
    y[nn] = np.maximum(y[nn], 0.0)
    scale = float(np.abs(y).max(initial=0.0)) or 1.0
    # (floor, uniform scale, graded scale): the graded candidates grow earlier blocks' multipliers
    # slightly more than later ones, which lifts degenerate optima (orthogonal GroupSort nets,
    # where every block of M is exactly 0) into the interior.
    trials = [(0.0, 1.0, 0.0), (1e-9, 1.0, 0.0), (1e-7, 1.0 + 1e-6, 0.0), (0.0, 1.0, 1e-6),
              (1e-5, 1.0 + 1e-4, 0.0), (0.0, 1.0, 1e-4), (1e-3, 1.01, 0.0), (0.0, 1.0, 1e-2),
              (1e-2, 1.1, 0.0)]
    blocks = lmi.var_block[k:] if lmi.var_block is not None else np.zeros(len(y), dtype=np.int64)
    depth = int(blocks.max(initial=0))
    etas = [1e-12, 1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 2e-4, 5e-4, 1e-3]
    message = "no multipliers made the hidden block negative definite"
    prepared = []
    for floor, s, graded in trials[:candidates]:
        yc = y * s * (1.0 + graded) ** (depth - blocks)
        yc[nn] += floor * scale
        lam = _repair_input(lmi, lam0 * s, yc, band)
        if lam is None:
            continue
        # The input block needs a margin above the test's shift c; when rho(T) is tiny
        # (a nearly constant network) that absolute margin matters more than eta.
        x0 = np.concatenate([lam, yc])
        # A unit of rho adds at least input_floor to -M's input block (1 unless docs/math.md §10.1).
        prepared.append((lam, yc, shift_needed(lmi, x0, band) / lmi.input_floor))
        if len(prepared) == 1:
            message = "the rigorous test failed at every inflation"
            # Most points pass with the first candidate at a tiny inflation: try that before the rest.
            found = _lowest_passing(lmi, prepared, [e for e in etas if e <= 1e-4], max_inflation, v, k, t0,
                                    fast=True, band=band)
            if found is not None:
                return found
    # Otherwise the lowest bound any candidate gives (ill-conditioned nets, e.g. deep ones, need
    # 1e-4..1e-3 with some candidates and less with others).
    found = _lowest_passing(lmi, prepared, etas, max_inflation, v, k, t0, band=band)
    if found is not None:
        return found
    return Verification(False, None, None, None, "float-cholesky", 0.0, 0.0, message, time.perf_counter() - t0)


def verify_balanced(lmi: LMIProblem, x: np.ndarray, *, scale: np.ndarray | None = None,
                    candidates: int | None = None) -> Verification:
    """:func:`verify` on a congruent copy of ``lmi`` whose blocks are balanced at ``x``.

    The rigorous test proves ``-M - c I`` positive definite; the uniform shift ``c``
    covers the rounding errors of the largest entries.  When the diagonal of ``-M``
    spans many orders of magnitude across blocks (deep nets, whose composed norm
    bounds overshoot geometrically), that shift can swamp the small blocks, and
    the bound gets inflated far above the solver's.  A power-of-two congruence
    ``D M D`` (exact in floating point) that brings every block's diagonal to
    about one gives the test a uniform scale; the bound maps back exactly.
    """
    v = np.ones(lmi.n_var) if scale is None else np.asarray(scale, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (lmi.n_var,) or not np.all(np.isfinite(x)) or not lmi.blocks:
        return verify(lmi, x, scale=scale, candidates=candidates)
    balanced, v2 = lmi.preconditioned(*balanced_scales(lmi, x))
    x2 = x / v2
    if not np.array_equal(x2 * v2, x):  # powers of two: exact unless the scaling under/overflowed
        return verify(lmi, x, scale=scale, candidates=candidates)
    return verify(balanced, x2, scale=v * v2, candidates=candidates)


def balanced_scales(lmi: LMIProblem, x: np.ndarray) -> tuple[np.ndarray, float]:
    """``(block_scale, total)`` for :meth:`~lipsdp.lmi.LMIProblem.preconditioned` that bring the
    median diagonal entry of every block of ``M(x)`` to about that of the input block."""
    diag = np.abs(lmi.diagonal(x))
    mags = []
    for b in lmi.blocks:
        d = diag[b.start:b.start + b.size]
        d = d[d > 0]
        mags.append(float(np.median(d)) if d.size else 1.0)
    m0 = mags[0]
    block_scale = np.sqrt(m0 / np.asarray(mags))
    block_scale[0] = 1.0
    return block_scale, float(np.sqrt(m0))
