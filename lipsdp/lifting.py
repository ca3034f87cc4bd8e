"""Lifting a network to the stacked vector ``z = [x0; phi_1; ...; phi_n]``.

Every activation node ``k`` owns a block of ``z`` (its outputs ``w_k``); block 0
is the input.  Walking the graph in topological order, the value of every node
is a linear map of ``z`` (biases dropped: they cancel in increments):

- Input: ``[I 0 ... 0]``;
- Affine ``W``: ``W L_parent``;   Reshape: ``L_parent``;
- Add: ``sum L_parents``;         Concat: stacked rows, permuted for the axis;
- Activation ``k``: its pre-activation rows are ``P_k = L_parent``, its output
  rows ``Q_k`` select block ``k``;
- Equilibrium ``k`` (implicit layer ``z = phi(F z + u)``): ``P_k = L_parent + F Q_k``,
  rows that read the block's own outputs (``C_vw`` not triangular, MATH.md 5.2).

The network output is ``C z``.  This is the LFT form (3.1) of MATH.md:
``[P; Q] = [[C_vx, C_vw], [0, I]]`` and ``C = [D_yx, D_yw]``.  For a feed-forward
net ``P_k`` has nonzeros only in block ``k-1``, so the LMI is block-tridiagonal;
:meth:`Lifting.block_graph` exposes the coupling pattern for chordal methods.

Rounding: ``F Q_k`` is exact (``Q_k`` selects), and so is its sum with
``L_parent``, which only reads earlier blocks.  ``W L`` is exact when ``L``
selects coordinates (one nonzero, 1.0, per column), which covers feed-forward
nets.  Otherwise the product is rounded;
``perr`` and ``cerr`` keep entrywise bounds on that error (Higham's
``gamma_k |W||L|``) so verification (:mod:`lipsdp.verify`) can cover it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import scipy.sparse as sp

from lipsdp.network import Activation, Add, Affine, Concat, Equilibrium, Input, Network, Reshape, concat_permutation

_U = 2.0 ** -53


def _gamma(k: int) -> float:
    return k * _U / (1 - k * _U)


@dataclass
class Block:
    """One block of ``z``: the input (``node=0``) or the outputs of one activation node."""

    name: str
    node: int
    start: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.size


@dataclass
class Lifting:
    """All rows of the lifted network.

    Attributes
    ----------
    blocks : list of Block
        Block 0 is the input ``x0``; block ``k >= 1`` the outputs of activation node ``k``.
    pre : list of scipy.sparse.csr_matrix
        ``pre[k-1]``, shape ``(n_k, n_z)``: pre-activation rows ``P_k`` of block ``k``.
    output : scipy.sparse.csr_matrix, shape ``(m, n_z)``
        ``C``: the network output (bias-free) as a map of ``z``.
    pre_err, output_err : lists of csr_matrix / csr_matrix
        Entrywise bounds on the rounding error of ``pre`` and ``output`` (zero when exact).
    """

    network: Network
    blocks: list
    pre: list
    output: sp.csr_matrix
    pre_err: list = field(default_factory=list)
    output_err: sp.csr_matrix | None = None

    @property
    def n(self) -> int:
        """Size of ``z`` (and of the LMI)."""
        return self.blocks[-1].stop

    @property
    def input_dim(self) -> int:
        return self.blocks[0].size

    def selector(self, k: int) -> sp.csr_matrix:
        """``Q_k``: the rows of ``z`` holding block ``k``."""
        b = self.blocks[k]
        return sp.csr_matrix((np.ones(b.size), (np.arange(b.size), np.arange(b.start, b.stop))),
                             shape=(b.size, self.n))

    def block_of(self) -> np.ndarray:
        """Block index of every coordinate of ``z``."""
        return np.repeat(np.arange(len(self.blocks)), [b.size for b in self.blocks])

    def block_graph(self) -> nx.Graph:
        """Blocks as nodes, an edge where the LMI has a nonzero off-diagonal block.

        Feed-forward nets give a path ``0 - 1 - ... - n`` (block-tridiagonal LMI);
        residual nets add chords.
        """
        g = nx.Graph()
        g.add_nodes_from(range(len(self.blocks)))
        owner = self.block_of()
        for k, P in enumerate(self.pre, start=1):
            for j in np.unique(owner[P.indices]):
                if j != k:
                    g.add_edge(int(j), k)
        out_blocks = np.unique(owner[self.output.indices])
        for a in out_blocks:
            for b in out_blocks:
                if a < b:
                    g.add_edge(int(a), int(b))
        return g

    def reduce_input(self, rtol: float = 1e-12) -> "Lifting":
        """The same lifting with the input block shrunk to the row space it is seen through.

        Only ``G = [P_1[:, in]; ...; P_n[:, in]; C[:, in]]`` touches the input, and
        the input block of the LMI is ``-rho I``.  With ``U`` an orthonormal basis of
        ``G``'s row space (``n0 x r``) and ``x0 = U a + U_perp b``, the LMI splits
        into ``-rho I`` on ``b`` and the same LMI with ``G U`` on ``a``: the optimum is
        unchanged and the LMI shrinks from ``n0 + N`` to ``r + N`` (784 -> width for
        MNIST MLPs).  Meant for *solving* only: bounds are verified on the full LMI,
        so a rounded ``U`` costs optimality at worst, never soundness.
        """
        n0 = self.input_dim
        G = sp.vstack([P[:, :n0] for P in self.pre] + [self.output[:, :n0]]).tocsr()
        from lipsdp import accel

        gram = (G.T @ G).toarray()
        evals, evecs = accel.eigh(gram)  # on the GPU when one is there (lipsdp.accel)
        keep = evals > rtol * max(evals[-1], 1e-300)
        U = evecs[:, keep][:, ::-1]
        r = U.shape[1]
        if r >= n0:
            return self
        T = sp.block_diag([sp.csr_matrix(U), sp.identity(self.n - n0, format="csr")]).tocsr()
        shift = n0 - r
        blocks = [Block("input", 0, 0, r)] + [Block(b.name, b.node, b.start - shift, b.size) for b in self.blocks[1:]]
        zero = sp.csr_matrix
        return Lifting(self.network, blocks, [(P @ T).tocsr() for P in self.pre], (self.output @ T).tocsr(),
                       [zero((P.shape[0], self.n - shift)) for P in self.pre], zero((self.output.shape[0], self.n - shift)))

    @property
    def exact(self) -> bool:
        """True when every lifted row is an exact copy of the weights (no rounding)."""
        return self.output_err is None or (self.output_err.nnz == 0 and all(e.nnz == 0 for e in self.pre_err))


def _is_selector(L: sp.csr_matrix) -> bool:
    """One entry per column at most, each 1.0: then ``W @ L`` is exact."""
    if L.nnz == 0:
        return True
    if not np.all(L.data == 1.0):
        return False
    return np.all(np.diff(sp.csc_matrix(L).indptr) <= 1)


def lift(network: Network) -> Lifting:
    """Write every pre-activation and the output of ``network`` as rows over ``z``.

    Parameters
    ----------
    network : Network
        A validated network.

    Returns
    -------
    Lifting
    """
    acts = network.activations()
    blocks = [Block("input", 0, 0, network.input_dim)]
    for a in acts:
        blocks.append(Block(network.op(a).name, a, blocks[-1].stop, network.op(a).size))
    n = blocks[-1].stop
    block_index = {b.node: k for k, b in enumerate(blocks)}

    rows: dict[int, sp.csr_matrix] = {}
    errs: dict[int, sp.csr_matrix] = {}
    pre, pre_err = [], []
    for node in network.graph.nodes:
        op, parents = network.op(node), network.parents(node)
        if isinstance(op, Input):
            L = sp.csr_matrix((np.ones(op.size), (np.arange(op.size), np.arange(op.size))), shape=(op.size, n))
            E = sp.csr_matrix((op.size, n))
        elif isinstance(op, Affine):
            W = sp.csr_matrix(op.weight, dtype=np.float64)
            Lp, Ep = rows[parents[0]], errs[parents[0]]
            L = (W @ Lp).tocsr()
            absW = abs(W)
            E = (absW @ Ep).tocsr()
            if not _is_selector(Lp):
                k = int(np.diff(W.indptr).max(initial=0)) + 1
                E = (E + _gamma(k) * (absW @ abs(Lp))).tocsr()
        elif isinstance(op, Reshape):
            L, E = rows[parents[0]], errs[parents[0]]
        elif isinstance(op, Add):
            L = sum(rows[p] for p in parents[1:]) + rows[parents[0]] if len(parents) > 1 else rows[parents[0]]
            E = sum(errs[p] for p in parents)
            if len(parents) > 1:
                E = E + _gamma(len(parents)) * sum(abs(rows[p]) for p in parents)
            L, E = sp.csr_matrix(L), sp.csr_matrix(E)
        elif isinstance(op, Concat):
            perm = concat_permutation([network.op(p).shape for p in parents], op.axis)
            L = sp.vstack([rows[p] for p in parents]).tocsr()[perm]
            E = sp.vstack([errs[p] for p in parents]).tocsr()[perm]
        elif isinstance(op, Activation):
            k = block_index[node]
            b = blocks[k]
            L = sp.csr_matrix((np.ones(b.size), (np.arange(b.size), np.arange(b.start, b.stop))), shape=(b.size, n))
            P = rows[parents[0]]
            if isinstance(op, Equilibrium):
                # Disjoint columns (block k vs earlier blocks): the sum is exact.
                P = (P + sp.csr_matrix(op.feedback, dtype=np.float64) @ L).tocsr()
            pre.append(P)
            pre_err.append(errs[parents[0]])
            E = sp.csr_matrix((b.size, n))
        else:  # pragma: no cover - loaders only build the kinds above
            raise TypeError(f"unknown node kind {type(op).__name__}")
        L.eliminate_zeros()
        rows[node], errs[node] = L, E
    out = rows[network.output]
    return Lifting(network, blocks, pre, out, pre_err, errs[network.output])
