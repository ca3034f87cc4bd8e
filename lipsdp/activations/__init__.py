"""The activation catalogue: one class per slope-restricted elementwise activation.

Each entry (a :class:`SlopeActivation` subclass, one module of this package)
holds everything lipsdp knows about one activation: evaluation, derivative,
exact slope sector, parameters with defaults, and its names in torch
(``nn.Module`` classes), ATen (``torch.export`` and TorchScript) and ONNX.
From it are generated:

- the slope constraint of LipSDP (:class:`lipsdp.constraints.SlopeRestricted`);
- the loaders' tables: ATen and ONNX handlers, the untraced ``nn.Sequential``
  path and the ``torch.nn`` classes accepted up front (:mod:`lipsdp.io`);
- the activations of implicit layers (:data:`IMPLICIT_PARAMS`).

Every module of this package is imported here, so **adding an activation is
adding one module** that defines a subclass with its ``name``.  Activations
that are not elementwise (GroupSort, MaxMin, Householder) have their own
quadratic constraints in :mod:`lipsdp.constraints`.

The package imports numpy, scipy and :mod:`lipsdp.errors` only (no torch).

>>> from lipsdp.activations import get
>>> get("leaky_relu").sector({"negative_slope": 0.1})
(0.1, 1.0)
"""

from __future__ import annotations

import importlib
import pkgutil

from lipsdp.activations.base import JUMP_TOTAL, MARGIN, NotExpressible, SlopeActivation, TorchModule, catalogue

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get(name: str) -> SlopeActivation:
    """The catalogue entry of ``Activation.function`` key ``name``."""
    entries = catalogue()
    try:
        return entries[name]
    except KeyError:
        raise KeyError(f"no activation {name!r} in the catalogue; known: {', '.join(sorted(entries))}") from None


def names() -> tuple[str, ...]:
    """The ``Activation.function`` keys of the catalogue, sorted."""
    return tuple(sorted(catalogue()))


def aten_table() -> dict[str, tuple[SlopeActivation, object]]:
    """ATen operator name -> ``(entry, its argument mapping)``."""
    return {op: (act, mapping) for act in catalogue().values() for op, mapping in act.aten.items()}


def onnx_table() -> dict[str, tuple[SlopeActivation, object]]:
    """ONNX operator type -> ``(entry, its attribute mapping)``."""
    return {op: (act, mapping) for act in catalogue().values() for op, mapping in act.onnx.items()}


def torch_modules() -> dict[str, TorchModule]:
    """``torch.nn`` class name -> its :class:`TorchModule` record, over the whole catalogue."""
    return {m.class_name: m for act in catalogue().values() for m in act.torch_modules}


def caveats(network) -> list[str]:
    """``Certificate.caveats`` of a network: one line per distinct activation whose framework function is not
    the one certified (torch's Softplus switches to the identity above its threshold, a tiny jump).

    ``network`` is a :class:`lipsdp.network.Network` (read through ``activations()`` and ``op()``, so that the
    catalogue needs no graph import).
    """
    entries, neurons = catalogue(), {}
    for node in network.activations():
        op = network.op(node)
        if op.function in entries:
            key = (op.function, tuple(sorted(op.params.items())))
            neurons[key] = neurons.get(key, 0) + op.size
    lines = []
    for (function, params), count in neurons.items():
        line = entries[function].caveat(dict(params), count)
        if line:
            lines.append(line)
    return lines


#: Activations of :class:`lipsdp.nn.ImplicitLayer`: name -> the key of its one scalar parameter (or None).
IMPLICIT_PARAMS: dict[str, str | None] = {act.name: act.implicit_param
                                          for _, act in sorted(catalogue().items()) if act.implicit}

#: Default value of that scalar parameter (0.0 where there is none).
IMPLICIT_DEFAULTS: dict[str, float] = {name: float(get(name).defaults[key]) if key else 0.0
                                       for name, key in IMPLICIT_PARAMS.items()}


def implicit_params(function: str, param: float) -> dict:
    """``Activation.params`` of an implicit layer with activation ``function`` and scalar parameter ``param``."""
    if function not in IMPLICIT_PARAMS:
        raise ValueError(f"implicit layers support the activations {', '.join(IMPLICIT_PARAMS)}; "
                         f"got {function!r}")
    key = IMPLICIT_PARAMS[function]
    return {} if key is None else {key: float(param)}


__all__ = ["IMPLICIT_DEFAULTS", "IMPLICIT_PARAMS", "JUMP_TOTAL", "MARGIN", "NotExpressible", "SlopeActivation", "TorchModule",
           "aten_table", "catalogue", "caveats", "get", "implicit_params", "names", "onnx_table", "torch_modules"]
