"""The activation catalogue (lipsdp.activations): every entry's sector is exact and its names are right.

For every entry and a few parameter sets:

- every difference quotient lies in the sector (hypothesis; pairs far in the tails,
  near the entry's breakpoints, and anywhere in between), and the sector is tight
  (the derivative reaches both ends on a fine grid);
- its torch module, ATen operators and ONNX operator types exist, and the module
  computes the entry's function and derivative;
- invalid parameters are refused;
- the loaders' tables are the catalogue's.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lipsdp import activations
from lipsdp.activations import NotExpressible, SlopeActivation

REPO = Path(__file__).resolve().parents[1]

#: Parameter sets per entry (entries not listed are tested with their defaults only).
PARAMS = {
    "leaky_relu": [{"negative_slope": 0.2}, {"negative_slope": -0.5}, {"negative_slope": 3.0}],
    "elu": [{"alpha": 0.5}, {"alpha": 1.5}, {"alpha": -0.3}],
    "softplus": [{"beta": 2.0, "threshold": 14.0}, {"beta": 0.5, "threshold": 20.0}, {"beta": -1.5}],
    "hardtanh": [{"min_val": -0.5, "max_val": 2.0}, {"min_val": 0.0, "max_val": 6.0}],
    "gelu": [{"approximate": "tanh"}],
}
CASES = [(name, params) for name in activations.names() for params in [{}] + PARAMS.get(name, [])]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'default'}" for name, params in CASES]


def points(entry: SlopeActivation, params: dict):
    """Real numbers: the far tails, around the breakpoints (offsets down to 1e-12), and in between."""
    tails = st.floats(1e3, 1e8).flatmap(lambda r: st.sampled_from([r, -r]))
    middle = st.floats(-60.0, 60.0, allow_nan=False)
    near = [st.tuples(st.just(bp), st.floats(-1.0, 1.0), st.integers(0, 12)).map(lambda t: t[0] + t[1] * 10.0 ** -t[2])
            for bp in entry.breakpoints(params)]
    return st.one_of(tails, middle, *near)


def eval1(entry, params, x: float) -> float:
    return float(entry.evaluate(np.array([x], dtype=np.float64), params)[0])


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_difference_quotients_lie_in_the_sector(name, params, data):
    """Hypothesis: ``alpha <= (phi(a) - phi(b)) / (a - b) <= beta`` for pairs over the whole real line."""
    entry = activations.get(name)
    a = data.draw(points(entry, params), label="a")
    b = data.draw(st.one_of(points(entry, params), st.floats(-1e-6, 1e-6).map(lambda d: a + d)), label="b")
    if a == b:
        return
    lo, hi = entry.sector(params)
    fa, fb = eval1(entry, params, a), eval1(entry, params, b)
    q = (fa - fb) / (a - b)
    # phi is evaluated to a few ulps of its value (and a - b is exact only to an ulp of max |a|, |b|),
    # and a framework's switch of formula may jump by entry.discontinuity(params).
    slack = 1e-15 * (abs(fa) + abs(fb) + abs(a) + abs(b) + 1) + entry.discontinuity(params)
    tol = 1e-9 * (1 + abs(q)) + 1.01 * slack / abs(a - b)
    assert lo - tol <= q <= hi + tol, (a, b, q, (lo, hi))


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_sector_is_tight(name, params):
    """The sector's ends are the infimum and supremum of ``phi'`` (a grid comes within 1e-6 of both)."""
    entry = activations.get(name)
    lo, hi = entry.sector(params)
    x = np.concatenate([np.linspace(-40, 40, 400_001), np.asarray(entry.breakpoints(params), dtype=np.float64)])
    d = entry.derivative(x, params)
    assert lo <= d.min() + 1e-12 and d.max() <= hi + 1e-12
    assert d.min() - lo < 1e-6 and hi - d.max() < 1e-6


def test_known_sectors():
    get = activations.get
    assert get("relu").sector({}) == (0.0, 1.0)
    assert get("leaky_relu").sector({"negative_slope": 3.0}) == (1.0, 3.0)
    assert get("elu").sector({"alpha": -0.3}) == (-0.3, 1.0)
    assert get("sigmoid").sector({}) == (0.0, 0.25)
    assert get("hardtanh").sector({"min_val": 1.0, "max_val": 1.0}) == (0.0, 0.0)
    lo, hi = get("gelu").sector({})
    exact = 0.5 * math.erfc(1.0) - math.sqrt(2.0) * math.exp(-1.0) / math.sqrt(2.0 * math.pi)
    assert exact - 2e-10 < lo < exact and lo + hi == pytest.approx(1.0, abs=1e-15)
    lo, hi = get("silu").sector({})
    assert -0.0998394 < lo < -0.0998393 and 1.0998393 < hi < 1.0998394


@pytest.mark.parametrize(("name", "params"), [
    ("leaky_relu", {"negative_slope": float("nan")}), ("elu", {"alpha": float("inf")}),
    ("softplus", {"beta": 0.0}), ("softplus", {"threshold": float("nan")}),
    ("hardtanh", {"max_val": float("nan")}), ("gelu", {"approximate": "sigmoid"})])
def test_invalid_parameters_are_refused(name, params):
    with pytest.raises(ValueError):
        activations.get(name).sector(params)


def test_unknown_activation():
    with pytest.raises(KeyError, match="known: abs, elu"):
        activations.get("swish2")


def test_catalogue_imports_no_torch():
    code = "import sys, lipsdp.activations, lipsdp.constraints; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_catalogue_sits_below_the_graph():
    """The catalogue imports numpy, scipy and lipsdp.errors only; the loaders never import well-posedness code."""
    def lipsdp_imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        return {m for m in found if m.startswith("lipsdp")}

    for path in (REPO / "lipsdp" / "activations").glob("*.py"):
        assert lipsdp_imports(path) <= {"lipsdp.activations.base", "lipsdp.errors"}, path.name
    for path in (REPO / "lipsdp" / "io").glob("*.py"):
        assert not {m for m in lipsdp_imports(path) if m.startswith(("lipsdp.equilibrium", "lipsdp.verify"))}, path


# -- names in the model formats ---------------------------------------------------------
torch = pytest.importorskip("torch")

MODULE_CASES = [(name, m) for name in activations.names() for m in activations.get(name).torch_modules]


@pytest.mark.parametrize(("name", "record"), MODULE_CASES, ids=[m.class_name for _, m in MODULE_CASES])
def test_torch_module_computes_the_entry(name, record):
    """The module class exists where the record says, and its forward and autograd match the entry."""
    entry = activations.get(name)
    module_path, cls_name = record.path.rsplit(".", 1)
    cls = getattr(__import__(module_path, fromlist=[cls_name]), cls_name)
    assert cls is getattr(torch.nn, cls_name)
    module = cls().double()
    params = entry.module_params(module)
    assert set(params) <= set(entry.defaults)
    x = np.concatenate([np.linspace(-8, 8, 2001), [-30.0, 30.0, 1e4, -1e4]])
    xt = torch.tensor(x, requires_grad=True)
    y = module(xt)
    (g,) = torch.autograd.grad(y.sum(), xt)
    np.testing.assert_allclose(entry.evaluate(x, params), y.detach().numpy(), rtol=1e-12, atol=1e-12)
    # at a kink either one-sided slope is right (torch and the entry may pick different sides)
    smooth = np.all(np.abs(x[:, None] - np.asarray(entry.breakpoints(params) + (np.inf,))) > 1e-9, axis=1)
    np.testing.assert_allclose(entry.derivative(x, params)[smooth], g.numpy()[smooth], rtol=1e-9, atol=1e-12)


def test_module_params_read_the_instance():
    get = activations.get
    assert get("leaky_relu").module_params(torch.nn.LeakyReLU(0.3)) == {"negative_slope": 0.3}
    assert get("leaky_relu").module_params(torch.nn.PReLU(init=0.1)) == {"negative_slope": pytest.approx(0.1)}
    assert get("softplus").module_params(torch.nn.Softplus(2.0, 30.0)) == {"beta": 2.0, "threshold": 30.0}
    with pytest.raises(NotExpressible, match="jumps by"):  # issue 18: a jump of 3.4e-3 at x = 2.5
        get("softplus").module_params(torch.nn.Softplus(2.0, 5.0))
    assert get("hardtanh").module_params(torch.nn.ReLU6()) == {"min_val": 0.0, "max_val": 6.0}
    assert get("gelu").module_params(torch.nn.GELU("tanh")) == {"approximate": "tanh"}
    with pytest.raises(NotExpressible, match="one slope per channel"):
        get("leaky_relu").module_params(_prelu3())
    with pytest.raises(NotExpressible, match="SELU"):
        get("elu").aten["elu"](1.0, 1.0507, 1.0)


def _prelu3():
    m = torch.nn.PReLU(3)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.1, 0.2, 0.3]))
    return m


def test_aten_and_onnx_names_exist():
    onnx = pytest.importorskip("onnx")
    for name in activations.names():
        entry = activations.get(name)
        for op in entry.aten:
            assert hasattr(torch.ops.aten, op), (name, op)
        for op in entry.onnx:
            assert onnx.defs.has(op), (name, op)


def test_loader_tables_come_from_the_catalogue():
    from lipsdp.io import aten_ops, builder, onnx_, sequential, torch_module

    assert builder.ELEMENTWISE == frozenset(activations.names())
    assert set(activations.aten_table()) <= set(aten_ops.ATEN_OPS)
    assert set(activations.onnx_table()) <= set(onnx_.ONNX_OPS)
    modules = set(activations.torch_modules())
    assert modules <= set(sequential.LAYER_OPS) and modules <= torch_module.SUPPORTED_TORCH_LAYERS


def test_implicit_activations_come_from_the_catalogue():
    from lipsdp.activations import IMPLICIT_PARAMS as ACTIVATION_PARAMS, implicit_params as activation_params

    assert {"elu": "alpha", "gelu": None, "leaky_relu": "negative_slope", "relu": None, "sigmoid": None,
            "silu": None, "softplus": "beta", "tanh": None}.items() <= ACTIVATION_PARAMS.items()
    assert activation_params("softplus", 2.0) == {"beta": 2.0} and activation_params("gelu", 0.0) == {}
    with pytest.raises(ValueError, match="implicit layers support"):
        activation_params("hardtanh", 1.0)


def test_weights_only_activation_names_resolve_through_the_catalogue():
    from lipsdp.io.checkpoint import normalize_activation

    assert normalize_activation("Leaky-ReLU") == normalize_activation("LeakyReLU") == "leaky_relu"
    assert normalize_activation(" GELU ") == "gelu" and normalize_activation("relu6") == "relu6"
