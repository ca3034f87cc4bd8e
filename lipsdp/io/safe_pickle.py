"""Load ``torch.save`` files without running the code a pickle can carry.

``torch.load(weights_only=True)`` rebuilds only tensors, containers and the
classes it is told are safe.  :func:`allowed_globals` lists them: the layers of
``torch.nn``, of deel-torchlip (when installed) and of :mod:`lipsdp.nn`.  Rebuilding one of these
only restores its attribute dictionary; no ``__reduce__`` or ``__init__`` runs.

Checkpoints often carry numpy arrays and scalars in their metadata; numpy's
array reconstruction is allowed the way torch documents it
(:func:`numpy_globals`: ``_reconstruct``, ``ndarray``, ``dtype``, the numeric
dtype classes and ``scalar``).  They rebuild plain arrays only: any object an
object array holds is unpickled under the same allow-list.

A pickle that names anything else (a user's ``__main__.MyNet``,
``os.system``) is refused with :class:`~lipsdp.errors.UnsafeModelError` before
anything in it is executed, unless the caller trusts the file
(``trust_pickle=True``, command line ``--trust-pickle``).
"""

from __future__ import annotations

import functools
import pickle
import re

from lipsdp.errors import ModelLoadError, UnsafeModelError
from lipsdp.io.formats import first_line

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


@functools.lru_cache(maxsize=1)
def allowed_globals() -> tuple:
    """The classes a safe model pickle may name (``torch.nn`` modules, deel-torchlip and lipsdp.nn layers)."""
    import torch
    import torch.nn.modules as nn_modules

    allowed = []
    for name in nn_modules.__all__:
        obj = getattr(nn_modules, name, None)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            allowed.append(obj)
    allowed.extend(_torchlip_classes())
    allowed.extend(_lipsdp_classes())
    allowed.append(torch.nn.Parameter)
    return tuple(dict.fromkeys(allowed))


def _torchlip_classes() -> list:
    import torch

    try:
        import deel.torchlip as torchlip
    except Exception:  # not installed, or broken: its layers are simply not allowed
        return []
    return [obj for obj in vars(torchlip).values()
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module)]


def _lipsdp_classes() -> list:
    """lipsdp's own layers (:mod:`lipsdp.nn`): GroupSort, MaxMin, HouseHolder, ImplicitLayer, ..."""
    import torch

    import lipsdp.nn as lnn

    return [getattr(lnn, name) for name in lnn.__all__
            if isinstance(getattr(lnn, name), type) and issubclass(getattr(lnn, name), torch.nn.Module)]


@functools.lru_cache(maxsize=1)
def numpy_globals() -> tuple:
    """``(object, pickled name)`` pairs that rebuild numpy arrays, dtypes and scalars, nothing else.

    Pickles written under numpy 1 name ``numpy.core.multiarray``, under numpy 2
    ``numpy._core.multiarray``; both names are allowed for the same functions.
    """
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    pairs = []
    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name)
        pairs += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    pairs += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for code in "?bBhHiIlLqQefdgFDG":  # bool, integers, floats, complex: no object or void dtypes
        cls = type(np.dtype(code))
        if cls is not np.dtype:
            pairs.append((cls, _qualified(cls)))
    return tuple(dict.fromkeys(pairs))


def _qualified(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def load_torch_file(path: str, trust_pickle: bool = False):
    """``torch.load`` a ``torch.save`` file on the CPU, safely unless ``trust_pickle``.

    Raises
    ------
    UnsafeModelError
        The pickle names classes or functions outside :func:`allowed_globals`.
    ModelLoadError
        The file is damaged, or (with ``trust_pickle``) names a class that is
        not importable here.
    """
    import torch

    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError, ImportError) as exc:
            raise ModelLoadError(f"{path}: the pickle refers to code that is not importable here "
                                 f"({first_line(exc)}); import the model's module first, or save the model "
                                 "with TorchScript, torch.export or ONNX") from exc
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read the file ({first_line(exc)})") from exc
    allowed = list(allowed_globals()) + list(numpy_globals())
    names = {_qualified(obj) for obj in allowed_globals()} | {name for _, name in numpy_globals()}
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) format: the loader below reports what it refuses
        needed = []
    refused = [n for n in needed if n not in names]
    if refused:
        raise _unsafe(path, refused)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _GLOBAL.findall(str(exc))
        if refused:
            raise _unsafe(path, refused) from None
        raise ModelLoadError(f"{path}: cannot read the file safely ({first_line(exc)})") from exc
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the file ({type(exc).__name__}: {first_line(exc)})") from exc


def _unsafe(path: str, refused: list[str]) -> UnsafeModelError:
    listed = ", ".join(dict.fromkeys(refused))
    return UnsafeModelError(f"{path}: the pickle names {listed}, which lipsdp will not load without running its "
                            "code; pass --trust-pickle (API: trust_pickle=True) if you trust the file, or save the "
                            "model with TorchScript, torch.export or ONNX")
