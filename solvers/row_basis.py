"""Factor rows as a coordinate plus one pre-activation row: ``r_i = c_i e_{j_i} + d_i p_{pi_i}`` (docs/math.md §8.11).

The sector terms of slope-restricted activations, as the lifting writes them, have two rows per neuron,
``q - alpha p`` and ``beta p - q`` (``q`` the neuron's own coordinate, ``p`` its pre-activation row on the
block before), and both rows of a term share ``q`` and ``p``.  :class:`RowBasis` recovers that form from the
completion method's slabs (and checks it entry by entry); :func:`fits` tells, without building a chain,
whether a factored LMI likely has it.  :mod:`~lipsdp.solvers.completion_dense` works in this basis.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def fits(lmi) -> bool:
    """Whether :class:`~lipsdp.solvers.completion_dense.DenseKernel` likely serves ``lmi`` (cheap: no chain is built): a chain of two or more
    blocks where every factor row spans one block, or two consecutive ones with at most one entry in the
    second (a coordinate).  :class:`RowBasis` decides for good."""
    if lmi.factors is None or not lmi.blocks or len(lmi.blocks) < 2:
        return False
    R = sp.csr_matrix(lmi.factors[0])
    if not R.nnz:
        return False
    starts = np.array([b.start for b in lmi.blocks])
    blk = np.searchsorted(starts, R.indices, side="right") - 1
    rows = np.repeat(np.arange(R.shape[0]), np.diff(R.indptr))
    first = np.full(R.shape[0], len(starts), dtype=np.int64)
    last = np.full(R.shape[0], -1, dtype=np.int64)
    np.minimum.at(first, rows, blk)
    np.maximum.at(last, rows, blk)
    if np.any(last - first > 1):
        return False
    two = (last - first == 1)[rows]
    in_last = np.bincount(rows[two & (blk == last[rows])], minlength=R.shape[0])
    return bool(np.all(in_last <= 1))


class RowBasis:
    """Each factor row as ``c_i e_{j_i} + d_i p_{pi_i}``; :attr:`ok` is False where the rows are not of that form.

    ``P``: per block, the distinct pre-activation rows (dense, on that block) and their offsets in the
    stacked ``p`` index.  Per term ``t`` (rows ``u_t``, ``w_t`` of the same neuron): the coordinate ``j_t``
    and ``p`` row ``pi_t`` (-1: none), and ``A_t = T_t^T J T_t`` as ``(A_qq, A_qp, A_pp)``, where
    ``T_t = [[c_u, d_u], [c_w, d_w]]``.
    """

    def __init__(self, chain, lmi):
        self.ok = False
        _, iu, iw, _, _ = lmi.factors
        r = chain.r
        j, c = np.full(r, -1, dtype=np.int64), np.zeros(r)
        pi, d = np.full(r, -1, dtype=np.int64), np.zeros(r)
        urow, ucol, uval = chain.unit
        j[urow], c[urow] = ucol, uval
        # Each row's pre-activation part scaled to 1 at its largest entry (hat), its block (blk) and scale (d).
        hat, blk = np.zeros((r, int(np.max(chain.sizes)))), np.full(r, -1, dtype=np.int64)
        for idx, a, b, slab in chain.slabs:
            k = int(chain.block_of(np.array([a]))[0])
            s = chain.sizes[k]
            left = slab if b - a == s else slab[:, :s]  # rows on one block: p rows only
            if b - a != s:
                right = slab[:, s:]
                nz = right != 0
                if np.any(nz.sum(axis=1) > 1):
                    return
                has = nz.any(axis=1)
                col = np.argmax(nz[has], axis=1)
                j[idx[has]], c[idx[has]] = a + s + col, right[has, col]
            top = np.argmax(np.abs(left), axis=1)
            scale = left[np.arange(len(idx)), top]
            has = scale != 0
            hat[idx[has], :s] = left[has] / scale[has, None]
            blk[idx[has]], d[idx[has]] = k, scale[has]
        # The two rows of a term share their p row where their parts agree to rounding: merged along the
        # terms (labels propagated to the smallest row of each connected set), checked below.
        iu, iw = np.asarray(iu, dtype=np.int64), np.asarray(iw, dtype=np.int64)
        link = (blk[iu] >= 0) & (blk[iu] == blk[iw])
        link[link] = np.max(np.abs(hat[iu[link]] - hat[iw[link]]), axis=1) <= 1e-13
        lab = np.arange(r)
        for _ in range(r):
            low = np.minimum(lab[iu[link]], lab[iw[link]])
            if np.array_equal(low, lab[iu[link]]) and np.array_equal(low, lab[iw[link]]):
                break
            np.minimum.at(lab, iu[link], low)
            np.minimum.at(lab, iw[link], low)
        self.P, self.p_off, total = {}, {}, 0
        for k in np.unique(blk[blk >= 0]):
            rows = np.flatnonzero(blk == k)
            reps, inv = np.unique(lab[rows], return_inverse=True)
            self.P[int(k)], self.p_off[int(k)] = np.ascontiguousarray(hat[reps, :chain.sizes[k]]), total
            pi[rows] = total + inv.ravel()
            total += len(reps)
        self.np_ = total
        # Checked slab by slab: c_i e_{j_i} + d_i P[pi_i] gives back every row to rounding.
        for idx, a, b, slab in chain.slabs:
            back = np.zeros_like(slab)
            for k, P in self.P.items():
                sel = (pi[idx] >= self.p_off[k]) & (pi[idx] < self.p_off[k] + len(P))
                if np.any(sel):
                    o = chain.starts[k] - a
                    back[sel, o:o + P.shape[1]] = d[idx[sel], None] * P[pi[idx[sel]] - self.p_off[k]]
            sel = j[idx] >= 0
            back[np.flatnonzero(sel), j[idx[sel]] - a] += c[idx[sel]]
            if np.max(np.abs(back - slab), initial=0.0) > 1e-13 * max(float(np.max(np.abs(slab), initial=0.0)), 1e-300):
                return
        ju, jw, pu, pw = j[iu], j[iw], pi[iu], pi[iw]
        # Both rows of a term on one coordinate and one p row (either may lack one of them).
        if np.any((ju >= 0) & (jw >= 0) & (ju != jw)) or np.any((pu >= 0) & (pw >= 0) & (pu != pw)):
            return
        self.jt, self.pt = np.maximum(ju, jw), np.maximum(pu, pw)
        cu, cw, du, dw = c[iu], c[iw], d[iu], d[iw]
        self.Aqq, self.Aqp, self.App = 2 * cu * cw, cu * dw + cw * du, 2 * du * dw
        self.ok = True

    def side(self, t0, t1):
        """Run ``t0 <= t < t1``'s ``(j slice or None, p slice or None, A_qq, A_qp, A_pp)``, or None where the
        run's coordinates or p rows are not consecutive (or present for some terms only)."""
        out = []
        for idx in (self.jt[t0:t1], self.pt[t0:t1]):
            if np.all(idx < 0):
                out.append(None)
            elif np.all(idx >= 0) and np.all(np.diff(idx) == 1):
                out.append(slice(int(idx[0]), int(idx[0]) + len(idx)))
            else:
                return None
        return out[0], out[1], self.Aqq[t0:t1], self.Aqp[t0:t1], self.App[t0:t1]
