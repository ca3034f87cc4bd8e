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
:class:`lipsdp.interior.InteriorPoint` on one dense block (:class:`lipsdp.interior.DenseLMI`).

The dual value is a lower bound on the optimum (reported in ``extras``); the
answer ``y`` is, as always, only a candidate for :mod:`lipsdp.verify`.
"""

from __future__ import annotations

import time

import numpy as np

from lipsdp.interior import dense_iteration_cost, solve_dense
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
        return 16 * dense_bytes(lmi) + 8 * (2 * r * r + 3 * t * t + 2 * lmi.n_var ** 2) + 6 * stored_bytes(lmi)

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
        state, status, message = solve_dense(lmi, tol or self.default_tol, time_limit=time_limit, t0=t0,
                                             verbose=verbose, max_iters=self.max_iters,
                                             step_fraction=self.step_fraction, report=self.name)
        return SolveResult(status, state.y.copy(), float(state.c @ state.y), time.perf_counter() - t0,
                           state.iterations, message,
                           # The dual value bounds the optimum from below only where X is (nearly) feasible.
                           extras={"dual_objective": state.dual_objective if state.dinf < 1e-5 else float("nan"),
                                   "gap": state.gap, "path": state.path,
                                   "primal_infeasibility": state.pinf, "dual_infeasibility": state.dinf})
