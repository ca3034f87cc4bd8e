"""Weights-only MATLAB ``.mat`` files: LipSDP's ``weights`` cell, or a ``params`` struct of layers.

Two layouts are read, one per file:

- LipSDP (Fazlyab et al.'s repository): ``scipy.io.loadmat(path)["weights"][0]``
  is a cell array of dense matrices ``W_k`` (out x in) without biases;
- MATLAB LipSDP tools' export: a struct ``params`` with fields
  ``linear_<k>_weight`` (out x in) and optionally ``linear_<k>_bias``, the layers
  in increasing ``k``.  Convolution kernels (``conv_<k>_weight``) are refused:
  their stride and padding are not stored.

The activation is not stored, so it must be given (the LipSDP examples use
ReLU).  Nothing in the file is ignored: complex or non-numeric arrays, fields
of ``params`` other than these, and variables other than the one layout read
are refused with :class:`~lipsdp.errors.ModelLoadError`, all named at once.
"""

from __future__ import annotations

import numpy as np

from lipsdp.errors import ModelLoadError
from lipsdp.io.checkpoint import mlp_network


_CHILD = r"""
import re, sys, numpy as np
from scipy.io import loadmat

def fail(code, text):
    print(text, file=sys.stderr)
    sys.exit(code)

def matrix(label, w, vector=False):
    w = np.asarray(w)
    if np.iscomplexobj(w):
        fail(4, f"{label} is complex (shape {w.shape}); lipsdp certifies real networks only and will not drop "
                "the imaginary part")
    if not np.issubdtype(w.dtype, np.number) or w.dtype == object:
        fail(4, f"{label} is not a numeric array (shape {w.shape}, {w.dtype})")
    if vector and w.ndim == 2 and 1 in w.shape:
        w = w.reshape(-1)
    if w.ndim != (1 if vector else 2):
        fail(4, f"{label} is not a numeric {'vector' if vector else 'matrix'} (shape {w.shape})")
    return w.astype(np.float64)

data = loadmat(sys.argv[1])
variables = [k for k in data if not k.startswith("__")]
layout = [k for k in ("weights", "params") if k in data]
if not layout:
    fail(3, "	".join(variables))
if len(layout) > 1 or len(variables) > 1:
    fail(4, f"holds the variables {', '.join(variables)}; a weights-only file holds one 'weights' cell or one "
            "'params' struct, and lipsdp does not ignore the others")
out = {}
if layout[0] == "weights":
    cells = data["weights"]
    items = list(cells.ravel()) if cells.dtype == object else [cells]
    for k, w in enumerate(items):
        out[f"w{k:05d}"] = matrix(f"weights{{{k + 1}}}", w)
else:
    params = data["params"]
    if params.dtype.names is None or params.size != 1:
        fail(4, f"params is not a MATLAB struct of layers (shape {params.shape}, {params.dtype})")
    fields = {name: params.ravel()[0][name] for name in params.dtype.names}
    conv = [f for f in fields if re.fullmatch(r"conv\w*", f)]
    if conv:
        fail(4, f"params holds convolution kernels ({', '.join(conv)}); their stride and padding are not "
                "stored, so only linear layers are read from this layout: export the model as ONNX instead")
    found = {f: re.fullmatch(r"linear_(\d+)_(weight|bias)", f) for f in fields}
    other = [f for f, m in found.items() if m is None]
    ks = sorted({int(m.group(1)) for m in found.values() if m})
    orphan = [f"linear_{k}_bias" for k in ks if f"linear_{k}_weight" not in fields]
    if other or orphan:
        fail(4, f"params holds fields lipsdp cannot read ({', '.join(other + orphan)}); it reads "
                "linear_<k>_weight (out x in) and linear_<k>_bias")
    for i, k in enumerate(ks):
        out[f"w{i:05d}"] = matrix(f"params.linear_{k}_weight", fields[f"linear_{k}_weight"])
        if f"linear_{k}_bias" in fields:
            out[f"b{i:05d}"] = matrix(f"params.linear_{k}_bias", fields[f"linear_{k}_bias"], vector=True)
        out[f"n{i:05d}"] = np.array(k)
np.savez(sys.argv[2], **out)
"""


def _read_weights_isolated(path: str) -> list:
    """The layers ``(name, W, b or None)`` of a weights-only ``.mat`` file, read in a child process.

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
                                 "cell array 'weights' of matrices W_k (out x in), or a struct 'params' with "
                                 "fields linear_<k>_weight and linear_<k>_bias")
        if proc.returncode == 4:
            raise ModelLoadError(f"{path}: {err[-1]}")
        if proc.returncode < 0:
            raise ModelLoadError(f"{path}: the MATLAB file is damaged (it crashed scipy's reader, signal "
                                 f"{-proc.returncode})")
        if proc.returncode != 0:
            raise ModelLoadError(f"{path}: cannot read the MATLAB file ({err[-1] if err else 'unknown error'})")
        with np.load(out, allow_pickle=False) as npz:
            return _layers(dict(npz))


def _layers(arrays: dict) -> list:
    """``w<i>``, ``b<i>``, ``n<i>`` arrays of the child -> ``(name, W, b or None)`` in order."""
    layers = []
    for key in sorted(k for k in arrays if k.startswith("w")):
        i = key[1:]
        name = f"params.linear_{int(arrays['n' + i])}" if "n" + i in arrays else f"weights{{{int(i) + 1}}}"
        layers.append((name, arrays[key], arrays.get("b" + i)))
    return layers


def load_mat(path: str, activation: str | None = None, activation_params: dict | None = None):
    """Read a weights-only ``.mat`` file (module docstring: the two layouts) as an MLP.

    Parameters
    ----------
    path : str
    activation : str, optional
        Activation between layers (e.g. ``"relu"``); required.
    activation_params : dict, optional

    Returns
    -------
    Network
        ``Input -> Affine -> Activation -> ... -> Affine`` (no biases in LipSDP's layout).
    """
    layers = _read_weights_isolated(path)
    what = "a .mat struct 'params'" if layers and layers[0][0].startswith("params.") else "a LipSDP .mat file"
    return mlp_network(layers, activation, activation_params, path, what)
