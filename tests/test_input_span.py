"""Verification on the LMI restricted to the first layer's input rows (docs/math.md §10.1).

A net that reads a wide input through a narrow first layer (MNIST MLPs: 784 -> 16) is verified on
``T^T M T`` with ``T = diag(A^T, I)``, ``A`` the first layer's weights: an ``m x m`` input block instead
of ``n0 x n0``.  It must be exactly as strict as the full LMI (rho just below the optimum is rejected),
agree with it up to rounding, bound the rounding of ``A A^T``, and never build the full input block.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import lipsdp
import lipsdp.reductions as R
from lipsdp.checking import check_certificate
from lipsdp.errors import LipSDPError
from lipsdp.lifting import Lifting, lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.scaling import chain_scales
from lipsdp.verify import band_of, best_rho, rigorous_negative_definite


def wide_net(n0: int = 120, width: int = 6, depth: int = 3, seed: int = 0) -> Network:
    rng = np.random.default_rng(seed)
    dims = [n0] + [width] * depth + [3]
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(dims, dims[1:])]
    return Network.sequential(weights, activation="leaky_relu", params={"negative_slope": 0.01})


def full_and_spanned(**kw):
    lifting = lift(wide_net(**kw))
    span = lifting.span_input()
    assert span is not None
    return lifting, span, build_lmi(lifting), build_lmi(lifting, span=span)


def point(full):
    found = chain_scales(full)
    assert found is not None
    y = found.x[1:]
    return np.concatenate([[best_rho(full, y, band=False)], y])


def test_spanned_matrix_is_the_full_one_restricted():
    lifting, span, full, spanned = full_and_spanned()
    n0, m = full.input_dim, spanned.input_dim
    assert (n0, m) == (120, 6) and spanned.n == full.n - n0 + m
    x = point(full)
    A = lifting.pre[0][:, :n0].toarray()
    T = sp.block_diag([A.T, np.eye(full.n - n0)]).toarray()
    restricted = T.T @ full.matrix(x) @ T
    assert np.allclose(spanned.matrix(x), restricted, rtol=1e-12, atol=1e-12 * np.abs(restricted).max())
    # The same optimal rho for the same multipliers (a generalised eigenvalue on the spanned LMI).
    assert best_rho(spanned, x[1:], band=False) == pytest.approx(x[0], rel=1e-9)


@pytest.mark.parametrize("use_band", [False, True])
def test_spanned_test_is_as_strict_as_the_full_lmi(use_band):
    _, _, full, spanned = full_and_spanned(depth=4, seed=3)
    x = point(full)
    band = band_of(spanned) if use_band else False
    assert not use_band or band is not None
    for rel in (1e-6, 1e-9):
        below = x.copy()
        below[0] *= 1 - rel
        assert np.linalg.eigvalsh(full.matrix(below))[-1] > 0  # not a certificate of the network
        assert not rigorous_negative_definite(spanned, below, band)[0]
    above = x.copy()
    above[0] *= 1 + 1e-6
    assert rigorous_negative_definite(spanned, above, band)[0]


def test_metric_error_bound_covers_the_rounding_exactly():
    lifting, span, _, _ = full_and_spanned(n0=40, width=4, depth=1)
    A = lifting.pre[0][:, :40].toarray()
    for i in range(4):
        for j in range(4):
            exact = sum((Fraction(float(a)) * Fraction(float(b)) for a, b in zip(A[i], A[j])), Fraction(0))
            assert abs(Fraction(float(span.metric[i, j])) - exact) <= Fraction(float(span.metric_err[i, j]))
    assert np.array_equal(span.metric, span.metric.T)


def test_span_is_refused_where_it_would_not_be_exact():
    assert lift(wide_net(n0=10, width=6)).span_input() is None  # not narrower than half the input
    lifting = lift(wide_net())
    noisy = Lifting(lifting.network, lifting.blocks, lifting.pre, lifting.output,
                    [sp.csr_matrix(np.full(lifting.pre[0].shape, 1e-20))] + lifting.pre_err[1:], lifting.output_err)
    assert noisy.span_input() is None  # rounded first-layer rows: A would not be the network's


def spectral_mlp(dims, seed):
    torch.manual_seed(seed)
    layers = []
    for i, o in zip(dims, dims[1:]):
        lin = nn.Linear(i, o)
        with torch.no_grad():
            lin.weight /= torch.linalg.matrix_norm(lin.weight, 2)
        layers += [lin, nn.LeakyReLU(0.01)]
    return nn.Sequential(*layers[:-1]).double().eval()


def test_certify_never_builds_the_full_input_block_and_keeps_the_sandwich(monkeypatch):
    model = spectral_mlp([300, 8, 8, 8, 3], seed=2)
    sizes = []
    real = R.build_lmi
    monkeypatch.setattr(R, "build_lmi", lambda *a, **k: (lambda lmi: sizes.append(lmi.n) or lmi)(real(*a, **k)))
    cert = lipsdp.certify(model, lower_bound_samples=64)
    assert cert.verified and sizes and max(sizes) < 300  # before: the 300 x 300 input block (n = 324)
    assert cert.lower_bound <= cert.bound <= cert.trivial_bound * (1 + 1e-12)
    x = torch.randn(256, 300, dtype=torch.float64, requires_grad=True)  # the lower bound by autograd
    jac = torch.autograd.functional.jacobian(lambda z: model(z).sum(0), x).permute(1, 0, 2)
    assert float(torch.linalg.matrix_norm(jac, 2).max()) <= cert.bound
    check_certificate(cert, model)  # ``lipsdp verify`` proves it on the same spanned LMI
    monkeypatch.setattr(Lifting, "span_input", lambda self, **k: None)
    old = lipsdp.certify(model, lower_bound_samples=0)  # verified on the full LMI, as before
    assert cert.bound == pytest.approx(old.bound, rel=1e-6)


def test_certificates_proven_on_the_full_lmi_still_recheck(monkeypatch):
    model = spectral_mlp([300, 8, 8, 3], seed=5)
    with monkeypatch.context() as m:
        m.setattr(Lifting, "span_input", lambda self, **k: None)
        old = lipsdp.certify(model, lower_bound_samples=0)  # as certified before the restriction
    assert old.verified
    check_certificate(old, model)
    forged = copy.deepcopy(old)
    forged.multipliers[0] *= 0.99  # rho below what the multipliers need: neither LMI may accept it
    forged.bound = float(np.sqrt(forged.multipliers[0])) * (1 + 1e-9)
    with pytest.raises(LipSDPError, match="does not verify"):
        check_certificate(forged, model)


def test_strict_confirms_exactly_on_the_full_lmi():
    model = spectral_mlp([40, 4, 4, 2], seed=1)
    cert = lipsdp.certify(model, lower_bound_samples=0, strict=True)
    assert cert.verified and cert.verification["method"] == "exact"
