"""Check a PyTorch zip archive's tensor records before torch reads them.

``torch.jit.load`` and ``torch.export.load`` trust the sizes of the tensor
records in the archive: a record cut short is read past its end (heap garbage
as weights, or a segmentation fault), and an empty ``.pt2`` weight loads as
zeros.  Either way a *different* network would be certified.  This module
reads, without running any pickled code, what each record must hold and
refuses the file when a record is missing or too short.

- ``data.pkl`` / ``constants.pkl`` (``torch.save`` and TorchScript): tensor
  storages are persistent ids ``("storage", StorageType, key, location, numel)``
  whose bytes live in ``<archive>/data/<key>`` (``constants/<key>``).  A
  restricted unpickler that builds stand-ins for every global reads them.
- ``.pt2``: ``data/weights/model_weights_config.json`` gives each weight's dtype,
  sizes, strides and offset.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile

from lipsdp.errors import ModelLoadError

# torch storage type name -> bytes per element
_STORAGE_ITEMSIZE = {
    "FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
}
# torch.export schema ScalarType -> bytes per element
_EXPORT_ITEMSIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 9: 4, 10: 8, 11: 16, 12: 1, 13: 2}


class _Stub:
    """Stands in for any global a pickle names: accepts anything, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass


class _RecordReader(pickle.Unpickler):
    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: list[tuple[str, int]] = []

    def find_class(self, module, name):
        # a fresh stand-in class per global: REDUCE, NEWOBJ and BUILD all work on it and run nothing
        return type(str(name), (_Stub,), {})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind = getattr(pid[1], "__name__", str(pid[1]))
            itemsize = _STORAGE_ITEMSIZE.get(kind)
            if itemsize is not None and isinstance(pid[4], int):
                self.storages.append((str(pid[2]), pid[4] * itemsize))
        return _Stub()


def _too_short(path, record, have, need):
    return ModelLoadError(f"{path}: the archive is damaged: tensor record {record} holds {have} bytes but "
                          f"{need} are needed; save the model again")


def check_zip_records(path: str) -> None:
    """Raise :class:`ModelLoadError` if a tensor record of the archive is missing or too short."""
    try:
        with zipfile.ZipFile(path) as zf:
            sizes = {info.filename: info.file_size for info in zf.infolist()}
            for name in sizes:
                prefix, _, tail = name.rpartition("/")
                if tail in ("data.pkl", "constants.pkl"):
                    folder = "data" if tail == "data.pkl" else "constants"
                    reader = _RecordReader(zf.read(name))
                    try:
                        reader.load()
                    except Exception:  # an unreadable pickle is reported by torch's own loader
                        continue
                    for key, need in reader.storages:
                        record = f"{prefix}/{folder}/{key}" if prefix else f"{folder}/{key}"
                        have = sizes.get(record)
                        if have is None or have < need:
                            raise _too_short(path, record, have or 0, need)
                elif name.endswith("data/weights/model_weights_config.json"):
                    config = json.loads(zf.read(name)).get("config", {})
                    for entry in config.values():
                        if entry.get("use_pickle"):
                            continue
                        meta = entry.get("tensor_meta", {})
                        itemsize = _EXPORT_ITEMSIZE.get(meta.get("dtype"))
                        shape = [s.get("as_int") for s in meta.get("sizes", [])]
                        strides = [s.get("as_int") for s in meta.get("strides", [])]
                        offset = meta.get("storage_offset", {}).get("as_int", 0)
                        if itemsize is None or None in shape or None in strides or offset is None:
                            continue
                        numel = 1
                        for s in shape:
                            numel *= s
                        span = 0 if numel == 0 else offset + 1 + sum((s - 1) * st for s, st in zip(shape, strides))
                        record = name.rsplit("/", 1)[0] + "/" + str(entry.get("path_name"))
                        have = sizes.get(record)
                        if have is None or have < span * itemsize:
                            raise _too_short(path, record, have or 0, span * itemsize)
    except ModelLoadError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise ModelLoadError(f"{path}: the zip archive is damaged ({type(exc).__name__}: {exc})") from exc
