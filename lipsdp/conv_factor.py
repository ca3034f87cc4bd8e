"""The block Cholesky of the conv chain's Schur complement, in double or in single precision (docs/math.md §7.4.1).

:class:`lipsdp.conv_ipm.ConvChainSDP` assembles the Jacobi-scaled Schur complement ``H`` of the HKM direction as
a block-tridiagonal matrix: diagonal blocks ``D[g]`` (only their lower triangles are read) and couplings
``C[g]`` between group ``g`` and the tail ``t_{g-1}`` (the channel supply ``X_{g-1}``) of group ``g - 1``.
Its block Cholesky ``H = L L^T`` (:func:`factor`) is the work of an iteration at 32 channels: ``g^3 / 3``
flops per group of ``g`` ~ 4700 variables.

A factor in single precision costs half the time.  It is used as the preconditioner of conjugate gradients on
``H`` in double precision (:func:`refine`): the answer is then a double-precision solve to the same residual
as the direct one, or, when ``H`` has become too ill-conditioned for the single factor (near the optimum), the
caller factors ``H`` in double precision instead.  Imports nothing of lipsdp.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import cholesky, solve_triangular
from scipy.linalg.blas import get_blas_funcs

#: A refined solve of the Jacobi-scaled ``H`` is done when ``||b - H x|| <= RESIDUAL (||b|| + ||x||)``: the direct
#: double-precision solve, regularised by ``1e-14 I``, leaves about ``1e-14 ||x||`` (docs/performance.md).
RESIDUAL = 1e-13
#: Conjugate-gradient steps on top of the single factor's solve before it is given up for a double factor: each
#: reads ``H`` and the factor once, and a few cost as much as the double factor saved.
STEPS = 4


def factor(D: list, C: list, tails: list, regs, spare: np.ndarray | None = None) -> tuple[list, list]:
    """Block Cholesky in place (any float dtype): ``L_gg`` in ``D[g]``, ``L_{g,g-1}`` (nonzero only on the tail
    columns ``tails[g]`` of group ``g - 1``) in ``E[g]``.  Each diagonal block is regularised by ``regs[0] I``
    (Jacobi-scaled units); with a ``spare`` buffer (as large as the largest block) a block that is not
    numerically positive definite is restored from its copy there and factored again with the next of
    ``regs``, the blocks before it keeping theirs.  Raises ``LinAlgError`` when that does not help."""
    Lf, E = [], [None] * len(D)
    for g, Dg in enumerate(D):
        if C[g] is not None:
            t = tails[g]
            E[g] = solve_triangular(Lf[g - 1][t, t], C[g].T, lower=True, check_finite=False).T
        keep = None if spare is None else spare[:Dg.size].reshape(Dg.shape)
        if keep is not None:
            np.copyto(keep, Dg)
        for i, reg in enumerate(regs):
            try:
                Dg.flat[::len(Dg) + 1] += reg
                if E[g] is not None:
                    syrk = get_blas_funcs("syrk", (Dg,))
                    syrk(-1.0, np.asfortranarray(E[g]), beta=1.0, c=Dg.T, lower=0, overwrite_c=1)
                Lf.append(cholesky(Dg.T, lower=False, overwrite_a=True, check_finite=False).T)
                break
            except np.linalg.LinAlgError:
                if keep is None or i + 1 == len(regs):
                    raise
                np.copyto(Dg, keep)
    return Lf, E


def substitute(Lf: list, E: list, tails: list, bs: list) -> list:
    """``(L L^T)^{-1} b``, ``b`` given group by group (in the factor's dtype)."""
    xs = list(bs)
    for g in range(len(Lf)):
        b = xs[g] if E[g] is None else xs[g] - E[g] @ xs[g - 1][tails[g]]
        xs[g] = solve_triangular(Lf[g], b, lower=True, check_finite=False)
    for g in reversed(range(len(Lf))):
        b = xs[g]
        if g + 1 < len(Lf):
            b = b.copy()
            b[tails[g + 1]] -= E[g + 1].T @ xs[g + 1]
        xs[g] = solve_triangular(Lf[g], b, lower=True, trans="T", check_finite=False)
    return xs


def multiply(D: list, C: list, tails: list, xs: list) -> list:
    """``H x`` from the lower triangles of ``D`` and the couplings ``C``."""
    out = []
    for g, Dg in enumerate(D):
        symv = get_blas_funcs("symv", (Dg,))
        out.append(symv(1.0, Dg.T, xs[g], lower=0))  # Dg.T: the lower triangle as Fortran's upper one
    for g in range(1, len(D)):
        out[g] += C[g] @ xs[g - 1][tails[g]]
        out[g - 1][tails[g]] += C[g].T @ xs[g]
    return out


def single_factor(D: list, C: list, tails: list, buffers: list) -> tuple[list, list] | None:
    """The block Cholesky of ``H`` in single precision (``D`` copied into ``buffers``, allocated once by the
    caller; ``D`` and ``C`` are left as they are), or None when it breaks down."""
    for Dg, Bg in zip(D, buffers):
        np.copyto(Bg, Dg, casting="same_kind")
    C32 = [None if Cg is None else Cg.astype(np.float32) for Cg in C]
    try:
        return factor(buffers, C32, tails, (0.0,))
    except np.linalg.LinAlgError:
        return None


def refine(D: list, C: list, tails: list, low: tuple[list, list], bs: list,
           residual: float = RESIDUAL, steps: int = STEPS) -> tuple[list, bool, int]:
    """``H x = b`` by conjugate gradients preconditioned with the single factor ``low`` (double-precision
    residuals): ``(x, converged, steps taken)``; converged when ``||b - H x|| <= residual (||b|| + ||x||)``."""
    Lf, E = low

    def precondition(rs):
        return [z.astype(np.float64) for z in substitute(Lf, E, tails, [r.astype(np.float32) for r in rs])]

    def dot(us, vs):
        return float(sum(u @ v for u, v in zip(us, vs)))

    norm_b = np.sqrt(dot(bs, bs))
    xs = precondition(bs)
    rs = [b - h for b, h in zip(bs, multiply(D, C, tails, xs))]
    ps = precondition(rs)
    rz = dot(rs, ps)
    for step in range(steps + 1):
        if np.sqrt(dot(rs, rs)) <= residual * (norm_b + np.sqrt(dot(xs, xs))):
            return xs, True, step
        if step == steps:
            break
        hp = multiply(D, C, tails, ps)
        alpha = rz / dot(ps, hp)
        xs = [x + alpha * p for x, p in zip(xs, ps)]
        rs = [r - alpha * h for r, h in zip(rs, hp)]
        zs = precondition(rs)
        rz, rz_old = dot(rs, zs), rz
        ps = [z + (rz / rz_old) * p for z, p in zip(zs, ps)]
    return xs, False, steps
