"""Layer-by-layer sweeps toward the SDP optimum (``lipsdp/layer_sweep.py``).

The swept point must stay a feasible point of the LMI (rigorously verified here, so its bound lies
above the SDP's), lie much closer to the optimum than the greedy point on deep nets, leave the
certified bound unchanged, and save interior-point iterations.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import lipsdp
from lipsdp import checking, layer_sweep
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.scaling import chain_scales
from lipsdp.solvers import get_backend
from lipsdp.verify import verify

from conftest import assert_sandwich, torch_lower_bound


def _weights(sizes, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]


def _net(sizes, seed, activation="relu", params=None):
    return Network.sequential(_weights(sizes, seed), activation=activation, params=params or {})


def _torch_net(sizes, seed, activation, params):
    """The same net as a torch module, for the autograd lower bound."""
    import torch
    from torch import nn

    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
           "leaky_relu": lambda: nn.LeakyReLU((params or {}).get("negative_slope", 0.01))}[activation]
    layers = []
    for W in _weights(sizes, seed):
        lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W))
        layers += [lin, act()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.fixture
def any_depth(monkeypatch):
    """Sweep nets from 4 activation layers on (the small test nets), not only deep ones."""
    monkeypatch.setattr(layer_sweep, "MIN_LAYERS", 4)


def _points(net, norm="l2", omap=None):
    lmi = build_lmi(lift(net), output_map=omap, norm=norm)
    greedy = chain_scales(lmi)
    assert greedy is not None
    return lmi, greedy, layer_sweep.sweep(lmi, greedy)


@pytest.mark.parametrize("activation,params,norm", [("relu", None, "l2"), ("tanh", None, "l2"),
                                                    ("leaky_relu", {"negative_slope": 0.1}, "l2"),
                                                    ("relu", None, "linf"), ("sigmoid", None, "linf")])
def test_swept_point_is_a_verified_certificate_below_the_greedy_one(activation, params, norm, any_depth):
    sizes = (5,) + (8,) * 6 + (2,)
    net = _net(sizes, 11, activation, params)
    omap = np.array([[1.0, -1.0]]) if norm == "linf" else None
    lmi, greedy, swept = _points(net, norm, omap)
    assert swept is not greedy
    assert swept.total < greedy.total
    assert np.all(swept.x[lmi.nonneg] > 0)
    # Feasible: verify() re-derives rho from the multipliers and proves M <= 0 in floating point.
    ver = verify(lmi, swept.x)
    assert ver.verified
    own = np.sqrt(swept.x[: lmi.n_in].sum())  # sqrt(rho), or sqrt(sum lambda_in) for l_inf
    assert ver.bound <= own * (1 + 1e-4)  # verify re-derives the input multipliers itself
    # Hence at or above the SDP optimum, which is at or above the sampled lower bound.
    cert = lipsdp.certify(net, solver="ipm", norm=norm, output_map=omap)
    assert cert.bound <= ver.bound * (1 + 1e-7)
    if norm == "l2":
        assert_sandwich(cert, torch_lower_bound(_torch_net(sizes, 11, activation, params), 5))


def test_deep_net_greedy_decades_off_swept_within_a_few(any_depth):
    """16-16x16-4: the greedy point is two decades above the optimum in rho, two sweeps bring it
    within a factor of 5, and the solves from it agree with the SDP."""
    net = _net((16,) + (16,) * 16 + (4,), 3)
    lmi, greedy, swept = _points(net)
    cert = lipsdp.certify(net, solver="completion")
    assert cert.verified
    opt = cert.bound
    assert (greedy.total / opt) ** 2 > 50
    assert 1.0 <= (swept.total / opt) ** 2 < 5
    one = layer_sweep.sweep(lmi, greedy, 1)
    assert swept.total <= one.total < greedy.total
    chordal = lipsdp.certify(net, solver="chordal")
    assert chordal.bound == pytest.approx(opt, rel=1e-6)


@pytest.mark.parametrize("solver", [pytest.param("completion", marks=pytest.mark.slow), "chordal"])
def test_start_saves_iterations(solver):
    """The same solve from the greedy and from the swept point (four decades apart in rho on this
    48-layer net): same optimum, and 10 fewer iterations when measured (36 -> 26, 32 -> 22)."""
    net = _net((16,) + (12,) * 48 + (4,), 3)
    lmi = build_lmi(lift(net).reduce_input())
    greedy = chain_scales(lmi)
    swept = layer_sweep.sweep(lmi, greedy)
    results = []
    for point in (greedy, swept):
        plmi, v = replace(lmi, start=point.x).preconditioned(point.block_scale, point.total)
        res = get_backend(solver).solve(plmi)
        assert res.status in ("optimal", "optimal_inaccurate")
        results.append((res.iterations, res.objective * v[0]))
    (it_greedy, rho_greedy), (it_swept, rho_swept) = results
    assert rho_swept == pytest.approx(rho_greedy, rel=1e-5)
    assert it_swept <= it_greedy - 5


def test_declines_shallow_wide_and_failed_sweeps(monkeypatch):
    six = _net((5,) + (8,) * 6 + (2,), 11)
    lmi = build_lmi(lift(six))
    greedy = chain_scales(lmi)
    assert layer_sweep.sweep(lmi, greedy) is greedy  # below MIN_LAYERS: the greedy point is close enough
    monkeypatch.setattr(layer_sweep, "MIN_LAYERS", 4)
    assert layer_sweep.sweep(lmi, greedy) is not greedy
    monkeypatch.setattr(layer_sweep, "MAX_WIDTH", 7)
    assert layer_sweep.sweep(lmi, greedy) is greedy
    monkeypatch.setattr(layer_sweep, "MAX_WIDTH", 128)
    # A deadline already passed, or a layer step that fails: the greedy point stays.
    assert layer_sweep.sweep(lmi, greedy, deadline=0.0) is greedy

    def fail(*args, **kwargs):
        raise np.linalg.LinAlgError("test")

    monkeypatch.setattr(layer_sweep._Chain, "step_lmi", fail)
    assert layer_sweep.sweep(lmi, greedy) is greedy


def test_certificates_recheck_with_and_without_sweeps(monkeypatch, any_depth):
    """A certificate proven under the swept scales, and one proven under the greedy scales (an older
    lipsdp, or a time limit that cut the sweeps), both re-check."""
    net = _net((5,) + (8,) * 6 + (2,), 11)
    swept = lipsdp.certify(net, solver="ipm")
    sweeps = layer_sweep.SWEEPS
    monkeypatch.setattr(layer_sweep, "SWEEPS", 0)
    greedy = lipsdp.certify(net, solver="ipm")
    monkeypatch.setattr(layer_sweep, "SWEEPS", sweeps)
    assert swept.bound == pytest.approx(greedy.bound, rel=1e-6)
    for cert in (swept, greedy):
        assert checking.check_certificate(cert, net).verified
