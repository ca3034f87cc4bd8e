"""Residual and DAG networks: the lifting handles skip connections from any saved format."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from conftest import assert_sandwich, torch_lower_bound


class TwoBlockResNet(nn.Module):
    """``y = C (x1 + U2 relu(V2 x1)), x1 = x + U1 relu(V1 x)``."""

    def __init__(self, dim=4, hidden=6, out=3):
        super().__init__()
        self.v1, self.u1 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.v2, self.u2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, out)

    def forward(self, x):
        x = x + self.u1(torch.relu(self.v1(x)))
        x = x + self.u2(torch.relu(self.v2(x)))
        return self.head(x)


class ConcatNet(nn.Module):
    """Two branches concatenated: ``[relu(A x); tanh(B x)]`` then a read-out."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 4), nn.Linear(3, 5), nn.Linear(9, 2)

    def forward(self, x):
        return self.out(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return TwoBlockResNet().eval()


def test_export_and_onnx_give_the_same_bound(resnet, tmp_path):
    example = torch.randn(2, 4)
    pt2, onnx_path = tmp_path / "res.pt2", tmp_path / "res.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(resnet, (example,)), str(pt2))
        torch.onnx.export(resnet, (example,), str(onnx_path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    a, b = lipsdp.certify(pt2), lipsdp.certify(onnx_path)
    assert a.verified and b.verified
    assert a.bound == pytest.approx(b.bound, rel=1e-5)
    assert not a.network["feedforward"]
    lower = torch_lower_bound(resnet, 4, samples=512, scale=2.0)
    assert_sandwich(a, lower)
    assert a.bound < a.trivial_bound


def test_residual_block_graph_has_chords(resnet):
    from lipsdp.io import network_from_module
    from lipsdp.lifting import lift

    lifting = lift(network_from_module(resnet))
    g = lifting.block_graph()
    # the second block's pre-activation sees the input and the first block: not a path any more
    assert g.has_edge(0, 2) and g.has_edge(1, 2)


def test_concat_branches():
    torch.manual_seed(1)
    model = ConcatNet().eval()
    cert = lipsdp.certify(model)
    assert_sandwich(cert, torch_lower_bound(model, 3, samples=512, scale=2.0))


def test_residual_vertex_max_below_bound():
    """x + U relu(V x): enumerate activation patterns; the SDP can't go below the worst one."""
    import itertools

    from lipsdp.network import Activation, Add, Affine, Input, Network

    rng = np.random.default_rng(2)
    V, U, C = rng.standard_normal((5, 3)), rng.standard_normal((3, 5)), rng.standard_normal((2, 3))
    net = Network()
    x = net.add(Input("x", "Input", (3,)))
    v = net.add(Affine("V", "Linear", (5,), weight=V), [x])
    h = net.add(Activation("relu", "ReLU", (5,), function="relu"), [v])
    u = net.add(Affine("U", "Linear", (3,), weight=U), [h])
    s = net.add(Add("add", "Add", (3,)), [x, u])
    net.add(Affine("C", "Linear", (2,), weight=C), [s])
    cert = lipsdp.certify(net)
    vertex = max(np.linalg.norm(C @ (np.eye(3) + U @ np.diag(d) @ V), 2)
                 for d in itertools.product((0.0, 1.0), repeat=5))
    assert vertex <= cert.bound * (1 + 1e-9) <= cert.trivial_bound * (1 + 1e-6)
