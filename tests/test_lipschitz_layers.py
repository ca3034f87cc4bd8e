"""Lipschitz-by-construction layers (lipsdp.nn: SLL, LDLTResidual, AOL, CayleyLinear): issue 21.

Each layer computes its weights in ``forward`` from parameters; the loaders fold that parameter-only part
to constants in float64 (lipsdp.io.folding), so every format reads the network ``model.double()``
computes.  Stacks built ``c``-Lipschitz certify at ``<= c (1 + 1e-6)`` with the sampled lower bound of
the real (float64) torch model below (docs/math.md §5.3).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipsdp  # noqa: E402
import lipsdp.nn as lnn  # noqa: E402
from lipsdp.errors import UnsupportedLayerError  # noqa: E402
from lipsdp.io import load_network, network_from_module  # noqa: E402
from lipsdp.testing import check_translation  # noqa: E402

from conftest import assert_sandwich, torch_lower_bound  # noqa: E402

WIDTH = 5


def stack(family: str, depth: int, scale: float = 1.0, seed: int = 0, **kwargs) -> nn.Sequential:
    """``depth`` layers of ``family``, the first scaled by ``scale``, random parameters (not trained)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        c = scale if i == 0 else 1.0
        if family == "sll":
            layers.append(lnn.SLL(WIDTH, WIDTH + 2, scale=c))
        elif family == "ldlt":
            layers.append(lnn.LDLTResidual(WIDTH, WIDTH + 2, scale=c))
        else:
            layers.append(lnn.AOL(WIDTH, WIDTH, scale=c) if family == "aol"
                          else lnn.CayleyLinear(WIDTH, scale=c, **kwargs))
            if i < depth - 1:
                layers.append(nn.ReLU())
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():   # away from the initialisation (e.g. LDLT's Q = [I 0])
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def sampled(model) -> float:
    """The sampled lower bound on the float64 copy of the real torch model."""
    return torch_lower_bound(copy.deepcopy(model).double(), WIDTH, samples=64)


FAMILIES = [("sll", {}), ("ldlt", {}), ("aol", {}), ("cayley", {}), ("cayley", {"method": "solve"}),
            ("cayley", {"method": "exp"})]


@pytest.mark.parametrize("family,kwargs", FAMILIES)
def test_layers_are_lipschitz_by_construction(family, kwargs):
    """Autograd Jacobians of one random layer (float64) never exceed its ``scale``."""
    model = copy.deepcopy(stack(family, 1, scale=2.5, seed=1, **kwargs)).double()
    x = torch.randn(200, WIDTH, dtype=torch.float64)
    jac = torch.func.vmap(torch.func.jacrev(model))(x)
    assert torch.linalg.matrix_norm(jac, ord=2).max() <= 2.5 * (1 + 1e-12)
    if family == "cayley":  # orthogonal: every Jacobian is 2.5 Q
        assert torch.allclose(torch.linalg.matrix_norm(jac, ord=2), torch.full((200,), 2.5, dtype=torch.float64))


@pytest.mark.parametrize("family,kwargs", FAMILIES)
def test_every_format_loads_the_float64_function(family, kwargs):
    """The loaded graph computes what ``model.double()`` computes, to float64 rounding, in every format torch
    can write.  Fails with float32 folding (errors ~1e-7): the regression test of lipsdp.io.folding."""
    model = stack(family, 2, **kwargs)
    report = check_translation(model, torch.randn(3, WIDTH), rtol=1e-11, samples=8, neurons=1)
    assert {"pickle", "trace", "script", "export"} <= set(report.errors), report
    assert max(report.errors.values()) <= 1e-11
    if family in ("sll", "aol"):     # ONNX holds their parameter subgraphs (abs, sum, rsqrt, matmul, ...)
        assert "onnx" in set(report.errors) | set(report.unfaithful), report
    else:                            # ONNX has no inverse, solve, matrix_exp, Cholesky, QR or matrix 2-norm
        assert "onnx" in report.unsaved, report


def test_onnx_parameter_subgraph_is_folded_in_float64(tmp_path):
    """An ONNX file keeping AOL's rescaling as operators (no exporter folding) loads to float64 accuracy."""
    model = stack("aol", 2)
    path = tmp_path / "aol.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, WIDTH),), str(path), dynamo=False, do_constant_folding=False)
    net = load_network(path)
    x = np.random.default_rng(0).standard_normal((16, WIDTH))
    with torch.no_grad():
        want = copy.deepcopy(model).double()(torch.from_numpy(x)).numpy()
    assert np.abs(net.numpy_forward(x) - want).max() <= 1e-12


def test_onnx_cast_of_a_folded_constant_keeps_float64():
    """``Sqrt`` of a float32 initializer, then ``Cast`` to float: the weight is sqrt in float64 (a cast
    between floats is the identity), not rounded back to float32."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    a = np.random.default_rng(0).uniform(0.5, 2.0, (3, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["A"], ["r"]), helper.make_node("Cast", ["r"], ["w"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [numpy_helper.from_array(a, "A")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    from lipsdp.io.onnx_ import network_from_onnx

    net = network_from_onnx(model)
    got = net.numpy_forward(np.eye(3))
    assert np.abs(got - np.sqrt(a.astype(np.float64))).max() <= 1e-15


@pytest.mark.parametrize("family,kwargs", [("sll", {}), ("ldlt", {}), ("aol", {}), ("cayley", {})])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_stacks_certify_at_their_constant(family, kwargs, scale):
    """Depth-3 stacks: sampled lower bound <= certified <= scale (1 + 1e-6), and <= trivial."""
    model = stack(family, 3, scale=scale, **kwargs)
    cert = lipsdp.certify(model, input_shape=(WIDTH,), lower_bound_samples=16, tol=1e-10)
    assert_sandwich(cert, sampled(model))
    assert cert.bound <= scale * (1 + 1e-6), cert.bound


def test_deep_cayley_stack_is_exactly_one():
    """Twelve orthogonal layers: 1 + 1e-9 (with float32 folding each factor has norm 1 + O(1e-7))."""
    model = stack("cayley", 12)
    cert = lipsdp.certify(model, input_shape=(WIDTH,), lower_bound_samples=0)
    assert cert.verified and 1 - 1e-9 <= cert.bound <= 1 + 1e-9, cert.bound


def test_input_dependent_operations_stay_refused():
    """An inverse of something that depends on the input is not a constant: refused, named."""

    class InputInverse(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.eye(WIDTH))

        def forward(self, x):
            a = self.w + torch.diag_embed(x).sum(dim=0)
            return x @ torch.linalg.inv(a)

    with pytest.raises(UnsupportedLayerError, match="inv"):
        network_from_module(InputInverse().eval(), input_shape=(WIDTH,))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sll", "ldlt", "aol", "cayley"])
@pytest.mark.parametrize("depth", [10, 20])
def test_deep_stacks_certify(family, depth):
    """Depth 10 and 20, scales 1 and 2.5, with ``tol=1e-10`` and the interior-point backend.

    The deep residual LMIs are not chains (``C_vw`` is full lower triangular, docs/math.md §5.1) and
    ill-conditioned near ``rho = 1`` (the optimum is degenerate): this test pins the interior-point
    backend and tight tolerances; the default settings are tested in tests/test_lipschitz_defaults.py.
    """
    tol = 1e-12 if (family, depth) == ("sll", 20) else 1e-10
    for scale in (1.0, 2.5):
        model = stack(family, depth, scale=scale)
        cert = lipsdp.certify(model, input_shape=(WIDTH,), lower_bound_samples=0, tol=tol, solver="ipm",
                              time_limit=300)
        assert_sandwich(cert, sampled(model))
        assert cert.bound <= scale * (1 + 1e-6), (family, depth, scale, cert.bound)
