"""Wide-input MLPs (issue 19, item 2): the LMI's terms are assembled once (``lipsdp/reuse.py``).

The LMI verified on a net that reads a wide input through a narrow first layer is restricted to that
layer's input rows (docs/math.md §10.1); the LMI solved is on an orthonormal basis of the same rows.
The two differ only in the input block and the first layer, so the solved one shares the verified
one's index arrays and later layers' terms.  These tests pin that the bounds did not move (a table
computed with the code before the change), that the shared LMI is the reduced LMI entry for entry,
that bounds keep the sandwich, and that the memory refusal still comes first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from lipsdp import layer_sweep
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.reductions import Query, ReduceInput
from lipsdp.reuse import solve_lmi
from lipsdp.scaling import chain_scales

from conftest import assert_sandwich, torch_lower_bound

#: ``(n0, width, depth) -> bound``, certified with the code before lipsdp.reuse (commit 19e2c98,
#: solver auto, which chose completion for all four; the two deep ones now take one layer sweep, not
#: two, and come out tighter by 3e-11 relative).  The first two take the input-span path
#: (``2 width <= n0``), the second and fourth the layer sweeps (depth >= 20).
BEFORE = {
    (120, 6, 3): 0.1730254447288898,
    (60, 4, 22): 0.00018430079110866854,
    (8, 10, 3): 0.27191553532988494,
    (6, 5, 24): 6.250787100381979e-05,
}


def torch_mlp(n0: int, width: int, depth: int, out: int = 3, seed: int = 0) -> nn.Sequential:
    """Linear / LeakyReLU(0.01) layers as torch initialises them (float64)."""
    torch.manual_seed(seed)
    dims = [n0] + [width] * depth
    layers = []
    for i, o in zip(dims, dims[1:]):
        layers += [nn.Linear(i, o), nn.LeakyReLU(0.01)]
    layers.append(nn.Linear(dims[-1], out))
    return nn.Sequential(*layers).double().eval()


def random_net(n0: int, width: int, depth: int, seed: int = 0) -> Network:
    rng = np.random.default_rng(seed)
    dims = [n0] + [width] * depth + [3]
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(dims, dims[1:])]
    return Network.sequential(weights, activation="leaky_relu", params={"negative_slope": 0.01})


@pytest.mark.parametrize("shape", list(BEFORE))
def test_bounds_as_before_and_sandwiched(shape):
    model = torch_mlp(*shape)
    cert = lipsdp.certify(model, input_shape=(shape[0],), lower_bound_samples=0)
    assert cert.verified, cert.message
    assert cert.bound == pytest.approx(BEFORE[shape], rel=1e-7)
    assert_sandwich(cert, torch_lower_bound(model, shape[0], samples=64))


@pytest.mark.parametrize("shape,formulation", [((120, 6, 3), "neuron"), ((60, 4, 22), "neuron"),
                                               ((50, 8, 4), "neuron"), ((50, 8, 4), "layer")])
def test_solved_lmi_shares_the_verified_terms(shape, formulation):
    lifting = lift(random_net(*shape))
    query = Query.build(lifting, formulation, "l2", None)
    assert query.given.input_metric is not None and query.given.factors is not None
    reduced = lifting.reduce_input()
    full = build_lmi(reduced, formulation)
    shared = solve_lmi(query.given, reduced, formulation)
    assert shared is not None
    assert shared.rows is query.given.rows and shared.cols is query.given.cols and shared.var is query.given.var
    x = np.random.default_rng(1).random(full.n_var)
    assert np.array_equal(shared.matrix(x), full.matrix(x))  # the same floats: each entry's terms in one order
    # The factored form (what completion, chordal and the sweeps read) is the same matrix too.
    for lmi in (shared, query.given):
        R, iu, iw, coef, var = lmi.factors
        Rd = R.toarray()
        F = (Rd[iu].T * (coef * x[var])) @ Rd[iw]
        assert np.allclose(F + F.T + lmi.const.toarray(), lmi.matrix(x), rtol=0, atol=1e-13)
    solved, _ = ReduceInput().apply(query)
    assert solved.solve.rows is query.given.rows


def test_falls_back_where_the_layout_differs():
    lifting = lift(random_net(120, 6, 3))
    query = Query.build(lifting, "neuron", "l2", None)
    assert solve_lmi(query.given, lifting, "neuron") is None  # input block of another size
    plain = Query.build(lifting, "neuron", "l2", None, restrict=False)
    assert solve_lmi(plain.given, lifting.reduce_input(), "neuron") is None  # not the input-span LMI


def test_memory_refusal_comes_first():
    """A wide input read through 100 neurons: about 100 MB of one layer's terms against a 40 MB limit."""
    net = random_net(400, 100, 2)
    with pytest.raises(lipsdp.ResourceError, match="building the LMI needs about"):
        lipsdp.certify(net, memory_limit=40 * 2**20, lower_bound_samples=0)


def test_second_sweep_only_on_wide_layers(monkeypatch):
    """The default takes one layer sweep below ``SECOND_SWEEP_WIDTH`` and ``SWEEPS`` from it on."""
    monkeypatch.setattr(layer_sweep, "MIN_LAYERS", 4)
    lmi = build_lmi(lift(random_net(8, 8, 6)))
    greedy = chain_scales(lmi)
    one, two = (layer_sweep.sweep(lmi, greedy, k).x for k in (1, 2))
    assert two[0] < one[0] < greedy.x[0]
    assert np.array_equal(layer_sweep.sweep(lmi, greedy).x, one)
    monkeypatch.setattr(layer_sweep, "SECOND_SWEEP_WIDTH", 8)
    assert np.array_equal(layer_sweep.sweep(lmi, greedy).x, two)
