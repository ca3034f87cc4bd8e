"""Which kind of model file is this?  Decided from the content, the extension only breaks ties.

=============== ==================================================================
format          recognised by
=============== ==================================================================
``torchscript`` zip archive with ``code/`` and ``constants.pkl`` (``torch.jit.save``)
``export``      zip archive with ``archive_format`` or ``models/*.json`` (``torch.export.save``)
``pickle``      zip archive with ``data.pkl`` (``torch.save``), or a legacy pickle (``0x80``)
``mat``         ``MATLAB 5.0 MAT-file`` header (``scipy.io.savemat``, MATLAB ``-v7``)
``onnx``        a protobuf that parses as an ``onnx.ModelProto`` with a graph
=============== ==================================================================
"""

from __future__ import annotations

import os
import zipfile

from lipsdp.errors import ModelLoadError

FORMATS = ("pickle", "torchscript", "export", "onnx", "mat")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (backends write pages)."""
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


def detect_format(path: str) -> str:
    """Return one of :data:`FORMATS` for the file at ``path``.

    Raises
    ------
    ModelLoadError
        The file is missing, a directory, empty, a truncated archive, or not a
        model format lipsdp reads.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, not a model file")
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if not head:
        raise ModelLoadError(f"{path}: the file is empty")
    if head.startswith(b"PK"):
        return _zip_format(path)
    if head.startswith(b"MATLAB 7.3 MAT-file") or head[512:520] == b"\x89HDF\r\n\x1a\n":
        raise ModelLoadError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; "
                             "save the weights with save(..., '-v7')")
    if head.startswith(b"MATLAB 5.0 MAT-file") or path.lower().endswith(".mat"):
        return "mat"
    if head[:1] == b"\x80":
        return "pickle"
    if _looks_like_onnx(path):
        return "onnx"
    if path.lower().endswith(".onnx") and not _onnx_installed():
        raise ModelLoadError(f"{path}: ONNX files need the onnx extra: pip install 'lipsdp[onnx]'")
    if path.lower().endswith(".onnx"):
        raise ModelLoadError(f"{path}: not a valid ONNX model (the protobuf does not parse or has no graph)")
    hint = "" if _onnx_installed() else " (ONNX files need the onnx extra: pip install 'lipsdp[onnx]')"
    raise ModelLoadError(f"{path}: not a model file lipsdp can read (expected a PyTorch file from torch.save, "
                         f"torch.jit.save or torch.export.save, an ONNX model, or a LipSDP .mat file){hint}")


def _zip_format(path: str) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"{path}: the zip archive is damaged or truncated ({first_line(exc)}); "
                             "save the model again") from exc
    tails = {n.split("/", 1)[-1] for n in names}
    if "constants.pkl" in tails or any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "archive_format" in tails or any(t.startswith("models/") and t.endswith(".json") for t in tails):
        return "export"
    if "data.pkl" in tails:
        return "pickle"
    raise ModelLoadError(f"{path}: a zip archive, but not one written by torch.save, torch.jit.save or "
                         "torch.export.save")


def _onnx_installed() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def _looks_like_onnx(path: str) -> bool:
    if not _onnx_installed():
        return False
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0
