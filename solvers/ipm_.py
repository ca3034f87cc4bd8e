"""A primal-dual interior-point method that exploits the rank-two structure of LipSDP.

Every multiplier of LipSDP multiplies a sum of rank-two matrices of lifted
rows (:attr:`lipsdp.lmi.LMIProblem.factors`): a slope-restricted neuron adds
``t_i (a_i b_i^T + b_i a_i^T)`` with ``a_i = q_i - alpha p_i`` and
``b_i = beta p_i - q_i``.  A general-purpose solver sees only the entries of
these matrices and forms the Schur complement of the interior-point method,

.. math:: H_{ij} = \\operatorname{tr}(F_i X F_j Z), \\qquad Z = S^{-1},

entry by entry, at a cost of order ``m n nnz``.  With ``F_i`` written through
rows ``r_k`` of one matrix ``R`` it is a Hadamard combination of two Gram
matrices, ``G_X = R X R^T`` and ``G_Z = R Z R^T``: for terms
``t = (u, w)`` and ``s = (u', w')``,

.. math::

    \\operatorname{tr}\\big((uw^T + wu^T) X (u'w'^T + w'u'^T) Z\\big)
    = G_X[w,u'] G_Z[u,w'] + G_X[w,w'] G_Z[u,u'] + G_X[u,u'] G_Z[w,w'] + G_X[u,w'] G_Z[w,u'] ,

so one iteration costs a few dense ``n x n`` products and factorisations plus
two sparse Gram products: the technique of DSDP for rank-one constraints
(Benson, Ye and Zhang, SIAM J. Optim. 2000).  The iteration itself (HKM
direction, Mehrotra's predictor-corrector, infeasible start) is the shared
:class:`lipsdp.interior.InteriorPoint` on one dense block (:class:`lipsdp.interior.DenseLMI`), with the
Grams' products by :class:`RowSlabs` (dense blocks where ``R``'s rows fill their span).

Where the stored entries outweigh the factor rows (wide layers after the first: a LeakyReLU neuron
on a 512-wide layer stores ``512^2`` entries, its factor rows ``2 x 512``), the linear maps come from
the factors too (:class:`FactoredLMI`): ``M(y) = M_c + R^T K(y) R`` with ``K(y)`` the ``r x r``
sparse matrix of ``y_{var_t} coef_t`` at ``(u_t, w_t)`` and ``(w_t, u_t)``, and
``<F_j, G> = sum_{t: var_t = j} 2 coef_t (R G R^T)[u_t, w_t]``, so the COO basis (two sparse copies of
every entry) is never formed (docs/math.md §8.10).

The dual value is a lower bound on the optimum (reported in ``extras``); the
answer ``y`` is, as always, only a candidate for :mod:`lipsdp.verify`.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from lipsdp.interior import DenseLMI, InteriorPoint, dense_iteration_cost, term_schur
from lipsdp.solvers.base import Backend, LMIShape, SolveResult, dense_bytes, register, stored_bytes


@register
class LowRankIPM(Backend):
    """Interior-point method on the factored LMI (numpy / scipy only; l2 and l_inf).

    Conventions: reads the COO entries and the rank-two factors of the LMI directly (no
    vectorisation).  Memory: dense ``n x n`` iterates and factors, the Gram matrices of the
    factor rows and the term-by-term Schur pieces.  Preference: for factored LMIs without free
    multipliers up to :attr:`max_auto_size`, below the completion and chordal methods where those
    are cheaper; specialised.
    """

    name = "ipm"
    listing = 1
    specialised = True
    modules = ("scipy",)
    install = "built in (numpy and scipy)"
    family = "interior_point_lowrank"
    supports_time_limit = True
    default_tol = 1e-7
    max_iters = 80
    #: ``auto`` uses it up to this LMI size (dense n x n iterates: O(n^3) per iteration).
    max_auto_size = 3000
    step_fraction = 0.95
    #: ``auto``'s rank when it prefers this method (below completion and chordal, above fo).
    specialised_rank = 11.0

    @classmethod
    def memory_estimate(cls, lmi) -> int:
        if lmi.factors is None:
            return super().memory_estimate(lmi)
        r, t = lmi.factors[0].shape[0], len(lmi.factors[3])
        maps = 32 * r * lmi.n if factored_maps(lmi) else 6 * stored_bytes(lmi)  # K R, R G or R X and R Z
        return 16 * dense_bytes(lmi) + 8 * (2 * r * r + 3 * t * t + 2 * lmi.n_var ** 2) + maps

    @classmethod
    def preference(cls, lmi) -> float | None:
        # Free multipliers leave the Schur complement singular near their unbounded optimal set.
        shape = LMIShape.of(lmi)
        if shape.factored and not shape.free_multipliers and (shape.n is None or shape.n <= cls.max_auto_size):
            return cls.specialised_rank
        return None

    @classmethod
    def iteration_cost(cls, lmi) -> float:
        return dense_iteration_cost(lmi)

    @staticmethod
    def applies(lmi) -> bool:
        """Whether every multiplier of ``lmi`` has a factored form."""
        return getattr(lmi, "factors", None) is not None

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        t0 = time.perf_counter()
        if not self.applies(lmi):
            return SolveResult("solver_error", None, None, time.perf_counter() - t0,
                               message="ipm needs factored constraint terms; a constraint family gave none")
        structure = FactoredLMI(lmi) if factored_maps(lmi) else BasisLMI(lmi)
        state = InteriorPoint(structure, lmi.objective, lmi.nonneg, tol or self.default_tol, time_limit, t0,
                              verbose, self.max_iters, self.step_fraction)
        state.report = self.name
        status, message = state.run()
        return SolveResult(status, state.y.copy(), float(state.c @ state.y), time.perf_counter() - t0,
                           state.iterations, message,
                           # The dual value bounds the optimum from below only where X is (nearly) feasible.
                           extras={"dual_objective": state.dual_objective if state.dinf < 1e-5 else float("nan"),
                                   "gap": state.gap, "path": state.path,
                                   "primal_infeasibility": state.pinf, "dual_infeasibility": state.dinf})


def factored_maps(lmi) -> bool:
    """Whether :class:`FactoredLMI` serves ``lmi``: its ``r x n`` products weigh less than the stored entries,
    which the COO basis would hold twice more."""
    return lmi.factors is not None and 8 * lmi.factors[0].shape[0] * lmi.n < stored_bytes(lmi)


class RowSlabs:
    """Products with a sparse ``R`` (``r x n``) slab by slab: runs of :attr:`ROWS` consecutive rows, each a dense
    block over its column span where it fills at least :attr:`FILL` of it (a LeakyReLU layer's rows
    ``q_i - alpha p_i`` fill theirs), else kept sparse.  scipy's sparse-times-dense product runs near one
    GFLOP/s; a dense block's product is BLAS-3."""

    ROWS = 256
    FILL = 0.1

    def __init__(self, R: sp.csr_matrix):
        self.shape = R.shape
        self.slabs = []
        for r0 in range(0, R.shape[0], self.ROWS):
            block = R[r0:r0 + self.ROWS]
            if not block.nnz:
                continue
            a, b = int(block.indices.min()), int(block.indices.max()) + 1
            sub = block[:, a:b]
            dense = sub.nnz >= self.FILL * sub.shape[0] * (b - a)
            self.slabs.append((r0, r0 + block.shape[0], a, b, sub.toarray() if dense else sub.tocsr()))

    def times(self, X: np.ndarray) -> np.ndarray:
        """``R X`` for ``X`` of shape ``(n, k)``."""
        out = np.zeros((self.shape[0], X.shape[1]))
        for r0, r1, a, b, block in self.slabs:
            out[r0:r1] = block @ X[a:b]
        return out

    def t_times(self, Y: np.ndarray) -> np.ndarray:
        """``R^T Y`` for ``Y`` of shape ``(r, k)``."""
        out = np.zeros((self.shape[1], Y.shape[1]))
        for r0, r1, a, b, block in self.slabs:
            out[a:b] += block.T @ Y[r0:r1]
        return out


class SlabSchur:
    """:meth:`DenseLMI.schur` with the Grams ``R X R^T``, ``R Z R^T`` from the structure's :class:`RowSlabs`
    (``slabs``), for :class:`FactoredLMI` and :class:`BasisLMI`."""

    def schur(self, X, Z):
        slabs = self.slabs
        RX, RZ = slabs.times(X), slabs.times(Z)
        return term_schur(slabs.times(RX.T), slabs.times(RZ.T), self.iu, self.iw, self.KT)


class FactoredLMI(SlabSchur, DenseLMI):
    """:class:`~lipsdp.interior.DenseLMI` with the linear maps from the factor rows as well (see the module).

    ``linear(y)`` and ``adjoint(G)`` cost one product of ``R`` (or ``R^T``) with an ``n``-column matrix each,
    the Schur complement's Grams two; the memory is ``R``'s slabs and a few ``r x n`` products.
    """

    def __init__(self, lmi):  # noqa: D107 (DenseLMI's fields but the basis)
        self.n, self.m = lmi.n, lmi.n_var
        self.sizes = [lmi.n]
        self.F0s = [lmi.const.toarray()]
        R, iu, iw, coef, var = lmi.factors
        self.R = sp.csr_matrix(R)
        self.slabs = RowSlabs(self.R)
        self.iu, self.iw = np.asarray(iu), np.asarray(iw)
        self.coef, self.var = np.asarray(coef, dtype=np.float64), np.asarray(var)
        T = len(self.coef)
        self.KT = sp.csr_matrix((self.coef, (np.arange(T), self.var)), shape=(T, self.m)).T.tocsr()
        self.pairs = (np.concatenate([self.iu, self.iw]), np.concatenate([self.iw, self.iu]))

    def linear(self, y):
        """``[R^T K(y) R]``, symmetrised (the basis gives both triangles the same value: so does this)."""
        kap = self.coef * y[self.var]
        r = self.R.shape[0]
        K = sp.csr_matrix((np.concatenate([kap, kap]), self.pairs), shape=(r, r))
        M = self.slabs.t_times((K @ self.R).toarray())
        M += M.T
        M *= 0.5
        return [M]

    def adjoint(self, Gs):
        """``(<F_j, G>)_j`` for symmetric ``G``: ``2 coef_t r_u^T G r_w`` summed per variable."""
        RG = self.slabs.times(Gs[0])
        dots = np.asarray(self.R[self.iw].multiply(RG[self.iu]).sum(axis=1)).ravel()
        return self.KT @ (2.0 * dots)


class BasisLMI(SlabSchur, DenseLMI):
    """:class:`~lipsdp.interior.DenseLMI` (linear maps from the COO basis) with the Schur complement's Grams
    slab by slab: a factor matrix with dense rows (an input metric's ``g_i``) made scipy's products most of
    an iteration."""

    def __init__(self, lmi):  # noqa: D107
        super().__init__(lmi)
        self.slabs = RowSlabs(sp.csr_matrix(self.R))
