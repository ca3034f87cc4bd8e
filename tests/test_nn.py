"""lipsdp.nn: GroupSort / MaxMin / FullSort / HouseHolder modules and the implicit (equilibrium) layer.

Activations: same maps as deel-torchlip's, every save path loads them, orthogonal
nets certify at 1 (docs/math.md §4.4), random nets sit in the sandwich.
Implicit layers (docs/math.md §5.2): true equilibria and IFT Jacobians, every save path
that can hold them, ``sampled <= vertex max <= certified <= ||C|| ||U|| / (1 - ||W||)``
with well-posedness proved, and non-well-posed layers never get a bound.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipsdp  # noqa: E402
import lipsdp.nn as lnn  # noqa: E402
from lipsdp.errors import WellPosednessError  # noqa: E402
from lipsdp.io import load_network, network_from_module  # noqa: E402
from lipsdp.network import Activation, Add, Affine, Equilibrium, Input, Network  # noqa: E402

from conftest import assert_sandwich, torch_lower_bound  # noqa: E402
from models import lipschitz_sequential, orthogonal  # noqa: E402

SOLVER = os.environ.get("LIPSDP_TEST_SOLVER", "auto")
SUFFIX = {"pickle": "pt", "export": "pt2"}  # torch.export.load wants .pt2


def functions(net):
    return [op.function for op in net.ops() if isinstance(op, Activation)]


def save_and_load(model, fmt, tmp_path, example):
    """Write ``model`` the way ``fmt`` names and read it back with lipsdp."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "api":
            return network_from_module(model)
        path = tmp_path / f"model.{SUFFIX.get(fmt, fmt)}"
        if fmt == "pickle":
            torch.save(model, path)
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, (example,)), str(path))
        elif fmt == "script":
            torch.jit.save(torch.jit.script(model), str(path))
        elif fmt == "export":
            torch.export.save(torch.export.export(model, (example,)), str(path))
        elif fmt == "onnx":
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
        return load_network(path)


def assert_same(net, model, n_in, atol=1e-5):
    x = np.random.default_rng(0).standard_normal((16, n_in))
    with torch.no_grad():
        ref = model(torch.tensor(x, dtype=next(model.parameters()).dtype)).double().numpy()
    np.testing.assert_allclose(net.numpy_forward(x), ref, atol=atol)


def test_import_lipsdp_does_not_import_torch():
    code = "import sys, lipsdp, lipsdp.equilibrium, lipsdp.wellposed; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


# ---------------------------------------------------------------------------
# activations: the same maps as deel-torchlip
# ---------------------------------------------------------------------------
def test_forward_matches_torchlip():
    tl = pytest.importorskip("deel.torchlip")
    gen = torch.Generator().manual_seed(0)
    theta = torch.rand(4, generator=gen, dtype=torch.float64) * 6
    pairs = [(lnn.GroupSort2(), tl.GroupSort2()), (lnn.GroupSort(4), tl.GroupSort(4)), (lnn.FullSort(), tl.FullSort()),
             (lnn.GroupSort(2, k_coef_lip=0.5), tl.GroupSort(2, k_coef_lip=0.5)), (lnn.MaxMin(), tl.MaxMin()),
             (lnn.MaxMin(k_coef_lip=2.0), tl.MaxMin(k_coef_lip=2.0)), (lnn.HouseHolder(8), tl.HouseHolder(8))]
    for ours, theirs in pairs:
        if isinstance(ours, lnn.HouseHolder):
            ours.load_state_dict({"theta": theta})  # same parameter layout: deel's state_dict loads as is
            theirs.load_state_dict(ours.state_dict())
        for shape in [(16, 8), (5, 8, 3, 2)]:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            x[0, :2] = 0.5  # a tie
            torch.testing.assert_close(ours.double()(x), theirs.double()(x), rtol=0, atol=1e-12)
    # HouseHolder's default angle is deel's (pi / 2 for every pair)
    torch.testing.assert_close(lnn.HouseHolder(6).theta.detach(), tl.HouseHolder(6).theta.detach())


def test_bad_arguments():
    with pytest.raises(ValueError, match="not a multiple"):
        lnn.GroupSort(4)(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="even"):
        lnn.HouseHolder(5)
    with pytest.raises(ValueError, match="k_coef_lip"):
        lnn.HouseHolder(4, k_coef_lip=2.0)
    with pytest.raises(ValueError, match="activation"):
        lnn.ImplicitLayer(3, 4, activation="groupsort")


def activation_model(seed=8):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), lnn.GroupSort2(), nn.Linear(6, 6), lnn.GroupSort(3), nn.Linear(6, 8),
                          lnn.MaxMin(), nn.Linear(16, 8), lnn.HouseHolder(8), lnn.FullSort(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[7].theta.uniform_(0, 6)
    return model


@pytest.mark.parametrize("fmt", ["api", "pickle", "torchscript", "script", "export"])
def test_activations_load_through_every_path(fmt, tmp_path):
    model = activation_model()
    net = save_and_load(model, fmt, tmp_path, torch.randn(2, 4))
    assert_same(net, model, 4)
    assert functions(net) == ["groupsort", "groupsort", "relu", "householder", "groupsort"]
    acts = [op for op in net.ops() if isinstance(op, Activation)]
    assert [a.params.get("group_size") for a in acts] == [2, 3, None, None, 8]
    np.testing.assert_allclose(acts[3].params["theta"], model[7].theta.detach().double().numpy(), rtol=1e-6)


def test_activations_onnx(tmp_path):
    """ONNX: the sorts and MaxMin (HouseHolder's comparisons have no ONNX rule in lipsdp)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 6), lnn.GroupSort2(), nn.Linear(6, 6), lnn.GroupSort(3), nn.Linear(6, 4),
                          lnn.MaxMin(), nn.Linear(8, 4), lnn.FullSort(), nn.Linear(4, 2)).eval()
    net = save_and_load(model, "onnx", tmp_path, torch.randn(2, 4))
    assert_same(net, model, 4)
    assert functions(net) == ["groupsort", "groupsort", "relu", "groupsort"]


LAYERS = {"GroupSort2": lnn.GroupSort2, "GroupSort4": lambda: lnn.GroupSort(4), "FullSort": lnn.FullSort,
          "HouseHolder": lambda: lnn.HouseHolder(8)}


@pytest.mark.parametrize("name", list(LAYERS))
def test_orthogonal_nets_certify_one(name):
    """docs/math.md §4.4: orthogonal weights, true L = 1, certified 1.000 (pickled and reloaded too)."""
    rng = np.random.default_rng(11)
    model = lipschitz_sequential(8, 2, LAYERS[name], rng)
    cert = lipsdp.certify(model, solver=SOLVER)
    assert cert.verified, (name, cert.message)
    assert abs(cert.bound - 1.0) < 1e-3, (name, cert.bound)
    assert torch_lower_bound(model, 8) == pytest.approx(1.0, abs=1e-6)
    print(f"{name}: certified {cert.bound:.6f}  trivial {cert.trivial_bound:.6f}")


@pytest.mark.parametrize("name", list(LAYERS))
def test_random_nets_sandwich(name):
    rng = np.random.default_rng(21)
    model = lipschitz_sequential(8, 2, LAYERS[name], rng, orthogonal_weights=False)
    cert = lipsdp.certify(model, solver=SOLVER)
    lower = torch_lower_bound(model, 8, samples=512)
    assert_sandwich(cert, lower)
    assert_sandwich(cert, cert.lower_bound)
    assert cert.bound < 0.99 * cert.trivial_bound
    print(f"{name}: sampled {lower:.4f}  certified {cert.bound:.4f}  trivial {cert.trivial_bound:.4f}")


# ---------------------------------------------------------------------------
# implicit layers (docs/math.md §5.2)
# ---------------------------------------------------------------------------
def implicit_model(n_in=3, n=5, n_out=2, activation="relu", w_norm=0.9, seed=0, direct=False, param=None):
    """An ``ImplicitLayer`` in float64 whose feedback ``W`` has spectral norm ``w_norm``."""
    torch.manual_seed(seed)
    layer = lnn.ImplicitLayer(n_in, n, n_out, activation=activation, activation_param=param, direct=direct)
    w = np.random.default_rng(seed).standard_normal((n, n))
    with torch.no_grad():
        layer.W.weight.copy_(torch.tensor(w * w_norm / np.linalg.norm(w, 2)))
    return layer.double().eval()


def ift_jacobians(model, x):
    """Autograd Jacobians of the torch model (its backward is the implicit function theorem)."""
    J = torch.autograd.functional.jacobian(lambda v: model(v).sum(0), x)  # samples are independent
    return J.permute(1, 0, 2).detach().numpy()


def test_implicit_forward_is_the_equilibrium():
    model = implicit_model(activation="tanh", w_norm=0.95)
    x = torch.randn(32, 3, dtype=torch.float64)
    z = model.equilibrium(x)
    residual = z - torch.tanh(z @ model.W.weight.T + model.U(x))
    assert float(residual.detach().abs().max()) < 1e-9
    J = ift_jacobians(model, x)
    h = 1e-6
    E = torch.eye(3, dtype=torch.float64)
    fd = torch.stack([(model(x + h * E[i]) - model(x - h * E[i])) / (2 * h) for i in range(3)], -1)
    np.testing.assert_allclose(J, fd.detach().numpy(), atol=1e-7)
    # lipsdp's IR: same values, same IFT Jacobians
    from lipsdp.bounds import jacobians

    net = network_from_module(model)
    np.testing.assert_allclose(net.numpy_forward(x.numpy()), model(x).detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(jacobians(net, x.numpy()), J, atol=1e-12)


def test_implicit_newton_beyond_contraction():
    """||W|| > 1 but well-posed (W = -3 I: 2T - TW - W^T T = 8T > 0): Picard diverges, Newton converges."""
    layer = lnn.ImplicitLayer(2, 2, activation="relu").double()
    with torch.no_grad():
        layer.W.weight.copy_(-3 * torch.eye(2, dtype=torch.float64))
    x = torch.randn(8, 2, dtype=torch.float64)
    z = layer(x)
    u = layer.U(x)
    torch.testing.assert_close(z, torch.relu(u) / 4)  # z = relu(-3 z + u): z = u / 4 where u > 0
    torch.testing.assert_close(z, torch.relu(-3 * z + u))


@pytest.mark.parametrize("fmt", ["api", "pickle", "export", "torchscript", "script"])
def test_implicit_loads(fmt, tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(),
                          lnn.ImplicitLayer(4, 6, 2, activation="leaky_relu", activation_param=0.1, direct=True)).eval()
    net = save_and_load(model, fmt, tmp_path, torch.randn(2, 3))
    assert_same(net, model, 3)
    eq = [op for op in net.ops() if isinstance(op, Equilibrium)]
    assert len(eq) == 1 and eq[0].function == "leaky_relu" and eq[0].params == {"negative_slope": 0.1}
    np.testing.assert_allclose(eq[0].feedback, model[2].W.weight.detach().double().numpy())


def test_implicit_onnx_is_refused(tmp_path):
    model = implicit_model().float()
    with pytest.raises(Exception, match="lipsdp::equilibrium"):
        save_and_load(model, "onnx", tmp_path, torch.randn(2, 3))


def vertex_max(model) -> float:
    """``max over D in {0,1}^n of ||C (I - D W)^{-1} D U + D_x||``: every ReLU pattern's linear map."""
    W, U, C = (m.weight.detach().numpy() for m in (model.W, model.U, model.C))
    Dx = 0 if model.D is None else model.D.weight.detach().numpy()
    n = W.shape[0]
    best = 0.0
    for pattern in itertools.product([0.0, 1.0], repeat=n):
        D = np.diag(pattern)
        best = max(best, float(np.linalg.norm(C @ np.linalg.solve(np.eye(n) - D @ W, D @ U) + Dx, 2)))
    return best


@pytest.mark.parametrize("activation,seed,direct", [("relu", 0, False), ("relu", 1, True), ("relu", 2, False),
                                                    ("tanh", 3, False), ("leaky_relu", 4, True)])
def test_implicit_sandwich(activation, seed, direct):
    """docs/math.md §5.2: sampled <= vertex max <= certified <= ||C|| ||U|| / (1 - ||W||), well-posedness proved."""
    model = implicit_model(n_in=3, n=5, n_out=2, activation=activation, w_norm=0.9, seed=seed, direct=direct)
    cert = lipsdp.certify(model, solver=SOLVER)
    assert cert.verified, cert.message
    wp = cert.network["well_posedness"]
    assert wp["proved"], wp
    x = torch.randn(512, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    sampled = float(np.linalg.norm(ift_jacobians(model, x), 2, axis=(1, 2)).max())
    norms = [float(np.linalg.norm(m.weight.detach().numpy(), 2)) for m in (model.U, model.W, model.C)]
    naive = norms[2] * norms[0] / (1 - norms[1])
    if direct:
        naive += float(np.linalg.norm(model.D.weight.detach().numpy(), 2))
    assert_sandwich(cert, sampled)
    assert_sandwich(cert, cert.lower_bound)
    assert cert.trivial_bound == pytest.approx(naive, rel=1e-9)
    assert cert.bound < 0.9 * naive
    line = f"{activation} seed={seed}: sampled {sampled:.4f}  lipsdp-sampled {cert.lower_bound:.4f}  "
    if activation == "relu":
        vmax = vertex_max(model)
        assert vmax <= cert.bound * (1 + 1e-7)  # every ReLU pattern's linear map satisfies the QC
        assert sampled <= vmax * (1 + 1e-9)
        line += f"vertex {vmax:.4f}  "
    print(line + f"certified {cert.bound:.4f}  naive {naive:.4f}")


def test_implicit_strict_exact_check():
    cert = lipsdp.certify(implicit_model(seed=5), solver=SOLVER, strict=True)
    assert cert.verified and cert.verification["method"] == "exact", cert.message
    assert cert.network["well_posedness"]["proved"]


def test_implicit_strict_after_a_residual():
    """A residual block before the layer makes the lifted rows rounded: the exact check redoes them with F."""
    rng = np.random.default_rng(6)
    net = Network()
    x = net.add(Input("input", "Input", (2,)))
    a = net.add(Affine("A", "Linear", (2,), weight=rng.standard_normal((2, 2)) / 3), [x])
    r = net.add(Add("res", "Add", (2,)), [x, a])
    u = net.add(Affine("U", "Linear", (4,), weight=rng.standard_normal((4, 2))), [r])
    z = net.add(Equilibrium("deq", "ImplicitLayer", (4,), function="relu", feedback=0.8 * orthogonal(4, rng)), [u])
    net.add(Affine("C", "Linear", (1,), weight=rng.standard_normal((1, 4))), [z])
    from lipsdp.lifting import lift

    assert not lift(net).exact
    cert = lipsdp.certify(net, solver=SOLVER, strict=True)
    assert cert.verified and cert.verification["method"] == "exact", cert.message
    assert_sandwich(cert, cert.lower_bound)


def _equilibrium_net(W, U, C, function="relu"):
    net = Network()
    node = net.add(Input("input", "Input", (U.shape[1],)))
    node = net.add(Affine("U", "Linear", (U.shape[0],), weight=U), [node])
    node = net.add(Equilibrium("deq", "ImplicitLayer", (U.shape[0],), function=function, feedback=W), [node])
    net.add(Affine("C", "Linear", (C.shape[0],), weight=C), [node])
    return net


def test_not_well_posed_is_refused():
    """W = 2I with ReLU: z = relu(2z + u) has no solution for u > 0 and two for u < 0."""
    rng = np.random.default_rng(0)
    net = _equilibrium_net(2 * np.eye(3), rng.standard_normal((3, 2)), rng.standard_normal((1, 3)))
    with pytest.raises(WellPosednessError, match=r"F\[0,0\] = 2 >= 1/beta") as info:
        lipsdp.certify(net, solver=SOLVER)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_not_well_posed_cli(tmp_path):
    layer = lnn.ImplicitLayer(2, 3, 1)
    with torch.no_grad():
        layer.W.weight.copy_(2 * torch.eye(3))
    torch.save(layer, tmp_path / "deq.pt")
    out = subprocess.run([sys.executable, "-m", "lipsdp", "certify", str(tmp_path / "deq.pt")],
                         capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert "not provably well-posed" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_not_well_posed_gets_no_bound():
    """W = [[0, 2], [2, 0]]: passes the diagonal check, but u = (-1, -1) has the equilibria 0 and (1, 1)."""
    W = np.array([[0.0, 2.0], [2.0, 0.0]])
    net = _equilibrium_net(W, np.eye(2), np.ones((1, 2)))
    z0, z1 = np.zeros(2), np.ones(2)
    u = -np.ones(2)
    for z in (z0, z1):
        np.testing.assert_allclose(np.maximum(W @ z + u, 0), z)
    cert = lipsdp.certify(net, solver=SOLVER)
    assert not cert.verified and cert.bound is None
    assert cert.network["well_posedness"]["proved"] is False


def test_groupsort_implicit_layer_is_refused():
    net = _equilibrium_net(0.1 * np.eye(4), np.eye(4), np.ones((1, 4)), function="groupsort")
    with pytest.raises(WellPosednessError, match="slope-restricted activations only"):
        lipsdp.certify(net, solver=SOLVER)


def test_feedback_is_part_of_the_fingerprint_and_lifting():
    from lipsdp.lifting import lift

    rng = np.random.default_rng(3)
    W, U, C = 0.5 * orthogonal(3, rng), rng.standard_normal((3, 2)), rng.standard_normal((1, 3))
    a, b = _equilibrium_net(W, U, C), _equilibrium_net(0.4 * orthogonal(3, rng), U, C)
    assert a.fingerprint() != b.fingerprint()
    lifted = lift(a)
    assert lifted.exact
    np.testing.assert_array_equal(lifted.pre[0].toarray(), np.hstack([U, W]))  # P = [C_vx, C_vw] with C_vw = W


def test_implicit_certificate_rechecks_well_posedness():
    """``lipsdp verify`` re-proves the equilibrium's uniqueness from the stored multipliers, not just the LMI."""
    from lipsdp.certificate import Certificate
    from lipsdp.checking import check_certificate

    model = implicit_model(activation="relu", w_norm=0.9, seed=4)
    cert = lipsdp.certify(model, input_shape=(3,), lower_bound_samples=0)
    assert cert.verified and cert.network["well_posedness"]["proved"]
    stored = Certificate.from_dict(json.loads(cert.to_json()))
    stored.network.pop("well_posedness")
    again = check_certificate(stored, model, input_shape=(3,))
    assert again.verification["rechecked"] and again.network["well_posedness"]["proved"]


def test_mixed_group_sizes_certify_without_the_pair_rewrite():
    """A net with a GroupSort-2 *and* a FullSort: the two-ReLU comparison covers pairs only and is skipped."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), lnn.GroupSort2(), nn.Linear(6, 6), lnn.FullSort(), nn.Linear(6, 2)).eval()
    cert = lipsdp.certify(model, input_shape=(4,))
    assert cert.verified and "comparisons" not in cert.network
    assert cert.lower_bound <= cert.bound <= cert.trivial_bound
