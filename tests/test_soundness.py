"""Property-based soundness audit: random networks of every kind, the sandwich must hold.

hypothesis draws depths, widths, activations, weight scales from 1e-3 to 1e3,
rank-deficient and all-zero layers.  For each net: sampled Jacobian lower bound
<= verified bound <= trivial bound, or no bound at all (never a wrong one).
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import lipsdp
from lipsdp.bounds import sampled_lower_bound
from lipsdp.network import Network

ACTS = ["relu", "tanh", "sigmoid", "leaky_relu", "elu", "softplus", "silu", "gelu", "hardtanh"]


@st.composite
def networks(draw):
    depth = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 6)) for _ in range(depth + 2)]
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    weights = []
    for k in range(depth + 1):
        w = rng.standard_normal((sizes[k + 1], sizes[k])) * 10.0 ** draw(st.integers(-3, 3))
        kind = draw(st.sampled_from(["dense", "dense", "rank1", "zero", "tiny-row"]))
        if kind == "rank1":
            w = np.outer(rng.standard_normal(sizes[k + 1]), rng.standard_normal(sizes[k]))
        elif kind == "zero":
            w = np.zeros_like(w)
        elif kind == "tiny-row":
            w[0] *= 1e-9
        weights.append(w)
    act = draw(st.sampled_from(ACTS))
    biases = [rng.standard_normal(w.shape[0]) for w in weights]
    return Network.sequential(weights, activation=act, biases=biases)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.sampled_from(["neuron", "layer"]))
def test_sandwich_on_random_networks(net, formulation):
    cert = lipsdp.certify(net, formulation=formulation, lower_bound_samples=0)
    lower = max(sampled_lower_bound(net, samples=128, scale=s) for s in (0.1, 1.0, 10.0))
    trivial = cert.trivial_bound
    if cert.verified:
        assert lower <= cert.bound * (1 + 1e-7) + 1e-12, f"UNSOUND {lower} > {cert.bound}"
        # at most the trivial bound, up to the verification's inflation
        assert cert.bound <= trivial * (1 + 1e-3) + 1e-5 * (1 + trivial)
    else:
        assert cert.bound is None


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000))
def test_every_backend_sound_on_random_nets(seed):
    from lipsdp.solvers import usable

    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((5, 3)), rng.standard_normal((4, 5)), rng.standard_normal((2, 4))]
    net = Network.sequential(ws, biases=[rng.standard_normal(w.shape[0]) for w in ws])
    lower = sampled_lower_bound(net, samples=256)
    for solver in usable():
        if solver == "mosek":
            continue
        cert = lipsdp.certify(net, solver=solver, lower_bound_samples=0)
        assert cert.verified, (solver, cert.message)
        assert lower <= cert.bound * (1 + 1e-9) <= cert.trivial_bound * (1 + 1e-6)
