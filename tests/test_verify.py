"""Verification never lets an unverified number through."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import lipsdp
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.solvers import get_backend
from lipsdp.verify import best_rho, rigorous_negative_definite, round_up_sqrt, verify


def small_lmi(seed=0, form="neuron"):
    rng = np.random.default_rng(seed)
    net = Network.sequential([rng.standard_normal((6, 4)), rng.standard_normal((6, 6)), rng.standard_normal((2, 6))])
    return build_lmi(lift(net), form)


def test_round_up_sqrt_is_an_upper_bound():
    for rho in [2.0, 1e-300, 3.0000000000000004, 1e300, 12345.678]:
        L = round_up_sqrt(rho)
        assert Fraction(L) ** 2 >= Fraction(rho)
        assert Fraction(math.nextafter(L, 0)) ** 2 < Fraction(rho) or L == math.sqrt(rho)


def test_verified_matrix_is_negative_semidefinite():
    lmi = small_lmi()
    res = get_backend("cvxopt").solve(lmi)
    v = verify(lmi, res.x)
    assert v.verified
    assert np.linalg.eigvalsh(lmi.matrix(v.x))[-1] <= 0  # independent re-check
    assert v.bound ** 2 >= v.rho


def test_rho_below_the_repaired_value_fails_the_rigorous_test():
    lmi = small_lmi(1)
    res = get_backend("cvxopt").solve(lmi)
    y = np.maximum(res.x[1:], 0)
    rho = best_rho(lmi, y)
    ok, _ = rigorous_negative_definite(lmi, np.concatenate([[rho * (1 - 1e-6)], y]))
    assert not ok
    ok, _ = rigorous_negative_definite(lmi, np.concatenate([[rho * (1 + 1e-6)], y]))
    assert ok


def test_solver_objective_is_never_trusted():
    """A backend that reports a too-small rho (or perturbed multipliers) gets re-derived, never echoed."""
    lmi = small_lmi(2)
    res = get_backend("cvxopt").solve(lmi)
    honest = verify(lmi, res.x).bound
    lying = res.x.copy()
    lying[0] *= 0.5  # the solver claims half the rho
    assert verify(lmi, lying).bound == pytest.approx(honest, rel=1e-8)
    rng = np.random.default_rng(0)
    perturbed = res.x * (1 + 0.3 * rng.standard_normal(res.x.shape))
    v = verify(lmi, perturbed)
    assert not v.verified or v.bound >= honest * (1 - 1e-9)


def test_garbage_multipliers_are_rejected():
    lmi = small_lmi(3)
    assert not verify(lmi, np.full(lmi.n_var, np.nan)).verified
    assert not verify(lmi, np.zeros(3)).verified  # wrong shape
    v = verify(lmi, np.zeros(lmi.n_var))  # T = 0: hidden block is C^T C >= 0, no certificate
    assert not v.verified and v.bound is None


def test_scs_point_is_repaired_and_verified():
    lmi = small_lmi(4)
    raw = get_backend("scs").solve(lmi)
    exact = verify(lmi, get_backend("cvxopt").solve(lmi).x).bound
    v = verify(lmi, raw.x)
    assert v.verified and v.bound >= exact * (1 - 1e-9)
    assert v.bound == pytest.approx(exact, rel=1e-3)


def test_lifting_rounding_is_covered_for_residual_products():
    """Affine after Affine multiplies weights: verification accounts for that rounding."""
    rng = np.random.default_rng(5)
    from lipsdp.network import Activation, Affine, Input
    net = Network()
    x = net.add(Input("x", "Input", (3,)))
    a = net.add(Affine("l0", "Linear", (4,), weight=rng.standard_normal((4, 3))), [x])
    b = net.add(Affine("bn", "BatchNorm1d", (4,), weight=np.diag(rng.random(4) + 0.1)), [a])
    h = net.add(Activation("r", "ReLU", (4,), function="relu"), [b])
    net.add(Affine("l1", "Linear", (2,), weight=rng.standard_normal((2, 4))), [h])
    lifting = lift(net)
    assert not lifting.exact
    lmi = build_lmi(lifting)
    assert lmi.lifting_error(np.ones(lmi.n_var)) is not None
    assert verify(lmi, get_backend("cvxopt").solve(lmi).x).verified


def test_deep_net_is_verified_near_the_solver_value():
    """4-8x40-2: the composed norm bound overshoots 2e7-fold, the diagonal of -M spans many decades, and
    the rigorous test's uniform shift used to inflate the bound 600-fold (177204 vs the SDP's 297.6).
    The block-balanced exact congruence (``verify_balanced``) verifies it within 1e-4."""
    from lipsdp.bounds import sampled_lower_bound

    rng = np.random.default_rng(47)
    sizes = (4,) + (8,) * 40 + (2,)
    net = Network.sequential([rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])])
    cert = lipsdp.certify_network(net, solver="ipm", lower_bound_samples=0)
    assert cert.verified and cert.solver_objective is not None
    assert cert.bound <= cert.solver_objective * (1 + 1e-4)
    assert sampled_lower_bound(net, samples=256) <= cert.bound <= cert.trivial_bound


def test_the_repair_survives_a_failing_eigenvalue_driver(monkeypatch):
    """LAPACK's dsyevr (scipy's default for one eigenvalue) stopped with "Internal Error" on the input Schur
    complement of a 20-layer SLL stack (scipy 1.17), and the certification raised: the other drivers give it."""
    import scipy.linalg as sla

    from lipsdp import verify as verify_module

    rng = np.random.default_rng(0)
    A = rng.standard_normal((12, 12))
    S, G = A + A.T, np.eye(12) + np.diag(rng.random(12))
    real, tried = sla.eigh, []

    def flaky(a, b=None, **kwargs):
        tried.append(kwargs.get("driver"))
        if kwargs.get("driver") is None:
            raise sla.LinAlgError("Internal Error.")
        return real(a, b, **kwargs)

    monkeypatch.setattr(verify_module.sla, "eigh", flaky)
    assert verify_module._largest_eigenvalue(S) == pytest.approx(np.linalg.eigvalsh(S)[-1], rel=1e-12)
    assert verify_module._largest_eigenvalue(S, G) == pytest.approx(real(S, G, eigvals_only=True)[-1], rel=1e-12)
    assert tried == [None, "evx", None, "gvd"]
