"""``lipsdp.bounds.jacobians``: reverse mode where outputs are fewer than inputs, forward mode otherwise.

Both are checked against torch autograd on the real model: the sampled lower bound that every
certificate reports (and that the sandwich tests trust) is only as good as these Jacobians.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from lipsdp import bounds  # noqa: E402
from lipsdp.io import network_from_module  # noqa: E402

from conftest import torch_jacobians  # noqa: E402
from models import mlp, residual_mlp  # noqa: E402


class _Branches(nn.Module):
    """Concatenated branches, a residual sum and a reshape: every node kind reverse mode handles."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 5), nn.Linear(12, 4)
        self.mix = nn.Linear(9, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        h = x + self.mix(h)
        return self.out(nn.functional.leaky_relu(h.reshape(-1, 3, 4), 0.2).flatten(1))


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ELU(),
                          nn.Conv2d(4, 6, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model.eval()


CASES = [
    ("mlp", lambda: mlp([20, 16, 16, 3], activation="tanh"), (20,)),
    ("residual", lambda: residual_mlp(dim=6, hidden=8, n_out=2), (6,)),
    ("branches", _Branches, (12,)),
    ("cnn", _cnn, (1, 8, 8)),
]


@pytest.mark.parametrize("name,build,shape", CASES, ids=[c[0] for c in CASES])
def test_reverse_mode_matches_autograd_and_forward_mode(name, build, shape):
    model = build()
    net = network_from_module(model, input_shape=shape if len(shape) > 1 else None)
    assert bounds._reversible(net) and net.output_dim < net.input_dim
    x = np.random.default_rng(1).standard_normal((7, net.input_dim))
    reverse = bounds.jacobians(net, x)  # picks reverse mode here
    np.testing.assert_allclose(reverse, bounds._jacobians_forward(net, x), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(reverse, torch_jacobians(model, x, shape), rtol=1e-5, atol=1e-7)


def test_group_activations_keep_forward_mode():
    """GroupSort's local Jacobian is a permutation: not elementwise, so forward mode, still exact."""
    from lipsdp.network import Network

    rng = np.random.default_rng(0)
    net = Network.sequential([rng.standard_normal((6, 8)), rng.standard_normal((6, 6)), rng.standard_normal((2, 6))],
                             activation="groupsort", params={"group_size": 2})
    assert not bounds._reversible(net)
    x = rng.standard_normal((5, 8))
    eps = 1e-6
    fd = np.stack([(net.numpy_forward(x + eps * e) - net.numpy_forward(x - eps * e)) / (2 * eps)
                   for e in np.eye(8)], axis=2)
    np.testing.assert_allclose(bounds.jacobians(net, x), fd, atol=1e-6)


def test_wide_output_uses_forward_mode(monkeypatch):
    net = network_from_module(mlp([3, 8, 10]))
    called = []
    monkeypatch.setattr(bounds, "_jacobians_reverse", lambda *a: called.append(1))
    assert bounds.jacobians(net, np.zeros((2, 3))).shape == (2, 10, 3) and not called
