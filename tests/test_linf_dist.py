"""l_inf-distance nets and SortNet (issue 21): layers, loading from every format, l_inf and l2 certificates.

- ``LinfDistance`` (``y_i = ||x - w_i||_inf + b_i``) certifies at exactly 1 in l_inf, SortNet at its
  constructed constant ``sum |a_k|``; mixed nets with ``nn.Linear`` pass the sandwich
  ``sampled (autograd on the torch model) <= certified <= trivial`` in l_inf (max row l1 norm of the
  Jacobian) and l2 (docs/math.md §2.5).
- The loaders read ``abs``, ``amax`` / ``amin``, ``topk``, l_inf norms and broadcast ``x[:, None] - w``
  exactly in TorchScript, ``torch.export``, ONNX and pickles.
- Regression: a Householder layer's l_inf gain is ``|cos| + |sin|``, not 1 (the l_inf trivial bound
  certified 1 for a net whose constant is sqrt 2).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
from torch import nn  # noqa: E402

import lipsdp  # noqa: E402
from lipsdp.bounds import node_lipschitz  # noqa: E402
from lipsdp.errors import UnsupportedLayerError  # noqa: E402
from lipsdp.io import load_network  # noqa: E402
from lipsdp.network import Activation, Affine, Input, Network  # noqa: E402
from lipsdp.nn import LinfDistance, SortNet  # noqa: E402

from conftest import assert_sandwich, torch_jacobians, torch_lower_bound  # noqa: E402

SUFFIX = {"pickle": "pt", "torchscript": "ts.pt", "script": "ts.pt", "export": "pt2", "onnx": "onnx"}


def linf_lower_bound(model, n: int, samples: int = 256, seed: int = 0) -> float:
    """Largest l1 norm of a row of the autograd Jacobian of the torch model: a lower bound on the l_inf constant."""
    x = torch.randn(samples, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return float(np.abs(torch_jacobians(model, x)).sum(axis=2).max())


def save_and_load(model, fmt, tmp_path, n):
    example = torch.randn(2, n, generator=torch.Generator().manual_seed(1))
    path = tmp_path / f"model.{SUFFIX[fmt]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pickle":
            torch.save(model, path)
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, (example,)), str(path))
        elif fmt == "script":
            torch.jit.save(torch.jit.script(model), str(path))
        elif fmt == "export":
            torch.export.save(torch.export.export(model, (example,)), str(path))
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
    return load_network(path)


def mixed(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(LinfDistance(5, 6), nn.Linear(6, 4), SortNet(4, 3, q=0.3, truncate=3),
                         nn.Linear(3, 2)).eval()


def _forward_matches(net, model, n):
    x = np.random.default_rng(2).standard_normal((16, n))
    with torch.no_grad():
        want = model.double()(torch.as_tensor(x)).numpy()
    model.float()
    np.testing.assert_allclose(net.numpy_forward(x), want, rtol=1e-5, atol=1e-5)


# -- the layers ---------------------------------------------------------------------
def test_layers_compute_what_the_papers_define():
    torch.manual_seed(3)
    layer, x = LinfDistance(4, 3), torch.randn(5, 4)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        want = (x[:, None, :] - layer.weight).abs().max(dim=-1).values + layer.bias
        torch.testing.assert_close(layer(x), want)
        sort = SortNet(4, 3, q=0.5, truncate=3)
        a = 0.5 ** torch.arange(1, 4, dtype=torch.float64)
        a = a / a.sum()
        d = (x[:, None, :] - sort.weight).abs().sort(dim=-1, descending=True).values[..., :3].double()
        torch.testing.assert_close(sort(x).double(), d @ a, rtol=1e-6, atol=1e-6)
    assert sort.lipschitz() <= 1.0 and float(SortNet(9, 2, q=0.7).order_weights.double().sum()) <= 1.0
    scaled = SortNet(4, 2, order_weights=[2.0, -1.0, 1.0])
    assert float(scaled.order_weights.double().abs().sum()) <= 1.0 and scaled.k == 3
    with pytest.raises(ValueError):
        SortNet(4, 2, q=0.0)
    with pytest.raises(ValueError):
        SortNet(2, 2, order_weights=[0.2, 0.2, 0.2])


# -- loading --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pickle", "torchscript", "script", "export", "onnx"])
def test_every_format_loads_the_exact_graph(fmt, tmp_path):
    model = mixed()
    net = save_and_load(model, fmt, tmp_path, 5)
    _forward_matches(net, model, 5)
    functions = [op.function for op in net.ops() if isinstance(op, Activation)]
    assert functions == ["abs", "groupsort", "abs", "groupsort"], functions


class _Norms(nn.Module):
    """Other ways to write order statistics: l_inf norms, amin, the smallest k, max over a middle axis,
    ``torch.max(x, dim).values`` (kept for GroupSort-2's pattern, then read as a maximum)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(4)))

    def forward(self, x):
        d = x.unsqueeze(1) - self.weight                                                 # (N, 3, 4)
        a = torch.linalg.vector_norm(d, ord=float("inf"), dim=-1)
        b = torch.norm(d, p=float("inf"), dim=2)
        c = d.amin(dim=-1, keepdim=True).squeeze(-1)
        e = torch.topk(d, 2, dim=-1, largest=False).values.flatten(1)
        f = d.amax(dim=1)                                                             # over the 3 rows
        g = torch.max(d, dim=-1).values                                               # max.dim, not GroupSort-2
        h = torch.min(d, dim=1, keepdim=True).values.flatten(1)
        return torch.cat([a, b, c, e, f, g, h], dim=1)


@pytest.mark.parametrize("fmt", ["torchscript", "export", "onnx"])
def test_order_statistics_and_inf_norms(fmt, tmp_path):
    model = _Norms().eval()
    net = save_and_load(model, fmt, tmp_path, 4)
    _forward_matches(net, model, 4)


class _TwoNorm(nn.Module):
    def forward(self, x):
        return torch.linalg.vector_norm(x, ord=2, dim=-1, keepdim=True)


def test_other_norms_are_refused(tmp_path):
    with pytest.raises(UnsupportedLayerError, match="linalg_vector_norm"):
        save_and_load(_TwoNorm().eval(), "export", tmp_path, 4)


# -- certificates ---------------------------------------------------------------------
def test_one_linf_distance_layer_certifies_at_exactly_one():
    torch.manual_seed(5)
    model = nn.Sequential(LinfDistance(6, 4)).eval()
    cert = lipsdp.certify(model, norm="linf", lower_bound_samples=64)
    assert cert.verified and cert.bound == 1.0, (cert.bound, cert.message)
    assert linf_lower_bound(model, 6) == pytest.approx(1.0) and cert.lower_bound == pytest.approx(1.0)
    assert all(p["bound"] == 1.0 for p in cert.network["per_output"])


def test_sortnet_certifies_at_its_constructed_constant():
    torch.manual_seed(6)
    model = nn.Sequential(SortNet(6, 3, q=0.4, truncate=4)).eval()
    constant = model[0].lipschitz()
    cert = lipsdp.certify(model, norm="linf", lower_bound_samples=64)
    assert cert.verified and cert.bound == constant, (cert.bound, constant)
    assert linf_lower_bound(model, 6) == pytest.approx(constant, rel=1e-9)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_mixed_nets_pass_the_sandwich_in_linf_and_l2(seed):
    model = mixed(seed)
    linf = lipsdp.certify(model, norm="linf", lower_bound_samples=64)
    assert_sandwich(linf, linf_lower_bound(model, 5))
    l2 = lipsdp.certify(model, norm="l2", lower_bound_samples=64)
    assert_sandwich(l2, torch_lower_bound(model, 5))


def test_abs_activation_loads_and_certifies():
    class Abs(nn.Module):
        def forward(self, x):
            return torch.abs(x)

    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), Abs(), nn.Linear(6, 2)).eval()
    cert = lipsdp.certify(model, lower_bound_samples=64)
    assert_sandwich(cert, torch_lower_bound(model, 4))


def test_householder_linf_gain_is_not_one():
    """Regression: the reflection [[cos, sin], [sin, -cos]] at theta = pi/4 has l_inf gain sqrt 2.

    Before, the l_inf trivial bound took Householder's l2 constant (1), and certify --norm linf
    reported 1 (below the sampled 1.414) through the proven trivial bound."""
    net = Network()
    x = net.add(Input("in", "Input", (2,)))
    h = net.add(Activation("hh", "HouseHolder", (2,), function="householder",
                           params={"theta": np.array([np.pi / 4])}), [x])
    net.add(Affine("out", "Linear", (1,), weight=np.array([[1.0, 0.0]])), [h])
    assert node_lipschitz(net, "linf")[net.output] >= np.sqrt(2)
    cert = lipsdp.certify(net, norm="linf", lower_bound_samples=64)
    assert cert.lower_bound == pytest.approx(np.sqrt(2))
    assert_sandwich(cert, cert.lower_bound)


def test_an_unverified_linf_sdp_falls_back_to_the_proven_composition():
    """An l_inf certificate of a net with order statistics whose SDP does not verify (here: ``fo``, which
    solves l2 only) is the proven product of gains, and ``lipsdp verify`` proves it again."""
    from lipsdp.checking import check_certificate

    model = mixed()
    cert = lipsdp.certify(model, solver="fo", norm="linf", lower_bound_samples=16)
    assert cert.verification["method"] == "trivial" and cert.verification["sdp_bound"] is None
    assert_sandwich(cert, linf_lower_bound(model, 5))
    assert check_certificate(cert.to_dict(), model).verified


def test_implicit_layer_linf_trivial_bound_uses_row_sums():
    """Regression: the l_inf trivial bound of an implicit layer ``z = relu(F z + u)`` used ``||F||_2``; in l_inf
    the contraction argument needs ``||F||_inf`` (here 0.9 against 0.45), or the bound falls below the sampled one."""
    from lipsdp.bounds import sampled_lower_bound
    from lipsdp.network import Equilibrium

    H = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]) / 2.0   # orthogonal, row sums 2
    net = Network()
    x = net.add(Input("in", "Input", (4,)))
    u = net.add(Affine("u", "Linear", (4,), weight=np.eye(4)), [x])
    net.add(Equilibrium("z", "ImplicitLayer", (4,), function="relu", feedback=0.45 * H), [u])
    assert node_lipschitz(net, "linf")[net.output] >= sampled_lower_bound(net, norm="linf", samples=64) > 2.0
