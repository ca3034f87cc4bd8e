"""Verification linear in depth: the rigorous test block by block along the chain (docs/math.md §10).

The blocked test must be exactly as strict as the dense one: it rejects a chain LMI that is barely
not negative definite, wherever along the chain the defect sits, and it agrees with the dense
factorisation on random chains.  Its memory grows linearly with depth (counted with tracemalloc,
not timed), and certified bounds keep the sandwich.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.scaling import chain_scales
from lipsdp.verify import band_of, best_rho, input_schur, rigorous_negative_definite, verify


def chain_lmi(depth: int, width: int = 6, n0: int = 5, seed: int = 0, activation: str = "leaky_relu",
              norm: str = "l2"):
    rng = np.random.default_rng(seed)
    dims = [n0] + [width] * depth + [3]
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(dims, dims[1:])]
    params = {"negative_slope": 0.01} if activation == "leaky_relu" else None
    net = Network.sequential(weights, activation=activation, params=params)
    omap = np.eye(3)[:1] if norm == "linf" else None
    return build_lmi(lift(net), "neuron", output_map=omap, norm=norm)


def feasible(lmi) -> np.ndarray:
    """A point of the chain LMI: the layer-by-layer multipliers with the repaired input variable."""
    found = chain_scales(lmi)
    assert found is not None
    y = found.x[lmi.n_in:]
    rho = best_rho(lmi, y, band=False)
    return np.concatenate([[rho], y])


def largest_eig(lmi, x) -> float:
    return float(np.linalg.eigvalsh(lmi.matrix(x))[-1])


@pytest.mark.parametrize("depth", [1, 3, 8])
def test_blocked_test_rejects_a_chain_barely_not_negative_definite_at_the_input(depth):
    lmi = chain_lmi(depth, seed=depth)
    band = band_of(lmi)
    assert band is not None
    x = feasible(lmi)
    for rel in (1e-6, 1e-9):
        below = x.copy()
        below[0] *= 1 - rel  # rho under the repaired value: M has a positive eigenvalue
        assert largest_eig(lmi, below) > 0
        assert not rigorous_negative_definite(lmi, below, band)[0]
        assert not rigorous_negative_definite(lmi, below, band=False)[0]
    above = x.copy()
    above[0] *= 1 + 1e-6
    assert rigorous_negative_definite(lmi, above, band)[0] and rigorous_negative_definite(lmi, above, False)[0]


@pytest.mark.parametrize("where", ["last", "middle"])
def test_blocked_test_rejects_a_defect_deep_in_the_chain(where):
    """Shrink one layer's multipliers until the hidden part is barely not negative definite."""
    depth = 8
    lmi = chain_lmi(depth, seed=3)
    x = feasible(lmi)
    x[0] *= 1.0 + 1e-3  # the input block is fine; the defect comes from the hidden blocks
    layer = depth if where == "last" else depth // 2
    sel = np.flatnonzero(lmi.var_block == layer)

    def at(s):
        z = x.copy()
        z[sel] *= s
        return z

    lo, hi = 0.0, 1.0  # at 1: negative definite; bisect the scale where M stops being so
    assert largest_eig(lmi, at(hi)) < 0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if largest_eig(lmi, at(mid)) >= 0 else (mid, hi)
    band = band_of(lmi)
    bad = at(lo * (1 - 1e-9))
    assert largest_eig(lmi, bad) > 0
    assert not rigorous_negative_definite(lmi, bad, band)[0]
    assert rigorous_negative_definite(lmi, at(1.0), band)[0]
    worse = at(lo * 0.5)
    assert largest_eig(lmi, worse) > 0 and not rigorous_negative_definite(lmi, worse, band)[0]


@pytest.mark.parametrize("seed", range(6))
def test_blocked_and_dense_verifiers_agree_on_random_chains(seed):
    rng = np.random.default_rng(100 + seed)
    depth, width = int(rng.integers(1, 7)), int(rng.integers(2, 9))
    activation = ["relu", "leaky_relu", "tanh"][seed % 3]
    norm = "linf" if seed == 5 else "l2"
    lmi = chain_lmi(depth, width, n0=int(rng.integers(2, 7)), seed=seed, activation=activation, norm=norm)
    band = band_of(lmi)
    assert band is not None
    found = chain_scales(lmi)
    y = found.x[lmi.n_in:] * rng.uniform(0.7, 1.3, size=lmi.n_var - lmi.n_in)
    S_band, S_dense = input_schur(lmi, y, band), input_schur(lmi, y, band=False)
    assert (S_band is None) == (S_dense is None)
    if S_dense is None:
        return
    np.testing.assert_allclose(S_band, S_dense, rtol=1e-9, atol=1e-12 * np.abs(S_dense).max())
    top = float(np.linalg.eigvalsh(S_dense)[-1])
    for factor in (0.9, 1.0 - 1e-7, 1.0 + 1e-7, 1.1, 2.0):
        x = np.concatenate([np.full(lmi.n_in, max(top, 1e-12) * factor), y])
        ok_b, c_b = rigorous_negative_definite(lmi, x, band)
        ok_d, c_d = rigorous_negative_definite(lmi, x, band=False)
        assert ok_b or not ok_d  # the blocked test proves at least what the dense one proves
        if factor < 1:
            assert not ok_b  # rho below the Schur complement's top eigenvalue: M is not negative definite
        if ok_b:
            assert largest_eig(lmi, x) < 0
            assert c_b <= c_d * (1 + 1e-12) or not ok_d  # its shift: gamma of two blocks, not of n


def _peak_bytes(lmi, x) -> int:
    band = band_of(lmi)  # the once-per-LMI index work is not what grows per test
    tracemalloc.start()
    try:
        assert rigorous_negative_definite(lmi, x, band)[0]
        best_rho(lmi, x[1:], band)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_verify_memory_grows_linearly_with_depth():
    """Peak memory of one rigorous test and one repair at depth 2L is about twice that at depth L (the
    dense test's n x n matrices would grow about four times)."""
    peaks, sizes = [], []
    for depth in (24, 48):
        raw = chain_lmi(depth, width=12, n0=4)
        found = chain_scales(raw)
        lmi, v = raw.preconditioned(found.block_scale, found.total)  # deep chains need the scaling
        x = feasible(lmi)
        x[0] *= 1 + 1e-3
        peaks.append(_peak_bytes(lmi, x))
        sizes.append(lmi.n)
    dense = 8 * sizes[1] ** 2
    assert peaks[1] <= 2.5 * peaks[0]
    assert peaks[1] < dense / 4  # far below one dense copy of M


def spectral_mlp(widths, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, o in zip(widths, widths[1:]):
        lin = nn.Linear(i, o)
        with torch.no_grad():
            lin.weight /= torch.linalg.matrix_norm(lin.weight, 2)
        layers += [lin, nn.LeakyReLU(0.01)]
    return nn.Sequential(*layers[:-1]).double().eval()


def test_certified_deep_leaky_mlp_keeps_the_sandwich(monkeypatch):
    import lipsdp.verify as V

    monkeypatch.setattr(V, "DENSE_MAX", 0)  # the blocked test, as on large chains
    model = spectral_mlp([20] + [8] * 12 + [4], seed=1)
    cert = lipsdp.certify(model, lower_bound_samples=64)
    assert cert.verified
    assert cert.lower_bound <= cert.bound <= cert.trivial_bound * (1 + 1e-12)
    x = torch.randn(256, 20, dtype=torch.float64, requires_grad=True)  # the lower bound by autograd
    jac = torch.autograd.functional.jacobian(lambda z: model(z).sum(0), x).permute(1, 0, 2)
    assert float(torch.linalg.matrix_norm(jac, 2).max()) <= cert.bound


def test_verify_takes_the_blocked_path_on_chains(monkeypatch):
    import lipsdp.verify as V

    monkeypatch.setattr(V, "DENSE_MAX", 0)  # small chains are tested densely by default
    calls = []
    real = V.band_cholesky
    monkeypatch.setattr(V, "band_cholesky", lambda *a: calls.append(1) or real(*a))
    lmi = chain_lmi(5, seed=7)
    x = feasible(lmi)
    ver = verify(lmi, x)
    assert ver.verified and calls
    assert np.sqrt(x[0]) <= ver.bound <= np.sqrt(x[0]) * (1 + 1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_band_blocks_are_the_dense_matrix_entry_for_entry(seed):
    """The band buffer sums every entry's terms in the dense matrix's order: the same floats."""
    lmi = chain_lmi(4, width=5, seed=seed)
    x = feasible(lmi)
    band = band_of(lmi)
    blocks, off = band.chain.band_blocks(band.matrix(x))
    M = lmi.matrix(x)
    s = band.chain.starts
    for k in range(band.chain.nb):
        D = M[s[k]:s[k + 1], s[k]:s[k + 1]]
        np.testing.assert_array_equal(blocks[k], np.triu(D) + np.triu(D, 1).T)
        if k:
            np.testing.assert_array_equal(off[k], M[s[k - 1]:s[k], s[k]:s[k + 1]])
    assert band.terms == lmi.max_entry_terms
