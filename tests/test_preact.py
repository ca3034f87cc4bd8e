"""Pre-activation bounds (lipsdp.preact) and activations' slope sectors on intervals.

* every node's sampled values over the region lie inside its bounds, for every activation of the
  catalogue, interval and CROWN, on boxes and l2 balls, on an MLP, a CNN and a residual net with Add
  and Concat;
* CROWN is never looser than interval propagation, and strictly tighter on a ReLU MLP;
* ``derivative_range`` holds every sampled difference quotient inside the interval, and stays inside
  the global sector;
* nodes that cannot be bounded (GroupSort, implicit layers) and bad regions are refused with one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import mlp, residual_mlp

from lipsdp import activations
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.io import network_from_module
from lipsdp.nn import GroupSort
from lipsdp.network import Activation, Affine, Concat, Input, Network
from lipsdp.preact import preactivation_bounds, preactivation_bounds_ball

torch.set_num_threads(1)
ALL = activations.names()


def _inside(network, bounds, X) -> bool:
    values = network.node_values(X)
    return all(np.all(values[n] >= bounds[n][0]) and np.all(values[n] <= bounds[n][1]) for n in bounds)


def _net(act, rng, params=None):
    ws = [rng.normal(size=(12, 5)) / 2, rng.normal(size=(12, 12)) / 3, rng.normal(size=(3, 12)) / 3]
    bs = [rng.normal(size=12) * 0.3, rng.normal(size=12) * 0.3, rng.normal(size=3)]
    return Network.sequential(ws, activation=act, biases=bs, params=params)


def _ball(rng, c, r, n):
    u = rng.normal(size=(n, c.size))
    return c + u * (r * rng.uniform(0, 1, (n, 1)) ** (1 / c.size) / np.linalg.norm(u, axis=1, keepdims=True))


@pytest.mark.parametrize("act", ALL)
def test_bounds_hold_for_every_activation(act):
    rng = np.random.default_rng(3)
    params = {"negative_slope": 0.2} if act == "leaky_relu" else None
    net = _net(act, rng, params)
    for r in (0.05, 0.5):
        c = rng.normal(size=5)
        X = np.vstack([c + rng.uniform(-r, r, (3000, 5)), c + r * rng.choice([-1.0, 1.0], (500, 5))])
        boxes = {m: preactivation_bounds(net, c - r, c + r, method=m) for m in ("interval", "crown")}
        for bounds in boxes.values():
            assert _inside(net, bounds, X), act
        ball = preactivation_bounds_ball(net, c, r, "l2")
        assert _inside(net, ball, _ball(rng, c, r, 3000)), act
        if activations.get(act).sector(params or {})[0] < 0:
            continue  # non-monotone: a narrower interval can give a wider tent (still sound)
        for n in boxes["crown"]:  # CROWN is intersected with the interval bounds: never looser
            (c_lo, c_hi), (i_lo, i_hi) = boxes["crown"][n], boxes["interval"][n]
            slack = 1e-8 * (1 + np.abs(i_lo) + np.abs(i_hi))  # the rounding slack of saturated ends
            assert np.all(c_lo >= i_lo - slack) and np.all(c_hi <= i_hi + slack)


def test_crown_is_tighter_on_relu_and_ball_tighter_than_box():
    rng = np.random.default_rng(0)
    net = _net("relu", rng)
    c, r = rng.normal(size=5), 0.3
    out = net.output
    width = {m: np.mean(np.diff(preactivation_bounds(net, c - r, c + r, method=m)[out], axis=0))
             for m in ("interval", "crown")}
    ball = np.mean(np.diff(preactivation_bounds_ball(net, c, r, "l2")[out], axis=0))
    assert width["crown"] < 0.5 * width["interval"]
    assert ball < width["crown"]


def test_cnn_and_residual_graphs():
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(3, 2, 3, stride=2),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(2 * 2 * 2, 3))
    rng = np.random.default_rng(1)
    for model, shape in ((cnn, (1, 5, 5)), (residual_mlp(), (4,))):
        net = network_from_module(model, input_shape=shape).validate()
        c = rng.normal(size=net.input_dim)
        bounds = preactivation_bounds_ball(net, c, 0.2, "linf")
        assert _inside(net, bounds, c + rng.uniform(-0.2, 0.2, (2000, net.input_dim)))
        with torch.no_grad():  # the graph's values are the model's
            X = c + rng.uniform(-0.2, 0.2, (50, net.input_dim))
            ref = model(torch.as_tensor(X.reshape((50,) + shape), dtype=torch.float32)).numpy()
        assert np.all(ref >= bounds[net.output][0] - 1e-5) and np.all(ref <= bounds[net.output][1] + 1e-5)


def test_concat_graph():
    rng = np.random.default_rng(2)
    net = Network()
    x = net.add(Input("x", "Input", (2, 3)))
    a = net.add(Affine("a", "Linear", (2, 3), weight=rng.normal(size=(6, 6)), bias=rng.normal(size=6)), [x])
    h = net.add(Activation("h", "ReLU", (2, 3), function="relu"), [a])
    cat = net.add(Concat("cat", "Concat", (2, 6), axis=1), [h, x])
    net.add(Affine("out", "Linear", (2,), weight=rng.normal(size=(2, 12))), [cat])
    net.validate()
    c = rng.normal(size=6)
    bounds = preactivation_bounds(net, c - 0.5, c + 0.5)
    assert _inside(net, bounds, c + rng.uniform(-0.5, 0.5, (3000, 6)))


@pytest.mark.parametrize("act", ALL)
def test_derivative_range_holds_difference_quotients(act):
    entry = activations.get(act)
    params = {"negative_slope": 0.2} if act == "leaky_relu" else {}
    rng = np.random.default_rng(5)
    lo = rng.normal(size=200) * 3
    hi = lo + rng.exponential(size=200) * np.where(rng.uniform(size=200) < 0.3, 0.01, 2.0)
    alpha, beta = entry.derivative_range(lo, hi, params)
    glo, ghi = entry.sector(params)
    assert np.all(alpha >= glo - 1e-9) and np.all(beta <= ghi + 1e-9) and np.all(alpha <= beta)
    a = lo[:, None] + (hi - lo)[:, None] * rng.uniform(size=(200, 64))
    b = lo[:, None] + (hi - lo)[:, None] * rng.uniform(size=(200, 64))
    a = np.concatenate([a, lo[:, None], hi[:, None]], axis=1)
    b = np.concatenate([b, hi[:, None], lo[:, None]], axis=1)
    keep = np.abs(a - b) > 1e-7
    q = (entry.evaluate(a, params) - entry.evaluate(b, params)) / np.where(keep, a - b, 1.0)
    # Quotients over tiny steps carry the evaluation's rounding: 1e-7 relative slack for them.
    tol = 1e-7 * (1 + np.abs(entry.evaluate(a, params))) / np.maximum(np.abs(a - b), 1e-7)
    assert np.all(~keep | (q >= alpha[:, None] - tol)), act
    assert np.all(~keep | (q <= beta[:, None] + tol)), act


def test_stable_relu_sectors_are_exact():
    relu = activations.get("relu")
    alpha, beta = relu.derivative_range(np.array([-2.0, 0.5, -1.0, 0.0]), np.array([-1.0, 2.0, 1.0, 3.0]), {})
    assert alpha.tolist() == [0.0, 1.0, 0.0, 1.0] and beta.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_refusals():
    torch.manual_seed(0)
    gs = torch.nn.Sequential(torch.nn.Linear(4, 4), GroupSort(2), torch.nn.Linear(4, 2))
    net = network_from_module(gs).validate()
    with pytest.raises(UnsupportedLayerError, match="no pre-activation bounds"):
        preactivation_bounds(net, -np.ones(4), np.ones(4))
    plain = network_from_module(mlp([3, 4, 2])).validate()
    with pytest.raises(LipSDPError, match="lower <= upper"):
        preactivation_bounds(plain, np.ones(3), np.zeros(3))
    with pytest.raises(LipSDPError, match="3 inputs"):
        preactivation_bounds(plain, np.zeros(4), np.ones(4))
    with pytest.raises(LipSDPError, match="method"):
        preactivation_bounds(plain, np.zeros(3), np.ones(3), method="deeppoly")
    with pytest.raises(LipSDPError, match="radius"):
        preactivation_bounds_ball(plain, np.zeros(3), -1.0)
    with pytest.raises(LipSDPError, match="region norm"):
        preactivation_bounds_ball(plain, np.zeros(3), 1.0, norm="l1")
