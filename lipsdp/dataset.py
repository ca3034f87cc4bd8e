"""Labelled data sets for ``lipsdp robustness``: reading, checking and fingerprinting.

A data set is an input array ``x`` of shape ``(N, *input_shape)`` (or ``(N, input_dim)``) and integer
labels ``y`` of shape ``(N,)``. Files:

* ``.npz`` holding arrays ``x`` and ``y``;
* ``.npy`` for ``x`` with the labels in a second ``.npy`` (``labels=``);
* ``.pt`` / ``.pth``: a dict with tensors ``x`` and ``y``, or a tuple / list ``(x, y)``, read with
  ``torch.load(weights_only=True)``, so a data file cannot run code.

Everything that would make the certified accuracy meaningless is refused with one line
(:class:`DataError`, exit code 2): a missing key, a shape that is not the model's input shape, NaN or
Inf inputs, labels that are not whole numbers in ``0..K-1``. An input range that differs from the one
the user declares is a warning (:func:`range_warning`): raw digits pixels in ``0..16`` fed to a model
trained on ``[0, 1]`` give radii in the wrong units, and certified accuracies that mean nothing.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from lipsdp.errors import LipSDPError

__all__ = ["DataError", "load_data", "check_data", "range_warning", "data_digest"]

TORCH_SUFFIXES = (".pt", ".pth")


class DataError(LipSDPError):
    """The data set cannot be read, or does not fit the model (exit code 2)."""


def _npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                raise DataError(f"{path}: no array {' or '.join(repr(k) for k in missing)} "
                                f"(the file holds {', '.join(map(repr, keys)) or 'nothing'}; save with "
                                f"np.savez(path, x=inputs, y=labels))")
            return archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None


def _npy(path: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc})") from None


def _torch(path: str) -> tuple[object, object]:
    import torch  # heavy and only needed for this format

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle errors, RuntimeError, UnpicklingError)
        raise DataError(f"{path}: not a tensor file torch can read with weights_only=True "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(obj, dict):
        missing = [k for k in ("x", "y") if k not in obj]
        if missing:
            raise DataError(f"{path}: the dict has no {' or '.join(repr(k) for k in missing)} "
                            f"(keys: {', '.join(map(repr, obj)) or 'none'})")
        return obj["x"], obj["y"]
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    raise DataError(f"{path}: expected a dict {{'x': inputs, 'y': labels}} or a pair (inputs, labels), "
                    f"got {type(obj).__name__}")


def _array(value, what: str, path: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: {what} must be numbers, got dtype {arr.dtype}")
    return arr


def load_data(path, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` read from a ``.npz``, ``.npy`` (+ ``labels``) or torch file; not yet checked.

    Parameters
    ----------
    path : str or os.PathLike
        The data file.
    labels : str or os.PathLike, optional
        A ``.npy`` file of labels; required with a ``.npy`` input file, refused otherwise.

    Raises
    ------
    DataError
        The file is missing or unreadable, or lacks ``x`` or ``y``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    suffix = os.path.splitext(path)[1].lower()
    if labels is not None and suffix != ".npy":
        raise DataError(f"--labels goes with a .npy input file; {path} holds its own labels")
    if suffix == ".npz":
        x, y = _npz(path)
    elif suffix == ".npy":
        if labels is None:
            raise DataError(f"{path}: a .npy file holds only the inputs; give the labels with --labels y.npy")
        labels = os.fspath(labels)
        if not os.path.isfile(labels):
            raise DataError(f"{labels}: no such labels file")
        x, y = _npy(path), _npy(labels)
    elif suffix in TORCH_SUFFIXES:
        x, y = _torch(path)
    else:
        raise DataError(f"{path}: unknown data format {suffix or '(no suffix)'}; use .npz (x, y), .npy with "
                        f"--labels, or a torch .pt file")
    return _array(x, "inputs x", path), _array(y, "labels y", path)


def check_data(x, y, input_shape: tuple[int, ...], num_classes: int, *, source: str = "data"):
    """Checked float64 inputs ``(N, input_dim)`` and int64 labels ``(N,)`` for a model.

    ``x`` must have shape ``(N, *input_shape)`` or ``(N, prod(input_shape))``; a single sample
    without the batch axis is refused rather than guessed at.

    Raises
    ------
    DataError
        Wrong shape, NaN / Inf inputs, labels that are not whole numbers in ``0..num_classes-1``,
        or an empty data set.
    """
    x, y = np.asarray(x), np.asarray(y)
    input_shape = tuple(int(s) for s in input_shape)
    dim = int(np.prod(input_shape))
    if x.ndim < 2 or (x.shape[1:] != input_shape and x.shape[1:] != (dim,)):
        want = f"(N, {', '.join(map(str, input_shape))})" + ("" if len(input_shape) == 1 else f" or (N, {dim})")
        raise DataError(f"{source}: inputs x have shape {x.shape}; the model takes {want}")
    if len(x) == 0:
        raise DataError(f"{source}: the data set is empty")
    if y.shape != (len(x),):
        raise DataError(f"{source}: labels y have shape {y.shape}; expected ({len(x)},), one per input")
    xf = x.reshape(len(x), dim).astype(np.float64)
    bad = ~np.isfinite(xf).all(axis=1)
    if bad.any():
        raise DataError(f"{source}: {int(bad.sum())} input(s) hold NaN or Inf (first: sample {int(np.argmax(bad))})")
    yf = y.astype(np.float64)
    if not np.isfinite(yf).all() or (yf != np.round(yf)).any():
        raise DataError(f"{source}: labels y must be whole numbers (class indices)")
    yi = yf.astype(np.int64)
    if yi.min() < 0 or yi.max() >= num_classes:
        raise DataError(f"{source}: labels run from {yi.min()} to {yi.max()}; the model has {num_classes} "
                        f"classes (0..{num_classes - 1})")
    return xf, yi


def range_warning(x: np.ndarray, input_range: tuple[float, float] | None) -> str | None:
    """One line when the inputs do not look like they live in ``input_range``, else None.

    Radii are in the units of the data, so data on another scale than the model was trained on
    (pixels in ``0..16`` or ``0..255`` against ``[0, 1]``) gives certified accuracies that mean
    nothing. Warned: values outside the range, and data spanning under a tenth of it.
    """
    if input_range is None or x.size == 0:
        return None
    lo, hi = input_range
    dmin, dmax = float(x.min()), float(x.max())
    slack = 1e-6 * max(1.0, hi - lo)
    if dmin < lo - slack or dmax > hi + slack:
        return (f"the data runs from {dmin:.6g} to {dmax:.6g}, outside --input-range {lo:g},{hi:g}: radii and "
                f"certified accuracies are in the data's units; rescale the data as the model was trained")
    if hi > lo and dmax - dmin < 0.1 * (hi - lo):
        return (f"the data spans only {dmin:.6g} to {dmax:.6g} of --input-range {lo:g},{hi:g}: is it on the "
                f"scale the model was trained on?")
    return None


def data_digest(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of the checked inputs and labels (shape, float64 and int64 bytes): what a results file is about."""
    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y, dtype=np.int64)):
        h.update(f"{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()
