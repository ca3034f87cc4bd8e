"""Tests of lipsdp.io: every save format gives a Network that computes what the torch model computes."""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from scipy.special import erf

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lipsdp.errors import (  # noqa: E402
    InvalidNetworkError,
    ModelLoadError,
    UnsafeModelError,
    UnsupportedLayerError,
)
from lipsdp.io import detect_format, load_network, network_from_module  # noqa: E402
from lipsdp.network import Activation, Add, Affine, Concat, Input, Reshape, concat_permutation  # noqa: E402

from models import ACTIVATIONS, mlp, residual_mlp, save_all_formats, torch_forward  # noqa: E402

ANCHORS = Path("/work/shared/anchors")
REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


# ---------------------------------------------------------------------------
# an independent numpy evaluator of the IR (the semantics each function key promises)
# ---------------------------------------------------------------------------
def _phi(z: np.ndarray, function: str, p: dict) -> np.ndarray:
    if function == "relu":
        return np.maximum(z, 0)
    if function == "leaky_relu":
        return np.where(z > 0, z, p["negative_slope"] * z)
    if function == "tanh":
        return np.tanh(z)
    if function == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if function == "elu":
        return np.where(z > 0, z, p["alpha"] * np.expm1(np.minimum(z, 0)))
    if function == "softplus":
        bz = p["beta"] * z
        return np.where(bz > p["threshold"], z, np.log1p(np.exp(np.minimum(bz, p["threshold"]))) / p["beta"])
    if function == "hardtanh":
        return np.clip(z, p["min_val"], p["max_val"])
    if function == "silu":
        return z / (1 + np.exp(-z))
    if function == "gelu":
        if p["approximate"] == "tanh":
            return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
        return 0.5 * z * (1 + erf(z / np.sqrt(2)))
    if function == "groupsort":  # ascending sort of consecutive groups
        g = p["group_size"]
        return np.sort(z.reshape(len(z), -1, g), axis=2).reshape(len(z), -1)
    if function == "householder":  # coordinate k pairs with k + n/2
        h = z.shape[1] // 2
        x, y, th = z[:, :h], z[:, h:], p["theta"]
        flip = x * np.sin(th / 2) - y * np.cos(th / 2) > 0
        a = np.where(flip, x * np.cos(th) + y * np.sin(th), x)
        b = np.where(flip, x * np.sin(th) - y * np.cos(th), y)
        return np.concatenate([a, b], axis=1)
    raise NotImplementedError(function)


def forward(net, x: np.ndarray) -> np.ndarray:
    """Evaluate ``net`` on a batch with numpy, independently of lipsdp.constraints."""
    values = {}
    for n in net.graph.nodes:
        op, parents = net.op(n), net.parents(n)
        ins = [values[q] for q in parents]
        if isinstance(op, Input):
            y = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        elif isinstance(op, Affine):
            y = np.asarray((op.weight @ ins[0].T).T) + (0 if op.bias is None else op.bias)
        elif isinstance(op, Reshape):
            y = ins[0]
        elif isinstance(op, Add):
            y = sum(ins)
        elif isinstance(op, Concat):
            y = np.concatenate(ins, axis=1)[:, concat_permutation([net.op(q).shape for q in parents], op.axis)]
        else:
            y = _phi(ins[0], op.function, op.params)
        values[n] = y
    return values[net.output]


def assert_same(net, model, input_shape, n: int = 7, seed: int = 0):
    x = np.random.default_rng(seed).standard_normal((n,) + tuple(input_shape))
    np.testing.assert_allclose(forward(net, x), torch_forward(model, x, input_shape), atol=ATOL, rtol=0)
    net.validate()
    assert net.input_dim == int(np.prod(input_shape))


def functions(net) -> list[str]:
    return [op.function for op in net.ops() if isinstance(op, Activation)]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------
# every format, same numbers
# ---------------------------------------------------------------------------
GRAPH_FORMATS = ["pickle", "torchscript", "export", "onnx"]


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory):
    model = mlp([5, 8, 6, 3], "relu", seed=1)
    return model, save_all_formats(model, tmp_path_factory.mktemp("mlp"), (5,))


@pytest.mark.parametrize("fmt", GRAPH_FORMATS + ["checkpoint", "state_dict"])
def test_mlp_every_format(mlp_files, fmt):
    model, paths = mlp_files
    assert detect_format(str(paths[fmt])) == {"checkpoint": "pickle", "state_dict": "pickle"}.get(fmt, fmt)
    net = load_network(paths[fmt], activation="relu")
    assert_same(net, model, (5,))
    assert functions(net) == ["relu", "relu"]
    assert net.is_feedforward()
    affines = [op for op in net.ops() if isinstance(op, Affine)]
    np.testing.assert_allclose(affines[0].weight, model[0].weight.detach().double().numpy(), atol=0)
    assert affines[0].weight.dtype == np.float64 and affines[0].weight.shape == (8, 5)


def test_network_from_module(mlp_files):
    model, _ = mlp_files
    net = network_from_module(model)
    assert_same(net, model, (5,))
    assert [op.kind for op in net.ops()] == ["Input", "Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [op.name for op in net.ops()][1:3] == ["0", "1"]


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_numpy_forward_agrees(activation):
    """Network.numpy_forward (through lipsdp.constraints) reproduces the torch model."""
    model = mlp([4, 6, 5, 3], activation, seed=18)
    net = network_from_module(model)
    x = np.random.default_rng(1).standard_normal((6, 4))
    try:
        y = net.numpy_forward(x)
    except (ImportError, KeyError, NotImplementedError) as exc:
        pytest.skip(f"lipsdp.constraints cannot evaluate {activation} yet ({exc!r})")
    np.testing.assert_allclose(y, torch_forward(model, x), atol=ATOL, rtol=0)


def test_load_does_not_modify_model(mlp_files):
    model, _ = mlp_files
    model.train()
    network_from_module(model)
    assert model.training
    model.eval()


@pytest.fixture(scope="module")
def residual_files(tmp_path_factory):
    model = residual_mlp(4, 8, 3, seed=2)
    return model, save_all_formats(model, tmp_path_factory.mktemp("res"), (4,))


@pytest.mark.parametrize("fmt", ["api", "torchscript", "export", "onnx"])
def test_residual(residual_files, fmt):
    model, paths = residual_files
    net = network_from_module(model) if fmt == "api" else load_network(paths[fmt])
    assert_same(net, model, (4,))
    assert sum(isinstance(op, Add) for op in net.ops()) == 1
    assert not net.is_feedforward()


def test_residual_pickle_needs_trust(residual_files):
    model, paths = residual_files
    with pytest.raises(UnsafeModelError, match=r"models\.ResidualMLP.*--trust-pickle.*TorchScript"):
        load_network(paths["pickle"])
    net = load_network(paths["pickle"], trust_pickle=True)
    assert_same(net, model, (4,))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("fmt", ["api", "onnx"])
def test_activations(activation, fmt, tmp_path):
    model = mlp([4, 6, 3], activation, seed=3)
    if fmt == "api":
        net = network_from_module(model)
    else:
        torch.onnx.export(model, (torch.randn(2, 4),), str(tmp_path / "m.onnx"), dynamo=False)
        net = load_network(tmp_path / "m.onnx")
    assert_same(net, model, (4,))
    assert functions(net) == [activation]
    params = next(op for op in net.ops() if isinstance(op, Activation)).params
    # ONNX Softplus has no switch: lipsdp reads it with threshold 1000, where float64's softplus is x
    expected = {"leaky_relu": {"negative_slope": 0.1}, "elu": {"alpha": 1.0},
                "softplus": {"beta": 1.0, "threshold": 1000.0 if fmt == "onnx" else 20.0}, "hardtanh": {"min_val": -1.0, "max_val": 1.0},
                "gelu": {"approximate": "none"}}.get(activation, {})
    assert params.keys() == expected.keys()
    for key, value in expected.items():
        assert params[key] == (pytest.approx(value) if isinstance(value, float) else value)


def test_more_activation_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.ELU(0.5), nn.Linear(4, 4), nn.Softplus(beta=2.0, threshold=30.0),
                          nn.Linear(4, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 4), nn.ReLU6(),
                          nn.Linear(4, 2)).eval()
    net = network_from_module(model)
    assert_same(net, model, (3,))
    acts = [op.params for op in net.ops() if isinstance(op, Activation)]
    assert acts == [{"alpha": 0.5}, {"beta": 2.0, "threshold": 30.0}, {"approximate": "tanh"},
                    {"min_val": 0.0, "max_val": 6.0}]
    # issue 18: threshold 5 makes torch's Softplus jump by 3.4e-3 at x = 2.5 (no Lipschitz constant)
    model[3] = nn.Softplus(beta=2.0, threshold=5.0)
    with pytest.raises(UnsupportedLayerError, match="jumps by 0.00336"):
        network_from_module(model)


@pytest.fixture(scope="module")
def bn_model():
    torch.manual_seed(4)
    bn = nn.BatchNorm1d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), bn, nn.Dropout(0.3), nn.Identity(), nn.LeakyReLU(0.2),
                         nn.Linear(8, 3)).eval()


@pytest.mark.parametrize("fmt", ["api"] + GRAPH_FORMATS)
def test_batchnorm_dropout_flatten(bn_model, fmt, tmp_path):
    paths = save_all_formats(bn_model, tmp_path, (3, 4)) if fmt != "api" else {}
    net = network_from_module(bn_model, (3, 4)) if fmt == "api" else load_network(paths[fmt])
    assert_same(net, bn_model, (3, 4))
    kinds = [op.kind for op in net.ops() if isinstance(op, Affine)]
    assert len(kinds) == 2 and "BatchNorm" in kinds[0]  # Linear and BatchNorm folded into one Affine


def test_batchnorm_alone_is_affine():
    torch.manual_seed(5)
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), bn, nn.Linear(4, 2)).eval()
    net = network_from_module(model)
    assert_same(net, model, (3,))
    assert any(op.kind == "BatchNorm1d+Linear" for op in net.ops())


def test_export_variants(bn_model, tmp_path):
    """Programs with a dynamic batch axis, and programs saved after run_decompositions (core ATen)."""
    example = torch.randn(2, 3, 4)
    dynamic = torch.export.export(bn_model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(dynamic, str(tmp_path / "dynamic.pt2"))
    assert_same(load_network(tmp_path / "dynamic.pt2"), bn_model, (3, 4))
    torch.export.save(torch.export.export(bn_model, (example,)).run_decompositions(), str(tmp_path / "core.pt2"))
    assert_same(load_network(tmp_path / "core.pt2"), bn_model, (3, 4))
    with pytest.raises(ModelLoadError, match=r"exported for inputs of shape \(3, 4\), not \(12,\)"):
        load_network(tmp_path / "core.pt2", input_shape=(12,))


def test_onnx_dynamo_exporter(bn_model, tmp_path):
    pytest.importorskip("onnxscript")
    torch.onnx.export(bn_model, (torch.randn(2, 3, 4),), str(tmp_path / "d.onnx"), dynamo=True, verbose=False)
    assert_same(load_network(tmp_path / "d.onnx"), bn_model, (3, 4))


def test_checkpoint_dict_with_module(tmp_path):
    model = mlp([3, 5, 2], "tanh", seed=6)
    torch.save({"model": model, "epoch": 2}, tmp_path / "ckpt.pt")
    net = load_network(tmp_path / "ckpt.pt")
    assert_same(net, model, (3,))
    assert functions(net) == ["tanh"]


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_checkpoint_state_dict_keys(tmp_path, key):
    model = mlp([3, 5, 4, 2], "relu", seed=7)
    torch.save({key: model.state_dict(), "optimizer": {"lr": 0.1}}, tmp_path / "c.pt")
    net = load_network(tmp_path / "c.pt", activation="leaky_relu", activation_params={"negative_slope": 0.0})
    assert functions(net) == ["leaky_relu", "leaky_relu"]
    assert_same(net, model, (3,))


# ---------------------------------------------------------------------------
# deel-torchlip layers
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchlip_model():
    tl = pytest.importorskip("deel.torchlip")
    torch.manual_seed(8)
    with warnings.catch_warnings():  # torchlip warns about the plain Linear layers
        warnings.simplefilter("ignore")
        model = tl.Sequential(tl.SpectralLinear(4, 6), tl.GroupSort2(), tl.FrobeniusLinear(6, 6), tl.GroupSort(3),
                              tl.SpectralLinear(6, 8), tl.MaxMin(), nn.Linear(16, 8), tl.HouseHolder(8),
                              tl.FullSort(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[7].theta.uniform_(0, 6)
    return model


def _check_torchlip(net, model):
    assert_same(net, model, (4,))
    acts = [op for op in net.ops() if isinstance(op, Activation)]
    assert [(a.function, a.kind) for a in acts] == [
        ("groupsort", "GroupSort2"), ("groupsort", "GroupSort"), ("relu", "MaxMin"),
        ("householder", "HouseHolder"), ("groupsort", "FullSort")]
    assert [a.params.get("group_size") for a in acts] == [2, 3, None, None, 8]
    hh = acts[3].params
    assert hh["pairing"] == "halves"
    np.testing.assert_allclose(hh["theta"], model[7].theta.detach().double().numpy(), rtol=1e-6)
    # MaxMin = relu([W; -W] x): one Affine with stacked rows feeding the relu
    pre = net.op(net.parents(net.activations()[2])[0])
    assert pre.size == 16 and np.allclose(pre.weight[:8], -pre.weight[8:])


@pytest.mark.parametrize("fmt", ["api", "torchscript", "export"])
def test_torchlip_layers(torchlip_model, fmt, tmp_path):
    example = torch.randn(2, 4)
    if fmt == "api":
        net = network_from_module(torchlip_model)
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.trace(torchlip_model, (example,)), str(tmp_path / "m.ts"))
        net = load_network(tmp_path / "m.ts")
    else:
        torch.export.save(torch.export.export(torchlip_model, (example,)), str(tmp_path / "m.pt2"))
        net = load_network(tmp_path / "m.pt2")
    _check_torchlip(net, torchlip_model)
    assert [op.kind for op in net.ops() if isinstance(op, Affine)][0] == "SpectralLinear"


def test_torchlip_vanilla_pickle(torchlip_model, tmp_path):
    vanilla = torchlip_model.vanilla_export().eval()
    torch.save(vanilla, tmp_path / "v.pt")
    _check_torchlip(load_network(tmp_path / "v.pt"), vanilla)


def test_torchlip_parametrized_state_dict(torchlip_model, tmp_path):
    torch.save(torchlip_model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="parametrized.*vanilla_export"):
        load_network(tmp_path / "sd.pt", activation="relu")


@pytest.mark.parametrize("fmt", ["api", "torchscript"])
def test_torchlip_on_feature_maps(fmt, tmp_path):
    """GroupSort, HouseHolder and MaxMin act along the channel axis of (N, C, H, W) tensors."""
    tl = pytest.importorskip("deel.torchlip")
    torch.manual_seed(19)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), tl.GroupSort2(), nn.Conv2d(4, 6, 2), tl.HouseHolder(6),
                          tl.GroupSort(3), tl.MaxMin(), nn.Flatten(), nn.Linear(12 * 3 * 3, 2)).eval()
    with torch.no_grad():
        model[3].theta.uniform_(0, 6)
    if fmt == "torchscript":
        torch.jit.save(torch.jit.trace(model, (torch.randn(2, 1, 6, 6),)), str(tmp_path / "m.ts"))
        net = load_network(tmp_path / "m.ts", input_shape=(1, 6, 6))
    else:
        net = network_from_module(model, (1, 6, 6))
    assert_same(net, model, (1, 6, 6))
    assert functions(net) == ["groupsort", "householder", "groupsort", "relu"]
    assert net.op(net.activations()[1]).params["theta"].shape == (3 * 3 * 3,)


def test_groupsort_onnx(tmp_path):
    tl = pytest.importorskip("deel.torchlip")
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 6), tl.GroupSort2(), nn.Linear(6, 6), tl.GroupSort(3), nn.Linear(6, 4),
                          tl.MaxMin(), nn.Linear(8, 2)).eval()
    torch.onnx.export(model, (torch.randn(2, 4),), str(tmp_path / "g.onnx"), dynamo=False)
    net = load_network(tmp_path / "g.onnx")
    assert_same(net, model, (4,))
    assert functions(net) == ["groupsort", "groupsort", "relu"]


# ---------------------------------------------------------------------------
# custom forward, convolutions, TorchScript scripting
# ---------------------------------------------------------------------------
class Functional(nn.Module):
    """Concatenation, slicing, view, SiLU written as x * sigmoid(x), constants."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(6, 3)
        self.c = nn.Linear(16, 2)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x)) * 2 + 1, x * torch.sigmoid(x), x[:, :2]], dim=1)
        return self.c(h) - 0.5


@pytest.mark.parametrize("fmt", ["api", "torchscript", "export", "onnx"])
def test_functional_forward(fmt, tmp_path):
    torch.manual_seed(10)
    model = Functional().eval()
    paths = save_all_formats(model, tmp_path, (2, 3)) if fmt != "api" else {}
    net = network_from_module(model, (2, 3)) if fmt == "api" else load_network(paths[fmt], input_shape=(2, 3))
    assert_same(net, model, (2, 3))
    assert sorted(functions(net)) == ["relu", "silu", "tanh"]
    assert sum(isinstance(op, Concat) for op in net.ops()) == 1


@pytest.fixture(scope="module")
def conv_model():
    torch.manual_seed(11)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(3, 4, 2, groups=1),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4, 3)).eval()


@pytest.mark.parametrize("fmt", ["api"] + GRAPH_FORMATS)
def test_convolution_unrolled(conv_model, fmt, tmp_path):
    paths = save_all_formats(conv_model, tmp_path, (1, 7, 7)) if fmt != "api" else {}
    net = (network_from_module(conv_model, (1, 7, 7)) if fmt == "api"
           else load_network(paths[fmt], input_shape=(1, 7, 7)))
    assert_same(net, conv_model, (1, 7, 7))
    assert net.op(1).shape == (3, 4, 4)


def test_convolution_variants():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding="same", dilation=2, groups=2), nn.Tanh(),
                          nn.Identity(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 2)).eval()
    net = network_from_module(model, (4, 5, 6))
    assert_same(net, model, (4, 5, 6))
    big = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 2)).eval()
    net = network_from_module(big, (3, 32, 32))
    conv = net.op(1)
    assert sp.issparse(conv.weight) and conv.weight.shape == (16 * 32 * 32, 3 * 32 * 32)
    assert conv.weight.nnz <= 16 * 32 * 32 * 27
    assert_same(net, big, (3, 32, 32), n=2)


def test_conv_needs_input_shape(conv_model):
    with pytest.raises(ModelLoadError, match="input_shape"):
        network_from_module(conv_model)


def test_torchscript_scripted(tmp_path):
    tl = pytest.importorskip("deel.torchlip")
    torch.manual_seed(13)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.1), nn.LeakyReLU(0.2),
                          nn.Linear(6, 6), tl.GroupSort(3), nn.Linear(6, 2)).eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "s.pt"))
    net = load_network(tmp_path / "s.pt")
    assert_same(net, model, (4,))
    torch.jit.save(torch.jit.script(residual_mlp(seed=14)), str(tmp_path / "r.pt"))
    assert_same(load_network(tmp_path / "r.pt"), residual_mlp(seed=14), (4,))


# ---------------------------------------------------------------------------
# LipSDP .mat files (published anchors)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, sizes, naive", [("lipsdp_random_weights.mat", [2, 10, 30, 20, 2], 43.306),
                                                ("lipsdp_mnist_weights.mat", [784, 50, 10], 31.504)])
def test_lipsdp_mat_anchor(name, sizes, naive):
    path = ANCHORS / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    net = load_network(path, activation="relu")
    weights = [op.weight for op in net.ops() if isinstance(op, Affine)]
    assert [weights[0].shape[1]] + [w.shape[0] for w in weights] == sizes
    raw = scipy.io.loadmat(path)["weights"][0]
    for w, r in zip(weights, raw):
        np.testing.assert_array_equal(w, r)
    assert all(op.bias is None for op in net.ops() if isinstance(op, Affine))
    assert np.prod([np.linalg.norm(w, 2) for w in weights]) == pytest.approx(naive, abs=1e-3)
    with pytest.raises(ModelLoadError, match=r"holds only weights.*--activation relu"):
        load_network(path)


def test_mat_without_weights(tmp_path):
    scipy.io.savemat(tmp_path / "w.mat", {"W": np.eye(2)})
    with pytest.raises(ModelLoadError, match="no variable 'weights'.*found: W"):
        load_network(tmp_path / "w.mat", activation="relu")


# ---------------------------------------------------------------------------
# ONNX specifics: external data, absurd shapes
# ---------------------------------------------------------------------------
def test_onnx_external_data(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = mlp([6, 7, 2], "tanh", seed=15)
    torch.onnx.export(model, (torch.randn(1, 6),), str(tmp_path / "tmp.onnx"), dynamo=False)
    proto = onnx.load(str(tmp_path / "tmp.onnx"))
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(proto, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    assert (folder / "m.data").exists()
    assert_same(load_network(folder / "m.onnx"), model, (6,))


def _external_model(tmp_path, location: str, dims=(7, 6)):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(dims))
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(4 * int(np.prod(dims)))}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dims[1]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, dims[0]])], [weight])
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    return path


def test_onnx_external_data_outside_folder(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4 * 42)
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _external_model(inner, "../secret.bin")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_network(path)
    path = _external_model(inner, str(secret))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_network(path)


def test_onnx_absurd_shape(tmp_path):
    path = _external_model(tmp_path, "w.bin", dims=(200_000, 100_000))
    with pytest.raises(ModelLoadError, match="refusing"):
        load_network(path)


def test_onnx_missing_external_file(tmp_path):
    with pytest.raises(ModelLoadError, match="missing"):
        load_network(_external_model(tmp_path, "absent.bin"))


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_network(tmp_path / "nope.pt")


def test_text_file(tmp_path):
    (tmp_path / "model.pt").write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match="not a model file"):
        load_network(tmp_path / "model.pt")


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_network(tmp_path / "empty.pt")
    with pytest.raises(ModelLoadError, match="directory"):
        load_network(tmp_path)


@pytest.mark.parametrize("fmt", ["pickle", "torchscript", "export", "checkpoint", "onnx"])
def test_truncated_file(mlp_files, fmt, tmp_path):
    data = mlp_files[1][fmt].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="cut.pt"):
        load_network(tmp_path / "cut.pt")


def test_state_dict_without_activation(mlp_files):
    with pytest.raises(ModelLoadError) as info:
        load_network(mlp_files[1]["state_dict"])
    message = str(info.value)
    assert "model.state.pt holds only weights" in message
    assert "3 weight matrices, 5 -> 8 -> 6 -> 3" in message
    assert "--activation relu" in message and "torch.save(model)" in message
    assert "\n" not in message


def test_state_dict_shapes_do_not_chain(tmp_path):
    state = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4), "b.weight": torch.zeros(2, 5)}
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="b is 2x5 but a gives 4 values"):
        load_network(tmp_path / "bad.pt", activation="relu")


def test_state_dict_of_convolutions(tmp_path):
    torch.save(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)).state_dict(), tmp_path / "c.pt")
    with pytest.raises(ModelLoadError, match=r"cannot use \(0.weight \(2, 1, 3, 3\)"):
        load_network(tmp_path / "c.pt", activation="relu")


def _two_unsupported():
    torch.manual_seed(16)
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.ReLU(), nn.Linear(5, 3), nn.Softmax(dim=1)).eval()


@pytest.mark.parametrize("fmt", ["api", "pickle", "torchscript", "export", "onnx"])
def test_all_unsupported_layers_listed(fmt, tmp_path):
    model = _two_unsupported()
    paths = save_all_formats(model, tmp_path, (4,)) if fmt != "api" else {}
    with pytest.raises(UnsupportedLayerError) as info:
        network_from_module(model) if fmt == "api" else load_network(paths[fmt])
    message = str(info.value)
    assert "LayerNorm" in message and "Softmax" in message.replace("softmax", "Softmax"), message
    assert len(info.value.layers) == 2
    if fmt in ("api", "pickle"):
        assert info.value.layers == [("1", 1, "LayerNorm"), ("4", 4, "Softmax")]


def test_unsupported_op_in_custom_forward():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            y = self.fc(x)
            return torch.cat([y * y, torch.sin(x)], dim=1)

    with pytest.raises(UnsupportedLayerError, match=r"mul.*sin|sin.*mul"):
        network_from_module(Bad().eval())


def test_nan_weight(tmp_path):
    model = mlp([3, 4, 2], seed=17)
    with torch.no_grad():
        model[2].weight[0, 1] = float("nan")
    with pytest.raises(InvalidNetworkError, match=r"2 \(Linear\) has NaN"):
        network_from_module(model)
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    with pytest.raises(InvalidNetworkError, match="NaN"):
        load_network(tmp_path / "nan.pt", activation="relu")


class _Exploit:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned"
    for name, payload in [("zip.pt", {"state_dict": _Exploit(target)}), ("whole.pt", _Exploit(target))]:
        torch.save(payload, tmp_path / name)
        with pytest.raises(UnsafeModelError, match="--trust-pickle"):
            load_network(tmp_path / name)
        assert not target.exists()
    # legacy (non-zip) serialisation and a raw pickle
    torch.save({"x": _Exploit(target)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(_Exploit(target), protocol=2))
    for name in ("legacy.pt", "raw.pkl"):
        with pytest.raises(UnsafeModelError):
            load_network(tmp_path / name)
        assert not target.exists()


def test_trusted_pickle_of_unimportable_class(tmp_path):
    code = ("import torch, torch.nn as nn\nclass MyNet(nn.Module):\n    def __init__(self):\n"
            "        super().__init__(); self.fc = nn.Linear(2, 2)\n    def forward(self, x): return self.fc(x)\n"
            f"torch.save(MyNet(), {str(tmp_path / 'my.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(UnsafeModelError, match=r"__main__\.MyNet.*--trust-pickle"):
        load_network(tmp_path / "my.pt")
    with pytest.raises(ModelLoadError, match="not importable"):
        load_network(tmp_path / "my.pt", trust_pickle=True)


def test_zip_that_is_not_a_model(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.pt", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ModelLoadError, match="not one written by torch.save"):
        load_network(tmp_path / "x.pt")


def test_import_is_light():
    code = "import sys, lipsdp.io; assert 'torch' not in sys.modules and 'onnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_digits_example():
    path = REPO / "examples" / "digits_mlp.pt"
    if not path.exists():
        pytest.skip("run examples/make_example.py first")
    net = load_network(path)
    assert [op.size for op in net.ops() if isinstance(op, Affine)] == [32, 32, 10]
    assert net.input_dim == 64 and functions(net) == ["relu", "relu"]
