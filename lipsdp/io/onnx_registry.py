"""The registry of ONNX operator handlers, and what each declares it models.

Every handler states the attributes it understands, with the values it accepts,
and how many inputs it reads; the dispatch (:mod:`lipsdp.io.onnx_`) refuses a
node that uses anything else, so an attribute lipsdp does not model (AveragePool
``dilations``, a newer opset's option) is an unsupported layer, never ignored.
"""

from __future__ import annotations

from typing import Any, Callable

#: ONNX operator type -> handler ``(translator, inputs, attributes) -> value or list of values``.
ONNX_OPS: dict[str, Callable[..., Any]] = {}

#: Per operator type, the attributes its handler models: name -> the values it accepts
#: (``ANY``, a tuple of values, or a predicate).  Every other attribute, or value, is refused.
ONNX_ATTRIBUTES: dict[str, dict[str, Any]] = {}

#: Per operator type, the most inputs its handler reads (``None``: variadic).
ONNX_INPUTS: dict[str, int | None] = {}

#: Declares an attribute whose every value the handler models.
ANY = None


def register_onnx(*names: str, attributes: dict | None = None, inputs: int | None = 1):
    """Register a handler for ONNX operator types ``names`` (``handler(t, inputs, attributes)``).

    ``attributes`` declares what the handler models (see :data:`ONNX_ATTRIBUTES`), ``inputs``
    how many inputs it reads; the dispatch refuses nodes with anything else.
    """

    def deco(fn):
        for n in names:
            ONNX_OPS[n] = fn
            ONNX_ATTRIBUTES[n] = dict(attributes or {})
            ONNX_INPUTS[n] = inputs
        return fn

    return deco


def undeclared(op_type: str, attrs: dict, n_inputs: int) -> list[str]:
    """What a node of ``op_type`` uses that its handler does not model: attributes, values, extra inputs."""
    declared = ONNX_ATTRIBUTES.get(op_type, {})
    problems = []
    for name, value in attrs.items():
        if name not in declared:
            problems.append(f"attribute {name}")
            continue
        allowed = declared[name]
        if allowed is ANY:
            continue
        ok = allowed(value) if callable(allowed) else value in allowed
        if not ok:
            problems.append(f"{name}={value!r}")
    limit = ONNX_INPUTS.get(op_type)
    if limit is not None and n_inputs > limit:
        problems.append(f"{n_inputs} inputs (it reads {limit})")
    return problems


__all__ = ["ANY", "ONNX_ATTRIBUTES", "ONNX_INPUTS", "ONNX_OPS", "register_onnx", "undeclared"]
