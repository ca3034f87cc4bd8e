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
  rows that read the block's own outputs (``C_vw`` not triangular, docs/math.md §5.2).

The network output is ``C z``.  This is the LFT form of docs/math.md §3, (3.1):
``[P; Q] = [[C_vx, C_vw], [0, I]]`` and ``C = [D_yx, D_yw]``.  For a feed-forward
net ``P_k`` has nonzeros only in block ``k-1``, so the LMI is block-tridiagonal;
:meth:`Lifting.block_graph` exposes the coupling pattern for chordal methods.

Rounding: ``F Q_k`` is exact (``Q_k`` selects), and so is its sum with
``L_parent``, which only reads earlier blocks.  ``W L`` is exact when ``L``
selects coordinates (one nonzero, 1.0, per column), which covers feed-forward
nets.  Otherwise the product is rounded;
``pre_err`` and ``output_err`` keep entrywise bounds on that error (Higham's
``gamma_k |W||L|``) so verification (:mod:`lipsdp.verify`) can cover it.

The walk over the graph (:func:`traverse`) is written once, with each node
type's rule registered in :func:`lift_node`, and is generic in the arithmetic of
the rows (a :class:`RowAlgebra`): :func:`lift` runs it on float sparse rows with
error bounds (:class:`FloatRows`), :mod:`lipsdp.exact` on rational rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import singledispatch
from typing import Any, Protocol

import networkx as nx
import numpy as np
import scipy.sparse as sp

from lipsdp import accel
from lipsdp.network import Activation, Add, Affine, Concat, Equilibrium, Input, Network, Op, Reshape, concat_permutation

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
class InputSpan:
    """:meth:`Lifting.span_input`: the restricted lifting, ``fl(A A^T)``, its entrywise error bound, and
    an estimate of its smallest eigenvalue (how much a unit of ``rho`` adds to the input block)."""

    lifting: "Lifting"
    metric: np.ndarray
    metric_err: np.ndarray
    floor: float


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
        MNIST MLPs).  Meant for *solving* only: bounds are verified on the LMI of the network
        as given (or its exact restriction, :meth:`span_input`), so a rounded ``U`` costs
        optimality at worst, never soundness.
        """
        n0 = self.input_dim
        G = sp.vstack([P[:, :n0] for P in self.pre] + [self.output[:, :n0]]).tocsr()
        G = G[np.flatnonzero(np.diff(G.indptr))]  # rows that read no input add nothing to the row space
        if G.shape[0] < n0:  # through the small Gram G G^T = V diag(e) V^T: U = G^T V diag(e)^(-1/2)
            evals, evecs = accel.eigh((G @ G.T).toarray())
            keep = evals > rtol * max(evals[-1], 1e-300) if len(evals) else evals > 0
            U = np.asarray(G.T @ (evecs[:, keep] / np.sqrt(evals[keep])))[:, ::-1]
        else:
            evals, evecs = accel.eigh((G.T @ G).toarray())  # on the GPU when one is there (lipsdp.accel)
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

    def span_input(self, max_condition: float = 1e8) -> "InputSpan | None":
        """The lifting restricted to ``x0 = A^T a``, ``A`` the first layer's exact input rows (docs/math.md §10.1).

        When only block 1 reads the input, through exact rows ``A`` (``m x n0``, ``m < n0 / 2``),
        the input block of the LMI is ``-rho I + A^T (..) A`` and ``M <= 0`` iff ``rho >= 0`` and
        ``T^T M T <= 0`` with ``T = diag(A^T, I)``: the input block becomes ``-rho A A^T + ...``,
        ``m x m`` instead of ``n0 x n0``.  Unlike :meth:`reduce_input` this is meant for
        *verification*: ``T`` is exact data, and the rounding of ``A A^T`` (block 1's new rows and
        the ``rho`` term) is bounded entrywise by ``gamma_{n0} |A| |A|^T``, carried as ``pre_err``
        and :attr:`InputSpan.metric_err`.  None when it does not apply or ``A A^T`` is
        ill-conditioned (the test would need a large inflation of ``rho``).
        """
        n0 = self.input_dim
        if len(self.blocks) < 2 or not self.pre:
            return None
        A = sp.csr_matrix(self.pre[0][:, :n0])
        m = A.shape[0]
        others = [P[:, :n0] for P in self.pre[1:]] + [self.output[:, :n0]] + \
            [E[:, :n0] for E in self.pre_err[1:]] + ([self.output_err[:, :n0]] if self.output_err is not None else [])
        if 2 * m > n0 or self.pre[0][:, n0:].nnz or any(X.nnz for X in others) or \
                (self.pre_err and self.pre_err[0].nnz):
            return None
        gram = np.triu((A @ A.T).toarray())
        gram = gram + np.triu(gram, 1).T  # exactly symmetric, each entry one rounded inner product
        evals = np.linalg.eigvalsh(gram)
        if not evals[0] > evals[-1] / max_condition:
            return None
        absA = abs(A)
        # |fl(A A^T) - A A^T| <= gamma_{n0} |A||A|^T in any summation order; the bound itself is computed
        # with gamma_{n0} relative error on nonnegative terms, covered by taking gamma_{2 n0 + 2}.
        err = (absA @ absA.T).toarray() * _gamma(2 * n0 + 2)
        shift = n0 - m

        def widen(X):  # the columns past the input, behind ``m`` zero input columns
            return sp.hstack([sp.csr_matrix((X.shape[0], m)), X[:, n0:]]).tocsr()

        pre = [sp.hstack([sp.csr_matrix(gram), self.pre[0][:, n0:]]).tocsr()] + [widen(P) for P in self.pre[1:]]
        pre_err = [sp.csr_matrix(np.hstack([err, np.zeros((m, self.n - n0))]))] + [widen(E) for E in self.pre_err[1:]]
        out_err = sp.csr_matrix((self.output.shape[0], self.n - shift)) if self.output_err is None else \
            widen(self.output_err)
        blocks = [Block("input", 0, 0, m)] + [Block(b.name, b.node, b.start - shift, b.size) for b in self.blocks[1:]]
        return InputSpan(Lifting(self.network, blocks, pre, widen(self.output), pre_err, out_err), gram, err,
                         float(evals[0]))

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


class RowAlgebra(Protocol):
    """The arithmetic of lifted rows: what :func:`traverse` needs to write a node's rows over ``z``.

    A value is the stack of rows of one node (one row per coordinate), in the
    algebra's own representation.
    """

    def select(self, start: int, size: int, n: int) -> Any:
        """Rows picking ``z[start:start + size]`` out of ``z`` (length ``n``)."""

    def affine(self, W, rows: Any) -> Any:
        """``W @ rows``."""

    def add(self, terms: list) -> Any:
        """The sum of the rows ``terms`` (in this order)."""

    def concat(self, parts: list, perm: np.ndarray) -> Any:
        """The rows of ``parts`` stacked, then reordered by ``perm``."""

    def feedback(self, rows: Any, F, selector: Any) -> Any:
        """``rows + F @ selector``: an implicit layer's pre-activation reading its own block."""

    def settle(self, rows: Any) -> Any:
        """Tidy a node's rows once they are final (e.g. drop stored zeros)."""


class FloatRows:
    """Float64 sparse rows with an entrywise bound on their rounding error: values are ``(L, E)``."""

    def select(self, start, size, n):
        L = sp.csr_matrix((np.ones(size), (np.arange(size), np.arange(start, start + size))), shape=(size, n))
        return L, sp.csr_matrix((size, n))

    def affine(self, W, rows):
        W = sp.csr_matrix(W, dtype=np.float64)
        Lp, Ep = rows
        L = (W @ Lp).tocsr()
        absW = abs(W)
        E = (absW @ Ep).tocsr()
        if not _is_selector(Lp):
            k = int(np.diff(W.indptr).max(initial=0)) + 1
            E = (E + _gamma(k) * (absW @ abs(Lp))).tocsr()
        return L, E

    def inexact_affine(self, W, W_err, rows):
        """:meth:`affine` for a weight known only up to ``|W* - W| <= W_err``: the exact rows
        ``W* Lp*`` differ from the float ones by at most the affine bound plus ``W_err (|Lp| + Ep)``."""
        L, E = self.affine(W, rows)
        Lp, Ep = rows
        W_err = sp.csr_matrix(W_err, dtype=np.float64)
        return L, (E + W_err @ (abs(Lp) + Ep)).tocsr()

    def add(self, terms):
        Ls, Es = [t[0] for t in terms], [t[1] for t in terms]
        L = sum(Ls[1:]) + Ls[0] if len(Ls) > 1 else Ls[0]
        E = sum(Es)
        if len(Ls) > 1:
            E = E + _gamma(len(Ls)) * sum(abs(L_) for L_ in Ls)
        return sp.csr_matrix(L), sp.csr_matrix(E)

    def concat(self, parts, perm):
        return (sp.vstack([p[0] for p in parts]).tocsr()[perm], sp.vstack([p[1] for p in parts]).tocsr()[perm])

    def feedback(self, rows, F, selector):
        # Disjoint columns (the block itself vs earlier blocks): the sum is exact, the error unchanged.
        L, E = rows
        return (L + sp.csr_matrix(F, dtype=np.float64) @ selector[0]).tocsr(), E

    def settle(self, rows):
        rows[0].eliminate_zeros()
        return rows


@dataclass
class Walk:
    """The state of one :func:`traverse`: the arithmetic, ``z``'s size, block starts, pre-activation rows."""

    algebra: RowAlgebra
    n: int
    start: dict
    pre: list = field(default_factory=list)


@singledispatch
def lift_node(op: Op, ins: list, shapes: list, walk: Walk, node: int) -> Any:
    """The rows of node ``op`` over ``z``, from its parents' rows ``ins`` (shapes ``shapes``).

    An activation also appends its pre-activation rows to ``walk.pre``.
    """
    raise TypeError(f"unknown node kind {type(op).__name__}")


@lift_node.register(Input)
def _(op, ins, shapes, walk, node):
    return walk.algebra.select(0, op.size, walk.n)


@lift_node.register(Affine)
def _(op, ins, shapes, walk, node):
    if op.weight_err is not None:  # a weight the loader composed in floating point (docs/math.md §10.3)
        inexact = getattr(walk.algebra, "inexact_affine", None)
        if inexact is None:
            raise NotImplementedError(f"{op.name}'s weight was composed in floating point at load (a folded "
                                      "linear chain, docs/math.md §10.3): it has no exact value to check")
        return inexact(op.weight, op.weight_err, ins[0])
    return walk.algebra.affine(op.weight, ins[0])


@lift_node.register(Reshape)
def _(op, ins, shapes, walk, node):
    return ins[0]


@lift_node.register(Add)
def _(op, ins, shapes, walk, node):
    return walk.algebra.add(ins)


@lift_node.register(Concat)
def _(op, ins, shapes, walk, node):
    return walk.algebra.concat(ins, concat_permutation(shapes, op.axis))


@lift_node.register(Activation)
def _(op, ins, shapes, walk, node):
    walk.pre.append(ins[0])
    return walk.algebra.select(walk.start[node], op.size, walk.n)


@lift_node.register(Equilibrium)
def _(op, ins, shapes, walk, node):
    Q = walk.algebra.select(walk.start[node], op.size, walk.n)
    walk.pre.append(walk.algebra.feedback(ins[0], op.feedback, Q))
    return Q


def layout(network: Network) -> list[Block]:
    """The blocks of ``z``: the input, then one per activation node in topological order."""
    blocks = [Block("input", 0, 0, network.input_dim)]
    for a in network.activations():
        blocks.append(Block(network.op(a).name, a, blocks[-1].stop, network.op(a).size))
    return blocks


def traverse(network: Network, algebra: RowAlgebra, blocks: list[Block]) -> tuple[list, Any]:
    """Walk ``network`` in topological order and write every node as rows over ``z`` in ``algebra``.

    Returns ``(pre, output)``: the pre-activation rows of each activation block
    (in block order) and the rows of the network output.
    """
    walk = Walk(algebra, blocks[-1].stop, {b.node: b.start for b in blocks[1:]})
    rows: dict[int, Any] = {}
    for node in network.graph.nodes:
        parents = network.parents(node)
        rows[node] = algebra.settle(lift_node(network.op(node), [rows[p] for p in parents],
                                              [network.op(p).shape for p in parents], walk, node))
    return walk.pre, rows[network.output]


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
    blocks = layout(network)
    pre, (out, out_err) = traverse(network, FloatRows(), blocks)
    return Lifting(network, blocks, [P for P, _ in pre], out, [E for _, E in pre], out_err)
