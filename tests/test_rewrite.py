"""``lipsdp.rewrite.maxmin_as_relu``: GroupSort-2 as ReLU subgraphs (docs/math.md §4.4).

The rewritten networks compute the same function (forward passes and Jacobians
agree), the dedicated GroupSort constraint and the one-ReLU rewriting certify
orthogonal nets at 1, and the two-ReLU rewriting of Pauli et al.'s baseline is
strictly looser there (about 2 with two hidden layers, 2.7-2.8 with three).
"""

from __future__ import annotations

import inspect
import math
import os

import numpy as np
import pytest

import lipsdp
from lipsdp.bounds import jacobians, sampled_lower_bound
from lipsdp.solvers import BACKENDS
from lipsdp.verify import verify
from lipsdp.network import Activation, Affine, Concat, Input, Network, Reshape
from lipsdp.rewrite import VARIANTS, maxmin_as_relu

SOLVER = os.environ.get("LIPSDP_TEST_SOLVER", "auto")
#: The most verification raises a solver's rho (``lipsdp.verify.verify``'s ``max_inflation``).
MAX_INFLATION = inspect.signature(verify).parameters["max_inflation"].default


def above_optimum(cert) -> float:
    """How far (relative) a verified bound may lie above the SDP optimum, from the documented accuracies:
    the backend stops within its ``default_tol`` (relative gap) of the optimal ``rho``, and verification
    inflates ``rho`` by at most ``MAX_INFLATION``; the bound is ``sqrt(rho)``."""
    tol = BACKENDS[cert.solver].default_tol if cert.solver in BACKENDS else 0.0
    return math.sqrt((1 + tol) * (1 + MAX_INFLATION)) - 1


def orthogonal(n, rng):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def maxmin_net(weights, biases=None):
    return Network.sequential(weights, activation="groupsort", params={"group_size": 2}, biases=biases)


def branched_net(rng):
    """Input(6) -> Affine(8) -> Reshape(2, 4) -> GroupSort-2 on (2, 4), concatenated along axis 1
    with a ReLU branch of shape (2, 2) -> Reshape(12) -> Affine(3): shapes and a DAG survive the rewrite."""
    net = Network()
    x = net.add(Input("input", "Input", (6,)))
    h = net.add(Affine("fc", "Linear", (8,), weight=rng.standard_normal((8, 6)), bias=rng.standard_normal(8)), [x])
    h = net.add(Reshape("view", "View", (2, 4)), [h])
    s = net.add(Activation("sort", "GroupSort2", (2, 4), function="groupsort", params={"group_size": 2}), [h])
    b = net.add(Affine("side", "Linear", (4,), weight=rng.standard_normal((4, 6))), [x])
    b = net.add(Activation("side_relu", "ReLU", (4,), function="relu"), [b])
    b = net.add(Reshape("side_view", "View", (2, 2)), [b])
    c = net.add(Concat("cat", "Concat", (2, 6), axis=1), [s, b])
    c = net.add(Reshape("flat", "Flatten", (12,)), [c])
    net.add(Affine("head", "Linear", (3,), weight=rng.standard_normal((3, 12)), bias=rng.standard_normal(3)), [c])
    return net


def relu_neurons(net):
    return sum(net.op(n).size for n in net.activations() if net.op(n).function == "relu")


# ---------------------------------------------------------------------------
# the rewrite is the same function
# ---------------------------------------------------------------------------
def test_pair_formulas():
    """sort(u) = H u + G relu(W1 u) (two) and = u + E relu(F u) (one), ascending, on every sign pattern."""
    u = np.array([[3.0, -1.0], [-1.0, 3.0], [2.0, 2.0], [0.0, -0.5], [-4.0, -7.0]])
    net = maxmin_net([np.eye(2), np.eye(2)])
    for variant in VARIANTS:
        np.testing.assert_array_equal(maxmin_as_relu(net, variant).numpy_forward(u), np.sort(u, axis=1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sizes", [(4, 6, 2), (3, 8, 8, 4), (5, 10, 6, 4, 2)])
def test_forward_and_jacobian_agree(sizes, variant):
    rng = np.random.default_rng(len(sizes))
    weights = [rng.standard_normal((o, i)) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rng.standard_normal(o) for o in sizes[1:]]
    net = maxmin_net(weights, biases)
    relu_net = maxmin_as_relu(net, variant).validate()
    x = 2.0 * rng.standard_normal((200, sizes[0]))
    np.testing.assert_allclose(relu_net.numpy_forward(x), net.numpy_forward(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jacobians(relu_net, x), jacobians(net, x), atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_dag_and_shapes_kept(variant):
    rng = np.random.default_rng(7)
    net = branched_net(rng)
    fingerprint = net.fingerprint()
    relu_net = maxmin_as_relu(net, variant).validate()
    assert net.fingerprint() == fingerprint  # the input network is left alone
    x = rng.standard_normal((100, 6))
    np.testing.assert_allclose(relu_net.numpy_forward(x), net.numpy_forward(x), rtol=1e-12, atol=1e-12)
    sort_node = [n for n in relu_net.graph.nodes if relu_net.op(n).name == "sort"]
    assert len(sort_node) == 1 and relu_net.op(sort_node[0]).shape == (2, 4)
    assert relu_net.output_dim == 3 and relu_net.input_dim == 6


@pytest.mark.parametrize("variant,per_pair", [("two", 2), ("one", 1)])
def test_structure(variant, per_pair):
    rng = np.random.default_rng(0)
    net = maxmin_net([rng.standard_normal((6, 4)), rng.standard_normal((8, 6)), rng.standard_normal((2, 8))])
    relu_net = maxmin_as_relu(net, variant)
    functions = {relu_net.op(n).function for n in relu_net.activations()}
    assert functions == {"relu"}
    assert relu_neurons(relu_net) == per_pair * (6 + 8) // 2
    assert not relu_net.is_feedforward()  # residual (Add) subgraphs


def test_other_activations_copied():
    rng = np.random.default_rng(1)
    net = Network.sequential([rng.standard_normal((4, 3)), rng.standard_normal((2, 4))], activation="tanh")
    out = maxmin_as_relu(net)
    assert [type(op).__name__ for op in out.ops()] == ["Input", "Affine", "Activation", "Affine"]
    assert out.fingerprint() == net.fingerprint()


def test_fullsort_of_two_is_maxmin():
    net = Network.sequential([np.eye(2), np.eye(2)], activation="groupsort")  # no group_size: FullSort
    u = np.array([[1.0, -2.0], [0.5, 0.7]])
    np.testing.assert_array_equal(maxmin_as_relu(net, "one").numpy_forward(u), np.sort(u, axis=1))


@pytest.mark.parametrize("params,size", [({"group_size": 4}, 8), ({"group_size": 3}, 6), ({}, 6)])
def test_other_group_sizes_rejected(params, size):
    net = Network.sequential([np.eye(size), np.eye(size)], activation="groupsort", params=params)
    with pytest.raises(ValueError, match="group_size 2"):
        maxmin_as_relu(net)


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        maxmin_as_relu(maxmin_net([np.eye(2), np.eye(2)]), "three")


# ---------------------------------------------------------------------------
# docs/math.md §4.4: orthogonal nets (true L = 1)
# ---------------------------------------------------------------------------
# Seeds whose GroupSort-QC solve verifies: at the optimum every block of the LMI is 0 (no
# interior), and a few percent of random orthogonal nets fail the strict verification test.
ORTHOGONAL = [(4, 2, 0), (4, 3, 0), (6, 2, 1), (6, 3, 0), (8, 2, 0), (8, 3, 0)]


@pytest.mark.parametrize("n,hidden,seed", ORTHOGONAL)
def test_orthogonal_maxmin(n, hidden, seed):
    rng = np.random.default_rng(100 * n + 10 * hidden + seed)
    net = maxmin_net([orthogonal(n, rng) for _ in range(hidden + 1)])
    certs = {"groupsort": lipsdp.certify(net, solver=SOLVER)}
    for variant in VARIANTS:
        certs[variant] = lipsdp.certify(maxmin_as_relu(net, variant), solver=SOLVER)
    lower = sampled_lower_bound(net, samples=512)
    assert lower == pytest.approx(1.0, abs=1e-9)
    for name, cert in certs.items():
        assert cert.verified, (name, cert.message)
        assert lower <= cert.bound, f"UNSOUND {name}: sampled {lower} > certified {cert.bound}"
        # never above the trivial bound (issue 18): an SDP bound above it gives way to the proven product
        assert cert.bound <= cert.trivial_bound, (name, cert.bound, cert.trivial_bound, cert.message)
    # the optimum is 1 (docs/math.md §4.4): the bounds sit within the solvers' documented accuracy of it
    assert 1.0 <= certs["groupsort"].bound <= 1.0 + above_optimum(certs["groupsort"])
    assert 1.0 <= certs["one"].bound <= 1.0 + above_optimum(certs["one"])
    assert certs["two"].bound > 1.5  # the baseline's looseness (docs/math.md §4.4: 1.96, 2.64, 2.00 on its nets)
    print(f"orthogonal n={n} hidden={hidden}: groupsort QC {certs['groupsort'].bound:.6f}  "
          f"one-ReLU {certs['one'].bound:.6f}  two-ReLU {certs['two'].bound:.6f}")


# ---------------------------------------------------------------------------
# random nets: every representation is sound; one-ReLU = GroupSort QC <= two-ReLU
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(4, 6, 6, 3), (5, 8, 8, 2)])
def test_random_maxmin(sizes):
    """The two-ReLU Shor relaxation contains the one-ReLU one (map r1 = r - d, r2 = r with
    d = u1 - u2: both ReLU constraints become r (d - r) >= 0), so its bound cannot be smaller."""
    rng = np.random.default_rng(sum(sizes))
    net = maxmin_net([rng.standard_normal((o, i)) for i, o in zip(sizes[:-1], sizes[1:])])
    lower = sampled_lower_bound(net, samples=1024)
    certs = {"groupsort": lipsdp.certify(net, solver=SOLVER)}
    for variant in VARIANTS:
        certs[variant] = lipsdp.certify(maxmin_as_relu(net, variant), solver=SOLVER)
    for name, cert in certs.items():
        assert cert.verified, (name, cert.message)
        assert lower <= cert.bound, f"UNSOUND {name}: sampled {lower} > certified {cert.bound}"
        assert cert.bound <= cert.trivial_bound
    assert certs["one"].bound == pytest.approx(certs["groupsort"].bound, rel=1e-4)
    assert certs["two"].bound >= certs["one"].bound * (1 - 1e-4)
    print(f"random {sizes}: sampled {lower:.4f}  groupsort QC {certs['groupsort'].bound:.4f}  "
          f"one-ReLU {certs['one'].bound:.4f}  two-ReLU {certs['two'].bound:.4f}  "
          f"trivial {certs['groupsort'].trivial_bound:.4f}")
