"""The network as a graph of typed nodes.

Every loader (``lipsdp.io``) produces a :class:`Network`: a directed acyclic
graph (``networkx.DiGraph``) whose nodes carry one operator each.  Only a few
operator kinds exist, and they are all the converter needs to write every
pre-activation and output as a linear map of the stacked vector
``v = [x0; phi_1; ...; phi_n]`` (see :mod:`lipsdp.lifting`):

=========== =========================================================== ===========
node        meaning                                                     parents
=========== =========================================================== ===========
Input       the network input ``x0`` (shape without batch axis)         0
Affine      ``y = W x + b`` on the flattened tensor (Linear, folded BN, 1
            unrolled convolution, ...)
Reshape     same values, new shape (Flatten, View, Identity, Dropout)   1
Add         ``y = sum of parents`` (residual connections)               >= 1
Concat      concatenation along an axis of the non-batch shape          >= 1
Activation  a nonlinearity whose quadratic constraint lives in          1
            ``lipsdp.constraints`` (ReLU, Tanh, GroupSort, ...)
Equilibrium an implicit layer, an Activation whose output ``z`` solves  1
            ``z = phi(F z + u)`` (``u`` its parent, ``F`` its feedback;
            :mod:`lipsdp.equilibrium`)
=========== =========================================================== ===========

Tensors are flattened in row-major (C) order, as torch and ONNX lay them out,
so Flatten and Reshape do not move coordinates.  Biases are kept for local
analysis; every global bound ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import numpy as np
import scipy.sparse as sp

from lipsdp.errors import InvalidNetworkError


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) if len(shape) else 1


@dataclass
class Op:
    """Base of all node operators.

    Attributes
    ----------
    name : str
        Where the user finds it: the module path (``"layers.3"``) or ONNX node name.
    kind : str
        The user's layer type (``"Linear"``, ``"BatchNorm1d"``, ``"Gemm"``).
    shape : tuple of int
        Output shape without the batch axis.
    """

    name: str
    kind: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return _size(self.shape)


@dataclass
class Input(Op):
    pass


@dataclass
class Affine(Op):
    """``y = W x + b`` on flattened tensors.

    ``weight`` is a dense ``numpy.ndarray`` or a ``scipy.sparse`` matrix of shape
    ``(size_out, size_in)``, float64; ``bias`` has shape ``(size_out,)`` or is None.
    """

    weight: Any = None
    bias: np.ndarray | None = None


@dataclass
class Reshape(Op):
    pass


@dataclass
class Add(Op):
    pass


@dataclass
class Concat(Op):
    axis: int = 0  # axis of the non-batch shape


@dataclass
class Activation(Op):
    """A nonlinearity ``phi`` applied to its parent.

    ``function`` is the key of its quadratic constraint in
    :mod:`lipsdp.constraints` (``"relu"``, ``"leaky_relu"``, ``"tanh"``, ...);
    ``params`` holds the function's parameters (``{"negative_slope": 0.01}``).
    """

    function: str = "relu"
    params: dict = field(default_factory=dict)


@dataclass
class Equilibrium(Activation):
    """An implicit (equilibrium / DEQ) layer: ``z = phi(F z + u)`` with ``u`` the parent's value.

    It is an :class:`Activation` whose pre-activation also reads its own output
    through ``feedback`` ``F`` (shape ``(size, size)``, dense or sparse): in the
    LFT form of MATH.md section 3 its block of ``C_vw`` is ``F``, not
    triangular (section 5.2).  The graph itself stays acyclic.  The value of the
    node is the equilibrium; it exists and is unique when lipsdp's LMI verifies
    (:mod:`lipsdp.equilibrium` has the argument).
    """

    feedback: Any = None


class Network:
    """A DAG of :class:`Op` nodes with one input and one output.

    Build it with :meth:`add`; nodes are integers in insertion order, which is a
    topological order.  ``graph.nodes[i]["op"]`` is the operator of node ``i``.

    Examples
    --------
    >>> import numpy as np
    >>> net = Network.sequential([np.eye(2), np.ones((1, 2))], activation="relu")
    >>> [type(op).__name__ for op in net.ops()]
    ['Input', 'Affine', 'Activation', 'Affine']
    """

    def __init__(self, source: str = ""):
        self.graph = nx.DiGraph()
        self.source = source
        self.output: int | None = None

    # -- building -------------------------------------------------------
    def add(self, op: Op, parents: Iterable[int] = ()) -> int:
        """Add ``op`` fed by ``parents`` (in argument order); return its node id."""
        parents = list(parents)
        node = self.graph.number_of_nodes()
        self.graph.add_node(node, op=op, parents=parents)
        for p in parents:
            self.graph.add_edge(p, node)
        self.output = node
        return node

    @classmethod
    def sequential(cls, weights, activation: str = "relu", biases=None, params=None,
                   source: str = "") -> "Network":
        """A plain MLP ``W_l phi(... phi(W_0 x))`` from ordered weight matrices ``(out, in)``."""
        net = cls(source=source)
        weights = [np.asarray(w, dtype=np.float64) for w in weights]
        node = net.add(Input("input", "Input", (weights[0].shape[1],)))
        for k, w in enumerate(weights):
            b = None if biases is None or biases[k] is None else np.asarray(biases[k], np.float64)
            node = net.add(Affine(f"layers.{k}", "Linear", (w.shape[0],), weight=w, bias=b), [node])
            if k < len(weights) - 1:
                node = net.add(Activation(f"act.{k}", activation, (w.shape[0],), function=activation,
                                          params=dict(params or {})), [node])
        return net

    # -- reading --------------------------------------------------------
    def op(self, node: int) -> Op:
        return self.graph.nodes[node]["op"]

    def parents(self, node: int) -> list[int]:
        return self.graph.nodes[node]["parents"]

    def ops(self) -> list[Op]:
        return [self.op(n) for n in self.graph.nodes]

    @property
    def input(self) -> int:
        return 0

    @property
    def input_dim(self) -> int:
        return self.op(0).size

    @property
    def output_dim(self) -> int:
        return self.op(self.output).size

    def activations(self) -> list[int]:
        return [n for n in self.graph.nodes if isinstance(self.op(n), Activation)]

    def __repr__(self) -> str:
        body = ", ".join(f"{op.kind}{list(op.shape)}" for op in self.ops())
        return f"Network({body})"

    # -- checks ---------------------------------------------------------
    def validate(self) -> "Network":
        """Check finiteness and shapes; raise :class:`InvalidNetworkError` with every problem found."""
        problems = []
        if self.output is None or not isinstance(self.op(0), Input):
            raise InvalidNetworkError("the network has no input node")
        if not nx.is_directed_acyclic_graph(self.graph):
            problems.append("the graph has a cycle")
        for n in self.graph.nodes:
            op, parents = self.op(n), self.parents(n)
            sizes = [self.op(p).size for p in parents]
            if isinstance(op, Affine):
                w = op.weight
                data = w.data if sp.issparse(w) else np.asarray(w)
                if not np.all(np.isfinite(data)) or (op.bias is not None and not np.all(np.isfinite(op.bias))):
                    problems.append(f"{op.name} ({op.kind}) has NaN or Inf weights")
                if w.shape != (op.size, sizes[0]):
                    problems.append(f"{op.name} ({op.kind}) maps {w.shape[1]} -> {w.shape[0]} values "
                                    f"but receives {sizes[0]} and should give {op.size}")
            elif isinstance(op, (Reshape, Activation)) and sizes[0] != op.size:
                problems.append(f"{op.name} ({op.kind}) changes the size {sizes[0]} -> {op.size}")
            elif isinstance(op, Add) and any(s != op.size for s in sizes):
                problems.append(f"{op.name} ({op.kind}) adds tensors of sizes {sizes}")
            elif isinstance(op, Concat) and sum(sizes) != op.size:
                problems.append(f"{op.name} ({op.kind}) concatenates {sizes} into {op.size}")
            if isinstance(op, Equilibrium):
                F = op.feedback
                if F is None or F.shape != (op.size, op.size):
                    problems.append(f"{op.name} ({op.kind}) needs a {op.size}x{op.size} feedback matrix, got "
                                    f"{None if F is None else F.shape}")
                elif not np.all(np.isfinite(F.data if sp.issparse(F) else np.asarray(F))):
                    problems.append(f"{op.name} ({op.kind}) has NaN or Inf feedback weights")
            if isinstance(op, Activation):
                for key, value in op.params.items():
                    if isinstance(value, np.ndarray) and not np.all(np.isfinite(value)):
                        problems.append(f"{op.name} ({op.kind}) has NaN or Inf parameter {key}")
        if problems:
            raise InvalidNetworkError("; ".join(problems))
        return self

    def fingerprint(self) -> str:
        """SHA-256 of the architecture and every weight (float64 bytes): what a certificate is about."""
        import hashlib

        h = hashlib.sha256()
        for n in self.graph.nodes:
            op = self.op(n)
            h.update(f"{type(op).__name__}|{op.shape}|{self.parents(n)}|".encode())
            if isinstance(op, Affine):
                w = op.weight
                w = w.toarray() if sp.issparse(w) else np.asarray(w)
                h.update(np.ascontiguousarray(w, dtype=np.float64).tobytes())
                if op.bias is not None:
                    h.update(np.ascontiguousarray(op.bias, dtype=np.float64).tobytes())
            elif isinstance(op, Activation):
                h.update(op.function.encode())
                for key in sorted(op.params):
                    h.update(f"{key}={np.asarray(op.params[key]).tolist()}".encode())
                if isinstance(op, Equilibrium):
                    F = op.feedback.toarray() if sp.issparse(op.feedback) else np.asarray(op.feedback)
                    h.update(np.ascontiguousarray(F, dtype=np.float64).tobytes())
            elif isinstance(op, Concat):
                h.update(str(op.axis).encode())
        return h.hexdigest()

    def is_constant(self) -> bool:
        """True when the output provably does not depend on the input (an all-zero layer cuts every path).

        Exact: a node is non-constant only if it is the input, or an Affine with a
        nonzero weight entry (or a Reshape / Activation / Add / Concat) fed by a
        non-constant node.
        """
        varying: dict[int, bool] = {}
        for n in self.graph.nodes:
            op, parents = self.op(n), self.parents(n)
            if isinstance(op, Input):
                varying[n] = True
            elif isinstance(op, Affine):
                w = op.weight
                nonzero = (w.count_nonzero() if sp.issparse(w) else np.count_nonzero(w)) > 0
                varying[n] = nonzero and varying[parents[0]]
            else:
                varying[n] = any(varying[p] for p in parents)
        return not varying[self.output]

    def is_feedforward(self) -> bool:
        """True when the graph is a chain (no Add/Concat, no implicit layer), the case LipSDP's papers treat."""
        if any(isinstance(op, Equilibrium) for op in self.ops()):
            return False
        return all(self.graph.in_degree(n) <= 1 and self.graph.out_degree(n) <= 1 for n in self.graph.nodes)

    def numpy_forward(self, x: np.ndarray) -> np.ndarray:
        """Evaluate the network on a batch ``x`` of shape ``(batch, input_dim)`` with numpy.

        Used by tests to check that a loader reproduces the torch model exactly.
        """
        return self.node_values(x)[self.output]

    def node_values(self, x: np.ndarray) -> dict[int, np.ndarray]:
        """The value of every node on a batch ``x`` of shape ``(batch, input_dim)``, flat ``(batch, size)``."""
        from lipsdp.constraints import get_constraint

        values: dict[int, np.ndarray] = {}
        for n in self.graph.nodes:
            op, parents = self.op(n), self.parents(n)
            ins = [values[p] for p in parents]
            if isinstance(op, Input):
                y = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
            elif isinstance(op, Affine):
                y = np.asarray((op.weight @ ins[0].T).T)
                if op.bias is not None:
                    y = y + op.bias
            elif isinstance(op, Reshape):
                y = ins[0]
            elif isinstance(op, Add):
                y = sum(ins)
            elif isinstance(op, Concat):
                perm = concat_permutation([self.op(p).shape for p in parents], op.axis)
                y = np.concatenate(ins, axis=1)[:, perm]
            elif isinstance(op, Equilibrium):
                from lipsdp.equilibrium import equilibrium

                y = equilibrium(op, ins[0], strict=True)
            else:
                y = get_constraint(op.function).evaluate(ins[0], op)
            values[n] = y
        return values


def concat_permutation(shapes: list[tuple[int, ...]], axis: int) -> np.ndarray:
    """Index array ``perm`` with ``concat(x_1..x_k, axis).ravel() == hstack(ravel(x_i))[perm]``.

    Concatenation along the first axis of the non-batch shape is plain stacking
    (``perm`` is the identity); other axes interleave coordinates.
    """
    offsets = np.cumsum([0] + [_size(s) for s in shapes])
    pieces = [offsets[i] + np.arange(_size(s)).reshape(s) for i, s in enumerate(shapes)]
    return np.concatenate(pieces, axis=axis).ravel()
