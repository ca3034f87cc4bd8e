"""In-memory ``torch.nn.Module`` -> :class:`~lipsdp.network.Network`, untraced or through ``torch.export``.

Steps:

1. list every leaf module that lipsdp cannot describe and raise
   :class:`~lipsdp.errors.UnsupportedLayerError` naming all of them;
2. copy the model, switch it to ``eval()`` and bake deel-torchlip
   parametrizations (``SpectralLinear``, ``FrobeniusLinear``, ...) into plain
   weights, so the exported graph holds the weights the model really uses;
3. a plain ``Sequential`` of stock layers is translated layer by layer
   (:mod:`lipsdp.io.sequential`, no tracing); any other model is
   ``torch.export.export``-ed on a random batch of two samples whose shape is
   ``input_shape`` or the ``in_features`` of the first ``Linear``;
4. translate the ATen graph (:mod:`lipsdp.io.export`): custom ``forward``
   methods with residual connections and concatenations become Add / Concat nodes.
"""

from __future__ import annotations

import copy
import logging
import sys

from lipsdp import activations
from lipsdp.errors import ModelLoadError, UnsupportedLayerError
from lipsdp.io.batch_axis import time_first_model
from lipsdp.io.export import network_from_exported
from lipsdp.io.formats import first_line
from lipsdp.io.sequential import network_from_sequential
from lipsdp.io.torchscript import network_from_script

#: ``torch.nn`` leaf modules the translation handles (others from ``torch.nn`` are refused up front).
#: The activations among them are those of the catalogue :mod:`lipsdp.activations`.
SUPPORTED_TORCH_LAYERS = frozenset({
    "Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "Flatten", "Unflatten", "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
    "AlphaDropout", "FeatureAlphaDropout", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "MaxPool1d", "MaxPool2d", "MaxPool3d", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d",
    "ConstantPad1d", "ConstantPad2d", "ConstantPad3d", "Sequential", "ModuleList", "ModuleDict",
    "RNN",  # unrolled over the horizon by lipsdp.io.rnn
}) | frozenset(activations.torch_modules())

#: deel-torchlip leaf modules known to be nonlinear in a way lipsdp has no constraint for.
UNSUPPORTED_TORCHLIP_LAYERS = frozenset({
    "ScaledL2NormPool2d", "ScaledAdaptativeL2NormPool2d", "SpectralConvTranspose2d", "InvertibleUpSampling",
})


def unsupported_layers(module) -> list[tuple[str, int, str]]:
    """``(path, position, class)`` of every leaf module lipsdp cannot describe.

    A leaf from ``torch.nn`` must be in :data:`SUPPORTED_TORCH_LAYERS`; a few
    deel-torchlip layers are known to be unsupported; other user-defined leaves
    are judged later, operator by operator.
    """
    found = []
    leaves = [(name, m) for name, m in module.named_modules() if not any(True for _ in m.children())]
    for position, (name, m) in enumerate(leaves):
        cls = type(m)
        origin = cls.__module__ or ""
        if origin.startswith("torch.nn.modules.") and cls.__name__ not in SUPPORTED_TORCH_LAYERS:
            found.append((name or cls.__name__, position, cls.__name__))
        elif origin.startswith("deel.torchlip") and cls.__name__ in UNSUPPORTED_TORCHLIP_LAYERS:
            found.append((name or cls.__name__, position, cls.__name__))
        elif cls.__name__ in ("PReLU", "LPReLU") and getattr(m, "num_parameters", 1) != 1:
            found.append((name or cls.__name__, position, f"{cls.__name__} with one slope per channel"))
    return found


def training_mode_layers(module) -> list[tuple[str, int, str]]:
    """``(path, position, what)`` of every module in training mode whose output depends on that mode.

    A module depends on the mode when it is one of torch's dropout or batch-norm classes (identified by
    class, not name), or when its class's ``forward`` reads ``training`` itself (user code such as
    ``F.dropout(x, p, self.training)``, torch's spectral-norm parametrization, deel-torchlip's batch
    centering).  A model of other layers computes the same in either mode, so its flag is irrelevant.
    """
    import torch

    dependent = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._NormBase)
    found = []
    for position, (name, m) in enumerate(module.named_modules()):
        if not m.training:
            continue
        forward = getattr(type(m).forward, "__code__", None)
        if isinstance(m, dependent) or (forward is not None and "training" in forward.co_names):
            found.append((name or type(m).__name__, position,
                          f"{type(m).__name__} in training mode; call model.eval() before saving"))
    return found


def infer_input_shape(module, source: str = "") -> tuple[int, ...]:
    """Sample shape read from the first layer with parameters (``Linear.in_features``, ``BatchNorm1d``)."""
    import torch

    for name, m in module.named_modules():
        if not any(True for _ in m.parameters(recurse=False)) and not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(m, torch.nn.Linear):
            return (int(m.in_features),)
        if isinstance(m, torch.nn.BatchNorm1d):
            return (int(m.num_features),)
        if type(m).__module__.startswith("lipsdp.nn.") and isinstance(getattr(m, "in_features", None), int):
            return (m.in_features,)  # LinfDistance, SortNet
        if isinstance(m, torch.nn.RNN):
            raise ModelLoadError(f"{source}: a recurrent model maps sequences: give the horizon T (horizon=T, "
                                 f"command line --horizon T) or input_shape=(T, {m.input_size})")
        raise ModelLoadError(f"{source}: cannot infer the input shape (the first layer, {name!r}, is a "
                             f"{type(m).__name__}); pass input_shape=(C, H, W) (command line: --input-shape)")
    raise ModelLoadError(f"{source}: cannot infer the input shape (no layer with weights); pass input_shape")


def network_from_module(module, input_shape=None, source: str | None = None):
    """Translate an ``nn.Module`` (or a ``ScriptModule``, or an ``ExportedProgram``) into a Network.

    Parameters
    ----------
    module : torch.nn.Module, torch.jit.ScriptModule or torch.export.ExportedProgram
        The model; it is not modified (a copy is put in eval mode).
    input_shape : tuple of int, optional
        Shape of one sample, without batch axis.  Default: ``(in_features,)`` of
        the first ``Linear`` layer.
    source : str, optional
        Name used in messages (default: the class name).

    Returns
    -------
    Network
        Validated; its output is the module's output.

    Raises
    ------
    UnsupportedLayerError
        Listing every layer lipsdp cannot describe.
    ModelLoadError
        The input shape cannot be inferred, or ``torch.export`` cannot trace the model.
    """
    import torch

    source = source or type(module).__name__
    exported = sys.modules.get("torch.export")  # an ExportedProgram exists only once torch.export is imported
    if exported is not None and isinstance(module, exported.ExportedProgram):
        return network_from_exported(module, source=source, input_shape=input_shape)
    if isinstance(module, torch.jit.ScriptModule):
        return network_from_script(module, input_shape=input_shape, source=source)
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{source}: expected a torch.nn.Module, got {type(module).__name__}")
    model = _eval_copy(module)
    bad = unsupported_layers(model)
    if bad:
        raise UnsupportedLayerError(bad)
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else infer_input_shape(model, source)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((2,) + shape, generator=generator).to(dtype)
    if time_first_model(model):  # nn.RNN(batch_first=False) reads (T, batch, n) (lipsdp.io.batch_axis)
        example = example.transpose(0, 1).contiguous()
    network = network_from_sequential(model, example, source)
    if network is not None:
        return network
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # torch logs a traceback before raising; the error below says it all
    try:
        with torch.no_grad():
            program = torch.export.export(model, (example,))
    except Exception as exc:
        raise ModelLoadError(f"{source}: torch.export could not trace the model on inputs of shape "
                             f"{(2,) + shape} ({type(exc).__name__}: {first_line(exc)})") from exc
    finally:
        quiet.setLevel(level)
    return network_from_exported(program, source=source)


def _eval_copy(module):
    """A copy in eval mode with parametrized weights (deel-torchlip, spectral_norm) baked in.

    ``torch.nn.utils.parametrize.remove_parametrizations`` would also edit the
    class that the copy shares with the user's model, so the effective weights
    are read here and the copy alone gets its plain class back.
    """
    import torch
    from torch.nn.utils import parametrize

    try:
        model = copy.deepcopy(module)
    except Exception as exc:
        raise ModelLoadError(f"{type(module).__name__}: cannot copy the model to put it in eval mode "
                             f"({first_line(exc)})") from exc
    model.eval()
    with torch.no_grad():
        for m in list(model.modules()):
            if parametrize.is_parametrized(m):
                values = {name: getattr(m, name).detach().clone() for name in list(m.parametrizations.keys())}
                delattr(m, "parametrizations")
                m.__class__ = m.__class__.__bases__[0]
                for name, value in values.items():
                    m.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    return model
