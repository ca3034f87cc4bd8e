"""Progress over all phases on stderr (:mod:`lipsdp.progress`): load, build, solve (what is solved, the time
left under a limit), verify; silent for short runs, into pipes and with ``--json`` unless asked."""

from __future__ import annotations

import time

import numpy as np
import pytest

import lipsdp
from lipsdp.cli import main
from lipsdp.network import Network
from lipsdp.solvers import BACKENDS
from lipsdp.solvers.ipm_ import LowRankIPM


@pytest.fixture
def slow_solver(monkeypatch):
    class Slow(LowRankIPM):
        name = "slow"

        def solve(self, lmi, **kwargs):
            time.sleep(1.8)
            return super().solve(lmi, **kwargs)

    monkeypatch.setitem(BACKENDS, "slow", Slow)


def _net():
    rng = np.random.default_rng(0)
    return Network.sequential([rng.standard_normal((6, 3)), rng.standard_normal((2, 6))], activation="tanh")


def test_api_progress_shows_the_phase_and_the_time_left(slow_solver, capsys):
    cert = lipsdp.certify(_net(), solver="slow", lower_bound_samples=0, time_limit=60, progress="always")
    assert cert.verified
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lipsdp: ")]
    assert any(line.startswith("lipsdp: solve: a ") and "LMI with slow" in line and "s left" in line
               for line in lines), lines


def test_quiet_by_default_into_a_pipe_and_with_json(slow_solver, tmp_path, capsys):
    assert lipsdp.certify(_net(), solver="slow", lower_bound_samples=0).verified
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    import torch

    model = tmp_path / "m.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)), model)
    assert main(["certify", str(model), "--solver", "slow", "--samples", "0", "--json"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["certify", str(model), "--solver", "slow", "--samples", "0", "--json", "--progress"]) == 0
    assert "lipsdp: solve: a " in capsys.readouterr().err
