"""The chain-structured interior point for the conv-chain SDP (lipsdp.conv_ipm, docs/math.md §7.4.1)."""

from __future__ import annotations

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lipsdp  # noqa: E402
from lipsdp import conv_ipm  # noqa: E402
from lipsdp.budget import Budget  # noqa: E402
from lipsdp.conv_lmi import (MARGIN, STORAGE_BOUND, certify_chain, layer_blocks, solve_chain,  # noqa: E402
                             verify_chain)
from lipsdp.convnet import conv_chain  # noqa: E402
from lipsdp.errors import ResourceError  # noqa: E402
from lipsdp.io import network_from_module  # noqa: E402
from lipsdp.progress import iterations  # noqa: E402

from conftest import autograd_lower_bound  # noqa: E402


def cnn(channels=2, convs=2, size=4, seed=0, kernel=3, padding=1, slope=0.01):
    torch.manual_seed(seed)
    layers, c, s = [], 1, size
    for _ in range(convs):
        layers += [torch.nn.Conv2d(c, channels, kernel, padding=padding), torch.nn.LeakyReLU(slope)]
        c, s = channels, s + 2 * padding - kernel + 1
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(c * s * s, 3)).double().eval()


def chain_of(model, size):
    chain = conv_chain(network_from_module(model, input_shape=(1, size, size)))
    return chain, [layer_blocks(layer) for layer in chain.layers]


def test_schur_complement_is_the_dense_one():
    """The block-tridiagonal solve equals the dense ``H_ij = tr(F_i X F_j Z)`` built matrix by matrix."""
    chain, blocks = chain_of(cnn(2, 3, size=4, kernel=2, padding=1), 4)
    sdp = conv_ipm.ConvChainSDP(blocks, conv_ipm.grams_of(chain.tail, 2), 1e-6, 100.0)
    m, rng = sdp.m, np.random.default_rng(0)
    y = rng.standard_normal(m)
    Gs = [(lambda A: A + A.T)(rng.standard_normal((n, n))) for n in sdp.sizes]
    assert np.isclose(sum(np.sum(F * G) for F, G in zip(sdp.linear(y), Gs)), y @ sdp.adjoint(Gs), rtol=1e-12)
    F = [sdp.linear(np.eye(m)[j]) for j in range(m)]

    def spd(n):
        A = rng.standard_normal((n, n))
        return A @ A.T + n * np.eye(n)

    Xs, Zs = [spd(n) for n in sdp.sizes], [spd(n) for n in sdp.sizes]
    XF = [[X @ Fj @ Z for Fj, X, Z in zip(F[j], Xs, Zs)] for j in range(m)]
    H = np.array([[sum(np.sum(Fi * G) for Fi, G in zip(F[i], XF[j])) for j in range(m)] for i in range(m)])
    N = np.flatnonzero(sdp.nonneg)
    lp = rng.random(len(N))
    H[N, N] += lp
    b = rng.standard_normal(m)
    ref = np.linalg.solve(H, b)
    assert np.abs(sdp.newton(Xs, Zs, N, lp)(b) - ref).max() <= 1e-9 * np.abs(ref).max()


@pytest.mark.parametrize("channels,convs,size,kernel", [(2, 2, 5, 3), (3, 3, 5, 3), (2, 2, 4, 2)])
def test_agrees_with_clarabel(channels, convs, size, kernel):
    pytest.importorskip("cvxpy")
    chain, blocks = chain_of(cnn(channels, convs, size=size, kernel=kernel, seed=channels + convs), size)
    ours = solve_chain(chain, blocks, "conv-ipm")
    ref = solve_chain(chain, blocks, "clarabel")
    assert ours["solver"] == "conv-ipm" and ours["status"].startswith("optimal")
    a, b = verify_chain(chain, blocks, ours), verify_chain(chain, blocks, ref)
    assert a.verified and b.verified
    assert abs(a.bound - b.bound) <= 1e-5 * b.bound


@pytest.mark.parametrize("seed,channels,convs", [(0, 2, 2), (1, 3, 3)])
def test_sandwich_from_a_torch_file(tmp_path, seed, channels, convs):
    model = cnn(channels, convs, size=5, seed=seed)
    path = tmp_path / "cnn.pt"
    torch.save(model, path)
    cert = lipsdp.certify(str(path), input_shape=(1, 5, 5), structure="state-space", trust_pickle=True,
                          lower_bound_samples=32)
    assert cert.verified and cert.solver == "conv-ipm"
    lower = autograd_lower_bound(model, (1, 5, 5), samples=32)
    assert lower <= cert.bound and cert.lower_bound <= cert.bound <= cert.trivial_bound * (1 + 1e-12)


def test_time_limit_returns_a_verified_or_cleanly_unverified_point():
    chain, blocks = chain_of(cnn(2, 2, size=4), 4)
    sol = solve_chain(chain, blocks, "conv-ipm", time_limit=1e-9)
    assert sol["status"] == "time_limit" and sol["iterations"] == 0
    res = certify_chain(chain, "auto", time_limit=1e-9)  # no cvxpy fallback once the time is spent
    assert res.details["solver"] == "conv-ipm" and res.details["solver_status"] == "time_limit"
    assert res.verified == (res.bound is not None)
    if not res.verified:
        assert "proven" in res.message


def test_a_long_iteration_stops_before_the_deadline():
    chain, blocks = chain_of(cnn(2, 2, size=4), 4)
    sdp = conv_ipm.ConvChainSDP(blocks, conv_ipm.grams_of(chain.tail, 2), MARGIN, STORAGE_BOUND)
    now = time.perf_counter()
    sdp.deadline, sdp.last = now + 50.0, now - 100.0  # the previous iteration took 100 s, 50 s are left
    with pytest.raises(conv_ipm.OutOfTime):
        sdp.newton([np.eye(n) for n in sdp.sizes], [np.eye(n) for n in sdp.sizes], np.zeros(0, int), np.zeros(0))


def test_memory_refusal(monkeypatch):
    chain, blocks = chain_of(cnn(2, 2, size=4), 4)
    monkeypatch.setattr(conv_ipm, "available_memory", lambda: 1024)
    with pytest.raises(ResourceError, match="GiB"):
        solve_chain(chain, blocks, "auto")


def test_progress_is_reported_per_iteration():
    chain, blocks = chain_of(cnn(2, 2, size=4), 4)
    budget = Budget(time_limit=600)
    with budget.active():
        sol = solve_chain(chain, blocks, "auto")
    rec = iterations(budget)
    assert rec is not None and rec.solver == "conv-ipm" and rec.count == sol["iterations"]
    assert rec.bound == pytest.approx(np.sqrt(sol["rho"]), rel=1e-6)


def test_unknown_solver_is_refused():
    chain, blocks = chain_of(cnn(2, 2, size=4), 4)
    with pytest.raises(lipsdp.LipSDPError, match="structured SDP"):
        solve_chain(chain, blocks, "no-such-solver")


def test_auto_falls_back_to_clarabel_when_the_point_does_not_verify(monkeypatch):
    pytest.importorskip("cvxpy")
    chain, blocks = chain_of(cnn(2, 2, size=4), 4)
    real = conv_ipm.solve

    def unverifiable(*args, **kwargs):
        sol = real(*args, **kwargs)
        for point in (sol, *sol.get("earlier", ())):  # the earlier iterates too (certify_chain tries them)
            point["lam"] = [np.zeros_like(v) for v in point["lam"]]  # no multiplier: no block is negative definite
        return sol

    monkeypatch.setattr(conv_ipm, "solve", unverifiable)
    res = certify_chain(chain, "auto")
    assert res.verified and res.details["solver"] == "clarabel"
    assert not certify_chain(chain, "conv-ipm").verified  # asked for by name: no fallback


def test_layers_whose_gains_compound_still_certify():
    """Trained CNNs have layer gains well above 1, so the supplies grow by orders of magnitude towards the
    input.  With one storage bound and one margin for every layer the interior point's SDP was infeasible
    (rho ran to 1e17, unverified); the per-layer scales of :func:`lipsdp.conv_lmi.supply_scales` keep it
    solvable and the bound sound."""
    model = cnn(3, 4, size=6, seed=2)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight *= 4.0
    cert = lipsdp.certify(model, input_shape=(1, 6, 6), structure="state-space")
    lower = autograd_lower_bound(model, (1, 6, 6), samples=32)
    assert cert.verified, cert.message
    assert lower <= cert.bound <= cert.trivial_bound * (1 + 1e-9)
    chain, blocks = chain_of(model, 6)
    sol = solve_chain(chain, blocks)
    assert verify_chain(chain, blocks, sol).verified
