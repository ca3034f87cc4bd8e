"""A plain ``torch.nn.Sequential`` -> :class:`~lipsdp.network.Network`, layer by layer, untraced.

``torch.export`` imports TorchDynamo before it traces anything, which on a
small MLP takes longer than all of the LMI work (docs/performance.md).  A
``Sequential`` of stock ``torch.nn`` layers needs no tracing: its forward is the
composition of its children.  So such a model is translated here by calling,
for each layer, the handler that the ATen operator of its forward has in
:mod:`lipsdp.io.aten_ops` (``Linear`` -> ``linear``), in the same
:class:`~lipsdp.io.builder.GraphBuilder`: the nodes, names and merges
(``Linear -> BatchNorm1d`` into one ``Affine``) are those of the traced path.

Only what cannot differ from the traced forward takes this path: containers of
class ``Sequential`` exactly, leaves of exactly one of the classes in
:data:`LAYER_OPS`, no forward hooks (module or global), no instance-level
``forward``.  Everything else, and any layer a handler declines, goes through
``torch.export``.  As a last guard the translated network is evaluated on the
example batch and compared with the model's own output; a mismatch also falls
back to ``torch.export``.
"""

from __future__ import annotations

import numpy as np

from lipsdp import activations
from lipsdp.errors import LipSDPError
from lipsdp.io.aten_ops import Translator, handler_for
from lipsdp.io.builder import GraphBuilder, Label


def _conv(m):
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        return None  # circular / reflect padding, "same": left to torch.export
    return f"conv{len(m.kernel_size)}d", (m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def _batch_norm(m):
    if m.running_mean is None or m.running_var is None:
        return None  # batch statistics even in eval mode
    return "batch_norm", (m.weight, m.bias, m.running_mean, m.running_var, False, 0.0, m.eps)


#: Layer class -> ``(ATen operator name, its arguments after the input)``, or None to decline.
#: The arguments are those the layer's ``forward`` passes to ``torch.nn.functional``.
LAYER_OPS = {
    "Linear": lambda m: ("linear", (m.weight, m.bias)),
    "Conv1d": _conv, "Conv2d": _conv, "Conv3d": _conv,
    "BatchNorm1d": _batch_norm, "BatchNorm2d": _batch_norm, "BatchNorm3d": _batch_norm,
    "Flatten": lambda m: ("flatten", (m.start_dim, m.end_dim)),
    "Unflatten": lambda m: ("unflatten", (m.dim, m.unflattened_size)),
    # The identity in eval mode (the model is an eval-mode copy).
    **{cls: lambda m: ("identity", ()) for cls in ("Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
                                                   "AlphaDropout", "FeatureAlphaDropout")},
    # The activations of the catalogue: each forward is F.<aten>(input, *attributes).
    **{cls: (lambda m, e=entry: (e.aten, e.aten_args(m))) for cls, entry in activations.torch_modules().items()},
}


def _plain_layers(model) -> list[tuple[str, object, str, tuple]] | None:
    """``(path, module, operator, arguments)`` per leaf in forward order, or None if any part
    of ``model`` might not compute the composition of its stock layers."""
    import torch

    module_hooks = torch.nn.modules.module
    if any(getattr(module_hooks, name, None) for name in
           ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called")):
        return None
    layers = []

    def walk(module, path):
        if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
            return False
        if type(module) is torch.nn.Sequential:
            return all(walk(child, f"{path}.{name}" if path else name) for name, child in module.named_children())
        cls = type(module).__name__
        if cls not in LAYER_OPS or type(module) is not getattr(torch.nn, cls, None) or \
                any(True for _ in module.children()):
            return False
        spec = LAYER_OPS[cls](module)
        if spec is None:
            return False
        layers.append((path or cls, module, *spec))
        return True

    return layers if type(model) is torch.nn.Sequential and walk(model, "") else None


def network_from_sequential(model, example, source: str = ""):
    """The network of a plain ``Sequential`` ``model`` (eval mode), or None to use ``torch.export``.

    Parameters
    ----------
    model : torch.nn.Module
        An eval-mode copy with parametrizations baked in (:func:`~lipsdp.io.torch_module._eval_copy`).
    example : torch.Tensor
        A batch ``(2, *input_shape)`` of the model's dtype: the traced path's example; it fixes the
        batch axis of ``Flatten``'s dimensions and checks the translation.
    source : str
        Name used in messages.

    Returns
    -------
    Network or None
        Validated, and equal to the model on ``example`` (relative 1e-4); None where the
        model is not a plain ``Sequential``, a handler declines a layer, or the check fails.
    """
    import torch

    try:
        layers = _plain_layers(model)
        if layers is None:
            return None
        builder = GraphBuilder(source)
        t = Translator(builder, batch=example.shape[0])
        x = builder.input(tuple(example.shape[1:]), name="input")
        for position, (path, module, op, args) in enumerate(layers, start=1):
            if op == "identity":
                continue
            t.label, t.position, t.op_name = Label(path, type(module).__name__), position, op
            args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
            x = handler_for(op)(t, x, *args)
        network = builder.finish(x)
    except LipSDPError:
        raise  # NaN weights and the like: torch.export's path would say the same
    except Exception:  # a layer a handler declines, or a damaged module: torch.export reports it
        return None
    try:
        with torch.no_grad():
            want = model(example).double().reshape(len(example), -1).numpy()
    except Exception:  # torch.export reports it
        return None
    got = network.numpy_forward(example.double().reshape(len(example), -1).numpy())
    # Rounding of the float32 forward is ~1e-6 relative; a wrong translation is off by O(1).
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4 * (1.0 + np.abs(want).max())):
        return None
    return network
