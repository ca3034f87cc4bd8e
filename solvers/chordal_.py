"""An interior-point method on the clique decomposition of a layer-chain LMI.

The LMI of a feed-forward net is block-tridiagonal (docs/math.md §1.4): with
blocks ``0..l`` (input, then one per activation layer) only neighbouring
blocks are coupled.  That pattern is chordal with maximal cliques
``C_k = {k-1, k}``, so by Agler's theorem (Agler, Helton, McCullough and
Rodman 1988; docs/math.md §8.1)

.. math::

    M(y) \\preceq 0 \\iff \\exists\\, Y_1, \\dots, Y_{l-1} \\in \\mathbb S:\\quad
    Z_k(y, Y) = M_k(y) + E_0^T Y_{k-1} E_0 - E_1^T Y_k E_1 \\preceq 0 \\quad (k = 1..l),

where ``M_k`` collects the terms of ``M`` assigned to clique ``k`` (each
multiplier's matrix lies inside one clique), and ``Y_k`` splits the diagonal
block ``k`` shared by cliques ``k`` and ``k + 1`` (``E_0``, ``E_1`` pick the
first and second block of a clique; ``Y_0 = Y_l = 0``).  Summing the ``Z_k``
gives ``M`` back, so the optimum is exactly that of the full SDP: this is the
diagonal-multiplier clique form, not the released Chordal-LipSDP's band
couplings (unsound for ``tau >= 1``).

Each ``Z_k`` is small (``n_{k-1} + n_k``), and each variable touches at most
two neighbouring cliques, so the Schur complement of a primal-dual
interior-point method is block-tridiagonal over the groups
``(multipliers of layer k, Y_k)``: it is assembled clique by clique (the
rank-two Gram formula of :func:`lipsdp.interior.term_schur`, with unit rows for the
``Y`` entries) and factored by a block Cholesky recursion.  The cost of an
iteration is linear in depth, about ``l (w^2/2)^3`` flops for width ``w``,
against ``(l w)^3`` for the dense LMI: the dense method wins on shallow nets,
this one on deep narrow ones (``benchmarks/bench_solvers.py --deep``).

The iteration itself (HKM direction, Mehrotra predictor-corrector, infeasible
start) is :class:`lipsdp.interior.InteriorPoint`; only the answer's multipliers
are returned (the ``Y_k`` are discarded), and :mod:`lipsdp.verify` checks
them on the full LMI as always.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.linalg import LinAlgError, cholesky, solve_triangular
from scipy.linalg.blas import dsyrk

from lipsdp.chain import BlockChain
from lipsdp.interior import InteriorPoint, dense_iteration_cost, term_schur
from lipsdp.solvers.base import Backend, LMIShape, SolveResult, register, stored_bytes


@register
class ChordalIPM(Backend):
    """Interior-point method on the clique chain of a feed-forward LMI (numpy / scipy only).

    Conventions: reads the chain (:class:`lipsdp.chain.BlockChain`) and the rank-two factors of
    the LMI directly.  Memory: the block-tridiagonal Newton system over the groups
    ``(multipliers, Y_k)`` and the clique iterates, linear in depth.  Preference: for factored
    chain LMIs without free multipliers where :func:`estimate_cost` is below the dense method's
    and below :attr:`max_auto_cost` (deep narrow nets), unless the completion method is preferred;
    specialised.
    """

    name = "chordal"
    listing = 2
    specialised = True
    modules = ("scipy",)
    install = "built in (numpy and scipy)"
    family = "interior_point_chordal"
    supports_time_limit = True
    default_tol = 1e-7
    max_iters = 80
    step_fraction = 0.95
    #: ``auto`` uses it while :func:`estimate_cost` is below the dense ipm's and below this (an
    #: iteration of several seconds on one core; on wide layers the dense ipm is cheaper anyway).
    max_auto_cost = 2.0e11
    #: ``auto``'s rank when it prefers this method (below completion, above the dense ipm).
    specialised_rank = 12.0

    @classmethod
    def memory_estimate(cls, lmi) -> int:
        if len(lmi.blocks) < 3:
            return super().memory_estimate(lmi)
        sizes = np.array([b.stop - b.start for b in lmi.blocks], dtype=np.float64)
        group = sizes * (sizes + 1) / 2 + sizes  # Y_k and the layer's multipliers
        clique = sizes[:-1] + sizes[1:]
        # Per group: its block of H, its factor, the coupling and its solve; per clique ~12 iterates.
        return int(8 * (4 * np.sum(group ** 2) + 12 * np.sum(clique ** 2)) + 6 * stored_bytes(lmi))

    @classmethod
    def iteration_cost(cls, lmi) -> float | None:
        cost = estimate_cost(lmi)
        return None if cost is None else cost[0]

    @classmethod
    def preference(cls, lmi) -> float | None:
        # Deep narrow nets: the clique chain's Newton system grows linearly with depth.
        shape = LMIShape.of(lmi)
        if not shape.structured:
            return None
        cost = shape.cost(cls)
        if cost is None or not (cost < dense_iteration_cost(shape.lmi) and cost <= cls.max_auto_cost):
            return None
        return cls.specialised_rank

    @staticmethod
    def applies(lmi) -> bool:
        """Whether ``lmi`` has factored terms and is a chain of at least three blocks."""
        return _CliqueChain.layout(BlockChain(lmi)) is not None

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        t0 = time.perf_counter()
        blocks = BlockChain(lmi)
        layout = _CliqueChain.layout(blocks)
        if layout is None:
            return SolveResult("solver_error", None, None, time.perf_counter() - t0,
                               message="chordal needs a layer chain (feed-forward net, at least two activation "
                               "layers) with factored constraint terms")
        chain = _CliqueChain(blocks, layout)
        state = InteriorPoint(chain, chain.objective, chain.nonneg, tol or self.default_tol, time_limit, t0,
                              verbose, self.max_iters, self.step_fraction)
        state.report = self.name  # each iteration on the progress display
        status, message = state.run()
        y = state.y[chain.position]  # the multipliers, in the LMI's order; the Y_k are dropped
        return SolveResult(status, y, float(lmi.objective @ y), time.perf_counter() - t0, state.iterations,
                           message, extras={"dual_objective": state.dual_objective if state.dinf < 1e-5
                                            else float("nan"), "gap": state.gap, "cliques": len(chain.cliques),
                                            "path": [p[chain.position] for p in state.path],
                                            "primal_infeasibility": state.pinf, "dual_infeasibility": state.dinf})


def estimate_cost(lmi) -> tuple[float, float] | None:
    """``(chordal, dense)``: the cost of one iteration of each interior-point method, or None
    if the chain form does not apply.

    In flop-like units: ``chordal`` sums ``3 g^3`` over the groups ``(multipliers, Y_k)``
    (block Cholesky, coupling solve and update), the clique Schur products and a fixed
    per-clique overhead; ``dense`` is the one-block method's
    (:func:`lipsdp.interior.dense_iteration_cost`).  Calibrated against measured times on deep
    narrow nets (docs/performance.md).  ``auto`` uses it to choose between the two.
    """
    layout = _CliqueChain.layout(BlockChain(lmi))
    if layout is None:
        return None
    sizes, clique_of_var = layout[0], layout[1]
    counts = np.bincount(clique_of_var, minlength=len(sizes))
    overhead = 2e7  # about 1 ms of Python and small-matrix work per block and iteration
    chordal = 0.0
    for k in range(1, len(sizes)):
        g = float(counts[k] + (sizes[k] * (sizes[k] + 1) // 2 if k < len(sizes) - 1 else 0))
        t = g + sizes[k - 1] * (sizes[k - 1] + 1) / 2  # local variables of clique k
        chordal += 3.0 * g ** 3 + 8.0 * t * t + overhead
    return chordal, dense_iteration_cost(lmi)


class _CliqueChain:
    """The clique form of a chain LMI (:class:`lipsdp.chain.BlockChain`), in the interface
    :class:`lipsdp.interior.InteriorPoint` iterates on.

    Variables are reordered into groups ``g_k = (multipliers of clique k, svec(Y_k))``,
    ``k = 1..l``; ``position[j]`` is where the LMI's variable ``j`` went.  ``Y_k``
    is parametrised by its upper triangle: ``Y = sum_{a<=b} y_ab (e_a e_b^T + e_b e_a^T) / (1 + [a=b])``.
    """

    @staticmethod
    def layout(chain: BlockChain):
        """``(block sizes, clique of each variable, clique of each constant entry)``, or None if not a chain."""
        lmi = chain.lmi
        if getattr(lmi, "factors", None) is None or not lmi.blocks or len(lmi.blocks) < 3:
            return None
        if not chain.is_layer_chain:
            return None
        clique_of_var = chain.clique_of_var
        # Every factor row of a term must lie inside its variable's clique.
        _, iu, iw, _, fvar = lmi.factors
        rlo, rhi = chain.factor_blocks()
        k = clique_of_var[np.asarray(fvar)]
        for rows in (np.asarray(iu), np.asarray(iw)):
            used = rlo[rows] <= rhi[rows]
            if np.any(used & ((rlo[rows] < k - 1) | (rhi[rows] > k))):
                return None
        kr, kc = chain.const_blocks
        return chain.sizes, clique_of_var, np.maximum(np.maximum(kr, kc), 1)

    def __init__(self, chain: BlockChain, layout):
        lmi = chain.lmi
        sizes, clique_of_var, clique_of_const = layout
        l = len(sizes) - 1  # noqa: E741  (cliques 1..l)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        nY = [sizes[k] * (sizes[k] + 1) // 2 if 1 <= k < l else 0 for k in range(l + 1)]
        members = [np.flatnonzero(clique_of_var == k) for k in range(l + 1)]
        # Group k (k = 1..l) holds the clique's multipliers, then Y_k: Y_k sits at the tail, where
        # clique k + 1 couples to it.
        self.group_sizes = [len(members[k]) + nY[k] for k in range(1, l + 1)]
        offsets = np.concatenate([[0], np.cumsum(self.group_sizes)])
        m_new = int(offsets[-1])
        self.position = np.empty(lmi.n_var, dtype=np.int64)
        for k in range(1, l + 1):
            self.position[members[k]] = offsets[k - 1] + np.arange(len(members[k]))
        self.objective = np.zeros(m_new)
        self.objective[self.position] = lmi.objective
        self.nonneg = np.zeros(m_new, dtype=bool)
        self.nonneg[self.position] = lmi.nonneg
        self.n_prev = [nY[k - 1] for k in range(1, l + 1)]  # coupling to the previous group

        R, iu, iw, coef, fvar = lmi.factors
        R = sp.csr_matrix(R)
        iu, iw, coef, fvar = (np.asarray(a) for a in (iu, iw, coef, fvar))
        term_clique = clique_of_var[fvar]
        rows, cols, vals, var = (np.asarray(a) for a in (lmi.rows, lmi.cols, lmi.vals, lmi.var))
        entry_clique = clique_of_var[var]
        const = lmi.const.tocoo()
        self.cliques, self.sizes, self.F0s = [], [], []
        for k in range(1, l + 1):
            a, b = starts[k - 1], starts[k + 1]
            size, split = int(b - a), int(sizes[k - 1])
            # Local variables: Y_{k-1} (tail of group k-1), then group k.
            prev = offsets[k - 2] + len(members[k - 1]) + np.arange(nY[k - 1]) if k >= 2 else np.zeros(0, int)
            gidx = np.concatenate([prev, offsets[k - 1] + np.arange(self.group_sizes[k - 1])]).astype(np.int64)
            local = np.full(m_new, -1, dtype=np.int64)
            local[gidx] = np.arange(len(gidx))
            # The entries of the clique's multipliers and of +Y_{k-1} (first block), -Y_k (second).
            sel = entry_clique == k
            er, ec = [rows[sel] - a], [cols[sel] - a]
            ev, evar = [vals[sel]], [local[self.position[var[sel]]]]
            ys = []  # the Y blocks: (first row, last row + 1, sign), in local variable order
            for first, stop, sign, count in ((0, split, 1.0, nY[k - 1]), (split, size, -1.0, nY[k])):
                if not count:
                    continue
                ia, ib = np.triu_indices(stop - first)
                v = (0 if sign > 0 else len(prev) + len(members[k])) + np.arange(count)
                er += [ia + first, ib + first]
                ec += [ib + first, ia + first]
                ev += [np.where(ia == ib, sign / 2, sign)] * 2
                evar += [v, v]
                ys.append((first, stop, sign))
            er, ec, ev, evar = (np.concatenate(z) for z in (er, ec, ev, evar))
            basis = sp.csr_matrix((ev, (ec * size + er, evar)), shape=(size * size, len(gidx)))
            F0 = np.zeros((size, size))
            csel = clique_of_const == k
            np.add.at(F0, (const.row[csel] - a, const.col[csel] - a), const.data[csel])
            # The multipliers' factor rows, restricted to the clique's columns.
            tsel = term_clique == k
            used, inv = np.unique(np.concatenate([iu[tsel], iw[tsel]]), return_inverse=True)
            nt = int(tsel.sum())
            KT = sp.csr_matrix((coef[tsel], (local[self.position[fvar[tsel]]] - len(prev), np.arange(nt))),
                               shape=(len(members[k]), nt))
            self.cliques.append(_Clique(gidx, basis, R[used][:, a:b].toarray(), inv[:nt], inv[nt:], KT, ys,
                                        len(prev)))
            self.sizes.append(size)
            self.F0s.append(F0)
        self.m = m_new
        self.offsets = offsets

    # -- the interface InteriorPoint iterates on -------------------------------------
    def linear(self, y):
        return [(c.basis @ y[c.gidx]).reshape(s, s, order="F") for c, s in zip(self.cliques, self.sizes)]

    def adjoint(self, Gs):
        out = np.zeros(self.m)
        for c, G in zip(self.cliques, Gs):
            out[c.gidx] += c.basisT @ G.reshape(-1, order="F")
        return out

    def newton(self, Xs, Zs, N, lp):
        """Assemble the block-tridiagonal Schur complement and factor it; a solver, or None if singular."""
        for reg in (1e-14, 1e-11, 1e-8):  # free multipliers can make H singular near the optimum
            D, C, hd = self._assemble(Xs, Zs, N, lp)
            try:
                Lf, E = self._factor(D, C, reg)
            except LinAlgError:
                continue  # rare: assemble again rather than keep a copy of every block
            return lambda rhs: self._block_solve(Lf, E, hd, rhs)
        return None

    def _assemble(self, Xs, Zs, N, lp):
        """The Jacobi-scaled blocks: diagonal ``D[k]`` (lower triangles) and couplings ``C[k]``
        (rows of group ``k``, columns of the ``Y`` tail of group ``k-1``), and the scaling ``hd``."""
        l = len(self.cliques)  # noqa: E741
        D = [np.zeros((g, g)) for g in self.group_sizes]
        C = [None] * l
        # Only the lower triangles are filled and read (Cholesky reads the lower triangle).
        for k, (c, X, Z) in enumerate(zip(self.cliques, Xs, Zs)):
            h = c.schur(X, Z)
            J, p = c.n_own, self.n_prev[k]
            D[k][:J, :J] += h["own", "own"]
            if ("cur", "cur") in h:
                D[k][J:, :J] += h["cur", "own"]
                D[k][J:, J:] += h["cur", "cur"]
            if p:
                D[k - 1][-p:, -p:] += h["prev", "prev"]
                C[k] = np.vstack([h["own", "prev"], h["cur", "prev"]]) if ("cur", "prev") in h else h["own", "prev"]
        group = np.searchsorted(self.offsets, N, side="right") - 1
        for k in np.unique(group):
            at = group == k
            pos = N[at] - self.offsets[k]
            D[k][pos, pos] += lp[at]
        # Jacobi scaling, as in the dense method: the diagonal spans many orders of magnitude on deep nets.
        hd = [np.sqrt(np.maximum(np.diag(Dk), 1e-300)) for Dk in D]
        for k in range(l):
            D[k] /= np.outer(hd[k], hd[k])
            if C[k] is not None:
                C[k] = np.ascontiguousarray(C[k] / np.outer(hd[k], hd[k - 1][-self.n_prev[k]:]))
        return D, C, hd

    def _factor(self, D, C, reg):
        """Block Cholesky ``H = L L^T``, in place: ``L_kk`` overwrites ``D[k]``, ``L_{k,k-1}`` (``E[k]``,
        nonzero only on the ``Y`` columns of group ``k-1``) overwrites ``C[k]``, so the factor takes
        no more memory than the assembled system."""
        Lf, E = [], [None] * len(D)
        for k, Dk in enumerate(D):
            Dk.flat[::len(Dk) + 1] += reg
            if C[k] is not None:
                p = self.n_prev[k]
                # The trailing block of L_{k-1} is itself lower triangular; C[k].T is Fortran-ordered,
                # so the solve and the rank update run in place.
                E[k] = solve_triangular(Lf[k - 1][-p:, -p:], C[k].T, lower=True, overwrite_b=True,
                                        check_finite=False).T
                # D - E E^T on D's lower triangle, i.e. the upper triangle of its Fortran view.
                dsyrk(-1.0, E[k], beta=1.0, c=Dk.T, lower=0, overwrite_c=1)
            # Upper Cholesky of the Fortran view = lower Cholesky of D, in D's memory.
            Lf.append(cholesky(Dk.T, lower=False, overwrite_a=True, check_finite=False).T)
        return Lf, E

    def _block_solve(self, Lf, E, hd, rhs):
        l = len(Lf)  # noqa: E741
        xs = [rhs[self.offsets[k]:self.offsets[k + 1]] / hd[k] for k in range(l)]
        for k in range(l):
            b = xs[k]
            if E[k] is not None:
                b = b - E[k] @ xs[k - 1][-self.n_prev[k]:]
            xs[k] = solve_triangular(Lf[k], b, lower=True, check_finite=False)
        for k in reversed(range(l)):
            b = xs[k]
            if k + 1 < l and E[k + 1] is not None:
                b = b.copy()
                b[-self.n_prev[k + 1]:] -= E[k + 1].T @ xs[k + 1]
            xs[k] = solve_triangular(Lf[k], b, lower=True, trans="T", check_finite=False)
        return np.concatenate([x / h for x, h in zip(xs, hd)])


class _Clique:
    """One clique: its local variables (``gidx``, global indices of ``[Y_{k-1}, multipliers, Y_k]``),
    the COO basis of its matrices, and the factored terms of its multipliers.

    ``R`` (dense, rows x clique size) holds the multipliers' factor rows, ``iu, iw`` index
    them per term and ``KT`` (multipliers x terms) carries the coefficients; ``ys`` lists
    the ``Y`` blocks as ``(first row, stop row, sign)``, parametrised by their upper triangles.
    """

    def __init__(self, gidx, basis, R, iu, iw, KT, ys, n_prev):
        self.gidx, self.basis, self.basisT = gidx, basis, basis.T.tocsr()
        self.R, self.iu, self.iw, self.KT, self.ys, self.n_prev = R, iu, iw, KT, ys, n_prev
        self.tri = []  # per Y block: (ia, ib, coefficients), local rows of the upper triangle
        for first, stop, sign in ys:
            ia, ib = np.triu_indices(stop - first)
            self.tri.append((ia + first, ib + first, np.where(ia == ib, sign / 2, sign)))
        self.n_own = KT.shape[0]

    def schur(self, X, Z):
        """The clique's Schur complement ``H_ij = tr(F_i X F_j Z)`` over its local variables.

        Multiplier-multiplier entries come from the Gram formula of the factor rows;
        the ``Y`` entries have unit rows ``e_a, e_b``, for which that formula reads

        .. math:: h_{(ab),(cd)} = X_{bc}Z_{ad} + X_{bd}Z_{ac} + X_{ac}Z_{bd} + X_{ad}Z_{bc},

        evaluated as batched rank-two products over the blocks (``O(w^4)`` per clique).
        Returns the lower blocks, keyed by the spans ``"prev"`` (``Y_{k-1}``), ``"own"``
        (the multipliers) and ``"cur"`` (``Y_k``).
        """
        p = self.n_prev
        RX, RZ = self.R @ X, self.R @ Z
        u, w = self.iu, self.iw
        h = {("own", "own"): term_schur(RX @ self.R.T, RZ @ self.R.T, u, w, self.KT)}
        names = ["prev", "cur"] if p else ["cur"]
        for n1, (ia, ib, c1) in zip(names, self.tri):
            cross = RX[w][:, ia] * RZ[u][:, ib] + RX[w][:, ib] * RZ[u][:, ia] \
                + RX[u][:, ia] * RZ[w][:, ib] + RX[u][:, ib] * RZ[w][:, ia]
            if n1 == "prev":
                h["own", "prev"] = (self.KT @ cross) * c1
            else:
                h["cur", "own"] = ((self.KT @ cross) * c1).T
            for n2, (ic, id_, c2), (first, stop, _) in zip(names, self.tri, self.ys):
                if n1 == "cur" and n2 == "prev":
                    continue
                n = stop - first
                # rs[(a,b)] = X[a,:] Z[b,:]^T + X[b,:] Z[a,:]^T (rank two, over block 2): one
                # batched product; the other two terms are its transpose.
                U = np.stack([X[ia, first:stop], X[ib, first:stop]], axis=2)
                V = np.stack([Z[ib, first:stop], Z[ia, first:stop]], axis=1)
                rs = np.matmul(U, V).reshape(len(ia), n * n)
                ic0, id0 = ic - first, id_ - first
                blk = np.take(rs, ic0 * n + id0, axis=1) + np.take(rs, id0 * n + ic0, axis=1)
                blk *= c1[:, None]
                blk *= c2[None, :]
                h[n2, n1] = blk.T if n1 != n2 else blk
        return h
