"""Max pooling: translated exactly in every format (gather, GroupSort, selection; docs/math.md §2.5),
certified soundly, closed forms met, and what is not modelled refused."""

from __future__ import annotations

import numpy as np
import pytest

import lipsdp
from lipsdp.errors import UnsupportedLayerError

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
from torch import nn  # noqa: E402

from lipsdp.io import load_network  # noqa: E402
from lipsdp.testing import check_translation  # noqa: E402

from conftest import assert_sandwich, torch_jacobians, torch_lower_bound  # noqa: E402


class PoolIndices(nn.Module):
    """Uses max pooling's indices as values: not a Lipschitz map lipsdp can describe."""

    def forward(self, x):
        values, indices = nn.functional.max_pool2d(x, 2, return_indices=True)
        return values + indices.to(x.dtype)


def _cnn(pool: nn.Module, channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), pool, nn.Flatten()).eval()


POOLS = {
    "2x2": (nn.MaxPool2d(2), (1, 6, 6)),
    "3x3 stride 1 pad 1 (overlapping)": (nn.MaxPool2d(3, stride=1, padding=1), (1, 5, 5)),
    "3x3 stride 2 pad 1 dilation 2": (nn.MaxPool2d(3, stride=2, padding=1, dilation=2), (1, 7, 7)),
    "2x3 stride (1, 2)": (nn.MaxPool2d((2, 3), stride=(1, 2)), (1, 5, 6)),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_max_pooling_translates_exactly_in_every_format(name, tmp_path):
    pool, shape = POOLS[name]
    model = _cnn(pool)
    x = torch.randn(3, *shape)
    report = check_translation(model, x, folder=tmp_path, samples=8)
    assert not report.refused and not report.unfaithful, report
    assert max(report.errors.values()) < 1e-12


def test_ceil_mode_and_other_dimensions_translate_exactly(tmp_path):
    for sub in ("ceil", "one", "three"):
        (tmp_path / sub).mkdir()
    """ceil_mode (torch formats: onnx's reference evaluator gets the output size wrong), 1-D and 3-D pools."""
    model = _cnn(nn.MaxPool2d(2, stride=2, padding=1, ceil_mode=True))
    report = check_translation(model, torch.randn(2, 1, 5, 5), folder=tmp_path / "ceil", samples=8,
                               formats=("pickle", "trace", "script", "export"))
    assert max(report.errors.values()) < 1e-12
    one = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.MaxPool1d(3, stride=2), nn.Flatten()).eval()
    three = nn.Sequential(nn.Conv3d(1, 2, 2), nn.MaxPool3d(2), nn.Flatten()).eval()
    for model, x, sub in ((one, torch.randn(2, 2, 9), "one"), (three, torch.randn(2, 1, 5, 5, 5), "three")):
        report = check_translation(model, x, folder=tmp_path / sub, samples=8)
        assert max(report.errors.values()) < 1e-12


def test_disjoint_windows_certify_at_one():
    """Max pooling with disjoint windows is exactly 1-Lipschitz in l2: the bound is 1 (to solver accuracy)."""
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten()).eval()
    cert = lipsdp.certify(model, input_shape=(2, 4, 4))
    lower = torch_lower_bound(model, 32, shape=(2, 4, 4))
    assert_sandwich(cert, lower)
    assert lower == pytest.approx(1.0, rel=1e-12)
    assert cert.bound <= 1.0 + 1e-6


def test_overlapping_windows_are_not_taken_as_one_lipschitz():
    """Windows of 2 with stride 1 on 3 inputs share the middle one: moving it alone moves both outputs,
    so the constant is sqrt(2); a bound of 1 would be unsound."""
    model = nn.Sequential(nn.MaxPool1d(2, stride=1), nn.Flatten()).eval()
    cert = lipsdp.certify(model, input_shape=(1, 3))
    x = torch.tensor([[[0.0, 1.0, 0.0]]], dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: model(v).reshape(-1), x).reshape(2, 3).numpy()
    assert np.linalg.norm(J, 2) == pytest.approx(np.sqrt(2))
    assert cert.verified and cert.bound >= np.sqrt(2) * (1 - 1e-9)
    assert cert.bound <= cert.trivial_bound * (1 + 1e-9)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_cnn_with_max_pooling_sandwich(norm):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
                          nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, stride=1),
                          nn.Flatten(), nn.Linear(2, 3)).eval()
    cert = lipsdp.certify(model, input_shape=(1, 4, 4), norm=norm)
    if norm == "l2":
        lower = torch_lower_bound(model, 16, shape=(1, 4, 4), samples=256)
    else:
        x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        lower = float(np.abs(torch_jacobians(model, x, (1, 4, 4))).sum(axis=2).max())
    assert_sandwich(cert, lower)


def test_pooling_indices_are_refused(tmp_path):
    model = PoolIndices().eval()
    path = tmp_path / "indices.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 1, 4, 4),)), str(path))
    with pytest.raises(UnsupportedLayerError, match="indices"):
        load_network(path, input_shape=(1, 4, 4))


def test_onnx_ceil_mode_with_a_window_in_the_padding_is_refused(tmp_path):
    """k 2, stride 2, pad 1 on 3 inputs: the ONNX spec's ceil formula gives 3 outputs, torch gives 2."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
                            ceil_mode=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "ceil.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(UnsupportedLayerError, match="ceil_mode"):
        load_network(path)
