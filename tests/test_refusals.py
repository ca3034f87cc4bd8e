"""Translate or refuse, never ignore (issue 18, item 1): graph loaders refuse what they do not model exactly.

Each model is the real torch model, saved in every graph format that can express it (TorchScript script and
trace, ``torch.export``, ONNX), and the loader must refuse it with :class:`UnsupportedLayerError` naming the
layer; the safe casts (between floating types) must still give a correct certified bound (the sandwich).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from torch import nn  # noqa: E402

from conftest import assert_sandwich, torch_lower_bound  # noqa: E402
from lipsdp import certify  # noqa: E402
from lipsdp.errors import ModelLoadError, UnsupportedLayerError  # noqa: E402
from lipsdp.io import load_network  # noqa: E402
from lipsdp.network import Activation  # noqa: E402

GRAPH_FORMATS = ("script", "trace", "export", "onnx")


def save(model: nn.Module, tmp_path, fmt: str, shape=(4,)):
    """Write ``model`` (as it is, train or eval mode) in ``fmt``; return the path."""
    example = torch.randn((2,) + tuple(shape), generator=torch.Generator().manual_seed(0))
    path = tmp_path / f"model_{fmt}{dict(export='.pt2', onnx='.onnx').get(fmt, '.pt')}"
    with warnings.catch_warnings(), torch.no_grad():  # no_grad: autograd refuses integer intermediates
        warnings.simplefilter("ignore")
        if fmt == "script":
            torch.jit.save(torch.jit.script(model), str(path))
        elif fmt == "trace":
            torch.jit.save(torch.jit.trace(model, (example,), check_trace=False), str(path))
        elif fmt == "export":
            torch.export.save(torch.export.export(model, (example,)), str(path))
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}}, training=torch.onnx.TrainingMode.PRESERVE)
    return path


def assert_refused(path, *words: str):
    with pytest.raises(UnsupportedLayerError) as info:
        load_network(path)
    message = str(info.value)
    for word in words:
        assert word in message, message
    return message


class _Net(nn.Module):
    """``l2(middle(l1(x)))`` with ``middle`` given as a method of the subclass."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(self.middle(self.l1(x)))


class LongCast(_Net):
    def middle(self, x):
        return x.long().float()


class Int32Cast(_Net):
    def middle(self, x):
        return x.to(torch.int32).to(torch.float32)


class BoolCast(_Net):
    def middle(self, x):
        return x.to(torch.bool).float()


class TypeAsInt(_Net):
    def __init__(self):
        super().__init__()
        self.register_buffer("index", torch.zeros(1, dtype=torch.int64))

    def middle(self, x):
        return x.type_as(self.index).float()


class IntegerSum(_Net):
    def middle(self, x):
        return torch.sum(x.unsqueeze(2), dim=[2], dtype=torch.int64).float()  # truncates each entry


class Rounding(_Net):
    def middle(self, x):
        return torch.round(x) + torch.floor(x) + torch.ceil(x) + torch.sign(x)


class FloatCasts(_Net):
    def middle(self, x):
        return torch.relu(x.double().to(x.dtype).to(torch.float64).to(x.dtype))


# ---------------------------------------------------------------------------
# 1. discontinuous casts
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
@pytest.mark.parametrize("cls", [LongCast, Int32Cast, BoolCast, TypeAsInt, IntegerSum, Rounding])
def test_integer_casts_refused(cls, fmt, tmp_path):
    model = cls().eval()
    assert_refused(save(model, tmp_path, fmt))


@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
def test_float_casts_are_the_identity(fmt, tmp_path):
    model = FloatCasts().eval()
    cert = certify(save(model, tmp_path, fmt), solver="ipm")
    assert_sandwich(cert, torch_lower_bound(model, 4), rel=1e-6)


def test_onnx_cast_to_integer_refused(tmp_path):
    for to, refused in [(TensorProto.INT64, True), (TensorProto.BOOL, True), (TensorProto.INT8, True),
                        (TensorProto.DOUBLE, False), (TensorProto.FLOAT16, False)]:
        path = _onnx_model(tmp_path, [helper.make_node("Cast", ["h"], ["c"], to=to),
                                      helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)])
        if refused:
            assert_refused(path, "Cast")
        else:
            assert load_network(path).input_dim == 3


# ---------------------------------------------------------------------------
# 2. ONNX attributes, domains and opsets: declared, or refused
# ---------------------------------------------------------------------------
def _onnx_model(tmp_path, nodes, shape=(3,), out_shape=None, opset: int = 19, domains=()):
    """``x -> Gemm -> h -> nodes -> y`` as an ONNX file (``h`` has ``shape``)."""
    rng = np.random.default_rng(0)
    n = int(np.prod(shape))
    w = helper.make_tensor("w", TensorProto.FLOAT, (n, 3), rng.standard_normal((n, 3)).astype(np.float32).ravel())
    s = helper.make_tensor("s", TensorProto.INT64, (len(shape) + 1,), [-1, *shape])
    head = [helper.make_node("Gemm", ["x", "w"], ["g"], transB=1), helper.make_node("Reshape", ["g", "s"], ["h"])]
    graph = helper.make_graph(head + nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, s])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def _reference_map(path, n_in: int = 3):
    """The ONNX file's function through onnx's reference evaluator: ``f(x)`` for a batch, and its matrix."""
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(str(path))

    def f(x):
        return np.asarray(ref.run(None, {"x": np.asarray(x, np.float32)})[0], np.float64).reshape(len(x), -1)

    return f, (f(np.eye(n_in)) - f(np.zeros((1, n_in)))).T


POOLS = [  # (id, attributes, sample shape): dilated, padded, count_include_pad both ways, 1-D and 2-D
    ("issue-2x2-d2", dict(kernel_shape=[2, 2], dilations=[2, 2]), (1, 4, 4)),
    ("d2-pads-exclude", dict(kernel_shape=[3, 2], dilations=[2, 3], pads=[1, 2, 2, 1], strides=[1, 2]), (2, 5, 6)),
    ("d2-pads-include", dict(kernel_shape=[3, 2], dilations=[2, 3], pads=[1, 2, 2, 1], strides=[1, 2],
                             count_include_pad=1), (2, 5, 6)),
    ("1d-d3-stride2", dict(kernel_shape=[2], dilations=[3], strides=[2], pads=[2, 1]), (3, 9)),
    ("ceil-no-partial", dict(kernel_shape=[2, 2], dilations=[2, 1], strides=[2, 2], ceil_mode=1), (1, 7, 6)),
]


@pytest.mark.parametrize("attrs, shape", [p[1:] for p in POOLS], ids=[p[0] for p in POOLS])
def test_onnx_average_pool_dilations_modelled(attrs, shape, tmp_path):
    """opset 19 AveragePool with dilations was read as dilations 1 (bound 0.50 where the operator gives 0.85),
    then refused; it is a linear map (a dilated average), translated exactly: same function as onnx's
    reference evaluator, and the certified bound is the map's norm (the file is linear, so its Jacobian is
    its matrix and the sampled lower bound is exact)."""
    pool = helper.make_node("AveragePool", ["h"], ["p"], **attrs)
    path = _onnx_model(tmp_path, [pool, helper.make_node("Flatten", ["p"], ["y"])], shape=shape)
    net = load_network(path)
    f, jac = _reference_map(path)
    x = np.random.default_rng(1).standard_normal((16, 3))
    np.testing.assert_allclose(net.numpy_forward(x), f(x), rtol=1e-5, atol=1e-5)
    exact = float(np.linalg.norm(jac, 2))
    cert = certify(net, solver="ipm")
    assert_sandwich(cert, exact * (1 - 1e-5), rel=1e-6)
    assert cert.bound == pytest.approx(exact, rel=1e-4)


def test_onnx_average_pool_with_relu_sandwich(tmp_path):
    """Dilated pooling between nonlinear layers: sampled Jacobians of onnx's own evaluation <= bound."""
    nodes = [helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 0, 0]),
             helper.make_node("Flatten", ["p"], ["y"])]
    path = _onnx_model(tmp_path, nodes, shape=(1, 4, 4))
    f, _ = _reference_map(path)
    rng = np.random.default_rng(2)
    lower, step = 0.0, 1e-2
    for x0 in rng.standard_normal((64, 3)):
        jac = (f(x0 + step * np.eye(3)) - f(x0 - step * np.eye(3))).T / (2 * step)
        lower = max(lower, float(np.linalg.norm(jac, 2)))
    cert = certify(load_network(path), solver="ipm")
    assert_sandwich(cert, lower * (1 - 1e-3), rel=1e-6)


@pytest.mark.parametrize("attrs, words", [
    (dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), "ceil_mode"),            # partial last window
    (dict(kernel_shape=[2, 2], dilations=[2, 2], auto_pad="SAME_UPPER"), "auto_pad"),  # readings differ
    (dict(kernel_shape=[2, 2], dilations=[2, 2], auto_pad="VALID"), "auto_pad"),
    (dict(kernel_shape=[2, 2], dilations=[0, 1]), "dilations"),
    (dict(kernel_shape=[2, 2], pads=[-1, 0, 0, 0]), "pads"),
    (dict(kernel_shape=[2, 2], count_include_pad=2), "count_include_pad"),
])
def test_onnx_average_pool_options_refused(attrs, words, tmp_path):
    pool = helper.make_node("AveragePool", ["h"], ["p"], **attrs)
    assert_refused(_onnx_model(tmp_path, [pool, helper.make_node("Flatten", ["p"], ["y"])], shape=(1, 5, 5)),
                   "AveragePool", words)


@pytest.mark.parametrize("attrs, words", [
    (dict(kernel_shape=[2, 2], dilations=[0, 1]), "dilations"),
    (dict(kernel_shape=[2, 2], storage_order=2), "storage_order"),
    (dict(kernel_shape=[2, 2], auto_pad="SAME_UPPER", dilations=[2, 2]), "auto_pad"),
])
def test_onnx_max_pool_options_refused(attrs, words, tmp_path):
    """Max pooling is translated (tests/test_maxpool.py); what its handler does not model is refused."""
    pool = helper.make_node("MaxPool", ["h"], ["p"], **attrs)
    assert_refused(_onnx_model(tmp_path, [pool, helper.make_node("Flatten", ["p"], ["y"])], shape=(1, 5, 5)),
                   "MaxPool", words)


@pytest.mark.parametrize("node, words", [
    (helper.make_node("Relu", ["h"], ["y"], slope=0.5), ("Relu", "slope")),
    (helper.make_node("LeakyRelu", ["h"], ["y"], alpha=0.2, beta=1.0), ("LeakyRelu", "beta")),
    (helper.make_node("Flatten", ["h"], ["y"], axis=1, mode="x"), ("Flatten", "mode")),
    (helper.make_node("TopK", ["h", "k"], ["y", "i"], sorted=0), ("TopK", "sorted")),
])
def test_onnx_unknown_attributes_refused(node, words, tmp_path):
    k = helper.make_node("Constant", [], ["k"], value=helper.make_tensor("kv", TensorProto.INT64, (1,), [3]))
    assert_refused(_onnx_model(tmp_path, [k, node]), *words)


def test_onnx_every_unsupported_node_listed_at_once(tmp_path):
    nodes = [helper.make_node("AveragePool", ["h"], ["p"], kernel_shape=[2, 2], count_include_pad=2),
             helper.make_node("AveragePool", ["p"], ["q"], kernel_shape=[1, 1], dilations=[0, 3]),
             helper.make_node("Flatten", ["q"], ["y"])]
    message = assert_refused(_onnx_model(tmp_path, nodes, shape=(1, 4, 4)), "count_include_pad", "dilations")
    assert message.count("AveragePool") >= 2, message


def test_onnx_custom_domain_refused(tmp_path):
    node = helper.make_node("Relu", ["h"], ["y"], domain="com.example")
    assert_refused(_onnx_model(tmp_path, [node], domains=["com.example"]), "com.example")


def test_onnx_unknown_opset_refused(tmp_path):
    path = _onnx_model(tmp_path, [helper.make_node("Relu", ["h"], ["y"])], opset=5)
    with pytest.raises((UnsupportedLayerError, ModelLoadError), match="opset"):
        load_network(path)


# ---------------------------------------------------------------------------
# 3. training-mode operators
# ---------------------------------------------------------------------------
class DropoutNet(_Net):
    def __init__(self, kind):
        super().__init__()
        self.drop = kind(0.3)

    def middle(self, x):
        return self.drop(x)


class BatchNormNet(_Net):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(6)

    def middle(self, x):
        return self.bn(x)


@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
@pytest.mark.parametrize("kind", [nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout])
def test_dropout_in_training_mode_refused(kind, fmt, tmp_path):
    if fmt == "onnx" and kind is not nn.Dropout:
        pytest.skip("torch.onnx.export refuses alpha dropout in training mode itself")
    assert_refused(save(DropoutNet(kind).train(), tmp_path, fmt), "training")


@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
def test_dropout_in_eval_mode_is_the_identity(fmt, tmp_path):
    model = DropoutNet(nn.Dropout).eval()
    assert load_network(save(model, tmp_path, fmt)).output_dim == 3


@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
def test_batchnorm_in_training_mode_refused(fmt, tmp_path):
    assert_refused(save(BatchNormNet().train(), tmp_path, fmt), "training")


# ---------------------------------------------------------------------------
# 4. torch.max(a, b) is an unsupported layer, not a damaged file
# ---------------------------------------------------------------------------
class TwoTensorMax(_Net):
    def middle(self, x):
        return torch.max(x, -x) + torch.min(x, 2 * x) + torch.maximum(x, x + 1)


@pytest.mark.parametrize("fmt", GRAPH_FORMATS)
def test_two_tensor_max_is_unsupported(fmt, tmp_path):
    assert_refused(save(TwoTensorMax().eval(), tmp_path, fmt))


# ---------------------------------------------------------------------------
# 5. ONNX files without the onnx extra
# ---------------------------------------------------------------------------
def test_onnx_without_the_extra(tmp_path, monkeypatch):
    path = save(nn.Sequential(nn.Linear(4, 3)).eval(), tmp_path, "onnx")
    for name in [m for m in sys.modules if m == "onnx" or m.startswith("onnx.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModelLoadError, match=r"ONNX files need the onnx extra: pip install 'lipsdp\[onnx\]'"):
        load_network(path)


# ---------------------------------------------------------------------------
# a module is identified by where it is defined, not by its class name
# ---------------------------------------------------------------------------
class HouseHolder(nn.Module):
    """Not deel-torchlip's HouseHolder (a norm-preserving reflection): this one scales by 10."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(n // 2))

    def forward(self, x):
        return 10.0 * x


class Impostor(_Net):
    def __init__(self):
        super().__init__()
        self.act = HouseHolder()

    def middle(self, x):
        return self.act(x)


@pytest.mark.parametrize("fmt", ("script", "trace", "export"))
def test_module_identified_by_its_origin(fmt, tmp_path):
    model = Impostor().eval()
    net = load_network(save(model, tmp_path, fmt))
    assert not any(isinstance(op, Activation) for op in net.ops())  # no reflection was read into it
    cert = certify(net, solver="ipm")
    assert_sandwich(cert, torch_lower_bound(model, 4), rel=1e-6)


def test_aten_arguments_beyond_the_handler_refused():
    """A handler's parameters declare the arguments it models: an overload passing more is refused."""
    from lipsdp.io.aten_ops import Translator
    from lipsdp.io.builder import GraphBuilder, Label

    builder = GraphBuilder("t")
    t = Translator(builder)
    x = builder.input((4,), name="x")
    t.call(torch.ops.aten.dropout.default, [x, 0.1, False, 1.0], Label("drop", "Dropout"), 0)
    with pytest.raises(UnsupportedLayerError, match="drop.*4 arguments"):
        t.raise_errors()


# ---------------------------------------------------------------------------
# 6. whole-module pickles keep their mode, as the graph formats do
# ---------------------------------------------------------------------------
def _pickle(model, tmp_path, name="model.pt"):
    path = tmp_path / name
    torch.save(model, path)
    return path


@pytest.mark.parametrize("layer", [nn.Dropout(0.3), nn.AlphaDropout(0.3), nn.BatchNorm1d(6)],
                         ids=["dropout", "alpha-dropout", "batchnorm"])
def test_pickle_in_training_mode_refused(layer, tmp_path):
    """Was read in eval semantics (the loader switched the copy to eval) while script/trace/export refuse it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), layer, nn.ReLU(), nn.Linear(6, 3)).train()
    message = assert_refused(_pickle(model, tmp_path), "training mode", "model.eval()", "1 (#2")
    assert message.count("training mode") == 1, message    # only the mode-dependent layer is named
    assert load_network(_pickle(model.eval(), tmp_path, "eval.pt")).output_dim == 3


def test_pickle_in_a_checkpoint_in_training_mode_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model, "epoch": 3}, path)
    with pytest.raises(UnsupportedLayerError, match="Dropout in training mode"):
        load_network(path, trust_pickle=True)


def test_pickle_in_training_mode_without_mode_dependent_layers_accepted(tmp_path):
    """Linear and ReLU compute the same in either mode: the flag is irrelevant, the bound is the model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().train()
    net = load_network(_pickle(model, tmp_path))
    cert = certify(net, solver="ipm")
    assert_sandwich(cert, torch_lower_bound(model, 4), rel=1e-6)


class NoisyInTraining(nn.Module):
    """User code whose forward reads ``self.training`` (no torch dropout module inside)."""

    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


def test_pickle_with_user_code_reading_training_refused(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), NoisyInTraining(), nn.Linear(6, 3)).train()
    with pytest.raises(UnsupportedLayerError, match="NoisyInTraining in training mode"):
        load_network(_pickle(model, tmp_path), trust_pickle=True)


def test_spectral_norm_parametrization_depends_on_the_mode():
    """torch's spectral-norm parametrization runs a power iteration on every forward in training mode
    (such modules cannot be pickled whole; the check itself is what a pickle of one would meet)."""
    from torch.nn.utils.parametrizations import spectral_norm

    from lipsdp.io.torch_module import training_mode_layers

    model = nn.Sequential(spectral_norm(nn.Linear(4, 6)), nn.ReLU(), nn.Linear(6, 3))
    assert [kind.split()[0] for _, _, kind in training_mode_layers(model.train())] == ["_SpectralNorm"]
    assert training_mode_layers(model.eval()) == []


def test_conformance_suite_reports_training_mode_pickle_refused():
    from lipsdp.testing import check_translation

    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3), nn.Linear(6, 3)).train()
    report = check_translation(model, torch.randn(2, 4), formats=("pickle", "export"), allow_refusal=True)
    assert set(report.refused) == {"pickle", "export"} and not report.errors, report
    assert "model.eval()" in report.refused["pickle"]
