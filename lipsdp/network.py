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

Each node type states here, as methods, what it means for the graph: its value
(:meth:`Op.evaluate`), its shape checks (:meth:`Op.problems`), what the
fingerprint hashes (:meth:`Op.digest`) and whether it can carry the input's
variation (:meth:`Op.varies`).  The stages above register their own view of each
type next to their code: the lift in :mod:`lipsdp.lifting`, the norm bound and
Jacobian in :mod:`lipsdp.bounds`.

Tensors are flattened in row-major (C) order, as torch and ONNX lay them out,
so Flatten and Reshape do not move coordinates.  Biases are kept for local
analysis; every global bound ignores them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import networkx as nx
import numpy as np
import scipy.sparse as sp

from lipsdp.constraints import get_constraint
from lipsdp.equilibrium import equilibrium
from lipsdp.errors import InvalidNetworkError


def _size(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) if len(shape) else 1


def _finite(a) -> bool:
    return bool(np.all(np.isfinite(a.data if sp.issparse(a) else np.asarray(a))))


def _hash_array(h, a) -> None:
    if sp.issparse(a):  # the dense bytes by blocks of rows: the same digest without the dense matrix in memory
        a = sp.csr_matrix(a)
        step = max(1, (1 << 22) // max(a.shape[1], 1))
        for i in range(0, a.shape[0], step):
            h.update(np.ascontiguousarray(a[i:i + step].toarray(), dtype=np.float64).tobytes())
        return
    h.update(np.ascontiguousarray(np.asarray(a), dtype=np.float64).tobytes())


def activation_function(function: str):
    """The activation ``function`` as an object with ``evaluate(x, op)``, ``derivative(x, op)`` and
    ``jacobian(x, J, op)``: what evaluating the graph needs of a nonlinearity.

    The one place the graph reaches for activations' definitions: every ``Activation.function``
    key (GroupSort and Householder included) is known to :func:`lipsdp.constraints.get_constraint`,
    which imports nothing of the graph, so evaluating a network needs no stage above it.
    """
    return get_constraint(function)


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

    #: True for implicit layers (the value solves an equation instead of being computed in one pass).
    implicit: ClassVar[bool] = False

    @property
    def size(self) -> int:
        return _size(self.shape)

    def evaluate(self, ins: list[np.ndarray], shapes: list[tuple[int, ...]]) -> np.ndarray:
        """The node's value, flat ``(batch, size)``, from its parents' values ``ins`` (shapes ``shapes``)."""
        raise TypeError(f"unknown node kind {type(self).__name__}")

    def problems(self, sizes: list[int]) -> list[str]:
        """What is wrong with this node fed by parents of sizes ``sizes`` (empty when nothing)."""
        return []

    def digest(self, h) -> None:
        """Feed what defines this node besides its type, shape and parents to the hash ``h``."""

    def varies(self, parents: list[bool]) -> bool:
        """Whether the node can depend on the input, given which parents can."""
        return any(parents)

    def _size_problem(self, sizes: list[int]) -> list[str]:
        if sizes[0] != self.size:
            return [f"{self.name} ({self.kind}) changes the size {sizes[0]} -> {self.size}"]
        return []


@dataclass
class Input(Op):
    def evaluate(self, ins, shapes):
        x = ins[0]
        return np.asarray(x, dtype=np.float64).reshape(len(x), -1)

    def varies(self, parents):
        return True


@dataclass
class Affine(Op):
    """``y = W x + b`` on flattened tensors.

    ``weight`` is a dense ``numpy.ndarray`` or a ``scipy.sparse`` matrix of shape
    ``(size_out, size_in)``, float64; ``bias`` has shape ``(size_out,)`` or is None.
    """

    weight: Any = None
    bias: np.ndarray | None = None

    def evaluate(self, ins, shapes):
        y = np.asarray((self.weight @ ins[0].T).T)
        return y if self.bias is None else y + self.bias

    def problems(self, sizes):
        out, w = [], self.weight
        if not _finite(w) or (self.bias is not None and not np.all(np.isfinite(self.bias))):
            out.append(f"{self.name} ({self.kind}) has NaN or Inf weights")
        if w.shape != (self.size, sizes[0]):
            out.append(f"{self.name} ({self.kind}) maps {w.shape[1]} -> {w.shape[0]} values "
                       f"but receives {sizes[0]} and should give {self.size}")
        return out

    def digest(self, h):
        _hash_array(h, self.weight)
        if self.bias is not None:
            _hash_array(h, self.bias)

    def varies(self, parents):
        w = self.weight
        nonzero = (w.count_nonzero() if sp.issparse(w) else np.count_nonzero(w)) > 0
        return nonzero and parents[0]


@dataclass
class Reshape(Op):
    def evaluate(self, ins, shapes):
        return ins[0]

    def problems(self, sizes):
        return self._size_problem(sizes)


@dataclass
class Add(Op):
    def evaluate(self, ins, shapes):
        return sum(ins)

    def problems(self, sizes):
        if any(s != self.size for s in sizes):
            return [f"{self.name} ({self.kind}) adds tensors of sizes {sizes}"]
        return []


@dataclass
class Concat(Op):
    axis: int = 0  # axis of the non-batch shape

    def evaluate(self, ins, shapes):
        return np.concatenate(ins, axis=1)[:, concat_permutation(shapes, self.axis)]

    def problems(self, sizes):
        if sum(sizes) != self.size:
            return [f"{self.name} ({self.kind}) concatenates {sizes} into {self.size}"]
        return []

    def digest(self, h):
        h.update(str(self.axis).encode())


@dataclass
class Activation(Op):
    """A nonlinearity ``phi`` applied to its parent.

    ``function`` is the key of its quadratic constraint in
    :mod:`lipsdp.constraints` (``"relu"``, ``"leaky_relu"``, ``"tanh"``, ...);
    ``params`` holds the function's parameters (``{"negative_slope": 0.01}``).
    """

    function: str = "relu"
    params: dict = field(default_factory=dict)

    def evaluate(self, ins, shapes):
        return activation_function(self.function).evaluate(ins[0], self)

    def problems(self, sizes):
        return self._size_problem(sizes) + self._param_problems()

    def _param_problems(self) -> list[str]:
        return [f"{self.name} ({self.kind}) has NaN or Inf parameter {key}" for key, value in self.params.items()
                if isinstance(value, np.ndarray) and not np.all(np.isfinite(value))]

    def digest(self, h):
        h.update(self.function.encode())
        for key in sorted(self.params):
            h.update(f"{key}={np.asarray(self.params[key]).tolist()}".encode())


@dataclass
class Equilibrium(Activation):
    """An implicit (equilibrium / DEQ) layer: ``z = phi(F z + u)`` with ``u`` the parent's value.

    It is an :class:`Activation` whose pre-activation also reads its own output
    through ``feedback`` ``F`` (shape ``(size, size)``, dense or sparse): in the
    LFT form of docs/math.md §3 its block of ``C_vw`` is ``F``, not
    triangular (docs/math.md §5.2).  The graph itself stays acyclic.  The value of the
    node is the equilibrium; it exists and is unique when lipsdp's LMI verifies
    (:mod:`lipsdp.wellposed` has the argument).
    """

    feedback: Any = None

    implicit: ClassVar[bool] = True

    def evaluate(self, ins, shapes):
        return equilibrium(self, ins[0], activation_function(self.function), strict=True)

    def problems(self, sizes):
        return self._size_problem(sizes) + self._feedback_problems() + self._param_problems()

    def _feedback_problems(self) -> list[str]:
        F = self.feedback
        if F is None or F.shape != (self.size, self.size):
            return [f"{self.name} ({self.kind}) needs a {self.size}x{self.size} feedback matrix, got "
                    f"{None if F is None else F.shape}"]
        if not _finite(F):
            return [f"{self.name} ({self.kind}) has NaN or Inf feedback weights"]
        return []

    def digest(self, h):
        super().digest(h)
        _hash_array(h, self.feedback)


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
        #: What a loader recorded about the model's structure (``"recurrent"``: :mod:`lipsdp.io.rnn`).
        self.meta: dict = {}

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
        if self.output is None or not isinstance(self.op(0), Input):
            raise InvalidNetworkError("the network has no input node")
        problems = [] if nx.is_directed_acyclic_graph(self.graph) else ["the graph has a cycle"]
        for n in self.graph.nodes:
            problems.extend(self.op(n).problems([self.op(p).size for p in self.parents(n)]))
        if problems:
            raise InvalidNetworkError("; ".join(problems))
        return self

    def fingerprint(self) -> str:
        """SHA-256 of the architecture and every weight (float64 bytes): what a certificate is about."""
        h = hashlib.sha256()
        for n in self.graph.nodes:
            op = self.op(n)
            h.update(f"{type(op).__name__}|{op.shape}|{self.parents(n)}|".encode())
            op.digest(h)
        return h.hexdigest()

    def is_constant(self) -> bool:
        """True when the output provably does not depend on the input (an all-zero layer cuts every path).

        Exact: a node is non-constant only if it is the input, or an Affine with a
        nonzero weight entry (or a Reshape / Activation / Add / Concat) fed by a
        non-constant node.
        """
        varying: dict[int, bool] = {}
        for n in self.graph.nodes:
            varying[n] = self.op(n).varies([varying[p] for p in self.parents(n)])
        return not varying[self.output]

    def is_feedforward(self) -> bool:
        """True when the graph is a chain (no Add/Concat, no implicit layer), the case LipSDP's papers treat."""
        if any(op.implicit for op in self.ops()):
            return False
        return all(self.graph.in_degree(n) <= 1 and self.graph.out_degree(n) <= 1 for n in self.graph.nodes)

    def numpy_forward(self, x: np.ndarray) -> np.ndarray:
        """Evaluate the network on a batch ``x`` of shape ``(batch, input_dim)`` with numpy.

        Used by tests to check that a loader reproduces the torch model exactly.
        """
        return self.node_values(x)[self.output]

    def node_values(self, x: np.ndarray) -> dict[int, np.ndarray]:
        """The value of every node on a batch ``x`` of shape ``(batch, input_dim)``, flat ``(batch, size)``."""
        values: dict[int, np.ndarray] = {}
        for n in self.graph.nodes:
            parents = self.parents(n)
            ins = [x] if n == self.input else [values[p] for p in parents]
            values[n] = self.op(n).evaluate(ins, [self.op(p).shape for p in parents])
        return values


def concat_permutation(shapes: list[tuple[int, ...]], axis: int) -> np.ndarray:
    """Index array ``perm`` with ``concat(x_1..x_k, axis).ravel() == hstack(ravel(x_i))[perm]``.

    Concatenation along the first axis of the non-batch shape is plain stacking
    (``perm`` is the identity); other axes interleave coordinates.
    """
    offsets = np.cumsum([0] + [_size(s) for s in shapes])
    pieces = [offsets[i] + np.arange(_size(s)).reshape(s) for i, s in enumerate(shapes)]
    return np.concatenate(pieces, axis=axis).ravel()
