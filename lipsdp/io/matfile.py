"""LipSDP ``.mat`` weight files (Fazlyab et al.'s repository format).

``scipy.io.loadmat(path)["weights"][0]`` is a cell array of dense matrices
``W_k`` (out x in) without biases; the activation is not stored, so it must be
given (the LipSDP examples use ReLU).
"""

from __future__ import annotations

import numpy as np

from lipsdp.errors import ModelLoadError
from lipsdp.io.checkpoint import mlp_network


_CHILD = r"""
import sys, numpy as np
from scipy.io import loadmat
data = loadmat(sys.argv[1])
if "weights" not in data:
    print("\t".join(k for k in data if not k.startswith("__")), file=sys.stderr)
    sys.exit(3)
cells = data["weights"]
items = list(cells.ravel()) if cells.dtype == object else [cells]
out = {}
for k, w in enumerate(items):
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.number):
        print(f"weights{{{k + 1}}} is not a numeric matrix (shape {w.shape})", file=sys.stderr)
        sys.exit(4)
    out[f"w{k:05d}"] = w.astype(np.float64)
np.savez(sys.argv[2], **out)
"""


def _read_weights_isolated(path: str) -> list:
    """``loadmat(path)["weights"]`` read in a child process.

    scipy documents ``loadmat`` as not hardened against untrusted files: a damaged
    element type code crashes the process (SIGSEGV/SIGBUS, scipy PR #25349).  In a
    child, such a file ends in one :class:`ModelLoadError` instead.
    """
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lipsdp-mat-") as tmp:
        out = os.path.join(tmp, "weights.npz")
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, path, out], capture_output=True, text=True,
                                  timeout=300)
        except subprocess.TimeoutExpired as exc:
            raise ModelLoadError(f"{path}: reading the MATLAB file took over 300 s; is it damaged?") from exc
        err = proc.stderr.strip().splitlines()
        if proc.returncode == 3:
            found = ", ".join(err[-1].split("\t")) if err and err[-1] else "none"
            raise ModelLoadError(f"{path}: no variable 'weights' (found: {found}); a LipSDP .mat file holds a "
                                 "cell array 'weights' of matrices W_k (out x in)")
        if proc.returncode == 4:
            raise ModelLoadError(f"{path}: {err[-1]}")
        if proc.returncode < 0:
            raise ModelLoadError(f"{path}: the MATLAB file is damaged (it crashed scipy's reader, signal "
                                 f"{-proc.returncode})")
        if proc.returncode != 0:
            raise ModelLoadError(f"{path}: cannot read the MATLAB file ({err[-1] if err else 'unknown error'})")
        with np.load(out, allow_pickle=False) as npz:
            return [npz[k] for k in sorted(npz.files)]


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
    items = _read_weights_isolated(path)
    layers = []
    for k, w in enumerate(items):
        w = np.asarray(w)
        if w.ndim != 2 or not np.issubdtype(w.dtype, np.number):
            raise ModelLoadError(f"{path}: weights{{{k + 1}}} is not a numeric matrix (shape {w.shape})")
        layers.append((f"weights{{{k + 1}}}", w.astype(np.float64), None))
    return mlp_network(layers, activation, activation_params, path, "a LipSDP .mat file")
