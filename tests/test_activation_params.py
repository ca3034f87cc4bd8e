"""Parameterised activations: exact sectors over the whole real line, or refusal (issue 18).

torch's Softplus switches to the identity where ``beta x > threshold``; the
function jumps there by ``log(1 + e^-threshold) / |beta|``.  A jump of 1e-6 or
more has no finite Lipschitz constant and is refused by every loader; below it
the smooth softplus is certified, whose sector [0, 1] holds for every real
``beta != 0`` (negative ones included).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipsdp  # noqa: E402
from lipsdp import activations  # noqa: E402
from lipsdp.activations import NotExpressible  # noqa: E402
from lipsdp.activations.softplus import MAX_JUMP, jump, smallest_threshold  # noqa: E402
from lipsdp.errors import ModelLoadError, UnsupportedLayerError  # noqa: E402
from lipsdp.io import load_network, network_from_module  # noqa: E402

from conftest import assert_sandwich, torch_lower_bound  # noqa: E402

SOFTPLUS = activations.get("softplus")
betas = st.one_of(st.floats(0.05, 20.0), st.floats(-20.0, -0.05))


def smooth_softplus(x: float, beta: float) -> float:
    """``log(1 + e^{beta x}) / beta`` in float64, without overflow."""
    return float(np.logaddexp(0.0, beta * x) / beta)


@settings(max_examples=400, deadline=None)
@given(beta=betas, a=st.floats(-1e6, 1e6), d=st.one_of(st.floats(-1e3, 1e3), st.floats(-1e-6, 1e-6)))
def test_softplus_sector_holds_for_the_smooth_function(beta, a, d):
    """Hypothesis: difference quotients of the smooth softplus lie in [0, 1] for every beta != 0."""
    b = a + d
    if a == b:
        return
    lo, hi = SOFTPLUS.sector({"beta": beta, "threshold": 40.0})
    fa, fb = smooth_softplus(a, beta), smooth_softplus(b, beta)
    q = (fa - fb) / (a - b)
    tol = 1e-9 + 4e-16 * (abs(fa) + abs(fb) + abs(a) + abs(b) + 1) / abs(a - b)
    assert lo - tol <= q <= hi + tol


@settings(max_examples=300, deadline=None)
@given(beta=betas, threshold=st.floats(-50.0, 60.0))
def test_softplus_accepted_exactly_when_the_jump_is_small(beta, threshold):
    """Accepted parameters: torch's function is within MAX_JUMP of the smooth one everywhere, thresholds crossed."""
    params = {"beta": beta, "threshold": threshold}
    if jump(beta, threshold) >= MAX_JUMP:
        with pytest.raises(ValueError, match="jumps by"):
            SOFTPLUS.sector(params)
        with pytest.raises(NotExpressible, match=f"threshold >= {smallest_threshold(beta):g}"):
            SOFTPLUS.aten["softplus"](beta, threshold)
        return
    assert SOFTPLUS.sector(params) == (0.0, 1.0)
    edge = threshold / beta
    x = np.concatenate([edge + np.array([-1e-3, -1e-9, 0.0, 1e-9, 1e-3]), np.linspace(-80, 80, 161)])
    torch_values = nn.functional.softplus(torch.from_numpy(x), beta, threshold).numpy()
    smooth = np.logaddexp(0.0, beta * x) / beta
    assert np.max(np.abs(torch_values - smooth)) <= MAX_JUMP * (1 + 1e-9) + 1e-15 * np.max(np.abs(x))


def test_smallest_threshold_is_the_boundary():
    for beta in (0.01, 0.5, 1.0, -2.0, 30.0):
        t = smallest_threshold(beta)
        assert jump(beta, t) < MAX_JUMP <= jump(beta, t - 1)
    assert jump(1.0, 20.0) == pytest.approx(2.06e-9, rel=1e-3)


# -- refusal from every loader ---------------------------------------------------------------------------
def _jumpy_softplus_model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(3, 5), nn.Softplus(beta=2.0, threshold=5.0), nn.Linear(5, 2)).eval()


def test_jumpy_softplus_is_discontinuous_in_torch():
    """The case refused below: torch's function jumps by 3.4e-3 at x = 2.5, a step no bound can cover."""
    f = nn.Softplus(beta=2.0, threshold=5.0)
    x = torch.tensor([2.5, 2.5 + 1e-6], dtype=torch.float64)
    y = f(x)
    assert abs(float(y[0] - y[1])) > 3e-3
    assert jump(2.0, 5.0) == pytest.approx(3.357e-3, rel=1e-3)


@pytest.mark.parametrize("fmt", ["api", "pickle", "torchscript-trace", "torchscript-script", "export"])
def test_jumpy_softplus_is_refused_by_every_loader(fmt, tmp_path):
    model = _jumpy_softplus_model()
    example = torch.randn(2, 3)
    path = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pickle":
            torch.save(model, path)
        elif fmt == "torchscript-trace":
            torch.jit.save(torch.jit.trace(model, (example,)), str(path))
        elif fmt == "torchscript-script":
            torch.jit.save(torch.jit.script(model), str(path))
        elif fmt == "export":
            path = tmp_path / "m.pt2"
            torch.export.save(torch.export.export(model, (example,)), str(path))
    with pytest.raises(UnsupportedLayerError) as info:
        network_from_module(model) if fmt == "api" else load_network(path)
    message = str(info.value)
    assert "jumps by 0.00336" in message and "threshold >= " in message and "\n" not in message


def test_jumpy_softplus_is_refused_in_weights_only_files(tmp_path):
    torch.save(_jumpy_softplus_model().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="jumps by 0.00336"):
        load_network(tmp_path / "sd.pt", activation="softplus", activation_params={"beta": 2.0, "threshold": 5.0})


@pytest.mark.parametrize("beta", [-1.5, 0.5])
def test_softplus_with_any_beta_certifies_soundly(beta):
    """Sandwich against the torch model, negative beta included, with torch's default threshold."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 6), nn.Softplus(beta=beta), nn.Linear(6, 6), nn.Softplus(beta=beta),
                          nn.Linear(6, 2)).eval()
    cert = lipsdp.certify(model)
    lower = max(torch_lower_bound(model, 3, scale=s) for s in (0.1, 1.0, 10.0, 50.0))
    assert_sandwich(cert, lower, rel=1e-6)
    assert math.isfinite(cert.bound)


def test_gelu_with_an_unknown_approximation_is_refused_when_loading():
    """Refused by the loaders' mapping (one unsupported-layer line), not later by the sector."""
    with pytest.raises(NotExpressible, match="approximate='sigmoid'"):
        activations.get("gelu").aten["gelu"]("sigmoid")
    with pytest.raises(NotExpressible, match="approximate='erf'"):
        activations.get("gelu").onnx["Gelu"]({"approximate": "erf"})
    assert activations.get("gelu").onnx["Gelu"]({}) == {"approximate": "none"}
