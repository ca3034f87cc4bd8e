"""An LMI whose assembly would exhaust memory is refused with a clear error, never an OOM kill."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import lipsdp
import lipsdp.constraints.base as base
from lipsdp.constraints import outer_terms
from lipsdp.errors import ResourceError
from lipsdp.network import Network


def test_outer_terms_refuses_what_does_not_fit(monkeypatch):
    A = sp.csr_matrix(np.ones((4, 50)))
    rows, *_ = outer_terms(A, A, np.ones(4), np.arange(4))
    assert len(rows) == 4 * 50 * 50  # B is A: one entry per place (2 a a^T)
    monkeypatch.setattr(base, "available_memory", lambda: base.BYTES_PER_TERM * 4 * 50 * 50 - 1)
    with pytest.raises(ResourceError, match="building the LMI needs about"):
        outer_terms(A, A, np.ones(4), np.arange(4))


def test_certify_reports_it_instead_of_dying(monkeypatch):
    rng = np.random.default_rng(0)
    net = Network.sequential([rng.standard_normal((6, 4)), rng.standard_normal((2, 6))], activation="leaky_relu",
                             params={"negative_slope": 0.1})
    assert lipsdp.certify_network(net, lower_bound_samples=0).verified
    monkeypatch.setattr(base, "available_memory", lambda: 1000)
    with pytest.raises(ResourceError, match="building the LMI"):
        lipsdp.certify_network(net, lower_bound_samples=0)
