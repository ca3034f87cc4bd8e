"""Fault injection: a backend that crashes, lies or returns garbage never produces a wrong bound.

A fake backend is registered in :data:`lipsdp.solvers.BACKENDS` (pytest
``monkeypatch``, so nothing leaks between tests) and driven through
:func:`lipsdp.certify` and the command line (:func:`lipsdp.cli.main` in-process:
a subprocess would not see the patch).  Whatever it does, the certificate
either has no bound (``unverified`` / ``solver_failed``) or a bound that is at
least the true SDP optimum (computed with CVXOPT) and passes the exact
rational re-check of :mod:`lipsdp.exact`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lipsdp
import lipsdp.solvers as solvers
from lipsdp.certificate import SOLVER_FAILED, UNVERIFIED, VERIFIED
from lipsdp.cli import main
from lipsdp.errors import SolverError, SolverLicenseError
from lipsdp.exact import exact_certificate_check
from lipsdp.network import Network
from lipsdp.pipeline import certify_network
from lipsdp.verification import proven_trivial_bound
from lipsdp.solvers.base import Backend, SolveResult
from models import mlp


def _net(seed=0, sizes=(5, 10, 10, 3)):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((b, a)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])]
    biases = [rng.standard_normal(b) for b in sizes[1:]]
    return Network.sequential(weights, activation="relu", biases=biases)


def _honest(lmi) -> SolveResult:
    return solvers.CVXOPT().solve(lmi)


def _with(result: SolveResult, x, objective=None, status=None) -> SolveResult:
    return SolveResult(status or result.status, x, objective if objective is not None else result.objective,
                       result.seconds, result.iterations, result.message)


def _scaled_multipliers(factor):
    def run(lmi):
        r = _honest(lmi)
        x = r.x.copy()
        x[1:] *= factor
        return _with(r, x, objective=1e-12)  # and a lying, tiny objective
    return run


def _perturbed(rel, seed=0):
    def run(lmi):
        r = _honest(lmi)
        rng = np.random.default_rng(seed)
        return _with(r, r.x * (1 + rel * rng.standard_normal(r.x.shape)), objective=0.5 * r.objective)
    return run


def _lying_rho(lmi):
    r = _honest(lmi)
    x = r.x.copy()
    x[0] = 0.0  # "rho = 0": the network would be constant
    return _with(r, x, objective=0.0)


def _negated(lmi):
    r = _honest(lmi)
    return _with(r, -r.x, objective=-1.0)


def _honest_then(change):
    def run(lmi):
        r = _honest(lmi)
        return change(r)
    return run


def _crash(lmi):
    raise RuntimeError("factorization failed in the middle of iteration 7")


def _oom(lmi):
    raise MemoryError("cannot allocate the Schur complement")


FAULTS = {
    # (a) crashes
    "exception": _crash,
    "memory_error": _oom,
    # (b) non-finite multipliers
    "nan": lambda lmi: SolveResult("optimal", np.full(lmi.n_var, np.nan), 1e-3, 0.0),
    "inf": lambda lmi: SolveResult("optimal", np.full(lmi.n_var, np.inf), 1e-3, 0.0),
    "nan_objective": _honest_then(lambda r: _with(r, r.x, objective=float("nan"))),
    # (c) no point
    "infeasible": lambda lmi: SolveResult("infeasible", None, None, 0.0, message="primal infeasible"),
    "solver_error_status": lambda lmi: SolveResult("solver_error", None, None, 0.0),
    # (d) perturbed / scaled-down multipliers and lying objectives
    "scaled_half": _scaled_multipliers(0.5),
    "scaled_0.9": _scaled_multipliers(0.9),
    "scaled_1-1e-6": _scaled_multipliers(1 - 1e-6),
    "perturbed_30%": _perturbed(0.3),
    "perturbed_1e-4": _perturbed(1e-4, seed=1),
    "lying_rho": _lying_rho,
    "negated": _negated,
    "time_limit_partial": _honest_then(lambda r: _with(r, r.x * 0.97, status="time_limit")),
    # (e) degenerate points
    "zeros": lambda lmi: SolveResult("optimal", np.zeros(lmi.n_var), 0.0, 0.0),
    "ones": lambda lmi: SolveResult("optimal", np.ones(lmi.n_var), 1.0, 0.0),
    "huge": lambda lmi: SolveResult("optimal", np.full(lmi.n_var, 1e300), 1e300, 0.0),
    "tiny": _honest_then(lambda r: _with(r, r.x * 1e-300, objective=1e-300)),
    "wrong_shape": lambda lmi: SolveResult("optimal", np.ones(lmi.n_var + 3), 1.0, 0.0),
    "empty": lambda lmi: SolveResult("optimal", np.zeros(0), 0.0, 0.0),
}
NO_POINT = {"exception", "memory_error", "infeasible", "solver_error_status"}


def install_fake(monkeypatch, behaviour, name="fake"):
    """Register a backend called ``name`` whose ``solve`` is ``behaviour(lmi)``."""

    class Fake(Backend):
        modules = ()
        install = "(test double)"
        family = "interior_point"

        def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
            return behaviour(lmi)

    Fake.name = name
    monkeypatch.setitem(solvers.BACKENDS, name, Fake)
    return Fake


@pytest.fixture(scope="module")
def net():
    return _net()


@pytest.fixture(scope="module")
def optimum(net):
    """The SDP optimum from an accurate interior-point solve (verified, so a hair above it)."""
    cert = lipsdp.certify(net, solver="cvxopt", lower_bound_samples=0)
    assert cert.verified
    return cert.bound * (1 - 1e-6)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faulty_backend_never_gives_a_smaller_bound(monkeypatch, net, optimum, fault):
    install_fake(monkeypatch, FAULTS[fault])
    cert = lipsdp.certify(net, solver="fake", lower_bound_samples=64)
    assert cert.solver == "fake"
    if fault in NO_POINT:
        assert cert.status == SOLVER_FAILED and cert.bound is None, cert.message
    if cert.bound is None:
        assert cert.status in (UNVERIFIED, SOLVER_FAILED)
        assert not cert.verified and not cert.multipliers
        assert cert.to_dict()["bound"] is None
        return
    assert cert.status == VERIFIED
    assert cert.bound >= optimum, f"UNSOUND: {fault} gave {cert.bound} < SDP optimum {optimum}"
    assert cert.lower_bound <= cert.bound <= cert.trivial_bound
    if cert.verification["method"] == "trivial":
        # The backend's point proved less than the product of norms: the certificate is that product,
        # proven in floating point, with no multipliers to re-check.
        assert cert.bound == proven_trivial_bound(net) and not cert.multipliers
        return
    assert exact_certificate_check(cert, net), "the certificate does not hold in exact arithmetic"


def test_the_faults_exercise_both_outcomes(monkeypatch, net):
    """Some faults are repaired into valid (larger) bounds, others give none: both paths are covered."""
    outcomes = {}
    for fault in ("scaled_1-1e-6", "lying_rho", "nan", "zeros", "exception"):
        install_fake(monkeypatch, FAULTS[fault])
        outcomes[fault] = lipsdp.certify(net, solver="fake", lower_bound_samples=0).status
    assert outcomes["lying_rho"] == VERIFIED  # only the multipliers are trusted, rho is recomputed
    assert outcomes["nan"] == UNVERIFIED and outcomes["zeros"] == UNVERIFIED
    assert outcomes["exception"] == SOLVER_FAILED


def test_crash_message_names_the_exception(monkeypatch, net):
    install_fake(monkeypatch, _crash)
    cert = certify_network(net, solver="fake", lower_bound_samples=0)
    assert cert.status == SOLVER_FAILED
    assert "RuntimeError" in cert.message and "iteration 7" in cert.message


def test_backend_raising_a_lipsdp_error_propagates(monkeypatch, net):
    def refuse(lmi):
        raise SolverError("the fake solver gave up")

    install_fake(monkeypatch, refuse)
    with pytest.raises(SolverError, match="gave up"):
        lipsdp.certify(net, solver="fake", lower_bound_samples=0)


# -- the command line -------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "model.pt"
    torch.save(mlp([5, 8, 8, 3], seed=2), path)
    return path


@pytest.mark.parametrize("fault", ["exception", "nan", "infeasible", "zeros", "scaled_half"])
def test_cli_solver_failure_is_exit_1_without_traceback(monkeypatch, capsys, model_file, fault):
    install_fake(monkeypatch, FAULTS[fault])
    code = main(["certify", str(model_file), "--solver", "fake", "--samples", "0", "--json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    d = json.loads(lines[0])
    if d["bound"] is None:
        assert code == 1 and d["status"] in (UNVERIFIED, SOLVER_FAILED) and not d["verified"]
    else:  # repaired into a valid bound
        assert code == 0 and d["verified"]


@pytest.mark.parametrize("fault", ["exception", "nan"])
def test_cli_table_mode_says_why_in_one_line(monkeypatch, capsys, model_file, fault):
    install_fake(monkeypatch, FAULTS[fault])
    code = main(["certify", str(model_file), "--solver", "fake", "--samples", "0"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    last = out.strip().splitlines()[-1]
    assert "fake" in last and ("no solution" in last or "could not be verified" in last), last


def test_cli_backend_solver_error_is_one_line_exit_1(monkeypatch, capsys, model_file):
    def refuse(lmi):
        raise SolverError("the fake solver gave up")

    install_fake(monkeypatch, refuse)
    code = main(["certify", str(model_file), "--solver", "fake", "--samples", "0"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    assert err.strip().splitlines() == ["lipsdp: error: the fake solver gave up"]


# -- MOSEK without a licence ----------------------------------------------------------
def _one_line_exit_2(capsys, code, needle):
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lipsdp: error:"), err
    assert needle in lines[0].lower()


def test_unlicensed_mosek_real(capsys, net, model_file):
    MOSEK = solvers.MOSEK
    if not MOSEK.is_installed():
        pytest.skip("MOSEK is not installed here")
    ok, reason = MOSEK.license_status()
    if ok:
        pytest.skip("MOSEK is licensed here: the unlicensed path cannot be exercised for real")
    with pytest.raises(SolverLicenseError, match="licen"):
        lipsdp.certify(net, solver="mosek", lower_bound_samples=0)
    _one_line_exit_2(capsys, main(["certify", str(model_file), "--solver", "mosek", "--samples", "0"]), "licen")
    cert = lipsdp.certify(net, solver="auto", lower_bound_samples=0)  # auto skips it
    assert cert.verified and cert.solver != "mosek"


def test_unlicensed_mosek_simulated(monkeypatch, capsys, net, model_file):
    """The same path wherever MOSEK is or is not installed: installed, licence check fails."""
    MOSEK = solvers.MOSEK
    monkeypatch.setattr(MOSEK, "is_installed", classmethod(lambda cls: True))
    monkeypatch.setattr(MOSEK, "license_status",
                        classmethod(lambda cls: (False, "no valid licence (simulated: licence file missing)")))

    def must_not_solve(self, lmi, **kwargs):  # pragma: no cover - reaching this is the failure
        raise AssertionError("an unlicensed MOSEK was asked to solve")

    monkeypatch.setattr(MOSEK, "solve", must_not_solve)
    with pytest.raises(SolverLicenseError, match="simulated"):
        lipsdp.certify(net, solver="mosek", lower_bound_samples=0)
    _one_line_exit_2(capsys, main(["certify", str(model_file), "--solver", "mosek", "--samples", "0"]), "licen")
    assert SolverLicenseError.exit_code == 2
    cert = lipsdp.certify(net, solver="auto", lower_bound_samples=0)
    assert cert.verified and cert.solver != "mosek"
