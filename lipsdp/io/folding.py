"""Parameter-only subgraphs evaluated to constants in float64: weights computed in ``forward``.

Lipschitz-by-construction layers (SLL, AOL, Cayley, LDL^T layers, spectral normalisation, ...) compute
their weights in ``forward`` from parameters: ``T`` from ``|W W^T|``, a rescaling by ``rsqrt``, an
inverse or a matrix exponential, a Cholesky or QR factor.  Every loader evaluates an operator whose
inputs are all constants (it does not depend on the network input); this module makes that evaluation
float64 where the model stores float32 (or float16 / bfloat16) parameters, so the loaded weights are
the *exact* function of the stored parameters up to float64 rounding, not a float32 rounding of it.  A
construction that promises ``||W|| <= 1`` (an orthogonal Cayley factor) then loads with
``||W|| = 1 + O(1e-16)`` instead of ``1 + O(1e-7)``, which compounds over deep stacks (docs/math.md §5.3).

The network lipsdp certifies is therefore the one ``model.double()`` computes from the same parameters;
its sampled lower bound is computed on that model too.  Operators that depend on the input are not
touched here: they are translated exactly or refused, as before.

Used by the ``torch.export`` and TorchScript frontends (:class:`Float64Translator`) and the ONNX
frontend (:func:`promote_onnx_inputs`, :func:`float_cast`).  The rounding of linear chains the builder
composes at load is bounded by :mod:`lipsdp.io.fold_error` and carried into the proof.
"""

from __future__ import annotations

import numpy as np

from lipsdp.io.translator import Translator

#: Floating types promoted to float64 before folding (float64 and complex types are left alone).
_LOW_PRECISION = ("float16", "bfloat16", "float32")

#: TorchScript's ScalarType codes of those types (Half, Float, BFloat16) and of float64 (Double).
_LOW_CODES, _DOUBLE_CODE = (5, 6, 15), 7


def _is_low(value) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return str(value.dtype).replace("torch.", "") in _LOW_PRECISION
    return False


def promote(value):
    """``value`` (nested lists / tuples) with low-precision floating tensors cast to float64."""
    import torch

    if isinstance(value, (list, tuple)):
        return type(value)(promote(v) for v in value)
    if _is_low(value):
        return value.to(torch.float64)
    return value


def demote(value):
    """float64 tensors back to float32 (for the zero-valued shape runs of :meth:`Translator.shadow`)."""
    import torch

    if isinstance(value, (list, tuple)):
        return type(value)(demote(v) for v in value)
    if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
        return value.to(torch.float32)
    return value


def _promote_dtype(schema_type: str, value):
    """A ``ScalarType`` argument that names a low-precision floating type, as float64."""
    import torch

    if "ScalarType" not in schema_type or value is None or isinstance(value, bool):
        return value
    if isinstance(value, torch.dtype):
        return torch.float64 if str(value).replace("torch.", "") in _LOW_PRECISION else value
    if isinstance(value, int) and value in _LOW_CODES:
        return _DOUBLE_CODE
    return value


class Float64Translator(Translator):
    """:class:`~lipsdp.io.translator.Translator` whose constant folding runs in float64."""

    def fold(self, op, args: list):
        if op._schema.name.split("::")[-1] == "view" and op._overloadname == "dtype":
            return super().fold(op, args)  # a bit reinterpretation: only meaningful in the stored type
        schema = op._schema.arguments
        args = [_promote_dtype(str(a.type), promote(v)) for a, v in zip(schema, args)] + list(args[len(schema):])
        return super().fold(op, args)

    def shadow(self, op, args: list):
        return super().shadow(op, demote(args))


def promote_onnx_inputs(ins: list) -> list:
    """ONNX node inputs for folding: float16 / float32 numpy arrays as float64."""
    return [np.asarray(v, dtype=np.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
            and v.dtype != np.float64 else v for v in ins]


#: ONNX ``TensorProto`` codes of the floating types (FLOAT, FLOAT16, DOUBLE, BFLOAT16).
_ONNX_FLOATING = (1, 10, 11, 16)


def float_cast(node, ins: list, attrs: dict) -> bool:
    """Whether ``node`` casts a floating constant to a floating type: folded as the identity, so a
    float64 value is not rounded back to float32 (lipsdp reads casts between floats as the identity)."""
    if node.op_type == "Cast":
        target = attrs.get("to")
    elif node.op_type == "CastLike" and len(ins) > 1 and isinstance(ins[1], np.ndarray):
        target = 1 if ins[1].dtype.kind == "f" else None
    else:
        return False
    return target in _ONNX_FLOATING and isinstance(ins[0], np.ndarray) and ins[0].dtype.kind == "f"


__all__ = ["Float64Translator", "demote", "float_cast", "promote", "promote_onnx_inputs"]
