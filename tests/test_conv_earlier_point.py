"""The structured path verifies an earlier iterate when the solver's last one does not prove
(lipsdp.conv_lmi.certify_chain, docs/math.md §7.4 "Verification").

Near the optimum the interior point's last iterates can come closer to the boundary than the verification's
rounding margin allows (trained 32x4 CNN: iterations 50 and 51 verified, 52 to 54 did not).  The solver
returns its last iterates near the optimum (``sol["earlier"]``, newest first); before, a last point that
failed ended the structured path ("not proven negative definite"), now the newest earlier one that proves
gives the bound, said in the message, and sound (sampled lower <= bound <= trivial).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lipsdp import conv_lmi  # noqa: E402
from lipsdp.conv_lmi import certify_chain, solve_chain, verify_chain  # noqa: E402

from conftest import autograd_lower_bound  # noqa: E402
from test_conv_ipm import chain_of, cnn  # noqa: E402

SIZE = 12


@pytest.fixture(scope="module")
def solved():
    model = cnn(2, 2, size=SIZE, seed=1)
    chain, blocks = chain_of(model, SIZE)
    return model, chain, blocks, solve_chain(chain, blocks)


def _spoiled(sol: dict) -> dict:
    """The last point with its first layer's multipliers zeroed (that block cannot prove), the real last
    point handed back as the earlier iterates."""
    keep = {k: sol[k] for k in ("P1", "P2", "lam", "x", "Y", "rho")}
    lam = [np.zeros_like(sol["lam"][0]), *sol["lam"][1:]]
    return {**sol, "lam": lam, "earlier": [keep]}


def test_an_earlier_iterate_verifies_when_the_last_does_not(solved, monkeypatch):
    model, chain, blocks, sol = solved
    good = verify_chain(chain, blocks, sol)
    assert good.verified, good.message
    bad = _spoiled(sol)
    assert not verify_chain(chain, blocks, bad).verified  # what certify_chain ended with before
    monkeypatch.setattr(conv_lmi, "solve_chain", lambda *args, **kw: dict(bad))
    res = certify_chain(chain, solver="own")
    assert res.verified and "iterate 1 before its last" in res.message, res.message
    assert res.bound == good.bound
    assert np.allclose(res.details["point"]["lam"][0], sol["lam"][0])  # the stored point is the one verified
    lower = autograd_lower_bound(model, (1, SIZE, SIZE), samples=16)
    trivial = float(np.prod([layer.norm() for layer in chain.layers])) * float(np.linalg.norm(chain.tail, 2))
    assert lower <= res.bound <= trivial * (1 + 1e-9)


def test_no_earlier_iterate_leaves_the_last_points_reason(solved, monkeypatch):
    _, chain, blocks, sol = solved
    bad = {**_spoiled(sol), "earlier": []}
    monkeypatch.setattr(conv_lmi, "solve_chain", lambda *args, **kw: dict(bad))
    res = certify_chain(chain, solver="own")
    assert not res.verified and "not proven negative definite" in res.message, res.message


def test_a_time_limited_point_is_said_to_be_maybe_not_tight(solved, monkeypatch):
    """A bound verified from a solve stopped by its time limit is valid; the certificate says it may not be
    tight, as the unrolled path's does (before: the message read as for a converged solve)."""
    import lipsdp

    model, _, _, sol = solved
    monkeypatch.setattr(conv_lmi, "solve_chain", lambda *args, **kw: {**sol, "status": "time_limit"})
    cert = lipsdp.certify(model, input_shape=(1, SIZE, SIZE), structure="state-space", lower_bound_samples=16)
    assert cert.verified and "solver status time_limit: the bound is valid, maybe not tight" in cert.message
    assert cert.lower_bound <= cert.bound <= cert.trivial_bound * (1 + 1e-9)
