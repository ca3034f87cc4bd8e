"""Fuzzing the model loaders: damaged files are refused with a LipSDPError, never a crash or a hang.

``lipsdp.io.load_network`` reads files users download and pass around; a
damaged one must give a :class:`~lipsdp.errors.LipSDPError` (the command line
turns it into one line and exit 2).  Hypothesis feeds it

- random bytes, behind the magic numbers of each format;
- real saved models (``torch.save`` module / state_dict / checkpoint / legacy
  pickle, TorchScript, ``torch.export`` ``.pt2``, ONNX) with random byte flips,
  overwrites, insertions, deletions and truncations;
- *structure-aware* damage that gets past the checksums: zip members mutated
  and re-zipped with valid CRCs, and ONNX protobufs with edited dims, inputs,
  attributes and operator types.

Two readers can die of a native crash (segmentation fault) on damaged input --
``scipy.io.loadmat`` and ``torch.jit.load`` -- so ``.mat`` files and damaged
TorchScript members are fuzzed in a child process that the harness restarts.

The loader bugs this fuzzing found (damaged zip headers, unvalidated ONNX graphs, short tensor
records in TorchScript and .pt2 archives, scipy's loadmat crash) are fixed; their reproducers at the
end of this file are regression tests.  :data:`KNOWN` lists escapes still tolerated (none).

Examples per test: ``LIPSDP_FUZZ_EXAMPLES`` (default 60; the runs are
derandomized, so CI sees the same cases every time).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import traceback
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lipsdp.errors import LipSDPError  # noqa: E402
from lipsdp.io import load_network  # noqa: E402

from models import mlp, save_all_formats  # noqa: E402

EXAMPLES = int(os.environ.get("LIPSDP_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
TIMEOUT = 20.0  # seconds per load: far above the ~0.05 s a damaged file takes


# -- known bugs (reported; reproducers at the end) ------------------------------------
ONNX_FILES = ("lipsdp/io/onnx_.py", "lipsdp/io/onnx_ops.py", "lipsdp/io/aten_ops.py", "lipsdp/io/aten_linear.py",
              "lipsdp/io/aten_shapes.py", "lipsdp/io/translator.py", "lipsdp/io/builder.py", "lipsdp/io/linmaps.py")
# Known escapes tolerated by the fuzzers: none left.  Damaged zip headers and unvalidated ONNX graphs
# (UnicodeDecodeError, NotImplementedError, IndexError, ValueError, TypeError, ...) are now turned into
# ModelLoadError by lipsdp.io.load_network; their reproducers below are regression tests.
KNOWN: dict = {}


class Hang(BaseException):
    """Raised by the alarm; a BaseException so the loaders' ``except Exception`` cannot swallow it."""


def _innermost_lipsdp_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/lipsdp/" in f.filename.replace(os.sep, "/")]
    if not frames:
        return "?"
    f = frames[-1]
    path = f.filename.replace(os.sep, "/")
    return f"{path[path.rindex('lipsdp/'):]}:{f.lineno} {f.name}"


def known_bug(exc: BaseException, fmt: str) -> str | None:
    where = _innermost_lipsdp_frame(exc)
    for name, (types, files) in KNOWN.items():
        if name.startswith("onnx") and fmt != "onnx":
            continue
        if isinstance(exc, types) and where.startswith(files):
            return name
    return None


def check_load(path: Path, fmt: str) -> str:
    """Load ``path``: ``"ok"``, ``"refused"`` (a LipSDPError) or ``"known bug: <name>"``; fail otherwise."""
    def alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = load_network(path, activation="relu")
        net.validate()
        return "ok"
    except LipSDPError as exc:
        assert str(exc).strip(), "empty error message"
        return "refused"
    except Hang:
        pytest.fail(f"{fmt}: load_network did not return within {TIMEOUT} s ({path.stat().st_size} bytes)")
    except Exception as exc:
        bug = known_bug(exc, fmt)
        if bug is None:
            keep = Path(os.environ.get("LIPSDP_FUZZ_KEEP", path.parent)) / f"crash-{fmt}{''.join(path.suffixes)}"
            keep.write_bytes(path.read_bytes())
            pytest.fail(f"{fmt}: load_network raised {type(exc).__name__}: {exc} at "
                        f"{_innermost_lipsdp_frame(exc)} (input kept at {keep})")
        return f"known bug: {bug}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- base files -----------------------------------------------------------------------
def _tiny_onnx(nodes=None, initializers=None, name="tiny") -> onnx.ModelProto:
    """``x[?, 3] -> Gemm(W0, b0) -> Relu -> Gemm(W1, b1) -> y``, built by hand (no torch)."""
    rng = np.random.default_rng(0)
    inits = {"W0": rng.standard_normal((4, 3)).astype(np.float32), "b0": np.zeros(4, np.float32),
             "W1": rng.standard_normal((2, 4)).astype(np.float32), "b1": np.zeros(2, np.float32)}
    inits = [numpy_helper.from_array(v, k) for k, v in inits.items()] if initializers is None else initializers
    nodes = nodes or [helper.make_node("Gemm", ["x", "W0", "b0"], ["h"], name="fc0", transB=1),
                      helper.make_node("Relu", ["h"], ["r"], name="act"),
                      helper.make_node("Gemm", ["r", "W1", "b1"], ["y"], name="fc1", transB=1)]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _mat_bytes() -> bytes:
    import scipy.io

    rng = np.random.default_rng(0)
    cells = np.empty((1, 2), dtype=object)
    cells[0, 0], cells[0, 1] = rng.standard_normal((4, 3)), rng.standard_normal((2, 4))
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"weights": cells})
    return buf.getvalue()


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """One small model (3 -> 4 -> 2, ReLU) in every format ``load_network`` reads."""
    d = tmp_path_factory.mktemp("fuzz-bases")
    model = mlp([3, 4, 2], seed=0)
    paths = save_all_formats(model, d, (3,))
    paths["legacy"] = d / "legacy.pt"
    torch.save(model.state_dict(), paths["legacy"], _use_new_zipfile_serialization=False)
    paths["mat"] = d / "model.mat"
    paths["mat"].write_bytes(_mat_bytes())
    for fmt, p in paths.items():  # the undamaged files load
        assert check_load(p, fmt) == "ok", fmt
    return paths


# -- mutations ------------------------------------------------------------------------
OPS = ("flip", "set", "insert", "delete", "truncate")
mutations = st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2 ** 20), st.binary(min_size=1, max_size=16)),
                     min_size=1, max_size=6)


def mutate(data: bytes, ops) -> bytes:
    d = bytearray(data)
    for op, pos, blob in ops:
        if not d:
            break
        i = pos % len(d)
        if op == "flip":
            d[i] ^= 1 << (blob[0] % 8)
        elif op == "set":
            d[i:i + len(blob)] = blob
        elif op == "insert":
            d[i:i] = blob
        elif op == "delete":
            del d[i:i + 1 + blob[0] % 64]
        else:
            del d[i:]
    return bytes(d)


def rezip(data: bytes, member: int, ops) -> bytes:
    """The zip archive ``data`` with one member's bytes mutated and every CRC valid again."""
    src = zipfile.ZipFile(io.BytesIO(data))
    infos = src.infolist()
    k = member % len(infos)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for j, info in enumerate(infos):
            content = src.read(info.filename)
            out.writestr(info.filename, mutate(content, ops) if j == k else content)
    return buf.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# -- in-process fuzzing ---------------------------------------------------------------
IN_PROCESS = ("pickle", "state_dict", "checkpoint", "legacy", "torchscript", "export", "onnx")
MAGIC = [b"", b"PK\x03\x04", b"PK\x05\x06", b"\x80\x02", b"\x80\x04\x95", b"\x08\x07\x12\x07pytorch:"]
SUFFIXES = [".pt", ".pt2", ".onnx", ".ckpt", ""]


@FUZZ
@given(st.sampled_from(MAGIC), st.binary(max_size=4096), st.sampled_from(SUFFIXES))
def test_random_bytes(tmp_path, magic, data, suffix):
    event(check_load(_write(tmp_path, f"random{suffix}", magic + data), "random"))


@pytest.mark.parametrize("fmt", IN_PROCESS)
@FUZZ
@given(ops=mutations)
def test_damaged_saved_model(tmp_path, bases, fmt, ops):
    path = bases[fmt]
    event(check_load(_write(tmp_path, "damaged" + "".join(path.suffixes), mutate(path.read_bytes(), ops)), fmt))


@pytest.mark.parametrize("fmt", ["pickle", "checkpoint", "export"])
@FUZZ
@given(member=st.integers(0, 100), ops=mutations)
def test_damaged_zip_member(tmp_path, bases, fmt, member, ops):
    """Past the CRC check: one member of the archive damaged, the archive itself intact."""
    path = bases[fmt]
    data = rezip(path.read_bytes(), member, ops)
    event(check_load(_write(tmp_path, "member" + "".join(path.suffixes), data), fmt))


ONNX_OPS = ["Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Relu", "Tanh", "Sigmoid", "LeakyRelu", "Reshape",
            "Flatten", "Concat", "Transpose", "Conv", "BatchNormalization", "Identity", "Squeeze", "Unsqueeze",
            "Slice", "Gather", "MaxPool", "Pad", "Softmax", "Max"]


@st.composite
def onnx_edits(draw):
    """A list of protobuf-level edits of the tiny ONNX model (dims, inputs, op types, attributes, data)."""
    kinds = st.sampled_from(["dims", "drop_init", "op_type", "attr", "input", "data", "drop_node", "in_dim",
                             "drop_input"])
    return draw(st.lists(st.tuples(kinds, st.integers(0, 50), st.integers(-3, 200), st.sampled_from(ONNX_OPS)),
                         min_size=1, max_size=4))


def edit_onnx(model: onnx.ModelProto, edits) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for kind, i, v, op in edits:
        if kind == "dims" and g.initializer:
            init = g.initializer[i % len(g.initializer)]
            del init.dims[:]
            init.dims.extend([abs(v) % 6] * (i % 4))
        elif kind == "drop_init" and g.initializer:
            del g.initializer[i % len(g.initializer)]
        elif kind == "op_type" and g.node:
            g.node[i % len(g.node)].op_type = op
        elif kind == "attr" and g.node:
            node = g.node[i % len(g.node)]
            name = ["transB", "alpha", "axis", "perm", "epsilon", "allowzero"][i % 6]
            del node.attribute[:]
            value = [v, 1] if name == "perm" else (float(v) if name in ("alpha", "epsilon") else v)
            node.attribute.append(helper.make_attribute(name, value))
        elif kind == "input" and g.node:
            node = g.node[i % len(g.node)]
            names = ["", "x", "missing"] + [t.name for t in g.initializer] + [o for n in g.node for o in n.output]
            if node.input:
                node.input[v % len(node.input)] = names[(i + v) % len(names)]
        elif kind == "data" and g.initializer:
            init = g.initializer[i % len(g.initializer)]
            arrays = [np.full(3, np.nan, np.float32), np.zeros((0,), np.float32), np.array(3.0, np.float32),
                      np.arange(v % 7 + 1, dtype=np.int64), np.ones((2, 2, 2), np.float64)]
            init.CopyFrom(numpy_helper.from_array(arrays[v % len(arrays)], init.name))
        elif kind == "drop_node" and g.node:
            del g.node[i % len(g.node)]
        elif kind == "in_dim":
            dims = g.input[0].type.tensor_type.shape.dim
            dims[i % len(dims)].dim_value = abs(v)
        elif kind == "drop_input" and g.node:
            node = g.node[i % len(g.node)]
            if node.input:
                del node.input[v % len(node.input)]
    return m.SerializeToString()


@FUZZ
@given(onnx_edits())
def test_edited_onnx_graph(tmp_path, edits):
    event(check_load(_write(tmp_path, "edited.onnx", edit_onnx(_tiny_onnx(), edits)), "onnx"))


# -- out-of-process fuzzing (readers that can die of SIGSEGV) ------------------------
WORKER = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from lipsdp.io import load_network
from lipsdp.errors import LipSDPError
paths = json.loads(sys.stdin.read())
start = int(sys.argv[1])
for i in range(start, len(paths)):
    print("BEGIN", i, flush=True)
    try:
        load_network(paths[i], activation="relu").validate()
        out = "ok"
    except LipSDPError:
        out = "refused"
    except Exception as exc:
        text = str(exc).strip().splitlines()
        out = "CRASH " + type(exc).__name__ + (": " + text[0][:200] if text else "")
    print("END", i, out, flush=True)
"""


def run_isolated(paths: list[Path], timeout: float | None = None) -> dict[int, str]:
    """Load every file in a child process, restarting it after a native crash.

    ``timeout`` (per child) defaults to 300 s plus 2 s a file: a damaged .mat file is read
    in a process of its own (lipsdp.io.matfile), about a second each.

    Returns ``{index: outcome}`` with outcomes ``ok``, ``refused``, ``CRASH ...``
    (a Python exception) or ``SIGNAL n`` (the child died while loading it).
    """
    outcomes: dict[int, str] = {}
    start = 0
    timeout = 300.0 + 2.0 * len(paths) if timeout is None else timeout
    env = dict(os.environ, PYTHONFAULTHANDLER="")
    while start < len(paths):
        proc = subprocess.run([sys.executable, "-c", WORKER, str(start)], input=json.dumps([str(p) for p in paths]),
                              capture_output=True, text=True, timeout=timeout, env=env)
        current = None
        for line in proc.stdout.splitlines():
            parts = line.split(" ", 2)
            if parts[0] == "BEGIN":
                current = int(parts[1])
            elif parts[0] == "END":
                outcomes[int(parts[1])] = parts[2]
                current = None
        if proc.returncode == 0:
            break
        if current is None:  # died outside a load: a harness problem, not a finding
            raise RuntimeError(f"fuzz worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        outcomes[current] = f"SIGNAL {-proc.returncode}"
        start = current + 1
    return outcomes


def _mat_tags(data: bytes, start: int = 128, end: int | None = None, depth: int = 0):
    """Yield the data-type code of every MAT v5 element (little endian, uncompressed) in ``data[start:end]``."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end and depth < 8:
        first, nbytes = struct.unpack_from("<II", data, pos)
        if first >> 16:  # small data element: type and size packed in 4 bytes, data in the next 4
            yield first & 0xFFFF
            pos += 8
            continue
        yield first
        if first == 14:  # miMATRIX: sub-elements
            yield from _mat_tags(data, pos + 8, min(pos + 8 + nbytes, end), depth + 1)
        pos += 8 + nbytes + (-nbytes % 8 if first != 14 else 0)


MAT_TYPES = {1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 14, 15, 16, 17, 18}


@pytest.mark.parametrize("count", [EXAMPLES // 3, pytest.param(3 * EXAMPLES, marks=pytest.mark.slow)])
def test_damaged_mat_files(tmp_path, bases, count):
    """``scipy.io.loadmat`` segfaults on some damaged files (an element type code it does not range-check).

    Each file is read in a child process of its own (about half a second each): the default run takes
    ``EXAMPLES // 3`` files, ``-m slow`` nine times as many (the same seed, so a superset)."""
    rng = random.Random(0)
    base = bases["mat"].read_bytes()
    paths = []
    for i in range(count):
        if i % 5 == 0:  # random bytes behind a valid MAT header
            data = base[:128] + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 512)))
        else:
            ops = [(rng.choice(OPS), rng.randrange(2 ** 20), bytes([rng.randrange(256)] * rng.randrange(1, 5)))
                   for _ in range(rng.randrange(1, 5))]
            data = mutate(base, ops)
        paths.append(_write(tmp_path, f"m{i}.mat", data))
    outcomes = run_isolated(paths)
    assert len(outcomes) == len(paths)
    new = []
    for i, out in outcomes.items():
        if out.startswith("SIGNAL"):
            data = paths[i].read_bytes()
            if not set(_mat_tags(data)) <= MAT_TYPES:
                continue  # known: "mat-bad-type-code" (scipy reads a wild pointer), reproducer below
            new.append((paths[i], out))
        elif out.startswith("CRASH"):
            new.append((paths[i], out))
    assert not new, f"new loader crashes: {new}"


def test_damaged_torchscript_members(tmp_path, bases):
    """TorchScript archives with one member damaged (CRC valid), loaded in a child process.

    Resizing a tensor record (``data/N``) makes ``torch.jit.load`` read out of
    bounds: that known bug has its own reproducer and is not generated here.
    """
    rng = random.Random(1)
    base = bases["torchscript"].read_bytes()
    names = [i.filename for i in zipfile.ZipFile(io.BytesIO(base)).infolist()]
    paths = []
    for i in range(EXAMPLES):
        member = rng.randrange(len(names))
        tensor_record = "/data/" in names[member] and not names[member].endswith(".pkl")
        ops = [(rng.choice(("flip", "set") if tensor_record else OPS), rng.randrange(2 ** 20),
                bytes([rng.randrange(256)])) for _ in range(rng.randrange(1, 5))]
        paths.append(_write(tmp_path, f"t{i}.ts.pt", rezip(base, member, ops)))
    outcomes = run_isolated(paths)
    assert len(outcomes) == len(paths)
    bad = {str(paths[i]): out for i, out in outcomes.items() if out.startswith(("SIGNAL", "CRASH"))}
    assert not bad, f"new loader crashes: {bad}"


# -- reproducers of the known bugs ----------------------------------------------------
def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    return buf.getvalue()


def _zip_bad_utf8_name() -> bytes:
    d = bytearray(_zip_bytes())
    i = d.index(b"PK\x01\x02")  # central directory entry
    d[i + 9] |= 0x08  # general purpose flag bit 11: the name is UTF-8 ...
    d[i + 46] = 0xFF  # ... but it is not
    return bytes(d)


def _zip_future_version() -> bytes:
    d = bytearray(_zip_bytes())
    i = d.index(b"PK\x01\x02")
    d[i + 6] = 84  # "version needed to extract" 8.4
    return bytes(d)


def _onnx_undefined_weight() -> bytes:
    m = _tiny_onnx()
    m.graph.node[0].input[1] = "W_missing"  # no initializer, no node produces it
    return m.SerializeToString()


def _onnx_rank1_weight() -> bytes:
    m = _tiny_onnx()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones(3, np.float32), "W0"))
    return m.SerializeToString()


def _onnx_initializer_dims_mismatch() -> bytes:
    m = _tiny_onnx()
    m.graph.initializer[0].dims[:] = [4, 4]  # 12 floats of data for 16 declared
    return m.SerializeToString()


def _onnx_gemm_one_input() -> bytes:
    m = _tiny_onnx()
    del m.graph.node[0].input[1:]
    return m.SerializeToString()


def _onnx_batchnorm_three_inputs() -> bytes:
    m = _tiny_onnx()
    m.graph.node[1].op_type = "BatchNormalization"
    m.graph.node[1].input[:] = ["h", "b0", "b0"]
    return m.SerializeToString()


def _onnx_reshape_nan_shape() -> bytes:
    m = _tiny_onnx()
    m.graph.initializer.append(numpy_helper.from_array(np.array([np.nan, 4.0], np.float32), "shape"))
    m.graph.node.insert(1, helper.make_node("Reshape", ["h", "shape"], ["h2"], name="reshape"))
    m.graph.node[2].input[0] = "h2"
    return m.SerializeToString()


def _onnx_non_utf8_op_type() -> bytes:
    data = _tiny_onnx().SerializeToString()
    assert data.count(b"Relu") == 1
    return data.replace(b"Relu", b"R\xfdlu")  # protobuf hands the string back as bytes


KNOWN_CRASHES = [  # (id, file bytes, suffix, exception once raised, where): fixed, kept as regressions
    ("zip-bad-utf8-name", _zip_bad_utf8_name, ".pt", UnicodeDecodeError, "formats.py:_zip_format"),
    ("zip-future-version", _zip_future_version, ".pt", NotImplementedError, "formats.py:_zip_format"),
    ("onnx-undefined-weight", _onnx_undefined_weight, ".onnx", IndexError, "aten_linear.py:apply_last"),
    ("onnx-rank1-weight", _onnx_rank1_weight, ".onnx", IndexError, "aten_linear.py:apply_last"),
    ("onnx-initializer-dims", _onnx_initializer_dims_mismatch, ".onnx", ValueError, "onnx_.py:network_from_onnx"),
    ("onnx-gemm-one-input", _onnx_gemm_one_input, ".onnx", IndexError, "onnx_ops.py:_gemm"),
    ("onnx-batchnorm-arity", _onnx_batchnorm_three_inputs, ".onnx", ValueError, "onnx_ops.py:_batch_norm"),
    ("onnx-reshape-nan", _onnx_reshape_nan_shape, ".onnx", ValueError, "onnx_ops.py:_reshape"),
    ("onnx-non-utf8-op-type", _onnx_non_utf8_op_type, ".onnx", TypeError, "translator.py:Translator.entry"),
]


@pytest.mark.parametrize("name,build,suffix,raises,where", [pytest.param(*case, id=case[0]) for case in KNOWN_CRASHES])
def test_known_crash_reproducers(tmp_path, name, build, suffix, raises, where):
    with pytest.raises(LipSDPError):
        load_network(_write(tmp_path, name + suffix, build()))


def _isolated_outcome(path: Path) -> str:
    return run_isolated([path], timeout=120)[0]


def _ts_with_record(bases, tmp_path, keep: int) -> Path:
    """The TorchScript model with its last tensor record (``data/3``, the 2 floats of the output bias) cut."""
    src = zipfile.ZipFile(bases["torchscript"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            out.writestr(info.filename, data[:keep] if info.filename.endswith("/data/3") else data)
    return _write(tmp_path, f"cut{keep}.ts.pt", buf.getvalue())


def test_torchscript_empty_tensor_record_is_refused(tmp_path, bases):
    assert _isolated_outcome(_ts_with_record(bases, tmp_path, 0)) == "refused"


def test_torchscript_short_tensor_record_is_refused(tmp_path, bases):
    assert _isolated_outcome(_ts_with_record(bases, tmp_path, 4)) == "refused"


def test_export_empty_weight_record_is_refused(tmp_path, bases):
    src = zipfile.ZipFile(bases["export"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info.filename)
            out.writestr(info.filename, b"" if info.filename.endswith("weights/weight_0") else data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(LipSDPError):
            load_network(_write(tmp_path, "cut.pt2", buf.getvalue()))


def test_mat_bad_type_code_is_refused(tmp_path):
    d = bytearray(_mat_bytes())
    i = d.index(struct.pack("<II", 9, 4 * 3 * 8))  # the miDOUBLE data of weights{1} (4 x 3)
    d[i + 1] = 2  # type code 9 -> 521
    path = _write(tmp_path, "bad.mat", bytes(d))
    assert not set(_mat_tags(bytes(d))) <= MAT_TYPES  # the class the mat fuzz test tolerates
    assert _isolated_outcome(path) == "refused"
