"""The ATen translation machinery shared by the ``torch.export`` and TorchScript frontends.

A frontend walks its graph and, for every operator call, hands
:meth:`Translator.call` the ``OpOverload`` (``torch.ops.aten.linear.default``),
its arguments in schema order and a :class:`~lipsdp.io.builder.Label` naming the
user's layer.  Calls whose arguments do not depend on the network input are
evaluated with torch (constant folding: shapes, weight transposes, ...); the
others go to the handler registered for the operator name in :data:`ATEN_OPS`
(the handlers live in :mod:`lipsdp.io.aten_shapes`, :mod:`lipsdp.io.aten_linear`
and :mod:`lipsdp.io.aten_ops`; import the last to have them all).

An unsupported operator does not stop the walk: it is recorded and its result
is a :class:`Poison` that keeps its shape (the operator runs on zeros, see
:meth:`Translator.shadow`), so shape arithmetic further down stays exact and
the final :class:`~lipsdp.errors.UnsupportedLayerError` lists every offending
layer at once.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import numpy as np

from lipsdp.errors import UnsupportedLayerError
from lipsdp.io import linmaps
from lipsdp.io.builder import GraphBuilder, Label, Sym, Unsupported


class Poison:
    """A value computed from an operator that could not be translated.

    ``shape`` (with batch axis, when known) keeps shape arithmetic downstream
    working, so later unsupported layers are found too; ``error`` holds a
    deferred entry (e.g. the indices output of ``sort``) that is reported only
    if something consumes it.
    """

    __slots__ = ("error", "shape")

    def __init__(self, error: tuple | None = None, shape: tuple | None = None):
        self.error = error
        self.shape = shape


class BatchAt:
    """A tensor whose batch axis is ``axis >= 1`` of torch's layout (``batch_first=False``: time first).

    Its value for one sample is the :class:`Sym` ``sym`` (the tensor with the batch axis removed).
    Only the handlers of :data:`BATCH_AT_OPS` (:mod:`lipsdp.io.batch_axis`) accept it; any other
    operator on it is refused, never read as if the batch came first.
    """

    __slots__ = ("sym", "axis")

    def __init__(self, sym, axis: int):
        self.sym, self.axis = sym, int(axis)

    def full_shape(self, batch: int) -> tuple:
        shape = list(self.sym.shape)
        shape.insert(self.axis, int(batch))
        return tuple(shape)


class Extreme:
    """``min``/``max`` over one axis, kept until a ``cat`` shows it is GroupSort-2."""

    __slots__ = ("kind", "x", "axis", "keepdim")

    def __init__(self, kind: str, x: Sym, axis: int, keepdim: bool):
        self.kind, self.x, self.axis, self.keepdim = kind, x, axis, keepdim


def leaves(value):
    """Yield the non-container values nested in lists, tuples and dicts."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from leaves(v)
    else:
        yield value


def to_numpy(value) -> np.ndarray:
    """A constant (torch tensor, number, list) as a float64 array that shares no memory with the model."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().to(dtype=torch_lib().float64).numpy()
    return np.array(value, dtype=np.float64, copy=True)


#: Casts read as the identity: between floating types the rounding is of the order of the unit roundoff,
#: whereas a cast to an integer, bool or complex type is a step function (or drops a part), which a
#: Lipschitz bound cannot cover.
FLOATING_DTYPES = ("float16", "bfloat16", "float32", "float64")


def dtype_name(value) -> str:
    """The dtype a cast argument stands for: a ``torch.dtype``, TorchScript's ScalarType code (an
    int), a constant tensor (``type_as``, ``to.other``) or an input-dependent value (floating)."""
    torch = torch_lib()
    if is_sym(value):
        return "float32"
    if isinstance(value, torch.Tensor):
        value = value.dtype
    elif isinstance(value, int) and not isinstance(value, bool):
        value = torch.ops.aten.to.dtype(torch.empty(0), value).dtype
    return str(value).replace("torch.", "")


def require_floating(value) -> None:
    """Raise :class:`Unsupported` unless the cast target ``value`` (None: no cast) is a floating type."""
    if value is not None and dtype_name(value) not in FLOATING_DTYPES:
        raise Unsupported(f"casts to {dtype_name(value)} (a step function; only casts between floating types "
                          "are the identity)")


def torch_lib():
    """torch, imported on first use (``import lipsdp`` stays free of it)."""
    import torch

    return torch


class Translator:
    """State of one graph walk: the builder, the batch size, and the errors found so far.

    Handlers read ``t.b`` (the :class:`~lipsdp.io.builder.GraphBuilder`),
    ``t.label`` (the layer being translated) and ``t.batch``.

    Parameters
    ----------
    builder : GraphBuilder
    batch : int
        The batch size the graph was traced with (shapes in the graph include it).
    """

    def __init__(self, builder: GraphBuilder, batch: int = 1):
        self.b = builder
        self.batch = int(batch)
        self.errors: list[tuple[str, int, str]] = []
        self._reported: set = set()
        self.label = Label("", "")
        self.position = 0
        self.op = None  # the OpOverload being translated (handlers read its schema)
        self.op_name = ""

    # -- errors ---------------------------------------------------------
    def entry(self, what: str) -> tuple[str, int, str]:
        """The :class:`UnsupportedLayerError` entry for ``what`` at the current operator.

        ``what`` names the operator and the reason (``"mul multiplies two ..."``);
        it follows the layer type unless it already starts with it.
        """
        kind = what if what.split(" ")[0] == self.label.kind else f"{self.label.kind}: {what}"
        return (self.label.name, self.position, kind)

    def report(self, entry: tuple[str, int, str]) -> Poison:
        key = (entry[0], entry[2].split(":")[0])
        if key not in self._reported:
            self._reported.add(key)
            self.errors.append(entry)
        return Poison()

    def raise_errors(self) -> None:
        if self.errors:
            raise UnsupportedLayerError(self.errors)

    # -- the dispatcher -------------------------------------------------
    def call(self, op, args: list, label: Label, position: int):
        """Translate one call of the ATen ``OpOverload`` ``op`` with ``args`` in schema order."""
        self.label, self.position = label, position
        name = op._schema.name.split("::", 1)[-1]
        self.op, self.op_name = op, name
        flat = list(leaves(args))
        poisoned = [v for v in flat if isinstance(v, Poison)]
        if poisoned:
            for v in poisoned:
                if v.error is not None:
                    self.report(v.error)
                    v.error = None
            if handler_for(name) is None:
                self.report(self.entry(name))
            return self.shadow(op, args)
        if any(isinstance(v, BatchAt) for v in flat):
            return self.call_batch_at(op, name, args)
        if not any(isinstance(v, (Sym, Extreme)) for v in flat):
            return self.fold(op, args)
        handler = handler_for(name)
        if handler is None:
            self.report(self.entry(name))
            return self.shadow(op, args)
        if name not in ("cat", "concat", "concatenate") and any(isinstance(v, Extreme) for v in flat):
            try:  # a max/min that is not GroupSort's pattern: its values (docs/math.md §2.5)
                args = self.resolve(args)
            except Unsupported as exc:
                self.report(self.entry(f"{name} of a max/min over an axis {exc}"))
                return self.shadow(op, args)
        try:  # a handler's parameters declare the arguments it models; an overload with more is refused
            inspect.signature(handler).bind(self, *args)
        except TypeError:
            self.report(self.entry(f"{name} with {len(args)} arguments (overload "
                                   f"{op._overloadname!r}), which lipsdp does not model"))
            return self.shadow(op, args)
        try:
            return handler(self, *args)
        except Unsupported as exc:
            self.report(self.entry(f"{name} {exc}"))
            return self.shadow(op, args)

    def call_batch_at(self, op, name: str, args: list):
        """A call with a :class:`BatchAt` argument: its handler in :data:`BATCH_AT_OPS`, or refused."""
        handler = BATCH_AT_OPS.get(name[:-1] if name.endswith("_") and name[:-1] in BATCH_AT_OPS else name)
        if handler is None:
            self.report(self.entry(f"{name} on a tensor whose batch axis is not the first (a time-first "
                                   "sequence: batch_first=False)"))
            return self.shadow(op, args)
        try:
            return handler(self, *args)
        except (Unsupported, TypeError) as exc:
            self.report(self.entry(f"{name} {exc}"))
            return self.shadow(op, args)

    def resolve(self, value):
        """``value`` with every :class:`Extreme` in it replaced by its values (:data:`EXTREME_VALUE`);
        a :class:`BatchAt` (a model's time-first output) by its value for one sample."""
        if isinstance(value, BatchAt):
            return value.sym
        if isinstance(value, Extreme):
            if not EXTREME_VALUE:
                raise Unsupported("(only GroupSort's pattern is supported)")
            return EXTREME_VALUE[0](self, value)
        if isinstance(value, (list, tuple)):
            return type(value)(self.resolve(v) for v in value)
        return value

    def shadow(self, op, args: list):
        """Result of ``op`` when it cannot be translated: :class:`Poison` values of the right shapes.

        The operator runs on zeros standing for the input-dependent values, so
        sizes, shapes and other non-tensor results stay exact for the rest of
        the walk.
        """
        torch = torch_lib()

        def concrete(v):
            if isinstance(v, (list, tuple)):
                return type(v)(concrete(u) for u in v)
            if isinstance(v, Sym):
                return torch.zeros(self.full_shape(v))
            if isinstance(v, Extreme):
                return torch.zeros(self.full_shape(v.x))
            if isinstance(v, BatchAt):
                return torch.zeros(v.full_shape(self.batch))
            if isinstance(v, Poison):
                if v.shape is None:
                    raise LookupError
                return torch.zeros(v.shape)
            return v

        def poison(out):
            if isinstance(out, torch.Tensor):
                return Poison(shape=tuple(out.shape))
            if isinstance(out, (list, tuple)):
                return type(out)(poison(o) for o in out)
            return out

        try:
            positional, keywords = _split_arguments(op, [concrete(a) for a in args])
            return poison(op(*positional, **keywords))
        except Exception:  # shape unknown from here on
            return Poison()

    def fold(self, op, args: list):
        """Evaluate ``op`` on constant arguments with torch."""
        positional, keywords = _split_arguments(op, args)
        try:
            return op(*positional, **keywords)
        except Exception as exc:  # an operator that cannot run here (device, custom kernel)
            self.report(self.entry(f"{op._schema.name} ({type(exc).__name__})"))
            return Poison()

    # -- helpers for handlers --------------------------------------------
    def axis(self, x: Sym, dim: int) -> int:
        """Axis of ``x.shape`` (no batch axis) for the torch dimension ``dim``."""
        ndim = len(x.shape) + 1
        d = int(dim) + ndim if int(dim) < 0 else int(dim)
        if d == 0:
            raise Unsupported("acts on the batch axis")
        if not 0 < d < ndim:
            raise Unsupported(f"has dimension {dim} out of range for shape {x.shape}")
        return d - 1

    def full_shape(self, x: Sym) -> tuple:
        return (self.batch,) + x.shape

    def broadcast_const(self, value, x: Sym) -> np.ndarray:
        """A constant broadcast against ``x``, flattened to ``(x.size,)``; it may not enlarge ``x``."""
        c = to_numpy(value)
        full = self.full_shape(x)
        if c.ndim > len(full):
            raise Unsupported(f"broadcasts a constant of shape {c.shape} against {full}")
        c = c.reshape((1,) * (len(full) - c.ndim) + c.shape)
        if c.shape[0] != 1 and not (c.shape[0] == self.batch and np.all(c == c[:1])):
            raise Unsupported("uses a constant that differs between samples")
        try:
            if np.broadcast_shapes(c.shape, full) != full:
                raise ValueError
        except ValueError:
            raise Unsupported(f"broadcasts a constant of shape {c.shape} against {full}") from None
        return np.broadcast_to(c[:1], (1,) + x.shape)[0].ravel()

    def reshape(self, x: Sym, shape) -> Sym:
        """``x.view(shape)`` where ``shape`` includes the batch axis."""
        shape = [int(s) for s in shape]
        total = self.batch * x.size
        if shape.count(-1) == 1:
            known = linmaps.size([s for s in shape if s != -1])
            shape[shape.index(-1)] = total // known if known else 0
        if linmaps.size(shape) != total or not shape or shape[0] != self.batch:
            raise Unsupported(f"reshapes {self.full_shape(x)} to {tuple(shape)}, which mixes the batch axis")
        return self.b.linear(x, shape=shape[1:])

    def act(self, x: Sym, function: str, params: dict | None = None) -> Sym:
        return self.b.activation(x, function, params, self.label)


def _split_arguments(op, args: list) -> tuple[list, dict]:
    """Schema-ordered ``args`` -> ``(positional, keyword-only)`` for calling ``op``."""
    positional, keywords = [], {}
    for arg, value in zip(op._schema.arguments, args):
        if arg.kwarg_only:
            keywords[arg.name] = value
        else:
            positional.append(value)
    return positional, keywords


# ---------------------------------------------------------------------------
# the registry of handlers: (translator, *args in schema order) -> value
# ---------------------------------------------------------------------------

#: ``(translator, Extreme) -> Sym``: a max/min over an axis as a GroupSort and a selection, set by
#: :mod:`lipsdp.io.aten_order` (which can sort; this module cannot import it).
EXTREME_VALUE: list[Callable[..., Any]] = []

#: ATen operator name -> handler for calls with a :class:`BatchAt` argument (:mod:`lipsdp.io.batch_axis`).
BATCH_AT_OPS: dict[str, Callable[..., Any]] = {}

#: ATen operator name -> handler; filled by :mod:`lipsdp.io.aten_ops` and the modules it imports.
ATEN_OPS: dict[str, Callable[..., Any]] = {}


def register_aten(*names: str):
    """Register a handler for the ATen operators ``names`` (without the ``aten::`` namespace).

    A handler receives the :class:`Translator` and the operator's arguments in
    schema order (defaults filled in); at least one argument is a :class:`Sym`.
    It returns the result (a :class:`Sym`, a constant, or a tuple for operators
    with several outputs) or raises :class:`~lipsdp.io.builder.Unsupported`.
    """

    def deco(fn):
        for n in names:
            ATEN_OPS[n] = fn
        return fn

    return deco


#: In-place variants (``relu_``) map to the functional handler.
def handler_for(name: str):
    if name in ATEN_OPS:
        return ATEN_OPS[name]
    if name.endswith("_") and not name.startswith("_") and name[:-1] in ATEN_OPS:
        return ATEN_OPS[name[:-1]]
    return None


def is_sym(v) -> bool:
    """Whether ``v`` depends on the network input."""
    return isinstance(v, Sym)
