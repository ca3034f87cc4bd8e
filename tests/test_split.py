"""Network splitting (docs/math.md §8.2): sound, looser, labelled; the fallback when the LMI does not fit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import lipsdp
from lipsdp.errors import LipSDPError
from lipsdp.network import Network
from lipsdp.split import compose_bounds, is_chain, split_chain

from conftest import assert_sandwich


def _net(sizes=(3, 5, 5, 5, 2), seed=0, activation="relu"):
    rng = np.random.default_rng(seed)
    return Network.sequential([rng.standard_normal((o, i)) for i, o in zip(sizes[:-1], sizes[1:])],
                              activation=activation)


def test_pieces_compose_to_the_network():
    net = _net()
    pieces = split_chain(net, layers=1)
    assert len(pieces) == 3 and all(is_chain(p) for p in pieces)
    x = np.random.default_rng(1).standard_normal((7, 3))
    y = x
    for p in pieces:
        y = p.numpy_forward(y)
    np.testing.assert_allclose(y, net.numpy_forward(x), atol=1e-12)
    assert [len(p.activations()) for p in split_chain(net, layers=2)] == [2, 1]


@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu"])
def test_split_bound_is_sound_and_looser(activation):
    net = _net(activation=activation, seed=3)
    full = lipsdp.certify_network(net, lower_bound_samples=256)
    split = lipsdp.certify_network(net, split=1, lower_bound_samples=256)
    assert_sandwich(split, split.lower_bound)
    assert split.bound >= full.bound * (1 - 1e-9)
    assert split.verification["method"] == "split" and "splitting into 3 pieces" in split.message
    parts = [p["bound"] for p in split.network["split"]]
    assert split.bound == compose_bounds(parts) and split.bound >= np.prod(parts)


def test_math_8_2_example_shape():
    """3-5-5-5-2 split after two layers: full < split < trivial (docs/math.md §8.2 reports 1.509 < 1.933 < 3.759)."""
    net = _net(seed=11)
    full = lipsdp.certify_network(net, lower_bound_samples=0)
    split = lipsdp.certify_network(net, split=2, lower_bound_samples=0)
    assert full.bound < split.bound < split.trivial_bound


def test_memory_fallback_splits_and_labels():
    net = _net(sizes=(10, 30, 30, 30, 30, 3), seed=2)
    full = lipsdp.certify_network(net, lower_bound_samples=0)
    # A budget the whole LMI (130 x 130) exceeds but two-layer pieces fit.
    small = lipsdp.certify_network(net, lower_bound_samples=64, memory_limit=1_300_000)
    assert small.verified and small.verification["method"] == "split", small.message
    assert small.bound >= full.bound and small.lower_bound <= small.bound <= small.trivial_bound
    with pytest.raises(LipSDPError):  # even single layers do not fit
        lipsdp.certify_network(net, lower_bound_samples=0, memory_limit=10_000)


def test_split_refuses_what_does_not_chain():
    net = _net()
    with pytest.raises(LipSDPError, match="l2"):
        lipsdp.certify_network(net, split=1, norm="linf")


def test_cli_split_and_verify_refusal(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    weights = np.empty(3, dtype=object)
    weights[:] = [rng.standard_normal((6, 3)), rng.standard_normal((6, 6)), rng.standard_normal((2, 6))]
    path = tmp_path / "net.mat"
    savemat(path, {"weights": weights})
    cert_path = tmp_path / "cert.json"
    proc = subprocess.run([sys.executable, "-m", "lipsdp", "certify", str(path), "--split", "1", "--json",
                           "--activation", "relu", "--save", str(cert_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["verified"] and d["verification"]["method"] == "split" and len(d["network"]["split"]) == 2
    proc = subprocess.run([sys.executable, "-m", "lipsdp", "verify", str(cert_path), str(path), "--activation", "relu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "split" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lipsdp", "certify", str(path), "--split", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "at least 1" in proc.stderr


def test_memory_refusal_names_the_backends_that_fit(monkeypatch):
    """Refused for memory, the message lists the usable backends that apply and fit (fo is l2-only)."""
    from lipsdp.errors import ResourceError
    from lipsdp.solvers import LowRankIPM

    monkeypatch.setattr(LowRankIPM, "memory_estimate", classmethod(lambda cls, lmi: 2**40))
    net = _net(sizes=(4, 6, 6, 2), seed=1)
    with pytest.raises(ResourceError) as err:  # l_inf: no splitting fallback
        lipsdp.certify_network(net, norm="linf", solver="ipm", lower_bound_samples=0, memory_limit=2**30)
    message = str(err.value)
    assert "with ipm needs about 1024.0 GiB" in message and "--solver scs (about" in message
    assert "--solver fo" not in message and "--solver ipm" not in message
