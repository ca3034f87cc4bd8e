"""Solvers' own output (SDPA's C++ messages, ARPACK / cvxpy warnings) stays off the terminal from the Python
API too, not only from the command line; ``verbose=True`` lets it through (:mod:`lipsdp.quiet`)."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest

import lipsdp
from lipsdp.network import Network
from lipsdp.solvers import BACKENDS
from lipsdp.solvers.ipm_ import LowRankIPM
from models import mlp


def test_sdpa_messages_do_not_reach_the_terminal_from_the_api(capfd):
    """Before: "Strange behavior : primal < dual" on the terminal from ``lipsdp.certify`` (fd 2)."""
    pytest.importorskip("sdpap")
    net = mlp([5, 12, 12, 3], seed=4)  # SDPA says "Strange behavior : primal < dual" on it
    cert = lipsdp.certify(net, solver="sdpa", lower_bound_samples=0, verbose=True)
    assert cert.verified
    out, err = capfd.readouterr()
    assert "Strange behavior" in err  # the net still triggers the message, so the next check means something
    cert = lipsdp.certify(net, solver="sdpa", lower_bound_samples=32)
    assert cert.verified and cert.lower_bound <= cert.bound <= cert.trivial_bound
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_native_output_and_warnings_are_dropped_and_then_restored(monkeypatch, capfd):
    class Noisy(LowRankIPM):
        name = "noisy"

        def solve(self, lmi, **kwargs):
            os.write(2, b"native noise on fd 2\n")
            os.write(1, b"native noise on fd 1\n")
            warnings.warn("a library warning", RuntimeWarning)
            return super().solve(lmi, **kwargs)

    monkeypatch.setitem(BACKENDS, "noisy", Noisy)
    rng = np.random.default_rng(0)
    net = Network.sequential([rng.standard_normal((6, 3)), rng.standard_normal((2, 6))], activation="tanh")
    assert lipsdp.certify(net, solver="noisy", lower_bound_samples=0).verified
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    os.write(2, b"after\n")  # descriptor 2 is the caller's again
    print("python stderr", file=sys.stderr)
    assert capfd.readouterr().err == "after\npython stderr\n"
    with pytest.warns(RuntimeWarning, match="a library warning"):
        assert lipsdp.certify(net, solver="noisy", lower_bound_samples=0, verbose=True).verified
    err = capfd.readouterr().err
    assert "native noise on fd 2" in err and "native noise on fd 1" in err
