"""The torch path of the dense preprocessing gives what numpy gives (CUDA uses the same code)."""

from __future__ import annotations

import numpy as np
import pytest

import lipsdp
from lipsdp import accel
from lipsdp.network import Network


def test_device_choice(monkeypatch):
    monkeypatch.setenv("LIPSDP_DEVICE", "numpy")
    assert accel.device_for(10_000) == "numpy"
    monkeypatch.setenv("LIPSDP_DEVICE", "torch")
    assert accel.device_for(3) == "torch"
    monkeypatch.delenv("LIPSDP_DEVICE")
    assert accel.device_for(10) == "numpy"  # small: never worth a transfer


def test_torch_path_matches_numpy(monkeypatch):
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    W = rng.standard_normal((60, 40))
    A = W.T @ W
    ref_norm, (ref_w, _) = float(np.linalg.norm(W, 2)), np.linalg.eigh(A)
    monkeypatch.setenv("LIPSDP_DEVICE", "torch")
    assert accel.spectral_norm(W) == pytest.approx(ref_norm, rel=1e-12)
    w, V = accel.eigh(A)
    np.testing.assert_allclose(w, ref_w, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(V @ np.diag(w) @ V.T, A, atol=1e-9)
    # The whole pipeline (spectral norms, input reduction) on the torch path: same certificate.
    net = Network.sequential([rng.standard_normal((8, 30)), rng.standard_normal((3, 8))])
    on_torch = lipsdp.certify(net, lower_bound_samples=0)
    monkeypatch.setenv("LIPSDP_DEVICE", "numpy")
    on_numpy = lipsdp.certify(net, lower_bound_samples=0)
    assert on_torch.verified and on_torch.bound == pytest.approx(on_numpy.bound, rel=1e-9)
    assert on_torch.trivial_bound == pytest.approx(on_numpy.trivial_bound, rel=1e-12)
