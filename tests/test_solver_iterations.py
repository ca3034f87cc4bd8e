"""Each solver iteration on the progress display (:func:`lipsdp.progress.iteration`): its count, its objective
as a bound in original units (marked as not yet verified), its gap and an estimate of the time left."""

from __future__ import annotations

import time

import numpy as np
import pytest

import lipsdp
from lipsdp import progress
from lipsdp.budget import Budget, current
from lipsdp.network import Network


def _net():
    rng = np.random.default_rng(4)
    dims = [6, 10, 10, 10, 3]
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(dims, dims[1:])]
    return Network.sequential(weights, activation="leaky_relu", params={"negative_slope": 0.1})


@pytest.fixture
def reports(monkeypatch):
    """Every reported iteration, with the record the display reads right after it."""
    seen = []
    real = progress.iteration

    def record(solver, count, *args, **kwargs):
        real(solver, count, *args, **kwargs)
        rec = progress.iterations(current())
        seen.append((solver, count, rec.bound, rec.gap))

    monkeypatch.setattr(progress, "iteration", record)
    return seen


@pytest.mark.parametrize("solver", ["ipm", "chordal", "completion", "fo"])
def test_every_backend_reports_its_iterations_in_original_units(solver, reports):
    cert = lipsdp.certify(_net(), solver=solver, lower_bound_samples=0)
    assert cert.verified
    assert reports and {r[0] for r in reports} == {solver}  # the layer sweeps' small solves stay silent
    counts = [r[1] for r in reports]
    assert counts == sorted(counts) and counts[-1] >= 2
    final = reports[-1][2]
    # The solver's last objective, mapped back through the preconditioning, is the bound it proposes
    # (not verified): the verified bound lies at or just above it.
    assert final == pytest.approx(cert.bound, rel=1e-3)
    if solver != "fo":
        assert reports[-1][3] < 1e-3  # an interior-point method's relative gap


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now


def test_status_line_shows_iteration_objective_gap_and_an_estimate(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress, "time", clock)
    budget = Budget()
    with budget.active():
        budget.enter("solve")
        budget.detail = "a 40x40 LMI with ipm"
        progress.objective_scale(4.0)
        for k, gap in enumerate([1e-1, 1e-2, 1e-3, 1e-4]):  # a decade every 2 s
            progress.iteration("ipm", k, 2.25, gap, 1e-8)
            clock.now += 2.0
        clock.now -= 2.0
        assert progress.iterations(budget).eta() == pytest.approx(8.0)  # 4 decades to 1e-8
        text = progress.line(budget)
        assert "iteration 3, objective 3 (not yet verified), gap 1.0e-04" in text  # sqrt(2.25 * 4)
        assert "about 8 s to go" in text
        budget.verified(2.5, "output 0")
        assert "best verified bound 2.5" in progress.line(budget)
        budget.enter("verify")
        assert "iteration" not in progress.line(budget)
    progress.iteration("ipm", 1, 1.0)  # outside a run: nothing to do, no error


def test_progress_always_prints_the_iterations(monkeypatch, capsys):
    real = progress.iteration

    def slow(*args, **kwargs):  # iterations long enough for the display (it polls twice a second)
        time.sleep(0.2)
        real(*args, **kwargs)

    monkeypatch.setattr(progress, "iteration", slow)
    assert lipsdp.certify(_net(), solver="ipm", lower_bound_samples=0, progress="always").verified
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lipsdp: solve")]
    assert any("iteration" in line and "objective" in line and "not yet verified" in line for line in lines), lines
