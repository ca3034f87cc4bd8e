"""ATen operators -> network nodes: the table shared by the ``torch.export`` and TorchScript frontends.

Importing this module fills :data:`ATEN_OPS` (:mod:`lipsdp.io.translator`) with
every handler: the shape and linear ones (:mod:`lipsdp.io.aten_shapes`,
:mod:`lipsdp.io.aten_linear`), and here the nonlinear ones: the activations of
the catalogue :mod:`lipsdp.activations` (generated), ``clamp``, sorting and
GroupSort's min/max pattern, concatenation, and implicit layers.

Whole modules that no operator-level rule can recover (deel-torchlip
``HouseHolder``) are translated from their parameters by
:data:`MODULE_HANDLERS`, found by :func:`module_handler` from the class's
defining package and name.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lipsdp import activations
from lipsdp.activations import NotExpressible
from lipsdp.io import aten_order  # noqa: F401  (registers amax, amin, topk and l_inf norms)
from lipsdp.io import aten_pool  # noqa: F401  (registers max pooling)
from lipsdp.io import linmaps
from lipsdp.io.aten_linear import (apply_last, avg_pool, batch_norm, conv, expand_tuple, matmul, product,
                                   reduce, scale_by, sum_terms)
from lipsdp.io.aten_shapes import permute, take, unsqueeze
from lipsdp.io import rnn  # noqa: F401  (registers nn.RNN's rnn_tanh / rnn_relu)
from lipsdp.io.builder import Sym, Unsupported
from lipsdp.io.translator import (ATEN_OPS, Extreme, Poison, Translator, handler_for, is_sym, leaves,
                                  register_aten, to_numpy)


# -- activations: generated from the catalogue ----------------------------------
def activation_handler(function: str, mapping: Callable[..., dict]):
    """The ATen handler of a catalogue activation: ``mapping`` turns the operator's arguments
    after the input (tensors as numpy arrays) into ``Activation.params``."""

    def handler(t, x, *args):
        if not is_sym(x) or any(is_sym(a) for a in args):
            raise Unsupported("with input-dependent parameters")
        try:
            params = mapping(*(to_numpy(a) if hasattr(a, "detach") else a for a in args))
        except NotExpressible as exc:
            raise Unsupported(str(exc)) from None
        return t.act(x, function, params)

    return handler


for _op, (_entry, _mapping) in activations.aten_table().items():
    register_aten(_op)(activation_handler(_entry.name, _mapping))


def clamp(t, x: Sym, lo, hi) -> Sym:
    """``clamp(x, lo, hi)``: hardtanh, or a shifted ReLU when one side is open."""
    lo = None if lo is None else float(to_numpy(lo).ravel()[0]) if not isinstance(lo, (int, float)) else float(lo)
    hi = None if hi is None else float(to_numpy(hi).ravel()[0]) if not isinstance(hi, (int, float)) else float(hi)
    if lo is not None and hi is not None:
        return t.act(x, "hardtanh", {"min_val": lo, "max_val": hi})
    if lo is not None:  # relu(x - lo) + lo
        y = t.act(t.b.linear(x, bias=np.full(x.size, -lo), label=t.label), "relu")
        return t.b.linear(y, bias=np.full(x.size, lo), label=t.label)
    if hi is not None:  # hi - relu(hi - x)
        y = t.act(t.b.linear(t.b.scale(x, -1.0, t.label), bias=np.full(x.size, hi), label=t.label), "relu")
        return t.b.linear(t.b.scale(y, -1.0, t.label), bias=np.full(x.size, hi), label=t.label)
    return x


def _scalar_bound(t, v):
    if v is None or isinstance(v, (int, float)):
        return v
    arr = to_numpy(v)
    if arr.size != 1:
        raise Unsupported("with tensor bounds")
    return float(arr.ravel()[0])


@register_aten("clamp", "clip")
def _clamp(t, x, lo=None, hi=None):
    return clamp(t, x, _scalar_bound(t, lo), _scalar_bound(t, hi))


@register_aten("clamp_min")
def _clamp_min(t, x, lo):
    return clamp(t, x, _scalar_bound(t, lo), None)


@register_aten("clamp_max")
def _clamp_max(t, x, hi):
    return clamp(t, x, None, _scalar_bound(t, hi))


# -- sorting: deel-torchlip GroupSort / FullSort -------------------------------
def group_sort(t, x: Sym, axis: int, descending: bool = False) -> Sym:
    """Sort ``x`` along ``axis``: a ``groupsort`` activation on groups of ``x.shape[axis]`` consecutive values.

    Axes after ``axis`` are moved in front of it first (a permutation), so each
    group is contiguous in the flattened vector, then moved back.
    """
    g = x.shape[axis]
    if g == 1:
        return x
    order = [a for a in range(len(x.shape)) if a != axis] + [axis]
    y = permute(t, x, order)
    y = t.act(y, "groupsort", {"group_size": int(g)})
    if descending:
        y = t.b.select(y, linmaps.grid(y.shape)[..., ::-1], t.label)
    return permute(t, y, list(np.argsort(order)))


@register_aten("sort")
def _sort(t, x, *args):
    # sort(self, dim=-1, descending=False) and sort.stable(self, *, stable, dim=-1, descending=False)
    dim, descending = args[-2:]
    values = group_sort(t, x, t.axis(x, dim), bool(descending))
    return values, Poison(t.entry("sort indices"))


@register_aten("min", "max")
def _extreme(t, x, dim=None, keepdim=False):
    if dim is None:
        raise Unsupported("over the whole tensor")
    if not isinstance(dim, int) or isinstance(dim, bool):  # max.other / min.other: torch.max(a, b)
        raise Unsupported("of two tensors (an elementwise maximum or minimum)")
    kind = t.op_name
    return Extreme(kind, x, t.axis(x, dim), bool(keepdim)), Poison(t.entry(f"{kind} indices"))


@register_aten("cat", "concat", "concatenate")
def cat(t, tensors, dim=0):
    parts = [p for p in tensors if not (hasattr(p, "numel") and p.numel() == 0)]
    if any(isinstance(p, Extreme) for p in parts):
        if (len(parts) == 2 and all(isinstance(p, Extreme) for p in parts) and parts[0].x is parts[1].x
                and parts[0].axis == parts[1].axis and parts[0].keepdim and parts[1].keepdim
                and parts[0].x.shape[parts[0].axis] == 2 and t.axis(parts[0].x, dim) == parts[0].axis
                and {parts[0].kind, parts[1].kind} == {"min", "max"}):
            return group_sort(t, parts[0].x, parts[0].axis, descending=parts[0].kind == "max")
        parts = t.resolve(parts)  # not GroupSort-2: the values of each max/min (aten_order)
    if not all(is_sym(p) for p in parts):
        raise Unsupported("concatenates constants with input-dependent tensors")
    ref = parts[0]
    return t.b.concat(parts, t.axis(ref, dim), t.label)


@register_aten("stack")
def _stack(t, tensors, dim=0):
    if not all(is_sym(p) for p in tensors):
        raise Unsupported("stacks constants with input-dependent tensors")
    ndim = len(tensors[0].shape) + 2
    d = int(dim) + ndim if int(dim) < 0 else int(dim)
    return cat(t, [unsqueeze(t, p, d) for p in tensors], d)


# -- implicit layers: lipsdp.nn.ImplicitLayer ------------------------------------
@register_aten("equilibrium")
def _equilibrium(t, u, W, activation, param, tol=None, max_iter=None):
    """``torch.ops.lipsdp.equilibrium(u, W, ...)``: the solution of ``z = phi(W z + u)`` (docs/math.md §5.2)."""
    if not is_sym(u) or is_sym(W):
        raise Unsupported("has an input-dependent feedback matrix")
    if len(u.shape) != 1:
        raise Unsupported(f"on samples of shape {u.shape} (implicit layers take (N, features) inputs)")
    F = to_numpy(W)
    if F.shape != (u.size, u.size):
        raise Unsupported(f"with a {F.shape} feedback matrix for {u.size} features")
    try:
        params = activations.implicit_params(str(activation), float(param))
    except ValueError as exc:
        raise Unsupported(str(exc)) from None
    return t.b.equilibrium(u, F, str(activation), params, t.label)


# -- whole modules -------------------------------------------------------------
def _householder(t, x: Sym, params: dict) -> Sym:
    """deel-torchlip ``HouseHolder``: pairs channel ``c`` with ``c + C/2`` (the two halves of axis 1).

    For ``z = (x_i, y_i)`` with ``u_i = (sin(theta_i/2), -cos(theta_i/2))``:
    ``z`` is kept where ``u_i . z <= 0`` and reflected to ``(I - 2 u_i u_i^T) z`` elsewhere.
    On the flattened sample, coordinate ``k < n/2`` pairs with ``k + n/2`` and
    ``params["theta"][k]`` is its angle (one per pair; channels repeat over space).
    """
    theta = to_numpy(params["theta"]).ravel()
    channels = x.shape[0] if x.shape else 0
    if channels % 2 or theta.size != channels // 2:
        raise Unsupported(f"with {theta.size} angles for {channels} channels")
    theta = np.repeat(theta, linmaps.size(x.shape[1:]))
    return t.act(x, "householder", {"theta": theta, "pairing": "halves"})


#: Modules translated as a whole, by class name: handler(translator, input Sym, parameters) -> Sym.
MODULE_HANDLERS: dict[str, Callable[..., Sym]] = {"HouseHolder": _householder}

#: The packages whose classes :data:`MODULE_HANDLERS` describes: a class of the same name defined
#: anywhere else may compute something else, so it is translated operator by operator instead.
MODULE_ORIGINS = ("deel.torchlip.", "lipsdp.nn.")


def module_handler(qualified_name: str):
    """The handler for the class ``qualified_name`` (``deel.torchlip.modules.activation.HouseHolder``,
    TorchScript's ``__torch__.`` prefix and name mangling allowed), or None.

    A module is identified by where it is defined, never by its class name alone.
    """
    parts = [p for p in str(qualified_name).split(".") if not p.startswith("___torch_mangle")]
    if parts and parts[0] == "__torch__":
        parts = parts[1:]
    if len(parts) < 2 or parts[-1] not in MODULE_HANDLERS:
        return None
    origin = ".".join(parts[:-1]) + "."
    return MODULE_HANDLERS[parts[-1]] if origin.startswith(MODULE_ORIGINS) else None


__all__ = ["ATEN_OPS", "MODULE_HANDLERS", "Extreme", "Poison", "Translator", "activation_handler", "apply_last",
           "avg_pool", "batch_norm", "cat", "clamp", "conv", "expand_tuple", "group_sort", "handler_for", "is_sym",
           "leaves", "matmul", "module_handler", "permute", "product", "reduce", "register_aten", "scale_by", "sum_terms", "take",
           "to_numpy", "unsqueeze"]
