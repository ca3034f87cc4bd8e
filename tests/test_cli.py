"""The command line as users meet it: tables, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from lipsdp.cli import main
from lipsdp.solvers import MOSEK
from models import mlp


def run_cli(*args, timeout=300):
    """The real command, in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "lipsdp", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(result, expected_code, *needles):
    code, _, err = result
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("lipsdp: error")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model.pt"
    torch.save(mlp([5, 12, 12, 3], seed=4), path)
    return path


def test_json_output_and_exit_zero(model_file):
    code, out, err = run_cli("certify", model_file, "--json")
    assert code == 0, err
    d = json.loads(out)  # stdout holds exactly one JSON object
    for key in ("bound", "status", "solver", "formulation", "norm", "seconds", "trivial_bound", "lower_bound"):
        assert key in d
    assert d["status"] == "verified" and d["norm"] == "l2" and d["formulation"] == "neuron"
    assert d["lower_bound"] <= d["bound"] <= d["trivial_bound"]


def test_table_output(model_file, capsys):
    assert main(["certify", str(model_file), "--formulation", "layer", "--solver", "scs"]) == 0
    out = capsys.readouterr().out
    assert "Lipschitz bound" in out and "trivial bound" in out and "scs" in out and "layer" in out


def test_console_script_and_python_m_agree(model_file):
    a = json.loads(run_cli("certify", model_file, "--json", "--solver", "cvxopt")[1])
    assert main(["certify", str(model_file), "--json", "--solver", "cvxopt"]) == 0
    assert a["bound"] == pytest.approx(a["bound"])


def test_solvers_listing():
    code, out, err = run_cli("solvers", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"mosek", "scs", "clarabel", "sdpa", "cvxopt"} <= set(rows)
    assert rows["scs"]["usable"]
    code, out, _ = run_cli("solvers")
    assert code == 0 and "lipsdp[mosek]" in out


# -- bad input: one clear line, exit 2 -------------------------------------
def test_missing_file(tmp_path):
    assert_one_line_error(run_cli("certify", tmp_path / "nope.pt"), 2, "nope.pt")


def test_not_a_model(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("these are not weights\n")
    assert_one_line_error(run_cli("certify", p), 2, "notes.pt")


def test_truncated_zip(tmp_path, model_file):
    data = model_file.read_bytes()
    p = tmp_path / "half.pt"
    p.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("certify", p), 2, "half.pt")


def test_state_dict_needs_activation(tmp_path):
    p = tmp_path / "weights.pt"
    model = mlp([4, 6, 2], seed=0)
    torch.save(model.state_dict(), p)
    assert_one_line_error(run_cli("certify", p), 2, "--activation")
    code, out, err = run_cli("certify", p, "--activation", "relu", "--json")
    assert code == 0, err
    from lipsdp import certify
    assert json.loads(out)["bound"] == pytest.approx(certify(model).bound, rel=1e-6)


def test_unsupported_layers_all_listed(tmp_path):
    p = tmp_path / "odd.pt"
    torch.save(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.Softmax(dim=-1)), p)
    assert_one_line_error(run_cli("certify", p), 2, "LayerNorm", "Softmax")


def test_nan_weight(tmp_path):
    model = mlp([3, 5, 2], seed=0)
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    p = tmp_path / "nan.pt"
    torch.save(model, p)
    assert_one_line_error(run_cli("certify", p), 2, "nan")


def test_unknown_solver(model_file):
    assert_one_line_error(run_cli("certify", model_file, "--solver", "gurobi"), 2, "gurobi", "scs")


@pytest.mark.skipif(MOSEK.license_status()[0], reason="MOSEK is licensed on this machine")
def test_unlicensed_mosek_asked_explicitly(model_file):
    ok, reason = MOSEK.license_status()
    if not MOSEK.is_installed():
        assert_one_line_error(run_cli("certify", model_file, "--solver", "mosek"), 2, "not installed")
    else:
        assert_one_line_error(run_cli("certify", model_file, "--solver", "mosek"), 2, "licence")


def test_bad_arguments_exit_two(model_file):
    code, _, err = run_cli("certify", model_file, "--time-limit", "-3")
    assert code == 2 and "Traceback" not in err
    code, _, err = run_cli("certify", model_file, "--formulation", "network")
    assert code == 2 and "Traceback" not in err


def test_solver_time_limit_never_prints_unverified_number(tmp_path):
    """SCS stopped after a millisecond: either its iterate verifies (a valid, looser bound) or exit 1 with no number."""
    torch.manual_seed(0)
    p = tmp_path / "wide.pt"
    model = mlp([20, 60, 60, 10], seed=2)
    torch.save(model, p)
    code, out, err = run_cli("certify", p, "--solver", "scs", "--time-limit", "0.001", "--json")
    assert "Traceback" not in err
    d = json.loads(out)
    from lipsdp import certify
    exact = certify(model, solver="cvxopt").bound
    if d["status"] == "limit_reached":  # the limit covers the whole run: spent before the solver (exit 1)
        assert code == 1 and d["bound"] is None and "time limit" in d["message"]
        return
    if code == 0:
        assert d["status"] == "verified" and d["bound"] >= exact * (1 - 1e-9)
    else:
        assert code == 1 and d["bound"] is None and d["status"] in ("unverified", "solver_failed")
    assert d["solver_status"] in ("time_limit", "optimal_inaccurate", "solver_error")


def test_import_is_light():
    code = ("import sys, lipsdp; heavy = [m for m in ('torch', 'scs', 'cvxpy', 'clarabel', 'mosek', 'cvxopt', "
            "'sdpap') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_debug_shows_traceback(tmp_path):
    code, _, err = run_cli("certify", tmp_path / "nope.pt", "--debug")
    assert code != 0 and "Traceback" in err


def test_saved_certificate_rechecks_and_catches_edits(tmp_path, model_file):
    cert_path = tmp_path / "cert.json"
    code, out, err = run_cli("certify", model_file, "--save", cert_path, "--json")
    assert code == 0, err
    code, out, err = run_cli("verify", cert_path, model_file, "--json")
    assert code == 0, err
    assert json.loads(out)["bound"] == json.loads(cert_path.read_text())["bound"]

    # an edited (smaller) bound is refused
    d = json.loads(cert_path.read_text())
    d["bound"] *= 0.9
    d["multipliers"][0] *= 0.81
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(d))
    assert_one_line_error(run_cli("verify", edited, model_file), 1, "verif")  # does not verify: exit 1

    # a changed model is refused
    other = tmp_path / "other.pt"
    torch.save(mlp([5, 12, 12, 3], seed=5), other)
    assert_one_line_error(run_cli("verify", cert_path, other), 2, "does not match")


def test_strict_exact_check(model_file):
    code, out, err = run_cli("certify", model_file, "--strict", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["verification"]["method"] == "exact" and "confirmed exactly" in d["verification"]["message"]
    code, out, err = run_cli("certify", model_file, "--strict", "--json", "--norm", "linf")
    assert code == 0, err
    assert json.loads(out)["verification"]["method"] == "exact"


def test_solver_help_names_every_backend():
    """``--solver``'s help is written by hand: it must not fall behind the backends lipsdp has."""
    from lipsdp.cli import build_parser
    from lipsdp.solvers import BACKENDS

    certify = build_parser()._subparsers._group_actions[0].choices["certify"]
    text = next(a.help for a in certify._actions if "--solver" in a.option_strings)
    missing = [name for name in BACKENDS if name not in text.replace(",", " ").replace(";", " ").split()]
    assert not missing, f"--solver help omits {missing}"
