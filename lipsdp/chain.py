"""The block structure of a LipSDP LMI: the one place that reads the layer chain off an LMI.

The lifting orders the LMI's rows and columns in blocks: the input block ``0``,
then one block per activation node.  For a feed-forward net only neighbouring
blocks are coupled, so ``M`` is block-tridiagonal (docs/math.md §1.4): the
multipliers of layer ``k`` fill blocks ``(k-1, k)``,

.. math::

    -\\sum_{j \\in \\text{layer } k} y_j M_j \\;=\\;
    \\begin{bmatrix} P_k & Q_k \\\\ Q_k^T & R_k \\end{bmatrix}
    \\quad\\text{on blocks } (k-1, k),

and the output term ``K = C^T C`` sits on the last block.  Everything that
exploits this pattern reads it from :class:`BlockChain`: the layer-by-layer
point and scales of :mod:`lipsdp.scaling`, the sweeps of :mod:`lipsdp.layer_sweep`,
the clique chain of the ``chordal`` backend (cliques ``{k-1, k}``, docs/math.md §8.1),
the block-tridiagonal pattern of the ``completion`` backend and the block
elimination of the ``fo`` backend (docs/math.md §8.4).  Each of those builds its
own numerical representation on top of it; the structural facts (which blocks,
which layer each variable and entry belongs to, whether the LMI is a chain at all)
are computed here once.
"""

from __future__ import annotations

import weakref
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from lipsdp.sharing import shared

if TYPE_CHECKING:  # only read, never built here; importing lmi would pull the lifting into ``lipsdp solvers``
    from lipsdp.lmi import LMIProblem


#: Terms handled at once by :meth:`BlockChain.band_index`.
_CHUNK = 1 << 22


class BlockChain:
    """The blocks of an :class:`~lipsdp.lmi.LMIProblem` and how its terms sit on them.

    Parameters
    ----------
    lmi : LMIProblem
    whole : bool
        Treat the LMI as one block (``[0, n)``) whatever its lifting's blocks: the view of a
        method that falls back to dense algebra where the LMI is no chain.

    Attributes
    ----------
    starts : ndarray of int, shape (nb + 1,)
        Block offsets, ``n`` appended.
    sizes : ndarray of int, shape (nb,)
    nb : int
        Number of blocks (1 when the LMI has no block structure, or ``whole``).

    Notes
    -----
    The properties are computed on first use: a caller pays only for the facts it reads.
    ``last`` and everything derived from it need the lifting's blocks.
    """

    def __init__(self, lmi: LMIProblem, whole: bool = False):
        self.lmi = lmi
        bounds = [(0, lmi.n)] if whole or not lmi.blocks else [(b.start, b.stop) for b in lmi.blocks]
        self.starts = np.array([a for a, _ in bounds] + [lmi.n])
        self.sizes = np.diff(self.starts)
        self.nb = len(self.sizes)

    def block_of(self, idx) -> np.ndarray:  # the block that each row/column index in ``idx`` belongs to
        return np.searchsorted(self.starts, np.asarray(idx), side="right") - 1

    # -- where the terms sit ---------------------------------------------------
    const = cached_property(lambda self: self.lmi.const.tocoo())  # the constant term ``M_c`` as COO

    @cached_property
    def const_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """The blocks of the rows and columns of ``M_c``'s entries."""
        return self.block_of(self.const.row), self.block_of(self.const.col)

    @cached_property
    def const_banded(self) -> bool:
        """Whether ``M_c`` couples only neighbouring blocks."""
        kr, kc = self.const_blocks
        return not np.any(np.abs(kr - kc) > 1)

    @cached_property
    def entries_banded(self) -> bool:
        """Whether every entry of ``sum_j y_j M_j`` couples only neighbouring blocks (a band pattern,
        whatever the variables)."""
        lmi = self.lmi
        return not np.any(np.abs(self.block_of(lmi.rows) - self.block_of(lmi.cols)) > 1)

    @cached_property
    def last(self) -> np.ndarray | None:
        """Per variable, the last block its matrix touches (-1 if none), or None unless every ``M_j``
        lies inside two neighbouring blocks (:meth:`~lipsdp.lmi.LMIProblem.chain_layers`)."""
        return shared(self.lmi, "last", self.starts, self.lmi.chain_layers)

    @cached_property
    def is_layer_chain(self) -> bool:
        """A layer chain: block-tridiagonal, every multiplier inside two neighbouring blocks, ``M_c`` banded."""
        return bool(self.lmi.blocks) and self.last is not None and self.const_banded

    @cached_property
    def clique_of_var(self) -> np.ndarray:
        """Per variable, the clique ``{k-1, k}`` (``k >= 1``) that holds its matrix (input variables: 1)."""
        return np.maximum(self.last, 1)

    @cached_property
    def layer(self) -> np.ndarray:
        """Per variable, its layer: 0 for the input variables, else the clique of its matrix."""
        return np.where(np.arange(self.lmi.n_var) < self.lmi.n_in, 0, self.clique_of_var)

    def factor_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row of the factor matrix ``R`` (:attr:`~lipsdp.lmi.LMIProblem.factors`), the first and last
        block it touches; ``(nb, -1)`` for an empty row."""
        R = sp.coo_matrix(self.lmi.factors[0])
        lo = np.full(R.shape[0], self.nb, dtype=np.int64)
        hi = np.full(R.shape[0], -1, dtype=np.int64)
        k = self.block_of(R.col)
        np.minimum.at(lo, R.row, k)
        np.maximum.at(hi, R.row, k)
        return lo, hi

    # -- the per-layer pieces of N = -M ------------------------------------------
    @cached_property
    def layer_entries(self) -> list[np.ndarray]:
        """Per layer, the indices of its COO entries in the upper triangle (the lower one mirrors it)."""
        return shared(self.lmi, "layer_entries", self.starts, self._layer_entries)

    def _layer_entries(self) -> list[np.ndarray]:
        lmi = self.lmi
        el = self.layer[lmi.var]
        order = np.arange(len(el)) if np.all(el[1:] >= el[:-1]) else np.argsort(el, kind="stable")  # built in order
        cuts = np.searchsorted(el[order], np.arange(self.nb + 1))
        out = []
        for k in range(self.nb):
            e = order[cuts[k]:cuts[k + 1]]
            out.append(e[lmi.cols[e] >= lmi.rows[e]])
        return out

    @cached_property
    def K(self) -> np.ndarray:
        """The output term on the last block, dense and symmetric."""
        K = self.lmi.const.tocsr()[self.starts[-2]:, self.starts[-2]:].toarray()
        return (K + K.T) / 2

    def pieces(self, k: int, x: np.ndarray):
        """``(P_k, Q_k, R_k)`` of layer ``k`` in ``N = -M`` at multipliers ``x`` (dense; ``P_0 = Q_0 = None``).

        Layer ``k``'s variables live on blocks ``(k-1, k)`` (the input variables, layer 0, on block 0).
        """
        lmi, e = self.lmi, self.layer_entries[k]
        lo = self.starts[max(k - 1, 0)]
        n1, n2 = (self.sizes[k - 1], self.sizes[k]) if k else (0, self.sizes[0])
        r, c, w = lmi.rows[e] - lo, lmi.cols[e] - lo, -lmi.vals[e] * x[lmi.var[e]]

        def dense(sel, shape, dr, dc):  # the upper-triangle entries ``sel``, summed, as a dense block
            flat = (r[sel] - dr) * shape[1] + (c[sel] - dc)
            return np.bincount(flat, weights=w[sel], minlength=shape[0] * shape[1]).reshape(shape)

        def symmetric(A):  # from its upper triangle
            return A + A.T - np.diag(np.diag(A))

        R = symmetric(dense(r >= n1, (n2, n2), n1, n1))
        if k == 0:
            return None, None, R
        top = r < n1
        return symmetric(dense(top & (c < n1), (n1, n1), 0, 0)), dense(top & (c >= n1), (n1, n2), 0, n1), R

    # -- the band: the only blocks a layer chain fills ------------------------------------------
    @cached_property
    def band_offsets(self) -> tuple[np.ndarray, np.ndarray, int]:
        """``(diag, off, total)``: where the diagonal block ``(k, k)`` (``n_k x n_k``) and the block
        ``(k-1, k)`` (``n_{k-1} x n_k``, ``k >= 1``) start in one flat buffer of ``total`` entries.

        The buffer holds ``sum_k n_k^2 + n_{k-1} n_k`` entries: linear in the depth, where the
        dense matrix is quadratic."""
        s = self.sizes.astype(np.int64)
        lengths = np.empty(2 * self.nb - 1, dtype=np.int64)
        lengths[0::2] = s * s
        lengths[1::2] = s[:-1] * s[1:]
        starts = np.concatenate([[0], np.cumsum(lengths)])
        off = np.zeros(self.nb, dtype=np.int64)
        off[1:] = starts[1:-1:2]
        return starts[0:-1:2], off, int(starts[-1])

    #: The block of every row/column index (a lookup table, faster than :meth:`block_of` on many).
    block_table = cached_property(lambda self: np.repeat(np.arange(self.nb), self.sizes))

    def band_index(self, rows, cols) -> tuple[np.ndarray, np.ndarray] | None:
        """``(upper, index)``: the entries with ``cols >= rows`` and their places in the band buffer
        (:attr:`band_offsets`), or None when some entry lies outside the band (no chain)."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        upper = np.flatnonzero(cols >= rows)
        index = np.empty(len(upper), dtype=np.int64)
        same, ahead = self.band_rows
        for a in range(0, len(upper), _CHUNK):  # in chunks: the temporaries stay small
            u = upper[a:a + _CHUNK]
            r, c = rows[u], cols[u]
            step = self.block_table[c] - self.block_table[r]
            if np.any(step > 1):
                return None
            index[a:a + len(u)] = np.where(step == 0, same[r], ahead[r]) + c
        return upper, index

    @cached_property
    def band_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row index ``r`` in block ``k``: where ``(r, c)`` lands in the band buffer, minus ``c``, for a
        column ``c`` in block ``k`` (first array) or in block ``k + 1`` (second)."""
        diag, off, _ = self.band_offsets
        k = self.block_table
        local = np.arange(self.lmi.n) - self.starts[k]
        same = diag[k] + local * self.sizes[k] - self.starts[k]
        nxt = np.minimum(k + 1, self.nb - 1)  # the last block has no block after it (never used there)
        ahead = off[nxt] + local * self.sizes[nxt] - self.starts[nxt]
        return same, ahead

    def band_sum(self, where: tuple[np.ndarray, np.ndarray], weights: np.ndarray) -> np.ndarray:
        """The band buffer of the upper-triangle entries ``where`` (from :meth:`band_index`) weighted by
        ``weights`` (one per entry, both triangles): each place the sum of its terms in entry order, as
        :meth:`~lipsdp.lmi.LMIProblem.matrix` sums them (so the rounding bounds of docs/math.md §10 hold)."""
        upper, index = where
        return np.bincount(index, weights=np.asarray(weights)[upper], minlength=self.band_offsets[2])

    def band_blocks(self, buffer: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        """``(diagonal, off)`` blocks of a band buffer: ``diagonal[k]`` symmetric (from its upper
        triangle), ``off[k]`` the block ``(k-1, k)`` (``off[0]`` is None)."""
        diag, off, _ = self.band_offsets
        s = self.sizes
        blocks, offs = [], [None]
        for k in range(self.nb):
            A = buffer[diag[k]:diag[k] + s[k] * s[k]].reshape(s[k], s[k])
            A = np.triu(A)
            blocks.append(A + A.T - np.diag(np.diag(A)))
            if k:
                offs.append(buffer[off[k]:off[k] + s[k - 1] * s[k]].reshape(s[k - 1], s[k]))
        return blocks, offs


def band_cholesky(diagonal: list, off: list, shift: float) -> float | None:
    """``||L||_F^2`` of the float Cholesky factor ``L`` of the block-tridiagonal ``H - shift I``, or None
    where the factorisation breaks down.

    Block by block along the chain (docs/math.md §10): ``L_kk = chol(H_kk - shift I - L_k,k-1 L_k,k-1^T)``,
    ``L_k+1,k = H_k+1,k L_kk^{-T}``.  ``L`` is block-bidiagonal (the dense factor's other blocks are
    exact zeros), and every computed entry is the usual Cholesky recurrence with its inner product
    summed in another order, so Higham's bound ``|E| <= gamma_{n+1} |L||L^T|`` holds as for the dense
    factorisation.  Cost: ``sum_k n_k^3``, linear in the depth.
    """
    total, X = 0.0, None
    for k, D in enumerate(diagonal):
        S = D.copy()
        S[np.diag_indices_from(S)] -= shift
        if X is not None:
            S -= X @ X.T
        try:
            L = sla.cholesky(S, lower=True, check_finite=False)
        except sla.LinAlgError:
            return None
        if not np.all(np.isfinite(L)):
            return None
        total += float(np.sum(L * L))
        if k + 1 < len(diagonal):
            X = sla.solve_triangular(L, off[k + 1], lower=True, check_finite=False).T
            total += float(np.sum(X * X))
    return total


def band_first_schur(diagonal: list, off: list) -> np.ndarray | None:
    """``Z`` with ``Z^T Z = H_01 H_hid^{-1} H_10`` for a block-tridiagonal ``H`` whose hidden part
    (blocks ``1..``) is positive definite, or None when it is not (a Cholesky factor breaks down).

    Eliminates the blocks from the last one backwards, ``T_L = H_LL``,
    ``T_k = H_kk - H_k,k+1 T_k+1^{-1} H_k+1,k``; only block 1 meets block 0, so
    ``H_01 H_hid^{-1} H_10 = H_01 T_1^{-1} H_10`` (docs/math.md §1.4).  Linear in the depth.
    """
    T = diagonal[-1]
    for k in range(len(diagonal) - 1, 0, -1):
        try:
            L = sla.cholesky(T, lower=True, check_finite=False)
        except sla.LinAlgError:
            return None
        Z = sla.solve_triangular(L, off[k].T, lower=True, check_finite=False)
        if k == 1:
            return Z
        T = diagonal[k - 1] - Z.T @ Z
    return None


_MAPS: dict = {}


def band_map(chain: BlockChain, rows, cols, var, n_var: int) -> "BandMap":
    """:class:`BandMap` of the terms ``(rows, cols, var)``, shared by LMIs that share those arrays (an
    LMI and its congruent copies, :meth:`~lipsdp.lmi.LMIProblem.preconditioned`): the index work is
    done once."""
    key = (id(rows), id(cols), id(var), tuple(chain.starts), n_var)
    found = _MAPS.get(key)
    if found is not None and found[0]() is rows and found[1]() is cols and found[2]() is var:
        return found[3]
    made = BandMap(chain, rows, cols, var, n_var)
    try:
        _MAPS[key] = (weakref.ref(rows), weakref.ref(cols), weakref.ref(var), made)
    except TypeError:  # not weak-referenceable (a list): no sharing
        return made
    weakref.finalize(rows, _MAPS.pop, key, None)  # the map goes with the LMI's arrays
    return made


class BandMap:
    """``x -> `` the band buffer of ``sum_j x_j M_j`` (upper triangle) as one sparse matrix, band places by
    variables, for COO terms ``(rows, cols, var)`` on the band of ``chain``.

    Built once per LMI (a stable sort of the terms into places); each evaluation is one sparse product
    in which every place adds its terms one after another in entry order, as
    :meth:`~lipsdp.lmi.LMIProblem.matrix` does (the same floats and ``K``, docs/math.md §10).
    ``ok`` is False when some term lies outside the band; ``counts`` holds the terms per place (the
    ``K`` of :attr:`~lipsdp.lmi.LMIProblem.max_entry_terms`: both triangles' terms at a place agree).
    """

    def __init__(self, chain: BlockChain, rows, cols, var, n_var: int):
        found = chain.band_index(rows, cols)
        self.ok = found is not None
        if not self.ok:
            return
        upper, index = found
        total = chain.band_offsets[2]
        self.counts = np.bincount(index, minlength=total)
        # The CSR of places by variables, each place's entries in their original order (a stable sort;
        # scipy's own conversion would merge duplicates and change the sums).  ``sel``: the COO entry
        # behind each CSR entry.
        self.sel = upper[np.argsort(index, kind="stable")]
        del upper, index
        itype = np.int32 if max(n_var, len(self.sel)) < 2**31 - 1 else np.int64
        self.indices = np.asarray(var)[self.sel].astype(itype)
        self.indptr = np.concatenate([[0], np.cumsum(self.counts)]).astype(itype)
        self.shape = (total, n_var)

    def matrix(self, vals: np.ndarray) -> sp.csr_matrix:
        """The map for term values ``vals`` (one per COO entry, both triangles)."""
        data = np.asarray(vals, dtype=np.float64)[self.sel]
        return sp.csr_matrix((data, self.indices, self.indptr), shape=self.shape)


class Band:
    """The band view of an LMI whose ``M(x)`` is block-tridiagonal for every ``x`` (a layer chain):
    ``M(x)``, ``|M|_abs(x)`` and the lifting's error bound as sparse maps into the band buffer of
    :class:`~lipsdp.chain.BlockChain` (:class:`~lipsdp.chain.BandMap`), built once per LMI and reused by
    every test, so a test costs one sparse product and a block factorisation, not a dense ``n x n``
    matrix.

    Attributes
    ----------
    chain : BlockChain
    terms : int
        The most terms that add up into one entry (``max_entry_terms``, counted on the band).
    inner : int
        The most terms of one inner product of the block Cholesky factorisation (``n`` for the dense one).
    ok : bool
        Whether every part of ``M`` and its error bound lies on the band.
    """

    def __init__(self, lmi: LMIProblem):
        self.chain = chain = BlockChain(lmi)
        self.ok = False
        entries = band_map(chain, lmi.rows, lmi.cols, lmi.var, lmi.n_var)
        if not entries.ok:
            return
        self.G = entries.matrix(lmi.vals)
        self.G_abs = sp.csr_matrix((np.abs(self.G.data), self.G.indices, self.G.indptr), shape=self.G.shape)
        self.terms = int(entries.counts.max(initial=0))
        self.const, self.const_abs = self._constant(lmi.const), self._constant(lmi.const_abs)
        self.lift = self.lift_const = None
        if lmi.lift_err is not None:
            rows, cols, vals, var, cerr = lmi.lift_err
            lift = band_map(chain, rows, cols, var, lmi.n_var)
            self.lift_const = self._constant(cerr)
            if not lift.ok or self.lift_const is None:
                return
            self.lift = lift.matrix(vals)
        if self.const is None or self.const_abs is None:
            return
        s = chain.sizes
        #: The longest inner product of the block Cholesky recurrence (docs/math.md §10): an entry of block
        #: row ``k`` sums over blocks ``k-1`` and ``k`` only, whatever the depth.
        self.inner = int(max(s[0], (s[:-1] + s[1:]).max(initial=0)))
        diag, _, total = chain.band_offsets
        self.diagonal = np.concatenate([diag[k] + np.arange(s) * (s + 1) for k, s in enumerate(chain.sizes)])
        # Frobenius weights: an off-diagonal place stands for two entries of the symmetric matrix.
        self.weight = np.full(total, 2.0)
        self.weight[self.diagonal] = 1.0
        self.ok = True

    def _constant(self, A) -> np.ndarray | None:
        """The band buffer of a constant sparse matrix (None when it leaves the band)."""
        A = sp.coo_matrix(A)
        at = self.chain.band_index(A.row, A.col)
        return None if at is None else self.chain.band_sum(at, A.data)

    def matrix(self, x: np.ndarray) -> np.ndarray:
        """The band buffer of ``M(x)`` (upper triangle)."""
        return self.G @ x + self.const

    def error(self, x: np.ndarray, factor: float) -> np.ndarray:
        """The band buffer of ``factor |M|_abs(x)`` plus the lifting's error bound (``factor``:
        ``2 gamma_K`` in :func:`lipsdp.verify.rigorous_negative_definite`)."""
        ax = np.abs(x)
        delta = factor * (self.G_abs @ ax + self.const_abs)
        if self.lift is not None:
            delta = delta + (self.lift @ ax + self.lift_const)
        return delta
