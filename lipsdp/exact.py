"""Exact (rational) test that ``M(x)`` is negative definite: docs/math.md §10, step 4.

Every float is a dyadic rational ``m 2^e``.  So ``-M(x)`` can be rebuilt
*exactly* from the numbers the theorem uses -- the lifted rows (the weights),
the slope sectors and the multipliers -- scaled by a common power of two to an
integer matrix ``H``, and tested with fraction-free (Bareiss) elimination:
the ``k``-th Bareiss pivot is the ``k``-th leading principal minor of ``H``, so

.. math::

    -M(x) \\succ 0 \\iff \\det H_{1:k,1:k} > 0 \\quad (k = 1, \\dots, n)
    \\qquad \\text{(Sylvester)} .

Nothing here rounds, so the answer is the truth about the exact matrix.
Bareiss costs ``O(n^3)`` operations on integers of ``O(n)`` words, and entries
with long mantissas (a leaky ReLU's ``alpha = 0.1``) make them longer.  So
:func:`exact_negative_definite` first tries two *exact* certificates that
floating point only guides -- a Gram residual ``A - R^T R - cI`` with
``c > ||.||_F`` for "yes", an integer witness ``z^T A z <= 0`` for "no" -- and
falls back to Bareiss only when ``-M`` is too close to singular for them
(``|lambda_min| / ||M|| <~ 1e-13``); docs/performance.md has the timings.  It is
the referee for :func:`lipsdp.verify.rigorous_negative_definite` (the cheap
floating-point proof the pipeline uses) in tests, and a second opinion for
small certificates (:func:`exact_certificate_check`).

The matrix is *not* read from :attr:`LMIProblem.vals`: those are rounded float
products ``coef * a * b``.  It is rebuilt from exact factors:

.. math::

    -M(x) = E_0^T \\operatorname{diag}(\\lambda) E_0 - C^T C
        - \\sum_i t_i \\big(-2\\alpha_i\\beta_i\\, p_i p_i^T
        + (\\alpha_i+\\beta_i)(p_i q_i^T + q_i p_i^T) - 2 q_i q_i^T\\big),

with ``lambda = rho`` on every input coordinate (l2) or ``lambda_in`` (l_inf),
``p_i`` the pre-activation rows of the lifting, ``q_i`` the selector of neuron
``i`` and ``t_i`` its multiplier (LipSDP-Neuron) or its node's (LipSDP-Layer).
Only slope-restricted activations (:class:`~lipsdp.constraints.SlopeRestricted`)
are covered.

References
----------
E. H. Bareiss, "Sylvester's identity and multistep integer-preserving Gaussian
elimination", Math. Comp. 22 (1968).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from lipsdp.certificate import Certificate
from lipsdp.constraints import SlopeRestricted, get_constraint
from lipsdp.lifting import lift, traverse
from lipsdp.lmi import build_lmi

__all__ = ["exact_negative_definite", "exact_certificate_check", "exact_matrix", "bareiss_positive_definite"]


def _dyadic(value) -> tuple[int, int]:
    """``(m, e)`` with ``value == m * 2**e`` exactly (``value`` a finite float or a dyadic Fraction)."""
    if isinstance(value, Fraction):
        num, den = value.numerator, value.denominator
    else:
        num, den = float(value).as_integer_ratio()
    e = den.bit_length() - 1
    if den != 1 << e:  # pragma: no cover - floats and their exact sums/products are dyadic
        raise ValueError(f"{value!r} is not a dyadic rational")
    return num, -e


def _to_float(m: int, e: int) -> float:
    """``m * 2**e`` as a float (rounded; for consistency checks only)."""
    if m == 0:
        return 0.0
    shift = m.bit_length() - 64
    if shift > 0:
        m, e = m >> shift, e + shift
    try:
        return math.ldexp(float(m), e)
    except OverflowError:
        return math.copysign(math.inf, m)


# -- exact rows -------------------------------------------------------------
def _csr_rows(A) -> list[list[tuple[int, int, int]]]:
    """Rows of a float matrix as ``[(col, m, e), ...]`` sorted by column (exact)."""
    A = sp.csr_matrix(A)
    A.sum_duplicates()
    A.sort_indices()
    out = []
    for i in range(A.shape[0]):
        lo, hi = A.indptr[i], A.indptr[i + 1]
        row = []
        for j, v in zip(A.indices[lo:hi].tolist(), A.data[lo:hi].tolist()):
            if v != 0.0:
                m, e = _dyadic(v)
                row.append((j, m, e))
        out.append(row)
    return out


def _fraction_rows(rows: list[dict]) -> list[list[tuple[int, int, int]]]:
    out = []
    for r in rows:
        out.append([(j, *_dyadic(v)) for j, v in sorted(r.items()) if v != 0])
    return out


class RationalRows:
    """The :class:`~lipsdp.lifting.RowAlgebra` of exact rows: each row a dict ``column -> Fraction`` over ``z``.

    Every float weight is a dyadic rational, so products and sums here are exact.
    """

    def select(self, start, size, n):
        return [{start + i: Fraction(1)} for i in range(size)]

    def affine(self, W, rows):
        W = sp.csr_matrix(W, dtype=np.float64)
        out = []
        for i in range(W.shape[0]):
            acc: dict = {}
            for j, w in zip(W.indices[W.indptr[i]:W.indptr[i + 1]].tolist(),
                            W.data[W.indptr[i]:W.indptr[i + 1]].tolist()):
                if w == 0.0:
                    continue
                fw = Fraction(w)
                for col, v in rows[j].items():
                    acc[col] = acc.get(col, 0) + fw * v
            out.append({c: v for c, v in acc.items() if v != 0})
        return out

    def add(self, terms):
        out = [dict(r) for r in terms[0]]
        for rows in terms[1:]:
            for acc, r in zip(out, rows):
                for col, v in r.items():
                    acc[col] = acc.get(col, 0) + v
        return [{c: v for c, v in acc.items() if v != 0} for acc in out]

    def concat(self, parts, perm):
        stacked = [r for rows in parts for r in rows]
        return [stacked[i] for i in perm]

    def feedback(self, rows, F, selector):
        F = sp.csr_matrix(F, dtype=np.float64)
        out = [dict(r) for r in rows]
        for i, acc in enumerate(out):
            for j, w in zip(F.indices[F.indptr[i]:F.indptr[i + 1]].tolist(),
                            F.data[F.indptr[i]:F.indptr[i + 1]].tolist()):
                if w != 0.0:
                    for col, v in selector[j].items():
                        acc[col] = acc.get(col, 0) + Fraction(w) * v
        return out

    def settle(self, rows):
        return rows


def _exact_lifted_rows(lifting) -> tuple[list[list[dict]], list[dict]]:
    """The lifting's pre-activation rows and output rows, computed in rationals from the weights.

    The same walk as :func:`lipsdp.lifting.lift` (:func:`lipsdp.lifting.traverse`) in
    :class:`RationalRows`.  Rows are dicts ``column -> Fraction`` over ``z``.
    """
    return traverse(lifting.network, RationalRows(), lifting.blocks)


# -- the exact matrix -------------------------------------------------------
def _slope_sectors(lifting):
    """``(alpha, beta)`` arrays per activation block; NotImplementedError for other families."""
    sectors = []
    for block in lifting.blocks[1:]:
        op = lifting.network.op(block.node)
        qc = get_constraint(op.function)
        if not isinstance(qc, SlopeRestricted):
            raise NotImplementedError(
                f"the exact test covers slope-restricted activations only; {op.name!r} is "
                f"{op.function!r} ({type(qc).__name__}); use lipsdp.verify.rigorous_negative_definite")
        lo, hi = qc.sector(op)
        alpha = np.broadcast_to(np.asarray(lo, dtype=np.float64), (block.size,)).tolist()
        beta = np.broadcast_to(np.asarray(hi, dtype=np.float64), (block.size,)).tolist()
        sectors.append((alpha, beta))
    return sectors


def _check_pairing(lmi, x: np.ndarray, lifting) -> None:
    """Refuse an ``x`` or ``lmi`` that cannot belong to ``lifting`` (ValueError)."""
    if lmi.formulation not in ("neuron", "layer"):
        raise ValueError(f"unknown formulation {lmi.formulation!r}")
    if lmi.n != lifting.n or lmi.input_dim != lifting.input_dim:
        raise ValueError(f"the LMI ({lmi.n}x{lmi.n}) is not the one of this lifting (n = {lifting.n})")
    if x.shape != (lmi.n_var,):
        raise ValueError(f"x has shape {x.shape}, the LMI has {lmi.n_var} variables")
    if not np.all(np.isfinite(x)):
        raise ValueError("x is not finite")


def _exact_rows(lifting, output_map) -> tuple[list, list]:
    """Pre-activation and output rows as ``[(col, m, e), ...]``, exact; the output through ``output_map``."""
    if lifting.exact:
        pre = [_csr_rows(P) for P in lifting.pre]
        out = _csr_rows(lifting.output)
    else:  # the float rows are rounded products: redo them in rationals from the weights
        pre_f, out_f = _exact_lifted_rows(lifting)
        pre = [_fraction_rows(P) for P in pre_f]
        out = _fraction_rows(out_f)
    if output_map is None:
        return pre, out
    cm = sp.csr_matrix(np.atleast_2d(np.asarray(output_map, dtype=np.float64)))
    rows_f = []
    for i in range(cm.shape[0]):
        acc: dict = {}
        for k, w in zip(cm.indices[cm.indptr[i]:cm.indptr[i + 1]].tolist(),
                        cm.data[cm.indptr[i]:cm.indptr[i + 1]].tolist()):
            mw, ew = _dyadic(w)
            for col, m, e in out[k]:
                acc[col] = acc.get(col, 0) + Fraction(mw * m) * Fraction(2) ** (ew + e)
        rows_f.append(acc)
    return pre, _fraction_rows(rows_f)


def _input_terms(x: np.ndarray, n0: int, n_in: int, add) -> None:
    """``+ rho I`` (l2) or ``+ diag(lambda_in)`` (l_inf) on the input block."""
    for i in range(n0):
        m, e = _dyadic(x[0] if n_in == 1 else x[i])
        if m:
            add(((i, i), m, e))


def _output_terms(out: list, add) -> None:
    """``- C^T C`` (upper triangle)."""
    for row in out:
        for a, (j, mj, ej) in enumerate(row):
            for (l, ml, el) in row[a:]:
                add(((j, l), -mj * ml, ej + el))


def _neuron_terms(prow: list, s: int, t: float, alpha: float, beta: float, add) -> None:
    """``- t F_i`` for one neuron: pre-activation row ``prow``, output coordinate ``s``, sector ``[alpha, beta]``."""
    tm, te = _dyadic(t)
    # + 2 t q q^T
    if tm:
        add(((s, s), 2 * tm, te))
    if tm == 0 or not prow:
        return
    am, ae = _dyadic(alpha)
    bm, be = _dyadic(beta)
    # + 2 t alpha beta p p^T
    if am and bm:
        cm_, ce = 2 * tm * am * bm, te + ae + be
        for a, (j, mj, ej) in enumerate(prow):
            for (l, ml, el) in prow[a:]:
                add(((j, l), cm_ * mj * ml, ce + ej + el))
    # - t (alpha + beta) (p q^T + q p^T), with alpha + beta summed exactly
    emin = min(ae, be)
    sm = (am << (ae - emin)) + (bm << (be - emin))
    if sm:
        cm_, ce = -tm * sm, te + emin
        for (j, mj, ej) in prow:
            v = cm_ * mj * (2 if j == s else 1)
            add(((j, s) if j <= s else (s, j), v, ce + ej))


def _sum_terms(terms: list) -> tuple[dict, int]:
    """``entries[(i, j)] * 2**E`` = the sum of the terms ``m 2^e`` at ``(i, j)``, exactly."""
    E = min((e for _, _, e in terms), default=0)
    entries: dict[tuple[int, int], int] = {}
    get = entries.get
    for key, m, e in terms:
        entries[key] = get(key, 0) + (m << (e - E))
    return entries, E


def exact_matrix(lmi, x, lifting, *, output_map=None) -> tuple[dict, int]:
    """``-M(x)`` exactly, as ``(entries, E)``: ``-M[i, j] = entries[(i, j)] * 2**E`` for ``i <= j``.

    Parameters
    ----------
    lmi : LMIProblem
        Built by :func:`lipsdp.lmi.build_lmi` from ``lifting`` (not preconditioned).
    x : array_like, shape (n_var,)
        Finite variables ``(rho, t)`` (or ``(lambda_in, t)``).
    lifting : Lifting
    output_map : array_like, optional
        The ``output_map`` that ``lmi`` was built with.

    Raises
    ------
    NotImplementedError
        An activation outside the slope-restricted family.
    ValueError
        ``x`` does not fit ``lmi``, or ``lmi`` is not the LMI of ``lifting``.
    """
    x = np.asarray(x, dtype=np.float64)
    n_in = int(getattr(lmi, "n_in", 1))
    neuron = lmi.formulation == "neuron"
    _check_pairing(lmi, x, lifting)
    sectors = _slope_sectors(lifting)
    pre, out = _exact_rows(lifting, output_map)

    terms: list[tuple[tuple[int, int], int, int]] = []  # ((i, j), m, e): -M[i, j] += m 2^e, i <= j
    _input_terms(x, lifting.input_dim, n_in, terms.append)
    _output_terms(out, terms.append)
    offset = n_in  # quadratic constraints: - t_i F_i
    for k, (P, (alpha, beta)) in enumerate(zip(pre, sectors), start=1):
        block = lifting.blocks[k]
        for i, prow in enumerate(P):
            _neuron_terms(prow, block.start + i, x[offset + (i if neuron else 0)], alpha[i], beta[i], terms.append)
        offset += block.size if neuron else 1
    if offset != lmi.n_var:
        raise ValueError(f"the LMI has {lmi.n_var} variables, the lifting's slope constraints "
                         f"({lmi.formulation}) give {offset}: not the LMI of this lifting")
    entries, E = _sum_terms(terms)
    _check_consistent(lmi, x, entries, E)
    return entries, E


def _check_consistent(lmi, x, entries, E) -> None:
    """Refuse an ``lmi`` whose float matrix is not a rounding of the exact one (wrong pairing)."""
    H = np.zeros((lmi.n, lmi.n))
    for (i, j), v in entries.items():
        H[i, j] = H[j, i] = _to_float(v, E)
    Mf = lmi.matrix(x)
    tol = 1e-8 * lmi.abs_matrix(x)
    lift = lmi.lifting_error(x)
    if lift is not None:
        tol = tol + 2.0 * lift
    bad = np.abs(H + Mf) > tol + 1e-300
    if np.any(bad):
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"the LMI does not match the lifting at entry ({i}, {j}): exact {-H[i, j]!r} vs "
                         f"{Mf[i, j]!r}; pass the lmi built by build_lmi(lifting, ...) (not preconditioned, "
                         "same output_map)")


# -- Bareiss / Sylvester ----------------------------------------------------
def bareiss_positive_definite(A: list[list[int]]) -> bool:
    """True iff the symmetric integer matrix ``A`` is positive definite.

    Fraction-free Gaussian elimination without pivoting: after step ``k`` the
    pivot ``A[k][k]`` equals the ``(k+1)``-th leading principal minor, and every
    division is exact (Bareiss 1968).  Stops at the first minor ``<= 0``.  Only
    the upper triangle is read and updated (the trailing blocks stay symmetric).
    ``A`` is modified in place.
    """
    n = len(A)
    prev = 1
    for k in range(n):
        akk = A[k][k]
        if akk <= 0:
            return False
        rowk = A[k]
        for i in range(k + 1, n):
            Ai = A[i]
            aik = rowk[i]
            if aik == 0:
                if prev == akk:
                    continue
                Ai[i:] = [v * akk // prev if v else 0 for v in Ai[i:]]
            else:
                Ai[i:] = [(v * akk - aik * w) // prev for v, w in zip(Ai[i:], rowk[i:])]
        prev = akk
    return True


def _integer_matrix(entries: dict, n: int) -> list[list[int]]:
    """Dense symmetric integer matrix from the upper-triangle ``entries``, divided by their gcd."""
    g = 0
    for v in entries.values():
        g = math.gcd(g, v)
    g = g or 1
    A = [[0] * n for _ in range(n)]
    for (i, j), v in entries.items():
        A[i][j] = A[j][i] = v // g
    return A


def _exact_gram(R: np.ndarray) -> list[list[int]]:
    """``R^T R`` exactly for an int64 matrix with ``|R| <= 2**52`` (two 26-bit limbs, int64 products)."""
    n = R.shape[1]
    if R.shape[0] > 1000:  # int64 partial sums could overflow: Python ints
        Ro = R.astype(object)
        return (Ro.T @ Ro).tolist()
    hi, lo = R >> 26, R & ((1 << 26) - 1)
    hh, hl, ll = hi.T @ hi, hi.T @ lo, lo.T @ lo
    hh, hl, ll = hh.tolist(), hl.tolist(), ll.tolist()
    return [[(hh[i][j] << 52) + ((hl[i][j] + hl[j][i]) << 26) + ll[i][j] for j in range(n)] for i in range(n)]


def _decide_by_certificates(A: list[list[int]]) -> bool | None:
    """Try to settle ``A > 0`` with exact certificates guided by floating point; None if undecided.

    - **yes**: with any matrix ``R`` (a float Cholesky factor of ``A - cI``,
      rounded to integers) and ``E = A - R^T R - cI`` computed exactly,
      ``c > ||E||_F`` gives ``z^T A z >= (c - ||E||_2) |z|^2 > 0``.
    - **no**: any integer ``z != 0`` (a rounded eigenvector) with
      ``z^T A z <= 0`` computed exactly.

    Both are exact proofs whatever the floating-point steps did; they fail
    (return None) only when ``A`` is too close to singular for float64 to guide them.
    """
    n = len(A)
    maxbits = max((abs(v).bit_length() for row in A for v in row), default=0)
    if maxbits == 0:
        return None
    t = maxbits  # A_f = A 2^-t, entries in (-1, 1)
    Af = np.array([[_to_float(v, -t) for v in row] for row in A])
    try:
        lam, vec = np.linalg.eigh(Af)
    except np.linalg.LinAlgError:  # pragma: no cover
        return None
    if lam[0] < 0:
        z = vec[:, 0]
        z = np.rint(z * 2.0 ** (52 - math.frexp(float(np.abs(z).max()))[1])).astype(np.int64).tolist()
        if any(z):
            q = sum(zi * sum(a * zj for a, zj in zip(row, z) if zj) for zi, row in zip(z, A) if zi)
            if q <= 0:
                return False
        return None
    if lam[0] == 0:
        return None
    c = float(lam[0]) / 2.0
    try:
        R = sla.cholesky(Af - c * np.eye(n), lower=False, check_finite=True)
    except (sla.LinAlgError, ValueError):
        return None
    rmax = float(np.abs(R).max())
    if not np.isfinite(rmax) or rmax == 0.0:
        return None
    s = 52 - math.frexp(rmax)[1]
    Ri = np.rint(R * 2.0 ** s).astype(np.int64)
    G = _exact_gram(Ri)  # ~ 2^(2s) (A 2^-t - c I)
    cm, ce = _dyadic(c)
    base = min(-t, -2 * s, ce)
    sa, sg, sc = -t - base, -2 * s - base, ce - base
    cI = cm << sc
    err2 = 0
    for i in range(n):
        Ai, Gi = A[i], G[i]
        for j in range(n):
            e = (Ai[j] << sa) - (Gi[j] << sg) - (cI if i == j else 0)
            err2 += e * e
    return True if cI > 0 and cI * cI > err2 else None


def exact_negative_definite(lmi, x, lifting, *, output_map=None, check_signs: bool = True,
                            method: str = "auto") -> bool:
    """Decide exactly whether ``M(x) < 0`` (negative definite), in rational arithmetic.

    Parameters
    ----------
    lmi : LMIProblem
        ``build_lmi(lifting, formulation[, output_map, norm])`` -- the float LMI
        is used only to read the formulation and variable layout and as a
        consistency check; the matrix tested is rebuilt from exact factors.
    x : array_like, shape (n_var,)
        ``(rho, t)`` (l2) or ``(lambda_in, t)`` (l_inf).
    lifting : Lifting
        The lifting ``lmi`` was built from.  When its rows are rounded
        (``lifting.exact`` is False) they are recomputed in rationals from the
        network's weights.
    output_map : array_like, optional
        As given to :func:`~lipsdp.lmi.build_lmi`.
    check_signs : bool
        Also require the sign-constrained variables (``rho``, ``t``) to be
        ``>= 0``, as the S-procedure does: with this, True means ``x`` is a
        valid certificate.
    method : {"auto", "bareiss"}
        ``bareiss``: Sylvester's criterion by Bareiss elimination only (the
        reference; ``O(n^3)`` big-integer operations).  ``auto``: first the
        exact float-guided certificates of :func:`_decide_by_certificates`
        (a Gram residual for "yes", a witness vector for "no"), then Bareiss
        when the matrix is too close to singular for them.  Both are exact.

    Returns
    -------
    bool
        False for non-finite ``x`` or a failed test.

    Raises
    ------
    NotImplementedError
        An activation that is not slope-restricted (GroupSort, Householder, ...).
    ValueError
        ``lmi`` and ``lifting`` do not belong together, or ``x`` has the wrong shape.
    """
    if method not in ("auto", "bareiss"):
        raise ValueError(f"unknown method {method!r}; use 'auto' or 'bareiss'")
    x = np.asarray(x, dtype=np.float64)
    if x.shape == (lmi.n_var,) and not np.all(np.isfinite(x)):
        return False
    if check_signs and x.shape == (lmi.n_var,) and np.any(x[np.asarray(lmi.nonneg, dtype=bool)] < 0):
        return False
    entries, _ = exact_matrix(lmi, x, lifting, output_map=output_map)
    A = _integer_matrix(entries, lmi.n)
    if method == "auto":
        decided = _decide_by_certificates(A)
        if decided is not None:
            return decided
    return bareiss_positive_definite(A)


def exact_certificate_check(cert, network) -> bool:
    """Re-check a certificate's multipliers on ``network`` in exact arithmetic.

    True iff the certificate holds: its multipliers make ``M(rho, T)`` exactly
    negative definite on the LMI of ``network`` (rebuilt here), the
    sign-constrained ones are ``>= 0`` and ``bound**2 >= rho`` exactly.  A
    certificate for another network (fingerprint mismatch), without a bound or
    with multipliers of the wrong length gives False.

    Parameters
    ----------
    cert : Certificate or dict
    network : Network

    Raises
    ------
    NotImplementedError
        Non-l2 certificates, or activations outside the slope-restricted family.
    """
    if isinstance(cert, dict):
        cert = Certificate.from_dict(cert)
    if cert.norm != "l2":
        raise NotImplementedError(f"exact re-check of {cert.norm!r} certificates is not implemented (l2 only)")
    if cert.bound is None or not cert.multipliers:
        return False
    sha = (cert.network or {}).get("sha256")
    if sha is not None and sha != network.fingerprint():
        return False
    lifting = lift(network)
    lmi = build_lmi(lifting, cert.formulation)
    x = np.asarray(cert.multipliers, dtype=np.float64)
    if x.shape != (lmi.n_var,) or not np.all(np.isfinite(x)):
        return False
    if not math.isfinite(cert.bound) or Fraction(cert.bound) ** 2 < Fraction(float(x[0])):
        return False
    return exact_negative_definite(lmi, x, lifting)
