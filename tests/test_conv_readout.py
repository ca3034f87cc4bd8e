"""The conv chain's read-out proof (lipsdp.conv_readout, docs/math.md §7.4 "Verification").

The trained 32-channel nets with 8 and 16 convolutions of the issue-19 grid ended "the read-out's Gram bound
was not proven": the proof took the solver's ``Y`` as it was, and at a point where the interior point
stopped at its time limit that ``Y`` was indefinite (32x16, 900 s: least eigenvalue -0.89, largest 38) and
far from the inverse of the solver's ``X_L``.  These tests hand the verification a solver
point whose ``Y`` is slightly indefinite or nearly singular (the rest of the point unchanged): the old proof
(:func:`lipsdp.conv_readout._direct`) fails on it, the regularised candidates prove a bound, the bound is
sound (sampled lower <= bound <= trivial) and ``lipsdp verify`` proves the stored certificate again.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lipsdp import conv_ipm  # noqa: E402
from lipsdp.certificate import Certificate  # noqa: E402
from lipsdp.checking import check_certificate  # noqa: E402
from lipsdp.conv_lmi import solve_chain, verify_chain  # noqa: E402
from lipsdp.conv_readout import _direct, _sym, prove_read_out, read_outs, regularised  # noqa: E402
from lipsdp.errors import LipSDPError  # noqa: E402

from conftest import autograd_lower_bound  # noqa: E402
from test_conv_ipm import chain_of, cnn  # noqa: E402

SIZE = 12  # 2 channels, 2 convolutions: the structured bound is below the product of norms here


def _spoil(Y: np.ndarray, smallest: float) -> np.ndarray:
    """``Y`` with its least eigenvalue set to ``smallest`` times its largest."""
    mu, V = np.linalg.eigh(_sym(Y))
    mu[0] = smallest * mu[-1]
    return _sym((V * mu) @ V.T)


@pytest.fixture(scope="module")
def solved():
    model = cnn(2, 2, size=SIZE, seed=1)
    chain, blocks = chain_of(model, SIZE)
    return model, chain, blocks, solve_chain(chain, blocks)


def _proves_exactly(chain, got) -> None:
    """``t X_L (x) I - W^T W`` is positive semidefinite (checked in float with a margin: W^T W is small)."""
    C = got.X_L.shape[0]
    W = chain.tail
    space = W.shape[1] // C
    G = got.t * np.kron(got.X_L, np.eye(space)) - W.T @ W
    assert np.linalg.eigvalsh(_sym(G))[0] >= -1e-9 * got.t * np.abs(got.X_L).max()
    assert prove_read_out(chain, got.Y, got.X_L, got.t) is None


@pytest.mark.parametrize("smallest", [-1e-9, -0.05, 1e-15])  # -0.05: as the 32x16 time-limited point (-0.89 / 38)
def test_spoiled_read_out_is_proven_again(solved, smallest):
    model, chain, blocks, sol = solved
    good = verify_chain(chain, blocks, sol)
    assert good.verified, good.message
    bad = dict(sol, Y=_spoil(sol["Y"], smallest))
    assert _direct(chain, _sym(bad["Y"])) is None  # what the verification did before: not proven
    got = next(read_outs(chain, bad["Y"], bad["x"][-1]))
    _proves_exactly(chain, got)
    res = verify_chain(chain, blocks, bad)
    assert res.verified, res.message
    lower = autograd_lower_bound(model, (1, SIZE, SIZE), samples=16)
    trivial = float(np.prod([layer.norm() for layer in chain.layers])) * float(np.linalg.norm(chain.tail, 2))
    assert lower <= res.bound <= trivial * (1 + 1e-9)
    assert res.bound <= good.bound * (1 + 1e-3)  # the solver's own X_L is recovered: not a looser bound


def test_floored_Y_proves_with_its_own_gain(solved):
    """The floor candidates alone (no solver supply): ``Y`` nearly singular, floored, still a proven read-out
    with ``t`` re-derived from the floored ``Y``."""
    _, chain, _, sol = solved
    Y = _spoil(sol["Y"], 1e-15)
    got = [g for g in read_outs(chain, Y) if not np.array_equal(g.Y, _sym(Y))][0]
    _proves_exactly(chain, got)
    Yr = regularised(Y, 1e-14)
    assert np.linalg.eigvalsh(Yr)[0] >= 0.5e-14 * np.linalg.eigvalsh(Yr)[-1]


def test_indefinite_Y_with_no_positive_direction_is_refused(solved):
    _, chain, blocks, sol = solved
    assert list(read_outs(chain, -np.abs(sol["Y"]) - np.eye(len(sol["Y"])))) == []
    res = verify_chain(chain, blocks, dict(sol, Y=-sol["Y"], x=[-x for x in sol["x"]]))
    assert not res.verified and "read-out" in res.message


def test_certificate_from_a_spoiled_point_rechecks(solved, monkeypatch):
    """End to end: the interior point returns the spoiled ``Y``; the certificate stores the ``Y`` the read-out
    was proven with, so ``lipsdp verify`` proves it again; a halved gain is refused."""
    from lipsdp.convnet import conv_chain
    from lipsdp.pipeline import load_model
    from lipsdp.structured import certify_structured

    model = solved[0]
    real = conv_ipm.solve

    def spoiled(*args, **kwargs):
        sol = real(*args, **kwargs)
        return dict(sol, Y=_spoil(sol["Y"], -1e-9))

    monkeypatch.setattr(conv_ipm, "solve", spoiled)
    net, _ = load_model(model, input_shape=(1, SIZE, SIZE))
    cert = certify_structured(net, conv_chain(net), lower_bound_samples=16)
    assert cert.verified, cert.message
    lower = autograd_lower_bound(model, (1, SIZE, SIZE), samples=16)
    assert lower <= cert.bound <= cert.trivial_bound * (1 + 1e-9) and cert.lower_bound <= cert.bound
    d = json.loads(cert.to_json())
    assert np.linalg.eigvalsh(np.array(d["verification"]["point"]["Y"]))[0] > 0  # the proven Y, not the solver's
    again = check_certificate(Certificate.from_dict(copy.deepcopy(d)), model, input_shape=(1, SIZE, SIZE))
    assert again.verified and again.bound == d["bound"]
    d["verification"]["tail_gain"] *= 0.5
    with pytest.raises(LipSDPError, match="Gram bound"):
        check_certificate(Certificate.from_dict(d), model, input_shape=(1, SIZE, SIZE))
