"""``lipsdp verify`` on the kinds of certificate beyond the global SDP one, and the folding error.

Local certificates (``--center/--radius``) store their center, the model's SHA-256 and, beside the
local multipliers, the global certificate's; ``lipsdp verify`` localizes the model again on the stored
region and proves every stated bound again (the local SDP's, the global one, the Clarke-Jacobian one).
Every edit that makes a claim stronger than what is proven fails with one line: a lowered bound, a
changed multiplier, an enlarged region, another center.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import lipsdp
from lipsdp.certificate import Certificate
from lipsdp.checking import check_certificate
from lipsdp.errors import LipSDPError
from models import mlp

CENTER = np.full(5, 0.3)


@pytest.fixture(scope="module")
def model():
    return mlp([5, 12, 12, 3], seed=4)


@pytest.fixture(scope="module")
def local_certs(model):
    """Saved local certificates: an l2 one won by the local SDP, an l_inf one won by the Clarke-Jacobian bound."""
    out = {}
    for norm, radius in (("l2", 0.1), ("linf", 0.05)):
        cert = lipsdp.certify(model, center=CENTER, radius=radius, norm=norm, lower_bound_samples=64)
        assert cert.verified and cert.region["sdp_from"] == "local", cert.message
        out[norm] = json.loads(cert.to_json())
    assert out["l2"]["verification"]["method"] == "float-cholesky"
    assert out["linf"]["verification"]["method"] == "clarke-jacobian"
    return out


def _check(d, model):
    return check_certificate(Certificate.from_dict(copy.deepcopy(d)), model)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_local_certificates_recheck(model, local_certs, norm):
    d = local_certs[norm]
    cert = _check(d, model)
    assert cert.verification["rechecked"] and cert.bound == d["bound"]
    # the sandwich: sampled in the region <= local bound <= global bound <= trivial bound
    assert d["lower_bound"] <= d["bound"] <= d["global_bound"] <= d["trivial_bound"] * (1 + 1e-9)
    assert d["schema_version"] == 2 and len(d["region"]["center"]) == 5


def _lower_bound(d):
    d["bound"] *= 0.99


def _lower_global(d):
    d["global_bound"] *= 0.99


def _lower_local(d):
    d["region"]["local_bound"] *= 0.99


def _enlarge(d):
    d["region"]["radius"] *= 10


def _move(d):
    d["region"]["center"][0] += 0.5


def _multiplier(d):
    vectors = d["multipliers"] if isinstance(d["multipliers"][0], list) else [d["multipliers"]]
    vectors[0][0] *= 0.9  # rho (or lambda_in[0]) lowered: M is no longer negative definite


EDITS = {"bound": (_lower_bound, "below"), "global_bound": (_lower_global, "below what its multipliers"),
         "local_bound": (_lower_local, "below what its multipliers"),
         "radius": (_enlarge, "other sectors"), "center": (_move, "center_sha256"),
         "multiplier": (_multiplier, "not provably negative definite")}


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_local_certificates_fail(model, local_certs, norm, edit):
    d = copy.deepcopy(local_certs[norm])
    change, reason = EDITS[edit]
    change(d)
    with pytest.raises(LipSDPError, match=reason):
        _check(d, model)


def test_local_certificate_of_another_model_fails(local_certs):
    with pytest.raises(LipSDPError, match="does not match"):
        _check(local_certs["l2"], mlp([5, 12, 12, 3], seed=5))


def _torch_lower_bound(model, center=None, radius=None, samples=64):
    """Largest Jacobian spectral norm of the torch model itself (autograd, float64) at random inputs."""
    gen = torch.Generator().manual_seed(0)
    net = copy.deepcopy(model).double()
    best = 0.0
    for _ in range(samples):
        x = torch.randn(5, generator=gen, dtype=torch.float64)
        if center is not None:
            x = torch.as_tensor(center) + radius * x / x.norm() * torch.rand(1, generator=gen, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(net, x)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


def test_sandwich_on_the_torch_model(model, local_certs):
    d = local_certs["l2"]
    assert _torch_lower_bound(model, CENTER, 0.1) <= d["bound"]
    assert _torch_lower_bound(model) <= d["global_bound"] <= d["trivial_bound"] * (1 + 1e-9)
