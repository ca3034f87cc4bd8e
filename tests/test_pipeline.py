"""End-to-end certification: published anchors, closed forms and the soundness sandwich."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.io

import lipsdp
from lipsdp.network import Network
from lipsdp.solvers import usable
from conftest import assert_sandwich, torch_jacobians, torch_lower_bound

OPEN_SOURCE = [s for s in ("cvxopt", "sdpa", "scs", "clarabel") if s in usable()]


def anchor_weights(anchors, name):
    return list(scipy.io.loadmat(anchors / name)["weights"][0])


def vertex_max(weights, alpha=0.0, beta=1.0):
    """max over D_k in {alpha, beta}^{n_k} of ||W_l D_l ... D_1 W_0||_2 (docs/math.md §1.5): a sound bound can't go below."""
    hidden = sum(w.shape[0] for w in weights[:-1])
    best = 0.0
    for pattern in itertools.product((alpha, beta), repeat=hidden):
        J, k = weights[0], 0
        for w in weights[1:]:
            d = np.array(pattern[k:k + J.shape[0]])
            k += J.shape[0]
            J = w @ (d[:, None] * J)
        best = max(best, np.linalg.norm(J, 2))
    return best


@pytest.mark.parametrize("solver", ["cvxopt", "sdpa", "clarabel", "scs"])
def test_random_anchor_neuron(anchors, solver):
    if solver not in usable():
        pytest.skip(f"{solver} not usable here")
    cert = lipsdp.certify(Network.sequential(anchor_weights(anchors, "lipsdp_random_weights.mat")),
                          solver=solver)
    assert cert.verified
    assert round(cert.bound, 3) == 36.482
    assert cert.lower_bound <= cert.bound <= cert.trivial_bound
    assert abs(cert.trivial_bound - 43.306) < 1e-3


def test_random_anchor_layer(anchors):
    cert = lipsdp.certify(Network.sequential(anchor_weights(anchors, "lipsdp_random_weights.mat")),
                          formulation="layer")
    assert cert.verified and round(cert.bound, 3) == 39.839


def test_mnist_anchor_layer(anchors):
    cert = lipsdp.certify(Network.sequential(anchor_weights(anchors, "lipsdp_mnist_weights.mat")),
                          formulation="layer", lower_bound_samples=0)
    assert cert.verified and round(cert.bound, 3) == 26.256


def test_mnist_anchor_neuron(anchors):
    cert = lipsdp.certify(Network.sequential(anchor_weights(anchors, "lipsdp_mnist_weights.mat")), solver="cvxopt")
    assert cert.verified and round(cert.bound, 3) == 24.366
    assert abs(cert.trivial_bound - 31.504) < 1e-3
    # The solve ran on the input-reduced LMI (784 -> 50 input directions); verification on the full one.
    assert cert.network["solved_lmi_size"] == 100 and cert.network["lmi_size"] == 834


def test_backends_agree():
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((8, 5)), rng.standard_normal((8, 8)), rng.standard_normal((3, 8))]
    bounds = {s: lipsdp.certify(Network.sequential(ws), solver=s).bound for s in OPEN_SOURCE}
    ref = min(bounds.values())
    for s, b in bounds.items():
        assert b == pytest.approx(ref, rel=2e-4 if s == "scs" else 1e-6), bounds


def test_single_linear_layer_is_spectral_norm():
    W = np.random.default_rng(0).standard_normal((7, 5))
    cert = lipsdp.certify(Network.sequential([W]))
    assert cert.verified and cert.solver == "closed-form"
    norm = np.linalg.norm(W, 2)
    assert norm <= cert.bound <= norm * (1 + 1e-8)


def test_ramp_counterexample_is_not_below_one():
    """relu(x) - relu(x-1) has L = 1; LipSDP-Network wrongly returns 0 (docs/math.md §1.2). We must return 1."""
    net = Network.sequential([np.array([[1.0], [1.0]]), np.array([[1.0, -1.0]])], biases=[np.array([0.0, -1.0]), None])
    for form in ("neuron", "layer"):
        cert = lipsdp.certify(net, formulation=form)
        assert cert.verified and 1.0 <= cert.bound <= 1.0 + 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_vertex_max_below_neuron_below_layer(seed):
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((5, 3)), rng.standard_normal((5, 5)), rng.standard_normal((2, 5))]
    net = Network.sequential(ws)
    neuron = lipsdp.certify(net).bound
    layer = lipsdp.certify(net, formulation="layer").bound
    assert vertex_max(ws) <= neuron * (1 + 1e-9)
    assert neuron <= layer * (1 + 1e-7)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "leaky_relu", "elu", "softplus",
                                        "hardtanh", "silu", "gelu"])
def test_sandwich_torch_models(activation):
    from models import mlp

    model = mlp([6, 16, 16, 3], activation=activation, seed=1)
    cert = lipsdp.certify(model)
    lower = torch_lower_bound(model, 6, samples=512, scale=2.0)
    assert_sandwich(cert, lower)
    assert cert.bound < cert.trivial_bound  # the SDP is worth running


def test_vertex_max_non_monotone_sector():
    """SiLU's sector has a negative lower slope; vertices of that sector still lie below the bound."""
    from lipsdp.constraints import get_constraint
    from lipsdp.network import Activation

    lo, hi = get_constraint("silu").sector(Activation("a", "SiLU", (1,), function="silu"))
    rng = np.random.default_rng(7)
    ws = [rng.standard_normal((4, 3)), rng.standard_normal((4, 4)), rng.standard_normal((2, 4))]
    cert = lipsdp.certify(Network.sequential(ws, activation="silu"))
    assert vertex_max(ws, lo, hi) <= cert.bound * (1 + 1e-9) <= cert.trivial_bound * (1 + 1e-6)


def test_digits_classifier_certifies():
    from conftest import EXAMPLES

    path = EXAMPLES / "digits_mlp.pt"
    if not path.exists():
        pytest.skip("examples/digits_mlp.pt not built")
    import torch

    cert = lipsdp.certify(path)
    model = torch.load(path, weights_only=False)
    assert_sandwich(cert, torch_lower_bound(model, 64, samples=256, scale=5.0))


# -- l_inf (docs/math.md §2.1) ------------------------------------------
def test_linf_single_linear_layer_is_l1_norm():
    w = np.random.default_rng(0).standard_normal((1, 6))
    cert = lipsdp.certify(Network.sequential([w]), norm="linf")
    assert cert.verified and np.abs(w).sum() <= cert.bound <= np.abs(w).sum() * (1 + 1e-8)


@pytest.mark.parametrize("seed", range(3))
def test_linf_between_vertex_max_and_trivial(seed):
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((5, 4)), rng.standard_normal((5, 5)), rng.standard_normal((3, 5))]
    net = Network.sequential(ws, biases=[rng.standard_normal(w.shape[0]) for w in ws])
    cert = lipsdp.certify(net, norm="linf")
    vertex = 0.0
    for pattern in itertools.product((0.0, 1.0), repeat=10):
        d1, d2 = np.array(pattern[:5]), np.array(pattern[5:])
        J = ws[2] @ (d2[:, None] * (ws[1] @ (d1[:, None] * ws[0])))
        vertex = max(vertex, np.abs(J).sum(axis=1).max())
    assert cert.verified
    assert cert.lower_bound <= vertex * (1 + 1e-12)
    assert vertex <= cert.bound * (1 + 1e-9) <= cert.trivial_bound * (1 + 1e-6)
    assert max(p["bound"] for p in cert.network["per_output"]) == cert.bound


def test_linf_torch_model_sampled_gradient_l1():
    import torch
    from models import mlp

    model = mlp([5, 10, 10, 2], activation="tanh", seed=3)
    x = 2 * torch.randn(512, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lower = float(np.abs(torch_jacobians(model, x)).sum(axis=2).max())
    cert = lipsdp.certify(model, norm="linf")
    assert cert.verified and lower <= cert.bound <= cert.trivial_bound


def test_output_index_and_pairs():
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal((6, 4)), rng.standard_normal((3, 6))]
    net = Network.sequential(ws)
    full = lipsdp.certify(net).bound
    one = lipsdp.certify(net, output_index=1)
    pair = lipsdp.certify(net, output_map=np.array([[1.0, -1.0, 0.0]]))
    assert one.verified and pair.verified
    assert one.lower_bound <= one.bound <= full * (1 + 1e-6)
    assert pair.lower_bound <= pair.bound <= np.sqrt(2) * full * (1 + 1e-6)  # docs/math.md §1.3: L_yj <= sqrt(2) L


def test_first_order_backend_is_sound_and_close():
    """Descent on rho(T) (docs/math.md §8.4): any iterate certifies; verified value >= the SDP optimum."""
    rng = np.random.default_rng(8)
    ws = [rng.standard_normal((10, 6)) / 2, rng.standard_normal((10, 10)) / 3, rng.standard_normal((3, 10)) / 3]
    net = Network.sequential(ws)
    exact = lipsdp.certify(net, solver="cvxopt", lower_bound_samples=0).bound
    fo = lipsdp.certify(net, solver="fo", lower_bound_samples=0)
    assert fo.verified and exact * (1 - 1e-9) <= fo.bound <= exact * 1.01
    assert fo.solver == "fo" and fo.solver_status in ("optimal_inaccurate", "time_limit")


# -- the stages, composed by hand as pipeline.py composes them --------------------------------------


def test_dir_lists_the_public_api():
    names = dir(lipsdp)
    assert {"certify", "load_network", "certified_radii", "Certificate", "LipSDPError"} <= set(names)


def test_stages_by_hand_give_the_certificate():
    """lift -> Query -> (ReduceInput, Precondition) -> Solve -> invert -> verify: the bound of certify()."""
    from lipsdp.bounds import node_lipschitz
    from lipsdp.lifting import lift
    from lipsdp.reductions import Chain, Precondition, Query, ReduceInput
    from lipsdp.solve import Solve
    from lipsdp.verification import verify_solution

    rng = np.random.default_rng(3)
    net = Network.sequential([rng.standard_normal((6, 9)), rng.standard_normal((5, 6)), rng.standard_normal((2, 5))],
                             activation="relu")
    lifting = lift(net)
    lips = node_lipschitz(net)
    block_scale = np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]])
    chain = Chain([ReduceInput(), Precondition(block_scale, lips[net.output])])
    query, inverse = chain.apply(Query.build(lifting, "neuron", "l2", None))
    assert query.solve.n < query.target.n == query.given.n  # 9 inputs seen through 6 rows
    assert np.all(np.log2(query.scale) == np.round(np.log2(query.scale)))  # exact: powers of two
    solution = chain.invert(Solve("ipm")(query), inverse)
    outcome = verify_solution(query, solution)
    cert = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
    assert outcome.verification.verified and outcome.verification.bound == cert.bound
    assert outcome.objective == cert.solver_objective


def test_split_reduction_inverts_to_the_rounded_product():
    from lipsdp.reductions import Split
    from lipsdp.split import compose_bounds

    net = Network.sequential([np.eye(3)] * 4, activation="relu")
    pieces, data = Split(1).apply(net)
    assert len(pieces) == 3
    assert Split(1).invert([1.5, 2.0, 3.0], data) == compose_bounds([1.5, 2.0, 3.0]) >= 9.0
