"""Files that hold weights but no architecture: state_dicts, checkpoint dicts, LipSDP ``.mat`` files.

Without an architecture the only sound reading is the one the user states: a
multilayer perceptron ``W_l phi(... phi(W_0 x + b_0) ...) + b_l`` whose
activation ``phi`` is given explicitly (``activation="relu"``, command line
``--activation relu``).  Without it, :class:`~lipsdp.errors.ModelLoadError`
says what the file holds and how to proceed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from lipsdp import activations
from lipsdp.errors import ModelLoadError
from lipsdp.network import Activation, Affine, Input, Network

#: Keys under which training scripts commonly store the model or its state_dict.
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "model_state", "net", "network", "module")


def normalize_activation(activation: str) -> str:
    """The catalogue key the user means: ``"Leaky-ReLU"``, ``"LeakyReLU"`` -> ``"leaky_relu"``.

    Case, ``-`` and ``_`` are ignored when matching the names of :mod:`lipsdp.activations`;
    anything else is returned lower-cased (and refused later, with the known names).
    """
    key = str(activation).strip().lower().replace("-", "_")
    compact = key.replace("_", "")
    return next((name for name in activations.names() if name.replace("_", "") == compact), key)


def mlp_network(layers: list[tuple[str, np.ndarray, np.ndarray | None]], activation: str | None,
                params: dict | None, source: str, what: str) -> Network:
    """An MLP from ordered ``(name, W (out, in), b or None)`` layers, checked to chain.

    Parameters
    ----------
    layers : list of (str, ndarray, ndarray or None)
    activation : str or None
        Function key of :mod:`lipsdp.constraints` between layers; None raises the
        "weights only" :class:`ModelLoadError`.
    params : dict or None
        Parameters of the activation (``{"negative_slope": 0.1}``).
    source, what : str
        File name and a description of its content for messages.
    """
    if not layers:
        raise ModelLoadError(f"{source} holds no weight matrices ({what}); save the whole model "
                             "(torch.save(model), TorchScript, torch.export or ONNX)")
    for (name, w, _), (prev, w_prev, _) in zip(layers[1:], layers[:-1]):
        if w.shape[1] != w_prev.shape[0]:
            raise ModelLoadError(f"{source}: {name} is {w.shape[0]}x{w.shape[1]} but {prev} gives "
                                 f"{w_prev.shape[0]} values; these weights do not chain into an MLP")
    for name, w, b in layers:
        if b is not None and b.shape != (w.shape[0],):
            raise ModelLoadError(f"{source}: the bias of {name} has shape {b.shape}, expected ({w.shape[0]},)")
    if activation is None:
        sizes = " -> ".join(str(n) for n in [layers[0][1].shape[1]] + [w.shape[0] for _, w, _ in layers])
        raise ModelLoadError(f"{source} holds only weights ({what} with {len(layers)} weight matrices, "
                             f"{sizes}); pass --activation relu (API: activation='relu') to certify it as an "
                             "MLP, or save the whole model (torch.save(model), TorchScript, torch.export or ONNX)")
    activation = normalize_activation(activation)
    if activation in activations.names():
        try:  # parameters without an exact sector (a Softplus threshold that jumps) are refused here
            activations.get(activation).sector(dict(params or {}))
        except ValueError as exc:
            raise ModelLoadError(f"{source}: activation {activation} {dict(params or {})}: {exc}") from None
    net = Network(source=source)
    node = net.add(Input("input", "Input", (layers[0][1].shape[1],)))
    for k, (name, w, b) in enumerate(layers):
        node = net.add(Affine(name, "Linear", (w.shape[0],), weight=np.asarray(w, dtype=np.float64),
                              bias=None if b is None else np.asarray(b, dtype=np.float64)), [node])
        if k < len(layers) - 1:
            node = net.add(Activation(f"{name}.{activation}", activation, (w.shape[0],), function=activation,
                                      params=dict(params or {})), [node])
    return net.validate()


def is_state_dict(obj) -> bool:
    """A mapping from names to tensors (every value a tensor)."""
    import torch

    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def find_in_checkpoint(obj, source: str):
    """Return ``("module", nn.Module)`` or ``("state_dict", mapping, key)`` found in a loaded torch file."""
    import torch

    if isinstance(obj, torch.nn.Module):
        return "module", obj, None
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), torch.nn.Module):
                return "module", obj[key], key
        for key in CHECKPOINT_KEYS:
            if is_state_dict(obj.get(key)):
                return "state_dict", obj[key], key
        if is_state_dict(obj):
            return "state_dict", obj, None
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise ModelLoadError(f"{source}: a dict with keys {keys} that holds neither a model nor a state_dict "
                             f"under {', '.join(CHECKPOINT_KEYS[:3])}; save the whole model (torch.save(model), "
                             "TorchScript, torch.export or ONNX)")
    raise ModelLoadError(f"{source}: holds a {type(obj).__name__}, not a model or a state_dict")


def mlp_from_state_dict(state: Mapping, activation: str | None, params: dict | None, source: str,
                        key: str | None = None) -> Network:
    """An MLP from the 2-D ``*weight`` tensors of a state_dict, in order, with their ``*bias``.

    Every entry must be consumed: a 2-D ``weight``, the ``bias`` next to it, or
    the stored state of a spectrally normalised weight (:func:`spectral_weight`).
    Anything else (running statistics of a BatchNorm, a custom ``scale``
    parameter, a further parametrization) changes what the model computes in a
    way an MLP reading would drop, so it is refused, all such keys named at once.

    Raises
    ------
    ModelLoadError
        Without ``activation``; when the state_dict holds entries an MLP
        cannot use (convolutions, normalisation, deel-torchlip parametrizations);
        or when the shapes do not chain.
    """
    what = "a state_dict" if key is None else f"a checkpoint whose {key!r} is a state_dict"
    layers, used = [], set()
    for name, value in state.items():
        found = _layer_weight(state, name, value, source)
        if found is None:
            continue
        prefix, weight, consumed = found
        bias = state.get(prefix + "bias")
        if bias is not None:
            consumed = consumed + (prefix + "bias",)
        layers.append((prefix.rstrip(".") or "weight", weight, None if bias is None else _np(bias)))
        used.update(consumed)
    left = [f"{k} {tuple(v.shape)}" for k, v in state.items() if k not in used]
    if left:
        hint = ("; the stored parametrizations other than torch's spectral_norm (e.g. deel-torchlip Bjorck) are "
                "not weights: save model.vanilla_export() with torch.save"
                if any(k.startswith("parametrizations.") or ".parametrizations." in k for k in left) else "")
        raise ModelLoadError(f"{source}: {what} with parameters an MLP cannot use ({', '.join(left)}){hint}; "
                             "save the whole model (torch.save(model), TorchScript, torch.export or ONNX)")
    return mlp_network(layers, activation, params, source, what)


_SPECTRAL = ("parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v")
_SPECTRAL_HOOK = ("weight_orig", "weight_u", "weight_v")


def _layer_weight(state: Mapping, name: str, value, source: str):
    """``(prefix, effective weight, keys consumed)`` when ``name`` is the weight of a dense layer, else None.

    A plain 2-D ``weight``, or the ``original`` / ``weight_orig`` of
    torch's spectral normalisation (parametrization or the older hook) with its
    ``u`` and ``v`` next to it.
    """
    if value.dim() != 2:
        return None
    for keys in (("weight",), _SPECTRAL, _SPECTRAL_HOOK):
        if name == keys[0] or name.endswith("." + keys[0]):
            prefix = name[: -len(keys[0])]
            if len(keys) == 1:
                return prefix, _np(value), (name,)
            full = tuple(prefix + k for k in keys)
            if not all(k in state for k in full[1:]):
                return None  # left over, and named as such
            return prefix, spectral_weight(*(state[k] for k in full), f"{source}: {name}"), full
    return None


def spectral_weight(original, u, v, where: str) -> np.ndarray:
    """The eval-mode weight of torch's spectral normalisation: ``original / (u^T original v)``.

    Both ``torch.nn.utils.parametrizations.spectral_norm`` and the older
    ``torch.nn.utils.spectral_norm`` hook compute, outside training, exactly this
    (no power iteration runs in eval mode) for a 2-D weight normalised along
    ``dim=0`` (the default for ``Linear``; a square weight normalised along
    ``dim=1`` stores the same shapes and cannot be told apart, nor can a
    parametrization without stored state registered after it: a state_dict
    records neither).  ``u`` and ``v`` must be the unit
    vectors torch's power method keeps (that is what identifies them, beyond
    their names), and ``u^T W v`` positive.

    Raises
    ------
    ModelLoadError
        Shapes of another ``dim`` than 0, vectors that are not unit vectors, or a
        non-positive or non-finite ``u^T W v``.
    """
    w, u, v = _np(original), _np(u), _np(v)
    if u.shape != (w.shape[0],) or v.shape != (w.shape[1],):
        raise ModelLoadError(f"{where}: spectral normalisation with u {u.shape} and v {v.shape} for a weight "
                             f"{w.shape}; only dim=0 (u of length {w.shape[0]}, v of {w.shape[1]}) is read")
    if not (abs(np.linalg.norm(u) - 1.0) < 1e-4 and abs(np.linalg.norm(v) - 1.0) < 1e-4):
        raise ModelLoadError(f"{where}: its u and v are not the unit vectors of torch's spectral normalisation "
                             f"(norms {np.linalg.norm(u):.6g}, {np.linalg.norm(v):.6g})")
    sigma = float(u @ w @ v)
    if not (np.isfinite(sigma) and sigma > 0.0):
        raise ModelLoadError(f"{where}: spectral normalisation divides by u^T W v = {sigma:g}, not a positive number")
    return w / sigma


def _np(tensor) -> np.ndarray:
    import torch

    return np.array(tensor.detach().cpu().to(torch.float64).numpy(), copy=True)
