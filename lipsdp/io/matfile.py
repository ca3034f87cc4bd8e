"""LipSDP ``.mat`` weight files (Fazlyab et al.'s repository format).

``scipy.io.loadmat(path)["weights"][0]`` is a cell array of dense matrices
``W_k`` (out x in) without biases; the activation is not stored, so it must be
given (the LipSDP examples use ReLU).
"""

from __future__ import annotations

import numpy as np

from lipsdp.errors import ModelLoadError
from lipsdp.io.checkpoint import mlp_network
from lipsdp.io.formats import first_line


def load_mat(path: str, activation: str | None = None, activation_params: dict | None = None):
    """Read the cell array ``weights`` of a LipSDP ``.mat`` file as an MLP.

    Parameters
    ----------
    path : str
    activation : str, optional
        Activation between layers (e.g. ``"relu"``); required.
    activation_params : dict, optional

    Returns
    -------
    Network
        ``Input -> Affine -> Activation -> ... -> Affine`` with no biases.
    """
    from scipy.io import loadmat

    try:
        data = loadmat(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the MATLAB file ({first_line(exc)})") from exc
    if "weights" not in data:
        found = ", ".join(k for k in data if not k.startswith("__")) or "none"
        raise ModelLoadError(f"{path}: no variable 'weights' (found: {found}); a LipSDP .mat file holds a "
                             "cell array 'weights' of matrices W_k (out x in)")
    cells = data["weights"]
    items = list(cells.ravel()) if cells.dtype == object else [cells]
    layers = []
    for k, w in enumerate(items):
        w = np.asarray(w)
        if w.ndim != 2 or not np.issubdtype(w.dtype, np.number):
            raise ModelLoadError(f"{path}: weights{{{k + 1}}} is not a numeric matrix (shape {w.shape})")
        layers.append((f"weights{{{k + 1}}}", w.astype(np.float64), None))
    return mlp_network(layers, activation, activation_params, path, "a LipSDP .mat file")
