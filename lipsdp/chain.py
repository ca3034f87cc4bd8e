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

from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:  # only read, never built here; importing lmi would pull the lifting into ``lipsdp solvers``
    from lipsdp.lmi import LMIProblem


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

    def block_of(self, idx) -> np.ndarray:
        """The block that each row/column index in ``idx`` belongs to."""
        return np.searchsorted(self.starts, np.asarray(idx), side="right") - 1

    # -- where the terms sit ---------------------------------------------------
    @cached_property
    def const(self) -> sp.coo_matrix:
        """The constant term ``M_c`` as COO."""
        return self.lmi.const.tocoo()

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
        return self.lmi.chain_layers()

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
        lmi = self.lmi
        el = self.layer[lmi.var]
        order = np.argsort(el, kind="stable")
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
