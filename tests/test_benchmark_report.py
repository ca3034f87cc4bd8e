"""The benchmark's reporting rules (``benchmarks/bench_solvers.py``), on made-up rows.

The tables in the README are built by these rules, so they are pinned here: an approximate backend
whose verified bound lies *above* the SDP value is looser, not a bug; anything below the interior-point
value is flagged; and the "fastest" column only counts configurations as tight as the best bound.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_solvers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_solvers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_solvers"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_solvers", None)


def _rows(bench, fo_bound, scs_bound):
    Row = bench.Row
    return [
        Row("net", 10, 10, "naive-sdpa", "naive", "sdpa", bound=2.0, seconds=[10.0]),
        Row("net", 10, 10, "naive-scs", "naive", "scs", bound=2.0, seconds=[40.0]),
        Row("net", 10, 8, "lipsdp-ipm", "lipsdp", "ipm", bound=2.0, verified=True, seconds=[1.0]),
        Row("net", 10, 8, "lipsdp-fo", "lipsdp", "fo", bound=fo_bound, verified=True, seconds=[0.5]),
        Row("net", 10, 8, "lipsdp-scs", "lipsdp", "scs", bound=scs_bound, verified=True, seconds=[2.0]),
    ]


def test_looser_approximate_bound_is_not_a_bug_but_a_lower_one_is(bench):
    rows = _rows(bench, fo_bound=2.5, scs_bound=1.9)
    found = {(d["config"], d["reference"]): d for d in bench.discrepancies(rows, [])}
    fo = found["lipsdp-fo", "naive-sdpa"]
    assert fo["looser"] and not fo["suspect"]
    scs = found["lipsdp-scs", "naive-sdpa"]  # below the interior-point value: would be unsound
    assert scs["suspect"] and not scs["looser"]
    assert ("lipsdp-ipm", "naive-sdpa") not in found


def test_fastest_counts_only_tight_configurations(bench):
    loose = _rows(bench, fo_bound=2.5, scs_bound=2.0)
    assert bench.fastest(loose)[0]["lipsdp"] == "lipsdp-ipm"
    tight = _rows(bench, fo_bound=2.0 * (1 + bench.REL_TOL / 2), scs_bound=2.0)
    assert bench.fastest(tight)[0]["lipsdp"] == "lipsdp-fo"


def test_same_family_ratios(bench):
    rows = _rows(bench, fo_bound=2.0, scs_bound=2.0)
    bench.add_ratios(rows)
    by = {r.config: r for r in rows}
    assert by["lipsdp-ipm"].vs_same == pytest.approx(10.0)  # interior point: naive SDPA
    assert by["lipsdp-fo"].vs_same == pytest.approx(80.0)  # first order: naive SCS
    assert by["lipsdp-fo"].vs_best == pytest.approx(20.0)  # fastest naive of any family


def test_gap_to_the_dual_bound(bench):
    """The "gap to dual" column: bound / (largest dual lower bound over the runs) - 1, or none."""
    row = bench.Row("net", 10, 8, "lipsdp-fo", "lipsdp", "fo", bound=2.0, verified=True, seconds=[1.0],
                    runs=[{"solver_dual_objective": 1.99}, {"solver_dual_objective": 1.98}])
    assert row.gap == pytest.approx(2.0 / 1.99 - 1.0)
    assert bench.Row("net", 10, 8, "lipsdp-scs", "lipsdp", "scs", bound=2.0, runs=[{}]).gap is None


@pytest.mark.slow
def test_cnn_benchmark_runs_and_agrees(tmp_path):
    """``benchmarks/bench_cnn.py`` on its small CNN: both configurations verified, the same bound, and
    the early elimination not slower per evaluation (measured 2.1x faster)."""
    import json
    import subprocess

    script = SCRIPT.parent / "bench_cnn.py"
    run = subprocess.run([sys.executable, str(script), "--nets", "small", "--repeats", "1", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    runs = json.loads((tmp_path / "cnn.json").read_text())["results"]["small"]["runs"]
    fo, plain = runs["fo"][0], runs["fo-plain"][0]
    assert fo["verified"] and plain["verified"]
    # Both verified; the two paths compute the same rho(T) and gradient (tests/test_firstorder.py), but over
    # hundreds of first-order steps their iterates part by rounding, and each stops at its tolerance.
    assert fo["bound"] == pytest.approx(plain["bound"], rel=1e-3)
    assert fo["per_eval"] < plain["per_eval"]
    assert "plain / fo per evaluation" in (tmp_path / "cnn.md").read_text()
