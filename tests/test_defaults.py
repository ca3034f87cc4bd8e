"""Defaults that keep their promise (issue 18, items 6 and 8): what a certificate records about itself,
``lipsdp verify --json``, the exit code of a ``--time-limit`` hit that still verified, solver noise kept
off the terminal, and ``auto`` never certifying above the trivial bound."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import pytest
import torch

import lipsdp
from lipsdp.certificate import SCHEMA_VERSION, Certificate
from lipsdp.errors import LipSDPError
from lipsdp.pipeline import check_certificate
from models import mlp


def run_cli(*args, timeout=300):
    """The real command, in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "lipsdp", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def small():
    return mlp([4, 8, 8, 2], seed=3)


# ---------------------------------------------------------------------------------------------------
# Certificates say which lipsdp wrote them, in which layout, and when.


def test_certificate_records_version_schema_and_time(small):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    d = json.loads(lipsdp.certify(small, lower_bound_samples=0).to_json())
    assert d["lipsdp_version"] == lipsdp.__version__
    assert d["schema_version"] == SCHEMA_VERSION == 1
    created = datetime.fromisoformat(d["created"])
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
    assert before <= created <= datetime.now(timezone.utc)


def test_old_certificate_without_the_fields_still_rechecks(small):
    d = json.loads(lipsdp.certify(small, lower_bound_samples=0).to_json())
    for key in ("lipsdp_version", "schema_version", "created"):
        del d[key]
    old = Certificate.from_dict(d)
    assert (old.lipsdp_version, old.schema_version, old.created) == (None, 0, None)
    assert check_certificate(old, small).verification["rechecked"]


def test_certificate_of_a_newer_schema_is_refused(small):
    d = json.loads(lipsdp.certify(small, lower_bound_samples=0).to_json())
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(LipSDPError, match="schema_version"):
        check_certificate(Certificate.from_dict(d), small)


def test_verify_json_has_a_verified_key(tmp_path, small):
    model, cert = tmp_path / "model.pt", tmp_path / "cert.json"
    torch.save(small, model)
    code, _, err = run_cli("certify", model, "--save", cert, "--samples", "0", "--json")
    assert code == 0, err
    code, out, err = run_cli("verify", cert, model, "--json")
    assert code == 0, err
    assert json.loads(out)["verified"] is True
    edited = json.loads(cert.read_text())
    edited["bound"] *= 0.5
    cert.write_text(json.dumps(edited))
    code, out, err = run_cli("verify", cert, model, "--json")
    assert code == 2 and "Traceback" not in err and err.startswith("lipsdp: error")
    d = json.loads(out)
    assert d["verified"] is False and "does not verify" in d["error"]


# ---------------------------------------------------------------------------------------------------
# A --time-limit hit whose unfinished point still verified a bound is a success (exit 0), as documented.


def test_time_limit_hit_that_verified_exits_0(tmp_path):
    model = tmp_path / "wide.pt"
    torch.save(mlp([40, 120, 120, 5], seed=1), model)
    code, out, err = run_cli("certify", model, "--solver", "ipm", "--time-limit", "0.02", "--samples", "0",
                             "--json")
    d = json.loads(out)
    assert d["solver_status"] == "time_limit", d["message"]
    assert d["status"] == "verified" and d["bound"] is not None
    assert code == 0, err
