"""A primal-dual interior-point method that keeps both iterates sparse, by matrix completion.

The LMI of a feed-forward net is block-tridiagonal, and so is the dual slack
``S = -M(y)``; the primal ``X`` of :mod:`~lipsdp.solvers.ipm_` is dense, and the
clique form of :mod:`~lipsdp.solvers.chordal_` adds ``w^2/2`` variables per layer:
on deep nets of moderate width either grows expensive.

Only the entries of ``X`` on the pattern ``P`` of ``S`` (the diagonal and
first off-diagonal blocks) enter the objective and the constraints.  The
*completion method* (Fukuda, Kojima, Murota and Nakata, SIAM J. Optim. 2000;
Nakata et al., SDPA-C, Math. Program. 2003) stores ``X_P`` only and works with
its maximum-determinant positive definite completion ``X^``, whose inverse is
sparse with the same pattern.  For the chain's cliques ``C_k = {k-1, k}`` and
separators ``{k}`` (Dahl, Vandenberghe and Roychowdhury, Optim. Methods Softw. 2008;
Vandenberghe and Andersen, *Chordal graphs and semidefinite optimization* 2015),

.. math::

    (X^)^{-1} = \\sum_{k} E_{C_k}^T X_{C_k C_k}^{-1} E_{C_k} - \\sum_{k\\ \\text{interior}} E_k^T X_{kk}^{-1} E_k ,

and ``X_P`` has a positive definite completion iff every ``X_{C_k C_k}`` is positive definite.
One HKM step (as in the ipm, with the factored rank-two terms) then needs

- ``G_S = R S^{-1} R^T`` and ``G_X = R X^ R^T``: two block-tridiagonal solves with the
  ``r`` factor rows and a slab-by-slab product (each row spans two blocks);
- the Schur complement ``H_ij = tr(F_i X^ F_j S^{-1})`` (:func:`lipsdp.interior.term_schur`),
  ``m x m`` in the multipliers alone;
- ``dX = P(mu S^{-1} - X^ - X^ dS S^{-1})`` on the pattern only: ``P(S^{-1})`` by the
  block recursion of the selected inverse, ``P(X^ dS S^{-1})`` from the two solves above;
- Mehrotra's corrector ``dX dS S^{-1}``: the predictor ``dX = -X^ + sym(X^ F S^{-1})``
  (``F = sum_j dy_j F_j``) is dense, but it enters only as ``dX R^T = -X^ R^T +
  (X^ F S^{-1} R^T + S^{-1} F X^ R^T) / 2``: two products with the sparse ``F`` and two
  more block solves.  Without it the method takes markedly more iterations.

For width ``w``, depth ``l``, ``r ~ 2 l w`` rows and ``m ~ l w`` multipliers that is about
``16 l w^2 r + 6 w r^2 + m^3 / 3`` flops an iteration (:func:`estimate_cost`).  It starts
from the LMI's strictly feasible point (:mod:`lipsdp.scaling`'s, doubled), so ``S = -M(y)``
holds exactly at every iterate and only the dual equations are infeasible until
convergence; ``X`` starts block diagonal, each block scaled to its block of ``S^{-1}``
(:meth:`_Completion.start_X`).  With one block (no chain) ``X^ = X`` and the step is the dense ipm's.
With two or more run threads (:mod:`lipsdp.threads`) the independent large products of an iteration
(the two solves with ``R^T``, the two Gram products, the corrector's pairs, the halves of a pattern
product) run two at a time (:func:`lipsdp.threads.both`), each on half the BLAS threads: the same products,
so the same iterates (docs/math.md §8.9).
Where every factor row is a coordinate plus one pre-activation row (the sector terms of slope-restricted
activations: :mod:`~lipsdp.solvers.row_basis`), the iteration goes through the dense inverses ``S^{-1}``
and ``X^`` instead, with neither ``(n, r)`` solves nor ``r x r`` Grams (:mod:`~lipsdp.solvers.completion_dense`,
docs/math.md §8.11); the iterates are the same up to rounding.  :class:`RowKernel` and
:class:`~lipsdp.solvers.completion_dense.DenseKernel` hold the two ways of making an iteration's products.
As always, ``y`` is only a candidate for :mod:`lipsdp.verify`.
"""

from __future__ import annotations

import time
from functools import cached_property

import numpy as np
import scipy.sparse as sp
from scipy.linalg import LinAlgError, cholesky, solve_triangular
from scipy.linalg.blas import dtrsm as _dtrsm
from scipy.linalg.lapack import dpotrf as _dpotrf
from scipy.linalg.lapack import dtrtri as _dtrtri
from scipy.linalg.lapack import dpotri

from lipsdp import progress
from lipsdp import threads as thread_pools
from lipsdp.chain import BlockChain
from lipsdp.interior import InteriorPoint, dense_iteration_cost, factor_schur, term_schur
from lipsdp.solvers.base import Backend, LMIShape, SolveResult, register, stored_bytes
from lipsdp.solvers.chordal_ import ChordalIPM
from lipsdp.solvers import completion_dense as dense
from lipsdp.solvers.completion_dense import DenseKernel
from lipsdp.solvers.row_basis import fits
from lipsdp.solvers.ipm_ import LowRankIPM


_U = 2.0 ** -53  # unit roundoff


@register
class CompletionIPM(Backend):
    """Primal-dual interior-point method with both iterates on the block-tridiagonal pattern (numpy / scipy).

    Conventions: reads the chain (:class:`lipsdp.chain.BlockChain`), the rank-two factors and the
    start hint of the LMI directly.  Memory: ``(n, r)`` work arrays for the block solves (``r``
    factor rows), the ``r x r`` Gram matrices, the term-by-term Schur pieces; through the dense inverses
    five ``n x n`` arrays and six ``n x n_p`` (``n_p`` pre-activation rows) instead; the iterates
    themselves are block-tridiagonal.  Preference: the first choice for factored LMIs without
    free multipliers that have a layer-by-layer start, where an iteration is affordable and
    cheaper than the dense ipm's and the chordal method's (weighed by :attr:`dense_ratio` and
    :attr:`chordal_ratio`); specialised.
    """

    name = "completion"
    listing = 3
    specialised = True
    modules = ("scipy",)
    install = "built in (numpy and scipy)"
    family = "interior_point_completion"
    supports_time_limit = True
    default_tol = 1e-7
    max_iters = 100
    step_fraction = 0.95

    #: ``auto`` uses it on chain LMIs with a layer-by-layer start while :func:`estimate_cost` is
    #: below this (an iteration of several seconds on one core); beyond it, on wide nets, ``fo``
    #: reaches a close bound sooner.
    max_auto_cost = 3.0e11
    #: ``auto``'s rank when it prefers this method (above every other lipsdp method).
    specialised_rank = 13.0

    @staticmethod
    def applies(lmi) -> bool:
        """Whether every multiplier of ``lmi`` has a factored form."""
        return getattr(lmi, "factors", None) is not None

    #: ``auto`` prefers :class:`~lipsdp.solvers.chordal_.ChordalIPM` where its cost estimate is below
    #: this multiple of this one's: an iteration here is ``r x r`` dense (``r`` factor rows, growing
    #: with depth), chordal's is linear in depth.  Calibrated on deep narrow nets from the swept start
    #: of :mod:`lipsdp.layer_sweep` (docs/performance.md).
    chordal_ratio = 2.5
    #: ... the same where the iteration goes through the dense inverses (:mod:`~lipsdp.solvers.completion_dense`):
    #: trained 784-16x64-10 solves faster by the chordal method, 784-32x64-10 by this one.
    chordal_ratio_dense = 1.5
    #: ... and the dense :class:`~lipsdp.solvers.ipm_.LowRankIPM` where this multiple of its estimate is
    #: below this one's (shallow wide nets), calibrated likewise.
    dense_ratio = 1.3

    @classmethod
    def memory_estimate(cls, lmi) -> int:
        if lmi.factors is None:
            return super().memory_estimate(lmi)
        # Eight (n, r) arrays (R^T, four reused work buffers for the solves and the corrector, the
        # products with K), three r x r Gram matrices (two reused buffers), the term-by-term Schur
        # pieces and H; the iterates themselves are block-tridiagonal.
        r, t = lmi.factors[0].shape[0], len(lmi.factors[3])
        if fits(lmi):  # the dense inverses' arrays instead (completion_dense)
            return dense.memory(lmi) + 8 * (5 * t * t + 2 * lmi.n_var ** 2) + 6 * stored_bytes(lmi)
        return 8 * (8 * lmi.n * r + 3 * r * r + 5 * t * t + 2 * lmi.n_var ** 2) + 6 * stored_bytes(lmi)

    @classmethod
    def iteration_cost(cls, lmi) -> float:
        return estimate_cost(lmi)

    @classmethod
    def preference(cls, lmi) -> float | None:
        """Preferred with factored terms, a layer-by-layer start (chain LMIs, where :mod:`lipsdp.scaling`
        found one), an affordable iteration, and cheaper than the dense ipm and the
        :class:`~lipsdp.solvers.chordal_.ChordalIPM` (where that applies)."""
        shape = LMIShape.of(lmi)
        if not shape.structured or not cls.applies(shape.lmi) or shape.lmi.start is None:
            return None
        cost, chordal = shape.cost(cls), shape.cost(ChordalIPM)
        ratio = cls.chordal_ratio_dense if fits(shape.lmi) else cls.chordal_ratio
        if (cost <= cls.max_auto_cost and cost <= cls.dense_ratio * dense_iteration_cost(shape.lmi)
                and (chordal is None or ratio * cost <= chordal)):
            return cls.specialised_rank
        return None

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        t0 = time.perf_counter()
        if not self.applies(lmi):
            return SolveResult("solver_error", None, None, time.perf_counter() - t0,
                               message="completion needs factored constraint terms; a constraint family gave none")
        # The work is BLAS-3 on (n, r) and (r, r) arrays, r ~ 2n factor rows: size the run's thread pools
        # (lipsdp.threads; a no-op outside a run, and --threads wins) for r rows rather than n.
        threads = thread_pools.fit(max(lmi.n, lmi.factors[0].shape[0]))
        state = _Completion(lmi, PatternChain(BlockChain(lmi)), tol or self.default_tol, time_limit, t0, verbose,
                            self.max_iters, self.step_fraction)
        state.workers = threads or 1
        status, message = state.run()
        if state.y is None and lmi.n <= LowRankIPM.max_auto_size:
            # No strictly feasible start (no layer-by-layer point, or a sector it does not cover):
            # the dense ipm starts infeasible and needs none.
            result = LowRankIPM().solve(lmi, time_limit=None if not time_limit else
                                        max(time_limit - (time.perf_counter() - t0), 1.0), tol=tol, verbose=verbose)
            result.message = f"{message}; solved by the dense ipm instead ({result.message})"
            result.seconds = time.perf_counter() - t0
            return result
        y = state.y
        return SolveResult(status, None if y is None else y.copy(),
                           None if y is None else float(lmi.objective @ y), time.perf_counter() - t0,
                           state.iterations, message,
                           extras={"dual_objective": state.dual_objective if state.dinf < 1e-5 else float("nan"),
                                   "gap": state.gap, "path": state.path, "dual_infeasibility": state.dinf,
                                   "blocks": len(state.chain.sizes)})


def estimate_cost(lmi) -> float:
    """Flops of one iteration (about): four block solves, three slab products ``R Y``, five
    pattern products with ``r`` columns, the Schur complement and its Cholesky factor; or, where
    the dense inverses serve (:func:`lipsdp.solvers.row_basis.fits`), their estimate.

    Calibrated against measured iteration times on one core (docs/performance.md).
    """
    if fits(lmi):
        return dense.estimate_cost(lmi)
    sizes = np.array([b.stop - b.start for b in lmi.blocks], dtype=np.float64) if lmi.blocks else \
        np.array([float(lmi.n)])
    r = float(lmi.factors[0].shape[0])
    band = float(np.sum(sizes ** 2) + 2.0 * np.sum(sizes[1:] * sizes[:-1]))
    span = float(np.max(sizes[:-1] + sizes[1:])) if len(sizes) > 1 else float(sizes[0])
    terms, m = float(len(lmi.factors[3])), float(lmi.n_var)
    return 2.0 * r * band * 9 + 3 * 2.0 * r * r * span + m ** 3 / 3 + 12.0 * terms ** 2


class PatternChain:
    """Matrices with the pattern of ``S(y) = -M(y)``: block-tridiagonal on the blocks of a
    :class:`lipsdp.chain.BlockChain` (one dense block where the LMI is no layer chain).

    Holds the lower blocks in one flat buffer (diagonal blocks ``D_k``, then sub-diagonal
    blocks ``B_k = S[k, k-1]``), a scatter index for the LMI's COO entries, and the factor
    rows ``R`` grouped into dense slabs over the blocks they span.
    """

    def __init__(self, blocks: BlockChain):
        lmi = blocks.lmi
        if not (blocks.nb >= 2 and blocks.is_layer_chain):
            blocks = BlockChain(lmi, whole=True)
        rows, cols = np.asarray(lmi.rows), np.asarray(lmi.cols)
        const = sp.coo_matrix(lmi.const)
        self.blocks = blocks
        self.starts, self.sizes = blocks.starts, blocks.sizes
        nb = len(self.sizes)
        d_off = np.concatenate([[0], np.cumsum(self.sizes ** 2)])
        b_sizes = np.concatenate([[0], self.sizes[1:] * self.sizes[:-1]])
        b_off = d_off[-1] + np.concatenate([[0], np.cumsum(b_sizes)])
        self.d_off, self.b_off, self.length = d_off, b_off, int(b_off[-1])

        def scatter(r, c):
            """Flat positions of entries ``(r, c)``; -1 for the upper off-diagonal blocks (unused)."""
            k, j = self.block_of(r), self.block_of(c)
            pos = np.full(len(r), -1, dtype=np.int64)
            d = k == j
            pos[d] = d_off[k[d]] + (r[d] - self.starts[k[d]]) * self.sizes[k[d]] + (c[d] - self.starts[k[d]])
            s = k == j + 1
            pos[s] = b_off[k[s]] + (r[s] - self.starts[k[s]]) * self.sizes[j[s]] + (c[s] - self.starts[j[s]])
            return pos

        self.scatter = scatter
        cpos = scatter(const.row.astype(np.int64), const.col.astype(np.int64))
        ck = cpos >= 0
        self.const = -np.bincount(cpos[ck], weights=const.data[ck], minlength=self.length)
        self.nb = nb

        # Factor rows: unit rows (a neuron's own output q_i, ReLU's a_i) pick a row of R Y as it is;
        # the others are grouped by the first block they touch, each group's slab spanning two blocks.
        R = sp.csr_matrix(lmi.factors[0])
        R.sum_duplicates()
        self.r = R.shape[0]
        Rc = R.tocoo()
        single = np.diff(R.indptr) == 1
        self.unit = (np.flatnonzero(single), R.indices[R.indptr[:-1][single]], R.data[R.indptr[:-1][single]])
        first = np.full(self.r, nb - 1, dtype=np.int64)
        last = np.zeros(self.r, dtype=np.int64)
        np.minimum.at(first, Rc.row, self.block_of(Rc.col))
        np.maximum.at(last, Rc.row, self.block_of(Rc.col))
        self.slabs = []
        for k in np.unique(first[~single]):
            idx = np.flatnonzero((first == k) & ~single)
            a, b = self.starts[k], self.starts[max(min(k + 2, nb), int(last[idx].max()) + 1)]
            self.slabs.append((idx, a, b, R[idx][:, a:b].toarray()))
        self.R = R
        # Unit rows first, then each slab's rows as one run, slab after slab (gram_of's symmetric half).
        order = np.concatenate([self.unit[0]] + [idx for idx, _, _, _ in self.slabs])
        self.ordered = bool(len(order) == self.r and np.array_equal(order, np.arange(self.r))
                            and np.array_equal(self.unit[0], np.arange(len(self.unit[0]))))
        self.plan = self.slab_plan(R, *lmi.factors[1:])
        # Row i of R is zero before block first[i]; where those blocks never decrease down the rows, the
        # columns of R^T that are nonzero in blocks <= k are a prefix, of length active[k] (solve's forward sweep).
        self.active = np.searchsorted(first, np.arange(nb), side="right") \
            if np.all(np.diff(first) >= 0) else None
        if self.plan is None:  # terms the slabs do not cover: assemble from the LMI's entries
            pos = scatter(rows, cols)
            keep = pos >= 0
            self.pos, self.vals, self.var = pos[keep], np.asarray(lmi.vals)[keep], np.asarray(lmi.var)[keep]

    @cached_property
    def Rt(self):
        """``R^T`` dense, ``(n, r)``: the right-hand sides of ``S Y = R^T`` (:class:`RowKernel` only)."""
        return np.ascontiguousarray(self.R.T.toarray())

    def block_of(self, idx):
        return self.blocks.block_of(idx)

    def slab_plan(self, R, iu, iw, coef, var):
        """How to assemble ``sum_j y_j F_j = R^T K(y) R`` on the band slab by slab (docs/math.md §8.6),
        or None where some term does not fit (the LMI's entries are then scattered instead).

        A term joins the slab of its non-unit row(s); its rows must lie in that slab or be unit rows
        whose column lies in the slab's span, and the span must be one block or two consecutive ones.
        Terms between two unit rows are single entries.  Returns ``(groups, unit terms)``: per slab
        ``(first block, term ids, Ru, Rw)`` with ``Ru, Rw`` the dense rows of the terms' two sides
        over the span, and ``(term ids, flat positions, weights)`` for the unit-unit terms.
        """
        iu, iw = np.asarray(iu, dtype=np.int64), np.asarray(iw, dtype=np.int64)
        coef, var = np.asarray(coef, dtype=np.float64), np.asarray(var, dtype=np.int64)
        urow, ucol, uval = self.unit
        ucols = np.full(self.r, -1, dtype=np.int64)
        ucols[urow] = ucol
        uvals = np.zeros(self.r)
        uvals[urow] = uval
        slab_of = np.full(self.r, -1, dtype=np.int64)
        for g, (idx, _, _, _) in enumerate(self.slabs):
            slab_of[idx] = g
        g_t = np.where(slab_of[iu] >= 0, slab_of[iu], slab_of[iw])
        groups = []
        for g in np.unique(g_t[g_t >= 0]):
            tids = np.flatnonzero(g_t == g)
            idx, a, b, slab = self.slabs[g]
            k = int(self.block_of(np.array([a]))[0])
            if self.starts[k] != a or b not in (self.starts[k + 1], self.starts[min(k + 2, self.nb)]):
                return None
            local = np.full(self.r, -1, dtype=np.int64)
            local[idx] = np.arange(len(idx))

            def side(rows):
                out = np.zeros((len(rows), b - a))
                ins = local[rows] >= 0
                out[ins] = slab[local[rows[ins]]]
                uc = ucols[rows[~ins]]
                if np.any(slab_of[rows[~ins]] >= 0) or np.any((uc < a) | (uc >= b)):
                    return None  # a row of another slab, or a unit row outside the span
                out[np.flatnonzero(~ins), uc - a] = uvals[rows[~ins]]
                return out

            Ru, Rw = side(iu[tids]), side(iw[tids])
            if Ru is None or Rw is None:
                return None
            groups.append((k, tids, Ru, Rw))
        ut = np.flatnonzero(g_t < 0)
        cu, cw = ucols[iu[ut]], ucols[iw[ut]]
        # Both orientations (a diagonal block is stored whole); a term on one row lands twice, as in K.
        pos = np.concatenate([self.scatter(cu, cw), self.scatter(cw, cu)])
        wts = np.tile(uvals[iu[ut]] * uvals[iw[ut]], 2)
        keep = pos >= 0
        return groups, (np.tile(ut, 2)[keep], pos[keep], wts[keep]), coef, var

    def linear(self, y):
        """The flat lower blocks of ``sum_j y_j F_j``, from the factors where :meth:`slab_plan` applies."""
        if self.plan is None:
            return np.bincount(self.pos, weights=self.vals * y[self.var], minlength=self.length)
        groups, (ut, upos, uw), coef, var = self.plan
        kap = coef * y[var]
        # (as float even with no unit-unit terms: bincount of nothing is an integer array)
        out = np.bincount(upos, weights=uw * kap[ut], minlength=self.length).astype(np.float64, copy=False)
        for k, tids, Ru, Rw in groups:
            M = Ru.T @ (kap[tids, None] * Rw)
            M += M.T
            s = self.sizes[k]
            self.diag(out, k)[:] += M[:s, :s]
            if M.shape[0] > s:
                self.sub(out, k + 1)[:] += M[s:, :s]
                self.diag(out, k + 1)[:] += M[s:, s:]
        return out

    def assemble(self, y):
        """The flat lower blocks of ``S(y)``."""
        return self.const - self.linear(y)

    def direction(self, dy):
        """The flat lower blocks of ``sum_j dy_j F_j`` (so ``S(y + a dy) = S(y) - a D``)."""
        return self.linear(dy)

    def factor(self, flat):
        """Block Cholesky ``(L_kk, E_k = L_{k,k-1}, log det)``, or None if not positive definite.

        LAPACK and BLAS are called directly: on a deep net the factor is a few hundred
        small calls per iteration, where scipy.linalg's checking wrappers cost more than the flops.
        """
        Ls, Es, logdet = [], [None], 0.0
        for k, s in enumerate(self.sizes):
            Dk = flat[self.d_off[k]:self.d_off[k] + s * s].reshape(s, s)
            if k:
                Bk = flat[self.b_off[k]:self.b_off[k + 1]].reshape(s, self.sizes[k - 1])
                # E_k^T = L_{k-1}^{-1} B_k^T (B_k^T is Fortran-ordered: no copy).
                Ek = _dtrsm(1.0, Ls[-1], Bk.T, side=0, lower=1, trans_a=0).T
                Es.append(Ek)
                Dk = Dk - Ek @ Ek.T
            Lk, info = _dpotrf(Dk, lower=1, clean=1)
            if info != 0:
                return None
            Ls.append(Lk)
            logdet += 2.0 * float(np.sum(np.log(np.diagonal(Lk))))
        return Ls, Es, logdet

    def inverses(self, fac):
        """The inverses of the factor's diagonal blocks ``L_k`` (None for one that is not invertible in
        floating point), for :meth:`solve` on several column slices with one factor."""
        out = []
        for L in fac[0]:
            inv, info = _dtrtri(L, lower=1)
            out.append(inv if info == 0 else None)
        return out

    def solve(self, fac, B, active=None, inverses=None):
        """``S^{-1} B`` for ``B`` of shape ``(n, r)``, C-ordered or a column slice of one (overwritten in place).

        Row slabs of ``B`` are C-contiguous, so their transposes go to BLAS's ``trsm`` as
        Fortran arrays from the right: ``X^T = B_k^T L_k^{-T}`` (forward), ``B_k^T L_k^{-1}`` (back).
        ``active``: ``B``'s columns that are nonzero in blocks ``0..k`` are its first ``active[k]``
        (:attr:`active`, for ``B = R^T``): the forward sweep ``L^{-1} B`` keeps the zeros above
        each column's first block, so it skips them (half its flops on a chain).
        ``inverses``: :meth:`inverses` of ``fac``; then both sweeps are products with them (numpy's matmul
        releases the GIL, scipy's LAPACK and BLAS wrappers do not: column slices solved in two threads
        serialised on the forward ``trsm``).
        """
        Ls, Es, _ = fac
        st = self.starts
        r = B.shape[1]
        tmp = np.empty((int(np.max(self.sizes)), B.shape[1]))
        forward = inverses is not None
        inverses = self.inverses(fac) if inverses is None else inverses
        for k, L in enumerate(Ls):
            c = r if active is None else int(active[k])
            if c == 0:
                continue
            blk = B[st[k]:st[k + 1], :c]
            if k:
                blk -= Es[k] @ B[st[k - 1]:st[k], :c]
            if forward and inverses[k] is not None:
                t = tmp[:len(blk), :c]
                np.matmul(inverses[k], blk, out=t)
                blk[...] = t
            elif blk.flags.c_contiguous:
                _dtrsm(1.0, L, blk.T, side=1, lower=1, trans_a=1, overwrite_b=1)
            else:  # a column slice is no Fortran array for BLAS: solved in a copy
                blk[...] = _dtrsm(1.0, L, blk.T, side=1, lower=1, trans_a=1).T
        # Back: B_k <- L_k^{-T} B_k by a product with the explicit inverse.  BLAS's trsm for this side
        # (X L = B from the right) ran at a third of the forward one's speed; the inverses of the
        # small triangular blocks cost next to nothing.
        for k in reversed(range(len(Ls))):
            blk = B[st[k]:st[k + 1]]
            if k + 1 < len(Ls):
                blk -= Es[k + 1].T @ B[st[k + 1]:st[k + 2]]
            inv = inverses[k]
            if inv is None:  # not invertible in floating point: the triangular solve (in a copy for a slice)
                blk[...] = _dtrsm(1.0, Ls[k], blk.T, side=1, lower=1, trans_a=0).T
                continue
            t = tmp[:len(blk)]
            np.matmul(inv.T, blk, out=t)
            blk[...] = t
        return B

    # -- the pattern's algebra ----------------------------------------------
    def diag(self, flat, k):
        s = self.sizes[k]
        return flat[self.d_off[k]:self.d_off[k] + s * s].reshape(s, s)

    def sub(self, flat, k):
        """Block ``(k, k-1)``, ``k >= 1``."""
        return flat[self.b_off[k]:self.b_off[k + 1]].reshape(self.sizes[k], self.sizes[k - 1])

    def inner(self, A, B):
        """``<A, B>`` of two symmetric matrices given by their lower blocks."""
        d = self.d_off[-1]
        return float(A[:d] @ B[:d] + 2.0 * (A[d:] @ B[d:]))

    def identity(self):
        flat = np.zeros(self.length)
        for k in range(self.nb):
            np.fill_diagonal(self.diag(flat, k), 1.0)
        return flat

    def selected_inverse(self, fac):
        """``P(S^{-1})`` from the block Cholesky factor, by the backward recursion
        ``Z_{k+1,k} = -Z_{k+1,k+1} E_{k+1} L_k^{-1}``, ``Z_kk = (L_k^{-T} - Z_{k+1,k}^T E_{k+1}) L_k^{-1}``."""
        Ls, Es, _ = fac
        Z = np.zeros(self.length)
        for k in reversed(range(self.nb)):
            Linv = solve_triangular(Ls[k], np.eye(self.sizes[k]), lower=True, check_finite=False)
            if k + 1 < self.nb:
                Zs = -(self.diag(Z, k + 1) @ Es[k + 1]) @ Linv
                self.sub(Z, k + 1)[:] = Zs
                Zk = (Linv.T - Zs.T @ Es[k + 1]) @ Linv
            else:
                Zk = Linv.T @ Linv
            self.diag(Z, k)[:] = (Zk + Zk.T) / 2
        return Z

    def cliques(self, X):
        """The clique submatrices of ``X_P``: ``[(first block, dense matrix)]``."""
        if self.nb == 1:
            return [(0, self.diag(X, 0).copy())]
        out = []
        for k in range(1, self.nb):
            a = self.sizes[k - 1]
            C = np.empty((a + self.sizes[k],) * 2)
            C[:a, :a] = self.diag(X, k - 1)
            C[a:, :a] = self.sub(X, k)
            C[:a, a:] = self.sub(X, k).T
            C[a:, a:] = self.diag(X, k)
            out.append((k - 1, C))
        return out

    def completion_inverse(self, X):
        """``((X^)^{-1} as lower blocks, the cliques' Cholesky factors)``, or None if ``X_P`` has no
        positive definite completion."""
        W = np.zeros(self.length)
        factors = []
        for k0, C in self.cliques(X):
            try:
                L = cholesky(C, lower=True, check_finite=False)
            except LinAlgError:
                return None
            factors.append(L)
            Ci, info = dpotri(L, lower=1)
            if info != 0:
                return None
            Ci = np.tril(Ci) + np.tril(Ci, -1).T
            a = self.sizes[k0]
            self.diag(W, k0)[:] += Ci[:a, :a]
            if self.nb > 1:
                self.sub(W, k0 + 1)[:] += Ci[a:, :a]
                self.diag(W, k0 + 1)[:] += Ci[a:, a:]
        for k in range(1, self.nb - 1):  # separators: the interior blocks, shared by two cliques
            try:
                L = cholesky(self.diag(X, k), lower=True, check_finite=False)
            except LinAlgError:
                return None
            Di, _ = dpotri(L, lower=1)
            self.diag(W, k)[:] -= np.tril(Di) + np.tril(Di, -1).T
        return W, factors

    def gram_of(self, Y, out=None, symmetric=False):
        """``R Y`` for ``Y`` of shape ``(n, r)``: unit rows by copy, the others slab by slab.

        ``symmetric``: ``R Y`` is known to be symmetric (``Y = A R^T``, ``A`` symmetric); where the
        rows come in order (unit rows, then the slabs in turn, as the lifting lays them out) only
        the lower block triangle is multiplied and the rest mirrored, half the flops.  ``out``: an
        ``(r, r)`` buffer to fill (large arrays allocated anew every iteration cost page faults).
        """
        G = np.empty((self.r, Y.shape[1])) if out is None else out
        rows, cols, vals = self.unit
        if symmetric and self.ordered:
            nu = len(rows)
            G[:nu, :nu] = Y[cols, :nu] * vals[:, None]
            for idx, a, b, slab in self.slabs:
                i0, i1 = idx[0], idx[-1] + 1
                np.matmul(slab, Y[a:b, :i1], out=G[i0:i1, :i1])
                G[:i0, i0:i1] = G[i0:i1, :i0].T
            return G
        G[rows] = Y[cols] * vals[:, None]
        for idx, a, b, slab in self.slabs:
            if idx[-1] - idx[0] + 1 == len(idx):
                np.matmul(slab, Y[a:b], out=G[idx[0]:idx[-1] + 1])
            else:
                G[idx] = slab @ Y[a:b]
        return G

    def pattern_times(self, A, B, out=None, threads=1):
        """``A B`` for symmetric ``A`` with the pattern (lower blocks) and ``B`` of shape ``(n, r)``;
        ``threads >= 2``: the first and the second half of the block rows in two threads."""
        out = np.empty_like(B) if out is None else out
        thread_pools.halves(lambda k0, k1: self.pattern_times_rows(A, B, out, k0, k1), self.nb, threads)
        return out

    def pattern_times_rows(self, A, B, out, k0, k1):
        """Block rows ``k0 <= k < k1`` of :meth:`pattern_times` into ``out``."""
        st = self.starts
        for k in range(k0, k1):
            # The block row (A_{k,k-1}, A_kk, A_{k,k+1}) times B's rows of blocks k-1..k+1: one product.
            row = [self.sub(A, k)] if k else []
            row.append(self.diag(A, k))
            if k + 1 < self.nb:
                row.append(self.sub(A, k + 1).T)
            np.matmul(np.hstack(row), B[st[max(k - 1, 0)]:st[min(k + 2, self.nb)]], out=out[st[k]:st[k + 1]])

    def pattern_product(self, Q, Y, threads=1):
        """``P(sym(Q Y^T))``: lower blocks of ``(Q Y^T + Y Q^T) / 2`` for ``Q, Y`` of shape ``(n, r)``.

        ``threads >= 2``: the first and the second half of the block rows in two threads
        (:func:`lipsdp.threads.both`); each block is made alike either way."""
        out = np.empty(self.length)
        thread_pools.halves(lambda k0, k1: self.pattern_rows(Q, Y, out, k0, k1), self.nb, threads)
        return out

    def pattern_rows(self, Q, Y, out, k0, k1):
        """Block rows ``k0 <= k < k1`` of :meth:`pattern_product` into ``out``."""
        st = self.starts
        for k in range(k0, k1):
            Qk, Yk = Q[st[k]:st[k + 1]], Y[st[k]:st[k + 1]]
            M = Qk @ Yk.T
            self.diag(out, k)[:] = (M + M.T) / 2
            if k:
                Qp, Yp = Q[st[k - 1]:st[k]], Y[st[k - 1]:st[k]]
                self.sub(out, k)[:] = (Qk @ Yp.T + Yk @ Qp.T) / 2
        return out


class _Completion:
    """State and steps of one completion-method solve (see the module docstring)."""

    path_length = 8
    #: The margin stop: near the optimum (relative gap under ``margin_gap``) the iteration stops once
    #: :meth:`margin` is under ``margin_roundings`` times the rounding level of ``S``'s test, where the
    #: verification would raise ``rho`` by more than the later iterates gain (docs/math.md §8.12).
    margin_gap = 1e-4
    margin_roundings = 150.0
    #: The Schur complement goes block by block over pairs of runs of terms up to this many runs
    #: (python loops over the pairs), through term_schur's gathers beyond.
    most_runs = 160
    #: The start multiplies the layer-by-layer point by this: strictly feasible, and well inside
    #: (the iteration count is insensitive to it; ``X = I``, ``z = 1`` as in the ipm).
    inflate = 2.0

    def __init__(self, lmi, chain, tol, time_limit, t0, verbose, max_iters, step_fraction):
        self.lmi, self.chain = lmi, chain
        # The rounding level of the verification's test on S(y) relative to its largest diagonal entry (a
        # Cholesky factor's backward error on rows of about three blocks), times margin_roundings.
        self.margin_floor = self.margin_roundings * (min(int(lmi.n), 3 * int(np.max(chain.sizes))) + 1) * _U
        self.tol, self.time_limit, self.t0, self.verbose = tol, time_limit, t0, verbose
        self.max_iters, self.step_fraction = max_iters, step_fraction
        self.c = np.asarray(lmi.objective, dtype=np.float64)
        self.m = len(self.c)
        self.N = np.flatnonzero(lmi.nonneg)
        R, iu, iw, coef, var = lmi.factors
        self.iu, self.iw = np.asarray(iu), np.asarray(iw)
        T = len(coef)
        self.KT = sp.csr_matrix((np.asarray(coef, dtype=np.float64), (np.arange(T), np.asarray(var))),
                                shape=(T, self.m)).T.tocsr()
        self.coef, self.var = np.asarray(coef, dtype=np.float64), np.asarray(var)
        self.runs = self.term_runs(self.iu, self.iw)
        # How the Schur complement's blocks add into H (schur); None where it goes through term_schur.
        self.into = None if self.runs is None or len(self.runs) > self.most_runs else self.collapse()
        self.H = None  # the Schur complement's buffer (schur)
        # Whether the runs' sides (one side where u = w) cover the r rows once each: Y K then writes
        # each column of its output once, with no zero fill and no temporaries (times_terms).
        sides = [] if self.runs is None else \
            [np.arange(a, a + t1 - t0) for t0, t1, u0, w0 in self.runs for a in ({u0, w0})]
        self.once = bool(sides) and np.array_equal(np.sort(np.concatenate(sides)), np.arange(chain.r))
        self.iterations = 0
        self.y = None
        self.path = []
        self.dual_objective = self.gap = self.dinf = float("nan")
        #: Threads of the run (lipsdp.threads); with two or more, independent large products of an
        #: iteration run two at a time (:func:`lipsdp.threads.both`), each on half of them.
        self.workers = 1

    @staticmethod
    def term_runs(iu, iw, most: int = 512):
        """``[(t0, t1, u0, w0)]``: maximal runs of terms ``t0 <= t < t1`` with ``iu[t] = u0 + t - t0`` and
        ``iw[t] = w0 + t - t0`` (a layer's terms, as the lifting lays them out), or None if there are more
        than ``most`` (products with ``K`` then go through scipy.sparse)."""
        if not len(iu):
            return None
        brk = np.flatnonzero((np.diff(iu) != 1) | (np.diff(iw) != 1)) + 1
        if len(brk) >= most:
            return None
        edges = np.concatenate([[0], brk, [len(iu)]])
        return [(int(a), int(b), int(iu[a]), int(iw[a])) for a, b in zip(edges[:-1], edges[1:])]

    def schur(self, GX, GZ):
        """The Schur complement ``H_ij = tr(F_i X^ F_j S^{-1})`` from the Gram matrices: the formula of
        :func:`lipsdp.interior.term_schur`, with its ``(terms x terms)`` gathers taken as slices, one
        block per pair of runs of terms, where there are few runs.

        Each term has one multiplier, so ``H = K^T h K`` adds up ``coef_s coef_t h_st`` over the
        terms of each pair of multipliers: each block of ``h`` is scaled and added into ``H`` as it
        is made (:meth:`collapse`), and only the blocks on and below the diagonal are made
        (``h`` is symmetric), with neither the ``T x T`` array ``h`` nor two sparse products.
        """
        if self.runs is None or len(self.runs) > self.most_runs:
            return term_schur(GX, GZ, self.iu, self.iw, self.KT)
        into = self.into
        T = len(self.iu)
        h = np.empty((T, T)) if into is None else None
        if into is not None:
            # One m x m buffer for all iterations (factor_schur factors it in place; the previous
            # iteration's factor is not used any more): a fresh one costs its page faults each time.
            if self.H is None:
                self.H = np.zeros((self.m, self.m))
            H = self.H
            H.fill(0.0)
        most = max(b - a for a, b, _, _ in self.runs)
        buf, tmp = np.empty((most, most)), np.empty((most, most))
        for ia, (a0, a1, ua, wa) in enumerate(self.runs):
            ra, sa = slice(ua, ua + a1 - a0), slice(wa, wa + a1 - a0)
            for ib, (b0, b1, ub, wb) in enumerate(self.runs if into is None else self.runs[:ia + 1]):
                rb, sb = slice(ub, ub + b1 - b0), slice(wb, wb + b1 - b0)
                blk = h[a0:a1, b0:b1] if into is None else buf[:a1 - a0, :b1 - b0]
                t = tmp[:a1 - a0, :b1 - b0]
                np.multiply(GX[sa, rb], GZ[ra, sb], out=blk)
                blk += np.multiply(GX[sa, sb], GZ[ra, rb], out=t)
                blk += np.multiply(GX[ra, rb], GZ[sa, sb], out=t)
                blk += np.multiply(GX[ra, sb], GZ[sa, rb], out=t)
                if into is not None:
                    self.add_block(H, blk, into[ia], into[ib], ib == ia)
        if into is not None:
            return H
        KTh = self.KT @ h
        return (self.KT @ KTh.T).T

    @staticmethod
    def add_block(H, blk, a, b, diagonal):
        """Add the block ``h_st`` of two runs (or tiles) of terms into ``H`` (:meth:`collapse`'s entries ``a``,
        ``b``): scaled by both sides' coefficients, the rows and columns of one multiplier summed, and
        mirrored unless ``diagonal`` (then made exactly symmetric, so that ``H`` is: factor_schur).
        ``blk`` is overwritten."""
        (ca, va, sta), (cb, vb, stb) = a, b
        blk *= ca
        blk *= cb.T
        red = blk if sta is None else np.add.reduceat(blk, sta, axis=0)
        red = red if stb is None else np.add.reduceat(red, stb, axis=1)
        if diagonal:
            red = (red + red.T) / 2
        if isinstance(va, slice) and isinstance(vb, slice):
            H[va, vb] += red
            if not diagonal:
                H[vb, va] += red.T
        else:  # multipliers not consecutive: fancy indices (unique within a run, so += adds)
            H[np.ix_(np.r_[va], np.r_[vb])] += red
            if not diagonal:
                H[np.ix_(np.r_[vb], np.r_[va])] += red.T

    def collapse(self):
        """Per run of terms ``(coef column, multipliers' index, reduceat starts or None)``: how its block
        rows of ``h`` add into ``H`` (the rows of one multiplier summed), or None where a run's
        multipliers are not in ascending order (``H = K^T h K`` by sparse products then)."""
        out = []
        for t0, t1, _, _ in self.runs:
            v = self.var[t0:t1]
            d = np.diff(v)
            if np.any(d < 0):
                out = None
                break
            col = self.coef[t0:t1, None].copy()
            if np.all(d == 1):
                out.append((col, slice(int(v[0]), int(v[0]) + len(v)), None))
                continue
            sta = np.concatenate([[0], np.flatnonzero(d) + 1])
            u = v[sta]
            idx = slice(int(u[0]), int(u[0]) + len(u)) if np.all(np.diff(u) == 1) else u
            out.append((col, idx, sta))
        return out

    def start(self):
        """A strictly feasible ``(y, S factor)``, or None if none was found.

        The LMI's start hint is feasible with ``M(y) = K + M_var(y)``, ``K = C^T C >= 0`` and
        ``-M_var(y)`` positive definite, but tight; ``f y`` for ``f > 1`` is strictly feasible,
        ``S(f y) = S(y) - (f - 1) M_var(y)``.  Without a hint: unit multipliers, scaled up until ``S`` factors.
        """
        lmi, ch = self.lmi, self.chain
        if lmi.start is not None and np.all(np.isfinite(lmi.start)):
            y = np.asarray(lmi.start, dtype=np.float64).copy()
        else:
            y = np.zeros(self.m)
            y[self.N] = 1.0
            y[: lmi.n_in] = 1.0
        y[self.N] = np.maximum(y[self.N], 1e-12 * max(1.0, float(np.max(y[self.N], initial=0.0))))
        y *= self.inflate
        for _ in range(60):
            fac = ch.factor(ch.assemble(y))
            if fac is not None:
                return y, fac
            y *= 2.0
        return None

    def start_X(self, fac, S):
        """The primal start: ``tau_k I`` on each diagonal block, ``tau_k`` the mean eigenvalue of that
        block of ``S^{-1}``, all scaled so that ``<X, S> = n`` (docs/math.md §8.7).

        ``X = I`` suits blocks that the preconditioning balanced, but on deep chains the optimal
        ``X`` decays along the chain (the worst-case direction shrinks layer by layer), and from
        ``X = I`` the method spent most of its iterations shrinking the deep blocks with short steps,
        or stalled (a 64-layer net).  The exactly central ``X = mu S^{-1}`` is no better: its
        scale follows ``S``'s smallest eigenvalues.  The block traces of ``S^{-1}`` carry the decay
        without them.
        """
        ch = self.chain
        Zp = ch.selected_inverse(fac)
        X = np.zeros(ch.length)
        for k in range(ch.nb):
            np.fill_diagonal(ch.diag(X, k), np.trace(ch.diag(Zp, k)) / ch.sizes[k])
        X *= self.lmi.n / ch.inner(X, S)
        return X

    def margin(self, S, Zp):
        """``1 / (tr(S^{-1}) max_i S_ii)``: a lower estimate of ``lambda_min(S) / max_i S_ii`` (within a small
        factor of it near the optimum, where a few directions of ``S`` become singular), free from ``P(S^{-1})``."""
        ch = self.chain
        trace = sum(float(np.trace(ch.diag(Zp, k))) for k in range(ch.nb))
        top = max(float(np.max(np.diagonal(ch.diag(S, k)))) for k in range(ch.nb))
        return 1.0 / (trace * top) if trace > 0 and top > 0 else 0.0

    def adjoint_gram(self, G):
        """``(<F_j, Y>)_j`` from ``G = R Y R^T``."""
        return self.KT @ (2.0 * G[self.iu, self.iw])

    def max_step_S(self, S, D, limit):
        """A step ``a <= limit`` with ``S - a D`` positive definite, within 2% of the largest
        (bisection on the block Cholesky; the caller takes a fraction of it anyway)."""
        ch = self.chain
        if ch.factor(S - limit * D) is not None:
            return limit
        lo, hi = 0.0, limit
        while hi - lo > 0.02 * hi:
            mid = (lo + hi) / 2
            if ch.factor(S - mid * D) is not None:
                lo = mid
            else:
                hi = mid
        return lo

    #: Which products an iteration uses: ``"auto"`` (the dense inverses where the rows allow,
    #: :mod:`~lipsdp.solvers.completion_dense`), ``"dense"`` or ``"rows"``.
    products = "auto"

    def kernel(self):
        """The iteration's products: :class:`~lipsdp.solvers.completion_dense.DenseKernel` where every row is a
        coordinate plus one pre-activation row (and not ruled out by :attr:`products`), else :class:`RowKernel`."""
        kernel = None
        if self.products != "rows":
            kernel = DenseKernel.make(self, self.chain, self.lmi)
        if kernel is None:
            kernel = RowKernel(self, self.chain)
        kernel.par = self.workers
        return kernel

    def run(self):
        """Iterate to a stop: ``(status, message)``; the iterate is left in :attr:`y`."""
        kernel = self.kernel()
        with thread_pools.blas(kernel.blas):
            return self.iterate(kernel)

    def iterate(self, kernel):
        ch, N, c = self.chain, self.N, self.c
        found = self.start()
        if found is None:
            return "solver_error", "no strictly feasible start (S(y) not positive definite at the start point)"
        y, fac = found
        S = ch.assemble(y)
        nc = float(self.lmi.n + len(N))
        normc = 1.0 + np.linalg.norm(c)
        X = self.start_X(fac, S)
        z = np.ones(len(N))
        F0 = -ch.const  # the LMI's constant term, lower blocks
        last = 0.0  # seconds of the previous iteration
        for it in range(self.max_iters):
            self.iterations = it
            self.y = y
            now = time.perf_counter()
            if it:
                last = now - t_it
            t_it = now
            # Stop before an iteration that would end past the limit (one is ~10^11 flops on 64-wide deep
            # nets): the point in hand is feasible, and the seconds left go to verifying it.
            if self.time_limit and now - self.t0 + last > self.time_limit:
                return "time_limit", f"time limit after {it} iterations" + \
                    (f" (the next, about {last:.2g} s, would pass it)" if now - self.t0 <= self.time_limit else "")
            comp = ch.completion_inverse(X)
            if comp is None:
                return "solver_error", f"primal iterate lost its positive definite completion at iteration {it}"
            W, xcliques = comp
            wfac = ch.factor(W)
            if wfac is None:
                return "solver_error", f"singular completion at iteration {it}"
            begun = kernel.begin(fac, wfac)
            if begun is None:
                return "solver_error", f"singular block at iteration {it}"
            AX, AZ, Zp = begun
            yN = y[N]
            zfull = np.zeros(self.m)
            zfull[N] = z
            r = zfull - c - AX
            mu = (ch.inner(X, S) + float(z @ yN)) / nc
            pobj, dobj = float(c @ y), ch.inner(F0, X)
            self.dual_objective = dobj
            self.gap = abs(pobj - dobj) / max(abs(pobj), abs(dobj), 1e-14)
            self.dinf = np.linalg.norm(r) / normc
            progress.iteration("completion", it, pobj, self.gap, self.tol)
            if self.gap < 1e-2:
                self.path.append(y.copy())
                del self.path[:-self.path_length]
            if self.verbose:
                print(f"completion {it:3d}  pobj {pobj:+.9e}  dobj {dobj:+.9e}  gap {self.gap:.1e}  "
                      f"dinf {self.dinf:.1e}  mu {mu:.1e}")
            if self.gap < self.tol and self.dinf < 1e3 * self.tol:
                return "optimal", f"converged in {it} iterations"
            if mu < 1e-3 * self.tol * max(abs(pobj), 1e-14) and self.gap < 1e2 * self.tol:
                return "optimal_inaccurate", f"stalled at iteration {it} (gap {self.gap:.1e})"
            if self.gap < self.margin_gap and self.margin(S, Zp) < self.margin_floor:
                return "optimal_inaccurate", (f"S(y) within {self.margin_floor / _U:.0f} roundings of singular at "
                                              f"iteration {it} (gap {self.gap:.1e}): later iterates verify worse")
            if not np.isfinite(mu):
                return "solver_error", "non-finite iterate"

            H = kernel.schur()
            H[N, N] += z / yN
            with thread_pools.blas(None if kernel.blas is None else self.workers):  # one large factor
                schur_solve = factor_schur(H, symmetric=self.into is not None)
            del H
            if schur_solve is None:
                return ("optimal_inaccurate" if self.gap < 1e-4 else "solver_error",
                        f"singular Schur complement at iteration {it} (gap {self.gap:.1e})")

            def direction(smu, corr_lp, corr=None):
                # rhs = r - A*(smu Z - X - C); the HKM step with S exact (no dual residual).
                rhs = r - smu * AZ + AX
                if corr is not None:
                    rhs += corr[1]
                rhs[N] += (smu - z * yN - corr_lp) / yN
                dy = schur_solve(rhs)
                D = ch.direction(dy)  # dS = -D
                # P(X^ dS S^{-1}) = -P(sym(X^ F S^{-1})), F = sum dy_j F_j.
                dX = smu * Zp - X + kernel.pattern(dy, D, corr, keep=corr is None)
                dz = (smu - z * yN - corr_lp - z * dy[N]) / yN
                return dy, D, dX, dz

            def steps(dy, D, dX, dz, limit):
                aP = min([InteriorPoint.max_step(L, C) for L, (_, C) in zip(xcliques, ch.cliques(dX))]
                         + [InteriorPoint.max_step_vec(z, dz), limit])
                aD = min(InteriorPoint.max_step_vec(yN, dy[N]), limit)
                aD = self.max_step_S(S, D, aD)
                return aP, aD

            dy, D, dX, dz = direction(0.0, 0.0)
            aP, aD = steps(dy, D, dX, dz, 1.0)
            mu_aff = (ch.inner(X + aP * dX, S - aD * D) + float((z + aP * dz) @ (yN + aD * dy[N]))) / nc
            sigma = min(1.0, max(0.0, mu_aff / mu)) ** 3
            dy, D, dX, dz = direction(sigma * mu, dy[N] * dz, kernel.corrector(dy, D))
            aP, aD = steps(dy, D, dX, dz, 1.0 / self.step_fraction)
            aP, aD = self.step_fraction * aP, self.step_fraction * aD
            if self.verbose:
                print(f"      steps aP {aP:.2e} aD {aD:.2e} sigma {sigma:.2e}")
            X = X + aP * dX
            z = z + aP * dz
            y = y + aD * dy
            S = ch.assemble(y)  # exactly -M(y)
            fac = ch.factor(S)
            while fac is None and aD > 1e-12:  # rounding pushed the step out of the cone: back off
                y = y - 0.5 * aD * dy
                aD *= 0.5
                S = ch.assemble(y)
                fac = ch.factor(S)
            if fac is None:
                return "solver_error", f"no positive definite dual step at iteration {it}"
        self.y = y
        self.iterations = self.max_iters
        if self.gap < 1e-4:
            return "optimal_inaccurate", f"iteration limit (gap {self.gap:.1e})"
        return "solver_error", "iteration limit reached"


class RowKernel:
    """One iteration's products of the completion method from the factor rows: ``X^ R^T`` and ``S^{-1} R^T``
    by block solves, their Gram matrices slab by slab (see the module docstring)."""

    def __init__(self, state, chain):
        self.state, self.ch = state, chain
        self.bufs = [np.empty(chain.Rt.shape), np.empty(chain.Rt.shape), np.empty((chain.r, chain.r)),
                     np.empty((chain.r, chain.r)), np.empty(chain.Rt.shape), np.empty(chain.Rt.shape)]
        self.par = 1
        self.blas = None  # BLAS threads during the iteration: the run's

    def begin(self, fac, wfac):
        """``(A*(X^), A*(S^{-1}), P(S^{-1}))``, keeping ``X^ R^T``, ``S^{-1} R^T`` and the Gram matrices."""
        ch, bufs, par, both, st = self.ch, self.bufs, self.par, thread_pools.both, self.state
        self.fac, self.wfac = fac, wfac
        # Work arrays reused from one iteration to the next (fresh large arrays cost page faults).
        np.copyto(bufs[0], ch.Rt)
        np.copyto(bufs[1], ch.Rt)
        self.XR, self.SR = both(lambda: ch.solve(wfac, bufs[0], ch.active),  # X^ R^T
                                lambda: ch.solve(fac, bufs[1], ch.active), par)  # S^{-1} R^T
        self.GX, self.GS = both(lambda: ch.gram_of(self.XR, bufs[2], symmetric=True),
                                lambda: ch.gram_of(self.SR, bufs[3], symmetric=True), par)
        return st.adjoint_gram(self.GX), st.adjoint_gram(self.GS), ch.selected_inverse(fac)

    def schur(self):
        return self.state.schur(self.GX, self.GS)

    def times_terms(self, Y, dy, out):
        """``Y K`` for ``Y`` of shape ``(n, r)``, where ``sum_j dy_j F_j = R^T K R`` (``K`` sparse and
        symmetric, ``kappa_t`` at ``(u_t, w_t)`` and ``(w_t, u_t)``), into the buffer ``out``; with
        two or more threads the upper and the lower half of the rows at once (row by row alike)."""
        thread_pools.halves(lambda a, b: self.rows_times_terms(Y[a:b], dy, out[a:b]), len(Y), self.par)
        return out

    def rows_times_terms(self, Y, dy, out):
        st = self.state
        kap = st.coef * dy[st.var]
        if st.runs is None:
            K = sp.coo_matrix((np.concatenate([kap, kap]), (np.concatenate([st.iu, st.iw]),
                                                            np.concatenate([st.iw, st.iu]))),
                              shape=(self.ch.r, self.ch.r)).tocsr()
            out[...] = (K @ Y.T).T
            return out
        # Runs of consecutive terms on consecutive rows: column slices, no transposed copy of Y.
        if st.once:  # each column of out is one run's side: written, not accumulated
            for t0, t1, u0, w0 in st.runs:
                k, L = kap[t0:t1], t1 - t0
                if u0 == w0:  # terms on one row: kappa_t at (u_t, u_t) twice
                    np.multiply(Y[:, u0:u0 + L], 2.0 * k, out=out[:, u0:u0 + L])
                else:
                    np.multiply(Y[:, u0:u0 + L], k, out=out[:, w0:w0 + L])
                    np.multiply(Y[:, w0:w0 + L], k, out=out[:, u0:u0 + L])
            return out
        out.fill(0.0)
        for t0, t1, u0, w0 in st.runs:
            k = kap[t0:t1]
            out[:, w0:w0 + t1 - t0] += Y[:, u0:u0 + t1 - t0] * k
            out[:, u0:u0 + t1 - t0] += Y[:, w0:w0 + t1 - t0] * k
        return out

    def pattern(self, dy, D, corr=None, keep=False):
        """``P(sym(X^ F S^{-1}))`` as ``P(sym(X^ R^T K R S^{-1}))``, plus the corrector's ``U K`` term."""
        Q = self.times_terms(self.XR, dy, self.bufs[4])  # X^ R^T K
        if corr is not None:  # - P(sym C) = P(sym(U K S^{-1} R^T...)): one pattern product for both
            Q += corr[0]
        return self.ch.pattern_product(Q, self.SR, self.par)

    def corrector(self, dy, D):
        """Mehrotra's second-order term ``C = dX dS S^{-1}`` of the predictor, as
        ``(U K, A*(C))`` with ``P(sym C) = -P(sym(U K (S^{-1} R^T)^T))``, without forming the
        dense ``dX = -X^ + sym(X^ F S^{-1})``
        (``F = sum dy_j F_j = R^T K R``): ``C = -U K (S^{-1} R^T)^T`` with
        ``U = dX R^T = -X^ R^T + (X^ F S^{-1} R^T + S^{-1} F X^ R^T) / 2``, two pattern
        products and two block solves.  ``A*(C)`` needs ``R C R^T`` at the terms' rows only,
        ``-(R dX F S^{-1} R^T)[u, w] = -U[:, u] . V[:, w]`` with ``V = F S^{-1} R^T`` the first
        pattern product (docs/math.md §8.8): column dot products, no ``r x r`` product."""
        ch, bufs, par, both, st = self.ch, self.bufs, self.par, thread_pools.both, self.state
        XR, SR = self.XR, self.SR
        n, r = ch.Rt.shape
        # V is kept in G_X's buffer (G_X is not needed after the Schur complement).
        V = bufs[2].reshape(-1)[:n * r].reshape(n, r) if r >= n else np.empty((n, r))
        both(lambda: ch.pattern_times(D, SR, out=V), lambda: ch.pattern_times(D, XR, out=bufs[5]), par)
        np.copyto(bufs[4], V)
        U, U2 = both(lambda: ch.solve(self.wfac, bufs[4]), lambda: ch.solve(self.fac, bufs[5]), par)

        def combine(a, b):  # U = (U + U2) / 2 - XR on rows a..b
            U[a:b] += U2[a:b]
            U[a:b] *= 0.5
            U[a:b] -= XR[a:b]

        thread_pools.halves(combine, n, par)
        if st.runs is None:
            cuw = np.einsum("it,it->t", U[:, st.iu], V[:, st.iw])
            cwu = np.einsum("it,it->t", U[:, st.iw], V[:, st.iu])
        else:  # column slices over the runs of terms: no gathered copies of the (n, r) arrays
            cuw, cwu = np.empty(len(st.iu)), np.empty(len(st.iu))
            for t0, t1, u0, w0 in st.runs:
                L = t1 - t0
                cuw[t0:t1] = np.einsum("it,it->t", U[:, u0:u0 + L], V[:, w0:w0 + L])
                cwu[t0:t1] = np.einsum("it,it->t", U[:, w0:w0 + L], V[:, u0:u0 + L])
        UK = self.times_terms(U, dy, bufs[5])
        del U
        # P(sym C) = -P(sym(UK (S^{-1} R^T)^T)): returned as UK, for the pattern product of direction.
        return UK, -(st.KT @ (cuw + cwu))
