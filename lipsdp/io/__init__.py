"""Model loaders: every way users save PyTorch models -> :class:`~lipsdp.network.Network`.

=========================== ===========================================================
saved with                  read by
=========================== ===========================================================
``torch.save(model)``       :mod:`~lipsdp.io.safe_pickle` (no pickled code runs), then
                            :mod:`~lipsdp.io.sequential` (plain ``Sequential``, untraced) or
                            ``torch.export`` of the module (:mod:`~lipsdp.io.torch_module`)
``torch.jit.save``          :mod:`~lipsdp.io.torchscript` (TorchScript graph)
``torch.export.save``       :mod:`~lipsdp.io.export` (ATen graph)
``torch.onnx.export``       :mod:`~lipsdp.io.onnx_` (ONNX graph, external data confined)
``torch.save(state_dict)``  :mod:`~lipsdp.io.checkpoint` (an MLP, given ``activation``)
LipSDP ``.mat`` weights     :mod:`~lipsdp.io.matfile` (an MLP, given ``activation``)
=========================== ===========================================================

The format is recognised from the file's content (:func:`detect_format`).  The
graph frontends share one operator table (:mod:`~lipsdp.io.aten_ops`) and one
builder (:mod:`~lipsdp.io.builder`) that folds chains of linear operations into
single ``Affine`` nodes.  Nothing here imports torch or onnx until a loader
needs it.

Examples
--------
>>> from lipsdp.io import load_network
>>> net = load_network("examples/digits_mlp.pt")          # doctest: +SKIP
>>> net = load_network("weights.mat", activation="relu")  # doctest: +SKIP
"""

from __future__ import annotations

import os

from lipsdp.errors import LipSDPError, ModelLoadError, UnsupportedLayerError
from lipsdp.io.checkpoint import find_in_checkpoint, mlp_from_state_dict
from lipsdp.io.export import load_exported
from lipsdp.io.formats import FORMATS, detect_format
from lipsdp.io.matfile import load_mat
from lipsdp.io.onnx_ import load_onnx
from lipsdp.io.records import check_zip_records
from lipsdp.io.safe_pickle import load_torch_file
from lipsdp.io.torch_module import network_from_module as _from_module, training_mode_layers
from lipsdp.io.torchscript import load_torchscript

__all__ = ["load_network", "network_from_module", "detect_format", "FORMATS"]


def load_network(path, *, activation: str | None = None, activation_params: dict | None = None,
                 input_shape=None, trust_pickle: bool = False):
    """Load a saved model as a validated :class:`~lipsdp.network.Network`.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by ``torch.save`` (whole module, checkpoint dict or
        state_dict), ``torch.jit.save``, ``torch.export.save``,
        ``torch.onnx.export`` (``.onnx``; external data next to it), or a LipSDP
        ``.mat`` file.  The format is read from the content.
    activation : str, optional
        For files that hold weights only (state_dicts, ``.mat``): the activation
        between layers (``"relu"``, ``"tanh"``, ``"leaky_relu"``, ...).  Ignored
        for files that carry their architecture.
    activation_params : dict, optional
        Parameters of ``activation`` (``{"negative_slope": 0.1}``).
    input_shape : tuple of int, optional
        Shape of one sample without batch axis; needed for convolutional models
        and whenever it cannot be read from the file or the first layer.
    trust_pickle : bool
        Allow ``torch.load`` to run code from the pickle (``weights_only=False``).
        Only for files you trust; by default only ``torch.nn``, deel-torchlip and
        :mod:`lipsdp.nn` layers may appear in a pickle.

    Returns
    -------
    Network

    Raises
    ------
    ModelLoadError
        Missing, damaged or unrecognised file; weights without ``activation``.
    UnsafeModelError
        The pickle names code outside the allow-list and ``trust_pickle`` is False.
    UnsupportedLayerError
        Listing every layer lipsdp cannot describe.
    InvalidNetworkError
        NaN/Inf weights or shapes that do not fit.
    """
    path = os.fspath(path)
    try:
        return _load_network(path, activation, activation_params, input_shape, trust_pickle)
    except (LipSDPError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        # A damaged or inconsistent file must end in one clear line, never a traceback.
        text = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
        raise ModelLoadError(f"{path}: damaged or inconsistent model file ({detail}); save the model again") \
            from exc


def _load_network(path, activation, activation_params, input_shape, trust_pickle):
    fmt = detect_format(path)
    if fmt in ("torchscript", "export", "pickle"):
        with open(path, "rb") as fh:
            is_zip = fh.read(2) == b"PK"
        if is_zip:
            check_zip_records(path)
    shape = None if input_shape is None else tuple(int(s) for s in input_shape)
    if fmt == "mat":
        return load_mat(path, activation, activation_params)
    if fmt == "onnx":
        return load_onnx(path, input_shape=shape)
    if fmt == "torchscript":
        return load_torchscript(path, input_shape=shape)
    if fmt == "export":
        return load_exported(path, input_shape=shape)
    obj = load_torch_file(path, trust_pickle=trust_pickle)
    kind, content, key = find_in_checkpoint(obj, path)
    if kind == "module":
        # As the graph formats do: a pickle keeps the mode it was saved in, and a model whose dropout or
        # batch norm would run in training mode is refused rather than read in eval semantics.
        training = training_mode_layers(content) if hasattr(content, "named_modules") else []
        if training:
            raise UnsupportedLayerError(training)
        return _from_module(content, input_shape=shape, source=path)
    return mlp_from_state_dict(content, activation, activation_params, path, key)


def network_from_module(module, input_shape=None):
    """Translate an in-memory model into a validated :class:`~lipsdp.network.Network`.

    Parameters
    ----------
    module : torch.nn.Module, torch.jit.ScriptModule or torch.export.ExportedProgram
        Not modified.  Custom ``forward`` methods (residual sums, concatenations)
        are traced with ``torch.export``.
    input_shape : tuple of int, optional
        Sample shape without batch axis; default ``(in_features,)`` of the first
        ``Linear`` layer.

    Raises
    ------
    UnsupportedLayerError
        Listing every layer lipsdp cannot describe, all at once.
    ModelLoadError
        The model cannot be traced, or its input shape cannot be inferred.
    """
    if input_shape is not None:
        input_shape = tuple(int(s) for s in input_shape)
    return _from_module(module, input_shape=input_shape)
