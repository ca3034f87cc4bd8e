"""The completion method's products through the dense inverses, where every factor row is a coordinate
plus one pre-activation row (docs/math.md §8.11).

:mod:`~lipsdp.solvers.completion_` works with ``X^ R^T`` and ``S^{-1} R^T``: ``(n, r)`` arrays made by block
solves, ``r ~ 2n`` on a layer chain (two rows per neuron).  For the sector terms of slope-restricted
activations each row is ``r_i = c_i e_{j_i} + d_i p_{pi_i}``: a multiple of the neuron's own coordinate and
a multiple of its pre-activation row ``p`` (a row of the weight matrix on the block before), and both rows
of a neuron's term share them.  Then everything an iteration needs follows from ``n x n`` matrices:

- ``S^{-1}`` and ``X^ = W^{-1}`` themselves, by the block recursion of the inverse of a block-tridiagonal
  matrix from its block Cholesky factor, ``Z_{ij} = -Z_{i,j+1} E_{j+1} L_j^{-1}`` below the diagonal
  (:func:`dense_inverse`, ``w^2 n l`` flops against a solve's ``~7 w^2 r l``);
- the Gram matrices ``R Z R^T`` only as the four ``(coordinate, row)`` pieces ``Z``, ``Z P^T``, ``P Z P^T``
  (``P`` the ``p`` rows, block-diagonal), never mixed into the ``r x r`` array: the Schur complement
  takes each neuron's ``2 x 2`` mixing ``A_s = T_s^T J T_s`` inside its blocks (:meth:`DenseKernel.schur`);
- ``P(sym(X^ F S^{-1}))`` from ``F S^{-1}`` (a pattern product) and one band of ``X^ (F S^{-1})``
  (:func:`band`), and Mehrotra's corrector from the dense predictor ``dX`` with ``n``-long dot products.

As always, the iterates are candidates only: every bound is verified from the stored entries.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.lapack import dtrtri as _dtrtri

from lipsdp import threads as thread_pools
from lipsdp.solvers.row_basis import RowBasis


def dense_inverse(chain, fac, out=None):
    """``S^{-1}`` as a C-ordered ``(n, n)`` array from the block Cholesky factor ``fac`` of ``S``
    (:meth:`~lipsdp.solvers.completion_.PatternChain.factor`).

    ``Z L = L^{-T}`` is block upper triangular, so below the diagonal ``Z_{ij} L_jj + Z_{i,j+1} E_{j+1} = 0``:
    block column ``j`` from block column ``j + 1``; the diagonal blocks as in the selected inverse.
    Filled in Fortran order (block columns contiguous), then mirrored: the transpose of the symmetric
    result is the C-ordered array.  ``out``: an ``(n, n)`` Fortran-ordered buffer to fill.
    """
    Ls, Es, _ = fac
    st, nb = chain.starts, chain.nb
    n = int(st[-1])
    Z = np.empty((n, n), order="F") if out is None else out
    for k in reversed(range(nb)):
        a, b = st[k], st[k + 1]
        Linv, info = _dtrtri(Ls[k], lower=1)
        if info != 0:
            return None
        if k + 1 < nb:
            Mk = Es[k + 1] @ Linv
            np.matmul(Z[b:, b:st[k + 2]], Mk, out=Z[b:, a:b])
            Z[b:, a:b] *= -1.0
            Zk = Linv.T @ Linv - Z[b:st[k + 2], a:b].T @ Mk
        else:
            Zk = Linv.T @ Linv
        Z[a:b, a:b] = (Zk + Zk.T) / 2
        Z[a:b, b:] = Z[b:, a:b].T
    return Z.T


def sym_pattern(chain, A):
    """``P(sym(A))``: the lower blocks of ``(A + A^T) / 2`` on the pattern, for a dense ``(n, n)`` ``A``."""
    st, out = chain.starts, np.empty(chain.length)
    for k in range(chain.nb):
        a, b = st[k], st[k + 1]
        d = A[a:b, a:b]
        chain.diag(out, k)[:] = (d + d.T) / 2
        if k:
            chain.sub(out, k)[:] = (A[a:b, st[k - 1]:a] + A[st[k - 1]:a, a:b].T) / 2
    return out


def band(chain, A, B, out=None, threads=1):
    """``P(sym(A B))``: the lower blocks of ``(A B + (A B)^T) / 2`` on the pattern, for ``(n, n)`` arrays
    (``A`` C-ordered); block column ``k`` of ``A B`` on block rows ``k-1 .. k+1`` is one product.
    ``threads >= 2``: the first and the second half of the block columns in two threads."""
    out = np.empty(chain.length) if out is None else out
    thread_pools.halves(lambda k0, k1: _band_columns(chain, A, B, out, k0, k1), chain.nb, threads)
    return out


def _band_columns(chain, A, B, out, k0, k1):
    """Block columns ``k0 <= k < k1`` of :func:`band` into ``out``."""
    st, nb = chain.starts, chain.nb
    if k0 >= k1:
        return
    # (A B)[k, k-1] of the block column before, waiting for its transpose partner
    prev = A[st[k0]:st[k0 + 1]] @ B[:, st[k0 - 1]:st[k0]] if k0 else None
    for k in range(k0, k1):
        a, b = st[k], st[k + 1]
        lo, hi = st[max(k - 1, 0)], st[min(k + 2, nb)]
        col = A[lo:hi] @ B[:, a:b]  # block rows k-1..k+1 of block column k
        d = col[a - lo:b - lo]
        chain.diag(out, k)[:] = (d + d.T) / 2
        if k:
            chain.sub(out, k)[:] = (prev + col[:a - lo].T) / 2  # ((AB)[k,k-1] + (AB)[k-1,k]^T) / 2
        prev = col[b - lo:] if k + 1 < nb else None


def estimate_cost(lmi) -> float:
    """Flops of one iteration (about) in the units of :func:`lipsdp.solvers.completion_.estimate_cost`: two dense
    inverses, the pieces' products with ``P`` (``n_p`` rows), five ``n x n`` pattern / band products and a block
    solve with ``n`` columns, the Schur complement and its factor; weighted for their lower BLAS efficiency
    (calibrated on trained 784-32x64-10 and 784-64x64-10, docs/performance.md)."""
    sizes = np.array([b.stop - b.start for b in lmi.blocks], dtype=np.float64)
    n, w, m, T = float(lmi.n), float(np.mean(sizes)), float(lmi.n_var), float(len(lmi.factors[3]))
    npr = float(np.sum(sizes[1:]))
    return 1.7 * (33.0 * n * n * w + 6.0 * n * npr * w + 2.0 * npr * npr * w + m ** 3 / 3 + 40.0 * T * T)


def memory(lmi) -> int:
    """Bytes of :class:`DenseKernel`'s work arrays: five ``n x n``, six ``n x n_p`` and two ``n_p x n_p``."""
    sizes = np.array([b.stop - b.start for b in lmi.blocks], dtype=np.int64)
    n, npr = int(lmi.n), int(np.sum(sizes[1:]))
    return 8 * (5 * n * n + 6 * n * npr + 2 * npr * npr)


class DenseKernel:
    """One iteration's products of the completion method through ``S^{-1}``, ``X^`` (see the module)."""

    def __init__(self, state, chain, basis: RowBasis):
        self.state, self.ch, self.rb = state, chain, basis
        self.sides = [basis.side(t0, t1) for t0, t1, _, _ in state.runs]
        self.par = 1
        # Work arrays reused from one iteration to the next (fresh large arrays cost their page faults):
        # the two inverses, M = F S^{-1}, X^ M, the predictor dX, and the p-row products of each.
        n, q = int(chain.starts[-1]), basis.np_
        self.inv = [np.empty((n, n), order="F"), np.empty((n, n), order="F")]
        self.work = [np.empty((n, n)) for _ in range(3)]
        self.rows = [(np.empty((n, q), order="F"), np.empty((q, q))) for _ in range(2)]
        self.rows2 = [np.empty((n, q), order="F"), np.empty((n, q), order="F")]
        self.tiles = self.merge(self.sides, state.into) if all(x is not None for x in self.sides) else None
        # The tiles' term ranges (runs are consecutive in the terms), and whether their p rows ascend (then
        # the Schur complement reads only the lower block triangle of P Z P^T, and pieces makes only that).
        self.spans, self.ascending, self.disjoint = [], True, False
        if self.tiles is not None:
            t = 0
            for side, _ in self.tiles:
                self.spans.append((t, t + len(side[2])))
                t += len(side[2])
            ps = [side[1] for side, _ in self.tiles if side[1] is not None]
            self.ascending = all(a.stop <= b.start for a, b in zip(ps, ps[1:]))
            # Whether no multiplier belongs to two tiles: then each entry of H comes from one pair of tiles, and
            # two threads may fill the pairs of disjoint sets of tile rows at once (schur).
            owned = np.concatenate([np.arange(v.start, v.stop) if isinstance(v, slice) else np.unique(np.r_[v])
                                    for _, (_, v, _) in self.tiles])
            self.disjoint = len(np.unique(owned)) == len(owned)

    def p_end(self, a, b):
        """How many columns of ``P Z P^T`` the Schur complement reads in rows ``a..b``: up to the end of the last
        tile they meet where the tiles' p rows ascend, else all."""
        if not self.ascending:
            return self.rb.np_
        ends = [ps.stop for (_, ps, *_), _ in self.tiles if ps is not None and ps.start < b and a < ps.stop]
        return max(ends + [b])

    #: Most terms in one tile of the Schur complement: its blocks stay in cache, and the pairs are few.
    tile_terms = 256

    @classmethod
    def merge(cls, sides, into):
        """Consecutive runs joined into tiles of up to :attr:`tile_terms` terms, where their coordinates, p rows
        and multipliers continue one another: ``[(side, into entry)]`` as for one run."""
        tiles = []
        for side, entry in zip(sides, into):
            if tiles:
                (js, ps, aqq, aqp, app), (col, va, sta) = tiles[-1]
                joins = (sta is None and entry[2] is None and isinstance(va, slice) and isinstance(entry[1], slice)
                         and va.stop == entry[1].start and len(aqq) + len(side[2]) <= cls.tile_terms
                         and all((a is None and b is None) or (a is not None and b is not None and a.stop == b.start)
                                 for a, b in ((js, side[0]), (ps, side[1]))))
                if joins:
                    tiles[-1] = ((None if js is None else slice(js.start, side[0].stop),
                                  None if ps is None else slice(ps.start, side[1].stop),
                                  np.concatenate([aqq, side[2]]), np.concatenate([aqp, side[3]]),
                                  np.concatenate([app, side[4]])),
                                 (np.concatenate([col, entry[0]]), slice(va.start, entry[1].stop), None))
                    continue
            tiles.append((side, entry))
        return tiles

    @property
    def blas(self):
        """BLAS threads during the iteration: one where the products run two at a time (:func:`lipsdp.threads.both`);
        the block factors' and solves' small products lose to a second BLAS thread (the Schur factor gets the run's)."""
        return 1 if self.par >= 2 else None

    @classmethod
    def make(cls, state, chain, lmi):
        """The kernel, or None where the rows have another form or the runs of terms do not fit."""
        if chain.nb < 2 or state.runs is None or state.into is None:
            return None
        basis = RowBasis(chain, lmi)
        if not basis.ok:
            return None
        kernel = cls(state, chain, basis)
        return kernel if kernel.tiles is not None else None

    # -- the two sides' pieces -------------------------------------------------
    def times_p(self, Y, out):
        """``Y P^T`` into ``out`` (``(n, n_p)``), block by block of ``P``."""
        st, rb = self.ch.starts, self.rb
        for k, P in rb.P.items():
            o = rb.p_off[k]
            np.matmul(Y[:, st[k]:st[k] + P.shape[1]], P.T, out=out[:, o:o + len(P)])
        return out

    def pieces(self, Z, bufs):
        """``(Z, Z P^T, P Z P^T)``: the coordinate / p-row pieces of ``R Z R^T`` (into ``bufs``)."""
        st, rb = self.ch.starts, self.rb
        ZP, PZP = self.times_p(Z, bufs[0]), bufs[1]
        for k, P in rb.P.items():  # the lower block triangle where the Schur complement's pairs have pb <= pa
            o = rb.p_off[k]
            e = self.p_end(o, o + len(P))
            np.matmul(P, ZP[st[k]:st[k] + P.shape[1], :e], out=PZP[o:o + len(P), :e])
        return Z, ZP, PZP

    def adjoint(self, pieces):
        """``(<F_j, Z>)_j = K^T (2 (R Z R^T)[u_t, w_t])`` from the pieces."""
        Z, ZP, PZP = pieces
        rb = self.rb
        j, p = np.maximum(rb.jt, 0), np.maximum(rb.pt, 0)
        g = rb.Aqq * Z[j, j]
        if rb.np_:
            g += 2.0 * rb.Aqp * ZP[j, p] + rb.App * PZP[p, p]
        return self.state.KT @ g

    def begin(self, fac, wfac):
        """``(A*(X^), A*(S^{-1}), P(S^{-1}))`` for this iteration, keeping the pieces for the Schur complement."""
        ch, both, par = self.ch, thread_pools.both, self.par
        self.wfac = wfac
        self.Zs, self.Xh = both(lambda: dense_inverse(ch, fac, self.inv[0]),
                                lambda: dense_inverse(ch, wfac, self.inv[1]), par)
        if self.Zs is None or self.Xh is None:
            return None
        self.PS, self.PX = both(lambda: self.pieces(self.Zs, self.rows[0]), lambda: self.pieces(self.Xh, self.rows[1]),
                                par)
        return self.adjoint(self.PX), self.adjoint(self.PS), sym_pattern(ch, self.Zs)

    # -- the Schur complement -------------------------------------------------
    @staticmethod
    def block(pieces, sa, sb):
        """The four ``(q|p, q|p)`` pieces of ``R Z R^T`` between runs ``sa`` and ``sb`` (None: absent)."""
        Z, ZP, PZP = pieces
        ja, pa, jb, pb = sa[0], sa[1], sb[0], sb[1]
        return {("q", "q"): Z[ja, jb] if ja is not None and jb is not None else None,
                ("q", "p"): ZP[ja, pb] if ja is not None and pb is not None else None,
                ("p", "q"): ZP[jb, pa].T if pa is not None and jb is not None else None,
                ("p", "p"): PZP[pa, pb] if pa is not None and pb is not None else None}

    def schur(self):
        """``H_st = sum_{a b c d} X'_ab A_s[a, c] S'_cd A_t[d, b]`` (X', S' the pieces, docs/math.md §8.11),
        as ``sum_{c b} (sum_a A_s[a, c] X'_ab) o (sum_d S'_cd A_t[d, b])`` block by block over pairs of runs,
        collapsed into ``H`` as :meth:`~lipsdp.solvers.completion_._Completion.schur` does."""
        st = self.state
        if st.H is None:
            st.H = np.zeros((st.m, st.m))
        H = st.H
        H.fill(0.0)
        # Where each entry of H comes from one pair of tiles, two threads take the pairs of disjoint sets of
        # tile rows, split where the pairs (row ia has ia + 1) are shared about evenly.
        nt = len(self.tiles)
        thread_pools.halves(lambda a, b: self.schur_rows(H, a, b), nt, self.par if self.disjoint else 1,
                            split=int(round(nt / np.sqrt(2.0))))
        return H

    def schur_rows(self, H, ia0, ia1):
        """The pairs of tiles ``(ia, ib)``, ``ia0 <= ia < ia1``, ``ib <= ia``, of :meth:`schur` into ``H``."""
        tiles = self.tiles
        for ia in range(ia0, ia1):
            sa = tiles[ia][0]
            As = {("q", "q"): sa[2], ("q", "p"): sa[3], ("p", "q"): sa[3], ("p", "p"): sa[4]}
            for ib in range(ia + 1):
                sb = tiles[ib][0]
                At = {("q", "q"): sb[2], ("q", "p"): sb[3], ("p", "q"): sb[3], ("p", "p"): sb[4]}
                X, S = self.block(self.PX, sa, sb), self.block(self.PS, sa, sb)
                blk = None
                for cc in "qp":
                    for bb in "qp":
                        xt = None  # sum_a A_s[a, cc] X'_{a bb}
                        for aa in "qp":
                            x = X[(aa, bb)]
                            if x is not None:
                                term = As[(aa, cc)][:, None] * x
                                xt = term if xt is None else xt + term
                        if xt is None:
                            continue
                        stl = None  # sum_d S'_{cc d} A_t[d, bb]
                        for dd in "qp":
                            s = S[(cc, dd)]
                            if s is not None:
                                term = s * At[(dd, bb)]
                                stl = term if stl is None else stl + term
                        if stl is None:
                            continue
                        xt *= stl
                        blk = xt if blk is None else blk + xt
                if blk is None:
                    continue
                self.state.add_block(H, blk, tiles[ia][1], tiles[ib][1], ib == ia)

    # -- directions -----------------------------------------------------------
    def pattern(self, dy, D, corr=None, keep=False):
        """``P(sym(X^ F S^{-1}))`` (``F = sum dy_j F_j``, lower blocks ``D``) plus the corrector's pattern term.

        ``keep``: the predictor's; ``M = F S^{-1}`` and the whole ``X^ M`` (by block solves with the
        completion's factor) are kept for :meth:`corrector`."""
        ch = self.ch
        M = ch.pattern_times(D, self.Zs, out=self.work[0], threads=self.par)
        if keep:
            XM = self.solve_halves(M, self.work[1])
            self.M, self.XM = M, XM
            out = sym_pattern(ch, XM)
        else:
            out = band(ch, self.Xh, M, threads=self.par)
        if corr is not None:
            out += corr[0]
        return out

    def solve_halves(self, B, out):
        """``X^ B = W^{-1} B`` into ``out``; with two threads the two column halves at once, each on one BLAS
        thread (the block solve's small products gain nothing from a second BLAS thread)."""
        ch = self.ch
        np.copyto(out, B)
        inv = ch.inverses(self.wfac)  # once for both halves, and the halves' products then release the GIL
        thread_pools.halves(lambda a, b: ch.solve(self.wfac, out[:, a:b], inverses=inv), B.shape[1], self.par)
        return out

    def corrector(self, dy, D):
        """Mehrotra's term from the predictor ``dX = -X^ + sym(X^ F S^{-1})`` (dense, from :meth:`pattern`'s
        kept products): ``(P(sym(dX M)), A*(C))`` with ``A*(C)_t`` from ``(R dX M R^T)[u_t, w_t] +
        (R dX M R^T)[w_t, u_t]``: ``n``-long column dot products of ``dX``, ``dX P^T`` with ``M``, ``M P^T``
        (``dX`` is symmetric), tile by tile."""
        ch, rb = self.ch, self.rb
        M, XM = self.M, self.XM
        dX, n, both = self.work[2], M.shape[0], thread_pools.both

        def predictor(i0, i1):  # rows i0..i1 of dX = (X^ M + (X^ M)^T) / 2 - X^
            for i in range(i0, i1, 128):
                o = dX[i:min(i + 128, i1)]
                np.add(XM[i:i + len(o)], XM[:, i:i + len(o)].T, out=o)
                o *= 0.5
                o -= self.Xh[i:i + len(o)]

        thread_pools.halves(predictor, n, self.par)

        if rb.np_:
            MP, DP = self.rows2
            both(lambda: self.times_p(M, MP), lambda: self.times_p(dX, DP), self.par)
        e = np.empty(len(rb.jt))

        def dots(A, B):
            return np.einsum("ij,ij->j", A, B)

        def terms(i0, i1):  # tiles i0..i1 of e
            for (t0, t1), ((js, ps, aqq, aqp, app), _) in zip(self.spans[i0:i1], self.tiles[i0:i1]):
                v = np.zeros(t1 - t0)
                if js is not None:
                    v += aqq * dots(dX[:, js], M[:, js])
                if ps is not None:
                    v += app * dots(DP[:, ps], MP[:, ps])
                    if js is not None:
                        v += aqp * (dots(dX[:, js], MP[:, ps]) + dots(DP[:, ps], M[:, js]))
                e[t0:t1] = v

        thread_pools.halves(terms, len(self.tiles), self.par)
        corr = band(ch, dX, M, threads=self.par)
        self.M = self.XM = None
        return corr, -(self.state.KT @ e)
