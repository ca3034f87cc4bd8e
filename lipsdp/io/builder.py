"""Build a :class:`~lipsdp.network.Network` from a traced graph, one operation at a time.

Frontends (``torch.export``, TorchScript, ONNX) walk their graph and call the
methods of :class:`GraphBuilder`.  A tensor that depends on the network input
is a :class:`Sym`: an affine map ``flat(value) = W @ flat(base) + b`` of a node
already in the graph.  Linear operations (Linear, folded BatchNorm, reshape,
transpose, slicing, scaling, ...) only compose ``W`` and ``b``; a node is
emitted when a nonlinearity, a residual sum or a concatenation needs its input
as a node.  So ``Linear -> BatchNorm -> Flatten`` becomes one ``Affine``, and the
graph holds only the nodes LipSDP needs.  Nodes nothing reads are dropped when
the network is finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lipsdp import activations
from lipsdp.errors import ModelLoadError
from lipsdp.io import fold_error, linmaps
from lipsdp.network import Activation, Add, Affine, Concat, Equilibrium, Input, Network, Reshape, concat_permutation

#: Activation functions applied coordinate by coordinate (these may be merged across a concatenation):
#: the catalogue :mod:`lipsdp.activations`.
ELEMENTWISE = frozenset(activations.names())


class Unsupported(Exception):
    """An operation the loader cannot express exactly; the frontend records it and goes on."""


@dataclass(frozen=True)
class Label:
    """Where a user finds an operation: module path (or node name) and layer type."""

    name: str
    kind: str


def layer_kind(class_name: str) -> str:
    """The user's layer type for a class name (``ParametrizedSpectralLinear`` -> ``SpectralLinear``)."""
    if class_name.startswith("Parametrized") and len(class_name) > len("Parametrized"):
        return class_name[len("Parametrized"):]
    return class_name


class Sym:
    """A tensor that depends on the network input.

    ``flat(value) = W @ flat(value of node base) + b`` for every sample, where
    ``W`` is None for the identity.  ``shape`` excludes the batch axis.

    Attributes
    ----------
    act : tuple or None
        ``(function, params, pre)`` when the value is the direct output of an
        activation applied to the :class:`Sym` ``pre``.
    err : ndarray, sparse matrix or None
        Entrywise bound on ``|W* - W|``, ``W*`` the exact composition of the linear maps folded into
        ``W`` (:mod:`lipsdp.io.fold_error`, docs/math.md §10.3); None when ``W`` is exact.
    """

    __slots__ = ("base", "shape", "W", "b", "labels", "node", "act", "err")

    def __init__(self, base: int, shape: tuple, W=None, b=None, labels: tuple = (), act=None, err=None):
        self.base = base
        self.shape = tuple(int(s) for s in shape)
        self.W = W
        self.b = b
        self.labels = labels
        self.node: int | None = None
        self.act = act
        self.err = err

    @property
    def size(self) -> int:
        return linmaps.size(self.shape)

    def __repr__(self) -> str:
        return f"Sym(base={self.base}, shape={self.shape}, linear={self.W is not None or self.b is not None})"


class GraphBuilder:
    """Collects operators, then :meth:`finish` keeps those the output needs.

    Parameters
    ----------
    source : str
        Shown in error messages and stored as :attr:`Network.source`.
    """

    def __init__(self, source: str = ""):
        self.source = source
        self._ops: list = []
        self._parents: list[list[int]] = []
        self.meta: dict = {}  # what handlers record for later stages (lipsdp.io.rnn), copied to Network.meta

    # -- nodes ----------------------------------------------------------
    def _emit(self, op, parents) -> int:
        self._ops.append(op)
        self._parents.append(list(parents))
        return len(self._ops) - 1

    def _shape(self, node: int) -> tuple:
        return self._ops[node].shape

    def input(self, shape, name: str = "input") -> Sym:
        """The network input (shape without the batch axis); call it first, once."""
        if self._ops:
            raise RuntimeError("the input must be the first node")
        shape = tuple(int(s) for s in shape)
        node = self._emit(Input(name, "Input", shape), [])
        sym = Sym(node, shape)
        sym.node = node
        return sym

    def node_of(self, x: Sym) -> int:
        """Emit (once) the node holding ``x`` and return its id."""
        if x.node is not None:
            return x.node
        if x.W is None and x.b is None:
            if x.shape == self._shape(x.base):
                x.node = x.base
            else:
                x.node = self._emit(Reshape("reshape", "Reshape", x.shape), [x.base])
            return x.node
        names = dict.fromkeys(lab.name for lab in x.labels) or {"affine": None}
        kinds = dict.fromkeys(lab.kind for lab in x.labels) or {"Affine": None}
        weight = self._explicit(x)
        x.node = self._emit(Affine("+".join(names), "+".join(kinds), x.shape, weight=linmaps.finalize(weight),
                                   bias=None if x.b is None else np.asarray(x.b, dtype=np.float64),
                                   weight_err=x.err), [x.base])
        return x.node

    def _explicit(self, x: Sym):
        return sp.identity(linmaps.size(self._shape(x.base)), format="csr") if x.W is None else x.W

    # -- linear algebra on Sym ------------------------------------------
    def linear(self, x: Sym, matrix=None, bias=None, shape=None, label: Label | None = None, err=None) -> Sym:
        """``M @ flat(x) + c``; ``matrix=None`` means the identity (a pure bias shift or reshape).

        Parameters
        ----------
        matrix : ndarray, scipy.sparse matrix or None
            ``(size(shape), x.size)``.
        bias : ndarray or None
            ``(size(shape),)``.
        shape : tuple of int, optional
            Output shape (default: ``x.shape``).
        err : ndarray, sparse matrix or None
            Entrywise bound on the rounding error of ``matrix`` (computed from the model's parameters, e.g. a
            folded BatchNorm's scale); the composition's own rounding is added (:mod:`lipsdp.io.fold_error`).
        """
        shape = x.shape if shape is None else tuple(int(s) for s in shape)
        if matrix is None and bias is None:
            if shape == x.shape:
                return x
            out = Sym(x.base, shape, x.W, x.b, x.labels, err=x.err)
            return out
        if matrix is None:
            W, b, E = x.W, x.b, x.err
            if W is None:
                W = sp.identity(x.size, format="csr")
        else:
            W = _tidy(matrix if x.W is None else matrix @ x.W)
            E = err if x.W is None else fold_error.product_error(matrix, x.W, err, x.err)
            b = None if x.b is None else np.asarray(matrix @ x.b).ravel()
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float64).ravel()
            b = bias if b is None else b + bias
        labels = x.labels if label is None or label in x.labels else x.labels + (label,)
        return Sym(x.base, shape, W, b, labels, err=E)

    def scale(self, x: Sym, factor: float, label: Label | None = None, rel_err: float = 0.0) -> Sym:
        """``factor * x`` (returns ``x`` itself for a factor of 1); ``rel_err`` bounds the relative rounding
        of ``factor`` itself (a reciprocal), carried with the product's (:mod:`lipsdp.io.fold_error`)."""
        factor = float(factor)
        if factor == 1.0 and not rel_err:
            return x
        W = _tidy(factor * self._explicit(x))
        b = None if x.b is None else factor * x.b
        labels = x.labels if label is None or label in x.labels else x.labels + (label,)
        return Sym(x.base, x.shape, W, b, labels, err=fold_error.scale_error(factor, self._explicit(x), x.err, rel_err))

    def select(self, x: Sym, index: np.ndarray, label: Label | None = None) -> Sym:
        """``flat(y) = flat(x)[index]`` with ``index`` shaped like ``y`` (``-1``: zero)."""
        index = np.asarray(index)
        if index.size == x.size and np.array_equal(index.ravel(), np.arange(x.size)):
            return self.linear(x, shape=index.shape)
        return self.linear(x, linmaps.selection(index, x.size), shape=index.shape, label=label)

    # -- nodes for nonlinear structure ----------------------------------
    def activation(self, x: Sym, function: str, params: dict | None = None, label: Label | None = None) -> Sym:
        """``phi(x)`` as an :class:`~lipsdp.network.Activation` node (``function`` keys :mod:`lipsdp.constraints`).

        Activations act on the flattened vector (elementwise, or on groups of
        consecutive coordinates), so when ``x`` only reshapes a node the
        activation is applied to that node and the reshape moves after it.
        """
        label = label or Label(function, function)
        params = dict(params or {})
        pure_reshape = x.W is None and x.b is None and x.node is None
        source = Sym(x.base, self._shape(x.base)) if pure_reshape else x
        node = self._emit(Activation(label.name, label.kind, source.shape, function=function, params=params),
                          [self.node_of(source)])
        out = Sym(node, source.shape, act=(function, params, source))
        out.node = node
        if pure_reshape and x.shape != source.shape:
            out = Sym(node, x.shape, act=(function, params, x))
        return out

    def equilibrium(self, x: Sym, feedback, function: str, params: dict, label: Label) -> Sym:
        """The solution ``z`` of ``z = phi(F z + x)``: an :class:`~lipsdp.network.Equilibrium` node.

        Its output carries no ``act`` tag: it is not an elementwise function of ``x``,
        so it must never be merged like MaxMin's two ReLUs.
        """
        node = self._emit(Equilibrium(label.name, label.kind, x.shape, function=function, params=dict(params),
                                      feedback=feedback), [self.node_of(x)])
        out = Sym(node, x.shape)
        out.node = node
        return out

    def add(self, terms: list[Sym], label: Label | None = None) -> Sym:
        """Sum of tensors of the same shape; one affine map when they share a base node."""
        shape = terms[0].shape
        if any(t.shape != shape for t in terms):
            raise Unsupported(f"adds tensors of shapes {[t.shape for t in terms]}")
        if len({t.base for t in terms}) == 1:
            Ws = [self._explicit(t) for t in terms]
            if all(sp.issparse(w) for w in Ws):
                W = _tidy(sum(Ws[1:], Ws[0]))
            else:
                W = sum(w.toarray() if sp.issparse(w) else np.asarray(w) for w in Ws)
            biases = [t.b for t in terms if t.b is not None]
            labels = tuple(dict.fromkeys(lab for t in terms for lab in t.labels))
            return Sym(terms[0].base, shape, W, sum(biases) if biases else None, labels,
                       err=fold_error.sum_error(Ws, [t.err for t in terms]))
        label = label or Label("add", "Add")
        node = self._emit(Add(label.name, label.kind, shape), [self.node_of(t) for t in terms])
        out = Sym(node, shape)
        out.node = node
        return out

    def concat(self, parts: list[Sym], axis: int, label: Label | None = None) -> Sym:
        """Concatenate along ``axis`` of the shape without batch axis.

        Parts that are affine maps of one node become one affine map; parts that
        are one elementwise activation of affine maps of one node (``MaxMin``'s
        ``[relu(x), relu(-x)]``) become that activation of one stacked affine map.
        """
        shapes = [p.shape for p in parts]
        ref = shapes[0]
        if not all(len(s) == len(ref) and s[:axis] == ref[:axis] and s[axis + 1:] == ref[axis + 1:]
                   for s in shapes):
            raise Unsupported(f"concatenates tensors of shapes {shapes} along axis {axis + 1}")
        out_shape = ref[:axis] + (sum(s[axis] for s in shapes),) + ref[axis + 1:]
        perm = concat_permutation(shapes, axis)
        if len({p.base for p in parts}) == 1:
            Ws = [self._explicit(p) for p in parts]
            W = sp.vstack(Ws, format="csr") if any(sp.issparse(w) for w in Ws) else np.vstack(Ws)
            W = W[perm]
            b = None
            if any(p.b is not None for p in parts):
                b = np.concatenate([p.b if p.b is not None else np.zeros(p.size) for p in parts])[perm]
            labels = tuple(dict.fromkeys(lab for p in parts for lab in p.labels))
            return Sym(parts[0].base, out_shape, W, b, labels, err=fold_error.stacked_error(Ws, [p.err for p in parts], perm))
        acts = [p.act for p in parts]
        if all(a is not None for a in acts):
            fn, params = acts[0][0], acts[0][1]
            if fn in ELEMENTWISE and all(a[0] == fn and _same_params(a[1], params) for a in acts) \
                    and len({a[2].base for a in acts}) == 1:
                pre = self.concat([a[2] for a in acts], axis, label)
                first = self._ops[parts[0].base]  # the activation node of the first part
                return self.activation(pre, fn, params, Label(first.name, first.kind))
        label = label or Label("concat", "Concat")
        node = self._emit(Concat(label.name, label.kind, out_shape, axis=axis), [self.node_of(p) for p in parts])
        out = Sym(node, out_shape)
        out.node = node
        return out

    # -- result ---------------------------------------------------------
    def finish(self, output: Sym, validate: bool = True) -> Network:
        """Emit ``output``, drop the nodes it does not depend on, and return the validated network."""
        out = self.node_of(output)
        live, stack = {out}, [out]
        while stack:
            for p in self._parents[stack.pop()]:
                if p not in live:
                    live.add(p)
                    stack.append(p)
        if 0 not in live:
            raise ModelLoadError(f"{self.source}: the output does not depend on the input")
        net = Network(source=self.source)
        remap = {}
        for node in sorted(live):
            remap[node] = net.add(self._ops[node], [remap[p] for p in self._parents[node]])
        net.meta.update(self.meta)
        return net.validate() if validate else net


def _tidy(m):
    """A dense ``ndarray`` or a CSR matrix (never ``np.matrix``)."""
    if sp.issparse(m):
        return m if isinstance(m, sp.csr_matrix) else sp.csr_matrix(m)
    return np.asarray(m)


def _same_params(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)
