"""Clarke-Jacobian bounds over a box (lipsdp.jacobian): containment, sandwich, exact constants, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from exact_local import exact_local_linf
from lipsdp.bounds import proven_trivial_bound
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.jacobian import jacobian_bounds, local_lipschitz_jacobian, norm_of_bounds
from lipsdp.network import Activation, Affine, Input, Network
from lipsdp.pipeline import load_model
from models import mlp, residual_mlp


class Concatenated(nn.Module):
    """``out(cat(tanh(a x), relu(b x)) + skip x)``: a Concat and an Add in one graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.skip, self.out = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.cat([torch.tanh(self.a(x)), torch.relu(self.b(x))], dim=1) + self.skip(x))


def _autograd_jacobians(model, X: np.ndarray) -> np.ndarray:
    model = model.double()
    return np.stack([torch.autograd.functional.jacobian(model, torch.tensor(x[None, :]))[0, :, 0, :].numpy()
                     for x in X])


MODELS = {
    "relu": lambda: mlp([4, 8, 8, 3], "relu", seed=1),
    "tanh": lambda: mlp([4, 8, 8, 3], "tanh", seed=2),
    "sigmoid": lambda: mlp([3, 6, 2], "sigmoid", seed=3),
    "leaky_relu": lambda: mlp([3, 6, 6, 2], "leaky_relu", seed=4),
    "hardtanh": lambda: mlp([3, 6, 2], "hardtanh", seed=5),
    "gelu": lambda: mlp([3, 6, 2], "gelu", seed=6),  # not monotone: sector slopes, Lipschitz value bounds
    "softplus": lambda: mlp([3, 6, 2], "softplus", seed=8),  # torch's threshold switch: a tiny jump
    "elu": lambda: mlp([3, 6, 2], "elu", seed=9),
    "residual": lambda: residual_mlp(seed=7),
    "concat": Concatenated,
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("radius", [0.05, 0.5])
def test_bounds_contain_autograd_jacobians_and_sandwich(name, radius):
    model = MODELS[name]().double().eval()
    network, _ = load_model(model)
    rng = np.random.default_rng(0)
    center = rng.standard_normal(network.input_dim)
    lo, hi = center - radius, center + radius
    Jlo, Jhi = jacobian_bounds(network, lo, hi)
    X = np.vstack([center, lo + (hi - lo) * rng.random((40, len(lo)))])
    J = _autograd_jacobians(model, X)
    tol = 1e-12 * (1.0 + np.abs(J))  # autograd's own float64 rounding
    assert np.all(Jlo - tol <= J) and np.all(J <= Jhi + tol)
    bound, details = local_lipschitz_jacobian(network, lo, hi)
    sampled = float(np.abs(J).sum(axis=2).max())
    assert sampled <= bound * (1 + 1e-12) <= proven_trivial_bound(network, "linf") * (1 + 1e-9)
    assert details["lower_bound"] <= bound


def _tiny_relu(rng):
    d = int(rng.integers(2, 9))
    sizes = [d] + [int(rng.integers(2, 9)) for _ in range(int(rng.integers(2, 4)))] + [int(rng.integers(1, 4))]
    Ws = [rng.standard_normal((sizes[i + 1], sizes[i])) for i in range(len(sizes) - 1)]
    bs = [0.5 * rng.standard_normal(sizes[i + 1]) for i in range(len(sizes) - 1)]
    return Ws, bs


def test_linf_bound_never_below_exact_local_constant():
    """Tiny ReLU nets (2-8 inputs, 2-3 hidden layers of <= 8): the bound over the exact constant, >= 1."""
    rng = np.random.default_rng(20)
    ratios = []
    while len(ratios) < 8:
        Ws, bs = _tiny_relu(rng)
        network = Network.sequential(Ws, biases=bs)
        center, radius = rng.standard_normal(Ws[0].shape[1]), float(rng.choice([0.05, 0.2]))
        exact = exact_local_linf(Ws, bs, center - radius, center + radius)
        one_pass = local_lipschitz_jacobian(network, center - radius, center + radius)[0]
        split = local_lipschitz_jacobian(network, center - radius, center + radius, time_limit=0.3)[0]
        interval = local_lipschitz_jacobian(network, center - radius, center + radius, values="interval",
                                            vertex_budget=0)[0]  # interval value bounds and products only
        assert exact <= split * (1 + 1e-12) and split <= one_pass <= interval
        if exact > 0:  # a net whose every path is dead on the box has constant 0 (and proves >= 0)
            ratios.append((one_pass / exact, split / exact))
    print("bound / exact local l_inf constant (one pass with CROWN value bounds, branch and bound 0.3 s):",
          ", ".join(f"{a:.3f}/{b:.3f}" for a, b in ratios))
    assert min(min(r) for r in ratios) >= 1.0


def test_small_radius_approaches_jacobian_norm_at_centre():
    model = mlp([6, 16, 16, 4], "relu", seed=11).double()
    network, _ = load_model(model)
    center = np.random.default_rng(1).standard_normal(6)
    J0 = _autograd_jacobians(model, center[None, :])[0]
    for norm, exact in (("linf", np.abs(J0).sum(axis=1).max()), ("l2", np.linalg.norm(J0, 2))):
        bound = local_lipschitz_jacobian(network, center - 1e-4, center + 1e-4, norm=norm)[0]
        assert exact <= bound <= 1.01 * exact


def test_branch_and_bound_and_vertices_tighten_and_stay_sound():
    model = mlp([2, 8, 8, 1], "relu", seed=5).double()
    network, _ = load_model(model)
    lo, hi = -np.ones(2), np.ones(2)
    Ws = [m.weight.detach().numpy() for m in model if isinstance(m, nn.Linear)]
    bs = [m.bias.detach().numpy() for m in model if isinstance(m, nn.Linear)]
    exact = exact_local_linf(Ws, bs, lo, hi)
    one, _ = local_lipschitz_jacobian(network, lo, hi, vertex_budget=0)  # interval products only
    split, details = local_lipschitz_jacobian(network, lo, hi, time_limit=0.5, vertex_budget=0)
    assert exact <= split < one and details["boxes"] > 1
    vertices, _ = local_lipschitz_jacobian(network, lo, hi)  # max over the slope box's vertices
    assert exact <= vertices < one


def test_rounding_is_outward():
    """1/3 is not a float: the row sum of three entries rounds up, never to below the exact value."""
    third = np.full((1, 3), 1.0 / 3.0)
    value = norm_of_bounds(third, third)
    assert value > 3 * (1.0 / 3.0) or value >= 1.0
    lo, hi = jacobian_bounds(Network.sequential([np.full((1, 3), 0.1)], activation="relu"), np.zeros(3), np.ones(3))
    assert np.all(lo < 0.1) and np.all(hi > 0.1)  # the identity input Jacobian times 0.1, widened outward


def test_sparse_weights_give_the_dense_bounds():
    """Unrolled convolutions arrive as scipy.sparse Affine weights: same bounds as the dense matrices."""
    rng = np.random.default_rng(4)
    W0, W1 = rng.standard_normal((6, 4)) * (rng.random((6, 4)) < 0.5), rng.standard_normal((2, 6))
    dense = Network.sequential([W0, W1], biases=[0.1 * np.ones(6), None])
    sparse = Network.sequential([W0, W1], biases=[0.1 * np.ones(6), None])
    for n in sparse.graph.nodes:
        if isinstance(sparse.op(n), Affine):
            sparse.op(n).weight = sp.csr_matrix(sparse.op(n).weight)
    a, b = jacobian_bounds(sparse, -0.3 * np.ones(4), 0.3 * np.ones(4))
    c, d = jacobian_bounds(dense, -0.3 * np.ones(4), 0.3 * np.ones(4))
    assert np.allclose(a, c, rtol=1e-12, atol=0) and np.allclose(b, d, rtol=1e-12, atol=0)


def test_refusals():
    net = Network()
    x = net.add(Input("input", "Input", (4,)))
    a = net.add(Affine("fc", "Linear", (4,), weight=np.eye(4)), [x])
    net.add(Activation("sort", "GroupSort", (4,), function="groupsort", params={"group_size": 2}), [a])
    with pytest.raises(UnsupportedLayerError, match="GroupSort"):
        local_lipschitz_jacobian(net, np.zeros(4), np.ones(4))
    relu = Network.sequential([np.eye(2), np.eye(2)])
    with pytest.raises(LipSDPError, match="lower <= upper"):
        local_lipschitz_jacobian(relu, np.ones(2), np.zeros(2))
    with pytest.raises(LipSDPError, match="unknown norm"):
        local_lipschitz_jacobian(relu, np.zeros(2), np.ones(2), norm="l1")
