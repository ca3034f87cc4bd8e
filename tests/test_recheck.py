"""``lipsdp verify`` / :func:`lipsdp.checking.check_certificate`: every kind of certificate re-checks, edits fail.

For l2, l_inf (all outputs, one output) and l2 of one output, a saved
certificate must re-check against its model without solving, and each edit
that makes it claim more than its multipliers prove must be refused with one
line (exit 1; exit 2 for a malformed file or another model): a lowered bound or per-output bound, a lowered input multiplier,
a changed hidden multiplier, another output, another norm, a dropped output,
another model.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import lipsdp
from lipsdp.certificate import Certificate
from lipsdp.errors import LipSDPError
from lipsdp.checking import check_certificate
from models import mlp

KINDS = {
    "l2": dict(norm="l2"),
    "l2_output": dict(norm="l2", output_index=2),
    "linf": dict(norm="linf"),
    "linf_output": dict(norm="linf", output_index=1),
    "linf_layer": dict(norm="linf", formulation="layer"),
}


@pytest.fixture(scope="module")
def model():
    return mlp([5, 12, 12, 3], seed=4)


@pytest.fixture(scope="module")
def certs(model):
    out = {}
    for kind, options in KINDS.items():
        cert = lipsdp.certify(model, lower_bound_samples=0, **options)
        assert cert.verified, (kind, cert.message)
        out[kind] = json.loads(cert.to_json())  # what a saved file holds
    return out


def _vectors(d):
    """The certificate's multiplier vectors, one per certified LMI (a view: edits go into ``d``)."""
    many = d["norm"] == "linf" and d["output_map"] is None and len(d["network"]["per_output"]) > 1
    return d["multipliers"] if many else [d["multipliers"]]


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_rechecks(model, certs, kind):
    d = certs[kind]
    cert = check_certificate(Certificate.from_dict(copy.deepcopy(d)), model)
    assert cert.verification["rechecked"] and cert.verification["recheck_margin"] > 0
    assert cert.bound == d["bound"]


def test_output_map_is_stored(certs):
    assert certs["l2"]["output_map"] is None and certs["linf"]["output_map"] is None
    assert certs["l2_output"]["output_map"] == [[0.0, 0.0, 1.0]]
    assert certs["linf_output"]["output_map"] == [[0.0, 1.0, 0.0]]
    assert len(certs["linf"]["multipliers"]) == 3  # one vector per output


def _lower_bound(d):
    d["bound"] *= 1 - 1e-6


def _lower_input_multiplier(d):
    for x in _vectors(d):
        x[0] *= 0.5


def _scale_hidden_multipliers(d):
    v = _vectors(d)[-1]
    n_in = 1 if d["norm"] == "l2" else 5
    for j in range(n_in, len(v)):
        v[j] *= 0.7


def _zero_hidden_multiplier(d):
    v = _vectors(d)[0]
    n_in = 1 if d["norm"] == "l2" else 5
    j = max(range(n_in, len(v)), key=lambda i: v[i])
    v[j] = 0.0


def _negative_multiplier(d):
    _vectors(d)[0][-1] = -1.0


def _nan_multiplier(d):
    _vectors(d)[0][3] = float("nan")


def _other_output(d):
    if d["output_map"] is None:
        d["output_map"] = [[1.0, 0.0, 0.0]]
    else:
        d["output_map"] = [d["output_map"][0][1:] + d["output_map"][0][:1]]


def _other_norm(d):
    d["norm"] = "linf" if d["norm"] == "l2" else "l2"


def _other_formulation(d):
    d["formulation"] = "layer" if d["formulation"] == "neuron" else "neuron"


def _drop_a_vector(d):
    d["multipliers"] = d["multipliers"][:-1]  # one output's vector, or one multiplier


def _bound_string(d):
    d["bound"] = "0.1"


def _ragged_output_map(d):
    d["output_map"] = [[1.0, 0.0], [0.0]]


EDITS = {
    "lower_bound": _lower_bound,
    "lower_input_multiplier": _lower_input_multiplier,
    "scale_hidden_multipliers": _scale_hidden_multipliers,
    "zero_hidden_multiplier": _zero_hidden_multiplier,
    "negative_multiplier": _negative_multiplier,
    "nan_multiplier": _nan_multiplier,
    "other_output": _other_output,
    "other_norm": _other_norm,
    "other_formulation": _other_formulation,
    "drop_a_vector": _drop_a_vector,
    "bound_string": _bound_string,
    "ragged_output_map": _ragged_output_map,
}


#: Edits after which the certificate claims less than before, so it still holds: an l2 bound on
#: the whole output vector bounds every single output too (C^T C >= e_i e_i^T C^T C e_i e_i^T).
STILL_TRUE = {("l2", "other_output")}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_edits_are_refused(model, certs, kind, edit):
    d = copy.deepcopy(certs[kind])
    EDITS[edit](d)
    if (kind, edit) in STILL_TRUE:
        assert check_certificate(Certificate.from_dict(d), model).bound == d["bound"]
        return
    with pytest.raises(LipSDPError):
        check_certificate(Certificate.from_dict(d), model)


def test_lowered_per_output_bound_is_refused(model, certs):
    d = copy.deepcopy(certs["linf"])
    low = min(range(3), key=lambda i: d["network"]["per_output"][i]["bound"])
    d["network"]["per_output"][low]["bound"] *= 0.99  # the overall bound (a max) is unchanged
    with pytest.raises(LipSDPError, match="output"):
        check_certificate(Certificate.from_dict(d), model)


def test_a_larger_bound_is_still_a_valid_certificate(model, certs):
    d = copy.deepcopy(certs["linf"])
    d["bound"] *= 2
    assert check_certificate(Certificate.from_dict(d), model).bound == d["bound"]


@pytest.mark.parametrize("kind", ["l2", "linf"])
def test_other_weights_are_refused(certs, kind):
    with pytest.raises(LipSDPError, match="does not match"):
        check_certificate(Certificate.from_dict(copy.deepcopy(certs[kind])), mlp([5, 12, 12, 3], seed=5))


def test_constant_network_certificate_rechecks():
    net = mlp([3, 4, 2], seed=0)
    with torch.no_grad():
        net[0].weight.zero_()
    cert = lipsdp.certify(net, lower_bound_samples=0)
    assert cert.verified and cert.bound == 0.0
    assert check_certificate(Certificate.from_dict(json.loads(cert.to_json())), net).bound == 0.0


# -- the command line -------------------------------------------------------------
def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "lipsdp", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_cli_verifies_linf_certificates_and_refuses_edits(tmp_path, model):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    cert_path = tmp_path / "cert.json"
    code, out, err = run_cli("certify", path, "--norm", "linf", "--output", "2", "--save", cert_path, "--json")
    assert code == 0, err
    code, out, err = run_cli("verify", cert_path, path)
    assert code == 0, err
    assert "(linf, output 2)" in out
    code, out, err = run_cli("verify", cert_path, path, "--json")
    d = json.loads(out)
    assert code == 0 and d["norm"] == "linf" and d["bound"] == json.loads(cert_path.read_text())["bound"]

    edited = json.loads(cert_path.read_text())
    edited["bound"] *= 0.999
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(edited))
    code, out, err = run_cli("verify", bad, path)
    assert code == 1 and "Traceback" not in err and out == ""
    assert [line for line in err.splitlines() if line.startswith("lipsdp: error")] == [err.strip()]
    assert "does not verify" in err


def test_kinds_not_rebuilt_from_the_network_are_refused_by_name(model, certs, tmp_path):
    """Composed certificates (re-checked by lipsdp.composition.check_composed) and local ones written before
    their center was stored are refused by name, before loading the model; state-space and all-horizon
    ones are re-checked with their own LMIs (tests/test_verify_kinds.py)."""
    local = json.loads(lipsdp.certify(model, center=torch.zeros(5).numpy(), radius=0.1,
                                      lower_bound_samples=0).to_json())
    del local["region"]["center"]
    with pytest.raises(LipSDPError, match="local certificates written without their center"):
        check_certificate(Certificate.from_dict(local), model)
    d = copy.deepcopy(certs["l2"])
    d["verification"]["method"] = "composition"
    with pytest.raises(LipSDPError, match="composed certificates"):
        check_certificate(Certificate.from_dict(d), model)
