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
from lipsdp.checking import check_certificate
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
    assert d["schema_version"] == SCHEMA_VERSION == 2
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
    assert code == 1 and "Traceback" not in err and err.startswith("lipsdp: error")
    d = json.loads(out)
    assert d["verified"] is False and "does not verify" in d["error"]


# ---------------------------------------------------------------------------------------------------
# A --time-limit hit whose unfinished point still verified a bound is a success (exit 0), as documented.


def test_time_limit_hit_that_verified_exits_0(tmp_path, capsys):
    model = tmp_path / "wide.pt"
    torch.save(mlp([40, 120, 120, 5], seed=1), model)
    # In-process: the limit covers the whole command (a fresh interpreter spends it importing torch), and
    # the solver gets most of what is left after loading and building. Which limit stops the solve late
    # enough to verify depends on the machine's load: try a few.
    from lipsdp.cli import main

    seen = []
    for limit in ("0.3", "0.6", "1.2", "2.4"):
        code = main(["certify", str(model), "--solver", "ipm", "--time-limit", limit, "--samples", "0", "--json"])
        out, err = capsys.readouterr()
        d = json.loads(out)
        seen.append((limit, d.get("solver_status"), d["status"], code))
        assert (code == 0) == (d["status"] == "verified" and d["bound"] is not None), (d, err)
        if d.get("solver_status") == "time_limit" and d["status"] == "verified":
            break
    else:
        pytest.fail(f"no time-limit hit verified a bound: {seen}")
    assert code == 0, err


# ---------------------------------------------------------------------------------------------------
# Solver noise (SDPA's C++ messages, library warnings) stays off the terminal unless --debug.


def test_sdpa_messages_reach_stderr_only_with_debug(tmp_path):
    pytest.importorskip("sdpap")
    model = tmp_path / "model.pt"
    torch.save(mlp([5, 12, 12, 3], seed=4), model)  # SDPA says "Strange behavior : primal < dual" on it
    code, out, err = run_cli("certify", model, "--solver", "sdpa", "--samples", "0", "--json", "--debug")
    assert code == 0, err
    assert "Strange behavior" in err  # the net still triggers the message, so the next check means something
    code, out, err = run_cli("certify", model, "--solver", "sdpa", "--samples", "0", "--json")
    assert code == 0 and json.loads(out)["verified"]
    assert err == ""
    code, out, err = run_cli("certify", tmp_path / "missing.pt")
    assert code == 2 and err.startswith("lipsdp: error")  # lipsdp's own lines still reach the terminal


# ---------------------------------------------------------------------------------------------------
# `auto` never certifies above the trivial bound (orthogonal GroupSort nets: SDPA stops "inaccurate" a
# little above the optimum 1, which the product of norms attains).


def _orthogonal(n, rng):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("n,hidden,seed,activation", [(4, 2, 0, "groupsort"), (6, 3, 0, "groupsort"),
                                                      (8, 3, 0, "groupsort"), (6, 2, 1, "fullsort")])
def test_auto_never_above_the_trivial_bound(n, hidden, seed, activation):
    from lipsdp.bounds import sampled_lower_bound
    from lipsdp.network import Network

    rng = np.random.default_rng(100 * n + 10 * hidden + seed)
    params = {"group_size": 2 if activation == "groupsort" else n}
    net = Network.sequential([_orthogonal(n, rng) for _ in range(hidden + 1)], activation="groupsort",
                             params=params)
    cert = lipsdp.certify(net, solver="auto")
    lower = sampled_lower_bound(net, samples=512)
    assert cert.verified, cert.message
    assert lower <= cert.bound <= cert.trivial_bound, (lower, cert.bound, cert.trivial_bound, cert.message)
    assert cert.bound < 1 + 1e-9  # the README's promise: orthogonal nets certify at 1.000
    rechecked = check_certificate(Certificate.from_dict(json.loads(cert.to_json())), net)
    assert rechecked.verification["rechecked"]


def test_trivial_certificate_rechecks_and_refuses_a_lowered_bound():
    from lipsdp.network import Network

    rng = np.random.default_rng(5)
    net = Network.sequential([_orthogonal(6, rng) for _ in range(3)], activation="groupsort",
                             params={"group_size": 2})
    cert = lipsdp.certify(net, solver="auto", lower_bound_samples=0)
    d = json.loads(cert.to_json())
    d["verification"] = {"method": "trivial"}
    d["bound"] = d["trivial_bound"] = cert.trivial_bound * (1 + 1e-9)
    d["multipliers"], d["multiplier_labels"] = [], []
    assert check_certificate(Certificate.from_dict(d), net).verification["rechecked"]
    d["bound"] = 1.0 - 1e-9  # below the true constant 1
    with pytest.raises(LipSDPError, match="does not verify"):
        check_certificate(Certificate.from_dict(d), net)


def test_proven_spectral_norm_is_an_upper_bound():
    from lipsdp.verification import proven_spectral_norm

    rng = np.random.default_rng(0)
    for W, exact in [(3.0 * _orthogonal(7, rng), 3.0), (np.diag(np.arange(1.0, 9.0)), 8.0),
                     (np.zeros((3, 4)), 0.0), (np.array([[1e-300, 0.0]]), 1e-300)]:
        s = proven_spectral_norm(W)
        assert exact <= s <= exact * (1 + 1e-10) + 1e-300, (exact, s)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("build", ["mlp", "residual"])
def test_proven_trivial_bound_is_the_composed_bound_rounded_up(norm, build):
    """One dispatch, two arithmetics: the proven composition bounds the float one from above, and by
    no more than rounding (a mismatch means the two paths compose differently)."""
    from lipsdp.bounds import node_lipschitz
    from lipsdp.io import network_from_module
    from lipsdp.verification import proven_trivial_bound
    from models import residual_mlp

    model = mlp([6, 9, 7, 3], activation="tanh", seed=2) if build == "mlp" else residual_mlp(seed=3)
    net = network_from_module(model, input_shape=(6,) if build == "mlp" else (4,))
    estimate = node_lipschitz(net, norm)[net.output]
    proven = proven_trivial_bound(net, norm)
    assert estimate <= proven <= estimate * (1 + 1e-9), (estimate, proven)
    omap = np.array([[1.0, -1.0, 0.0]])
    assert proven_trivial_bound(net, norm, omap) >= estimate


def test_composed_linf_bound_of_sparse_weights():
    """Convolutions are sparse Affine weights: the l_inf composition takes their row sums too."""
    import scipy.sparse as sp

    from lipsdp.bounds import Estimate, Proven

    W = sp.random(5, 7, density=0.5, format="csr", random_state=0)
    exact = float(np.abs(W.toarray()).sum(axis=1).max())
    assert Estimate("linf").matrix(W) == pytest.approx(exact, rel=1e-15)
    assert exact <= Proven("linf").matrix(W) <= exact * (1 + 1e-12)
