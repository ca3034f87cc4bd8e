"""``--time-limit`` holds for every backend, also SDPA and CVXOPT (no native limit: a worker process is killed).

The net below takes SDPA about 2.6 s and CVXOPT about 8 s on this machine; a
0.3 s limit must stop them within a second of the limit (plus, at most, the
start of a worker process) and give no bound of theirs (the layer-by-layer start point's, at most).  Without a limit nothing
changes: no worker, the same bound.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import lipsdp
import lipsdp.solvers.deadline as deadline
from lipsdp.bounds import sampled_lower_bound
from lipsdp.errors import SolverError
from lipsdp.network import Network
from lipsdp.solvers import BACKENDS, CVXOPT
from lipsdp.solvers.deadline import solve_in_child
from models import mlp

LIMITED = [name for name in ("sdpa", "cvxopt") if BACKENDS[name].is_installed()]
LIMIT = 0.3
#: Worst case for starting a worker (interpreter + cvxpy import, about 1.5 s here) on a loaded 2-core machine.
STARTUP = 20.0


def _net(sizes, seed=0):
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((b, a)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])]
    return Network.sequential(ws, activation="relu")


@pytest.fixture(scope="module")
def slow_net():
    return _net([30, 80, 80, 10])


def _cut_short(net, cert):
    """A killed solve gives no point: the bound, if any, is the layer-by-layer start point's (verified in the
    time left), in the sandwich and labelled as such; else none."""
    if cert.verified:
        msg = cert.verification["message"]
        assert "start point" in msg and "not the SDP optimum" in msg and "killed" in msg, msg
        lower = sampled_lower_bound(net, samples=64)
        assert lower <= cert.bound <= cert.trivial_bound
    else:
        assert cert.bound is None and not cert.multipliers and cert.to_dict()["bound"] is None
        assert "time limit" in cert.message and "killed" in cert.message


@pytest.mark.parametrize("solver", LIMITED)
def test_tiny_limit_stops_the_solve_and_gives_no_bound(slow_net, solver):
    deadline.stop_all()
    deadline._IDLE.clear()
    t0 = time.perf_counter()
    cert = lipsdp.certify(slow_net, solver=solver, time_limit=LIMIT, lower_bound_samples=0)
    elapsed = time.perf_counter() - t0
    assert cert.solver_status == "time_limit", cert.message
    _cut_short(slow_net, cert)
    assert elapsed < LIMIT + STARTUP
    # Once a worker is warm (a small solve leaves one idle), the limit is honoured within a second.
    assert lipsdp.certify(_net([3, 4, 2]), solver=solver, time_limit=100, lower_bound_samples=0).verified
    cert = lipsdp.certify(slow_net, solver=solver, time_limit=LIMIT, lower_bound_samples=0)
    assert cert.solver_status == "time_limit"
    _cut_short(slow_net, cert)
    assert cert.timings["solve"] < LIMIT + 1.0, cert.timings
    assert not deadline.ACTIVE - set(deadline._IDLE), "a killed worker is still registered"


@pytest.mark.parametrize("solver", LIMITED)
def test_no_limit_means_no_worker_and_the_same_bound(solver):
    deadline.stop_all()
    deadline._IDLE.clear()
    net = _net([6, 10, 10, 3], seed=1)
    plain = lipsdp.certify(net, solver=solver, lower_bound_samples=0)
    assert not deadline.ACTIVE, "a solve without a limit started a worker"
    limited = lipsdp.certify(net, solver=solver, time_limit=600, lower_bound_samples=0)
    assert plain.verified and limited.verified
    assert limited.bound == plain.bound and limited.multipliers == plain.multipliers
    assert "no time limit" not in limited.message


def test_linf_reuses_one_worker_across_outputs():
    deadline.stop_all()
    deadline._IDLE.clear()
    started = []
    original = deadline._Worker.__init__

    def counting(self):
        started.append(1)
        original(self)

    deadline._Worker.__init__ = counting
    try:
        cert = lipsdp.certify(_net([4, 8, 8, 3], seed=2), solver="cvxopt", norm="linf", time_limit=600,
                              lower_bound_samples=0)
    finally:
        deadline._Worker.__init__ = original
    assert cert.verified and len(cert.network["per_output"]) == 3
    assert len(started) == 1


class _DyingCVXOPT(CVXOPT):
    """Dies in the worker the way a native crash or the OOM killer would (SIGKILL)."""

    name = "dying"

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        if time_limit:
            return solve_in_child(self, lmi, time_limit, tol=tol)
        os.kill(os.getpid(), signal.SIGKILL)


class _RefusingCVXOPT(CVXOPT):
    name = "refusing"

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        if time_limit:
            return solve_in_child(self, lmi, time_limit, tol=tol)
        raise SolverError("refused in the worker")


def test_a_worker_that_dies_is_a_solver_error_not_a_crash(monkeypatch):
    monkeypatch.setitem(BACKENDS, "dying", _DyingCVXOPT)
    cert = lipsdp.certify(_net([3, 5, 2]), solver="dying", time_limit=60, lower_bound_samples=0)
    assert cert.solver_status == "solver_error" and cert.bound is None
    assert "died" in cert.message and "-9" in cert.message


def test_a_worker_exception_is_raised_in_the_parent(monkeypatch):
    monkeypatch.setitem(BACKENDS, "refusing", _RefusingCVXOPT)
    with pytest.raises(SolverError, match="refused in the worker"):
        lipsdp.certify(_net([3, 5, 2]), solver="refusing", time_limit=60, lower_bound_samples=0)


@pytest.mark.parametrize("solver", LIMITED[:1])
def test_cli_time_limit_is_exit_1_with_null_bound(tmp_path, solver):
    path = tmp_path / "slow.pt"
    torch.save(mlp([30, 80, 80, 10], seed=0), path)
    proc = subprocess.run([sys.executable, "-m", "lipsdp", "certify", str(path), "--solver", solver,
                           "--time-limit", str(LIMIT), "--samples", "0", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    d = json.loads(proc.stdout)
    assert d["bound"] is None and not d["verified"]
    if d["status"] == "limit_reached":  # the limit covers the whole command, from the process's start
        assert f"time limit of {LIMIT:g} s reached" in d["message"] and d["message"] in proc.stderr
    else:
        assert d["status"] == "solver_failed" and d["solver_status"] == "time_limit", d
        assert d["timings"]["solve"] < LIMIT + STARTUP and "s time limit" in d["message"]


def test_scs_time_limit_is_reported_as_such():
    """SCS 3.x says "solved (inaccurate - reached time_limit_secs)": that is a time limit, not an error."""
    rng = np.random.default_rng(0)
    from lipsdp.network import Network

    net = Network.sequential([rng.standard_normal((40, 30)), rng.standard_normal((40, 40)),
                              rng.standard_normal((5, 40))])
    cert = lipsdp.certify(net, solver="scs", time_limit=0.01, lower_bound_samples=0)
    assert cert.solver_status == "time_limit"
    full = lipsdp.certify(net, solver="ipm", lower_bound_samples=0)
    assert cert.bound is None or cert.bound >= full.bound * (1 - 1e-9)
