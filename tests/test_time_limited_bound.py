"""What a run cut short proves (issue 19, item 2): the better of the solver's unfinished point and the
layer-by-layer start point, a completion solve that stops before an iteration it cannot finish, and the
start's bound recorded under a limit.  Also the block lookup of ``LMIProblem.chain_layers`` against the
binary search it replaced.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from lipsdp.bounds import node_lipschitz, sampled_lower_bound
from lipsdp.budget import Budget
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from lipsdp.pipeline import _scales
from lipsdp.reductions import Chain, Precondition, Query, ReduceInput
from lipsdp.solve import Solution
from lipsdp.solvers import completion_
from lipsdp.solvers.completion_ import CompletionIPM
from lipsdp.verification import record_start_bound, verify_solution


def _net(sizes, seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    return Network.sequential(weights, activation="leaky_relu", params={"negative_slope": 0.01})


def _query(net):
    """The query as certify reduces it: input-reduced, preconditioned, with the swept start on ``solve``."""
    lips = node_lipschitz(net)
    lifting = lift(net)
    block_scale = np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]])
    chain = Chain([ReduceInput(), Precondition(block_scale, lips[net.output], scales=_scales)])
    query, inverse = chain.apply(Query.build(lifting, "neuron", "l2", None))
    return query, chain, inverse, lips[net.output]


def _sandwich(net, bound, trivial):
    lower = sampled_lower_bound(net, samples=64)
    assert lower <= bound * (1 + 1e-7), f"UNSOUND: sampled {lower} > certified {bound}"
    assert bound <= trivial * (1 + 1e-7)


def test_unfinished_solve_keeps_the_better_start_point():
    net = _net((12, 10, 10, 10, 10, 3))
    query, chain, inverse, trivial = _query(net)
    start = query.solve.start
    assert start is not None
    # An unfinished solver's point: feasible but looser than the start (the completion method's first
    # iterates, from the start doubled, are such points).
    worse = 2.0 * start
    cut = chain.invert(Solution(worse, "time_limit", "time limit after 1 iterations",
                                float(query.solve.objective @ worse)), inverse)
    out = verify_solution(query, cut)
    ver = out.verification
    assert ver.verified and "start point" in ver.message
    done = verify_solution(query, replace(cut, status="optimal"))  # a finished solve keeps its own point
    assert done.verification.verified and "start point" not in done.verification.message
    # The start's bound is about 1/sqrt(2) of the doubled point's (rho scales with the multipliers).
    assert ver.bound < 0.75 * done.verification.bound
    _sandwich(net, ver.bound, trivial)


def test_a_solve_cut_without_a_point_still_proves_the_start():
    net = _net((8, 8, 8, 8, 2), seed=1)
    query, chain, inverse, trivial = _query(net)
    out = verify_solution(query, chain.invert(Solution(None, "time_limit", "not solved"), inverse))
    assert out.verification is not None and out.verification.verified
    assert "not solved" in out.verification.message
    _sandwich(net, out.verification.bound, trivial)
    # A crash is not a time limit: no bound from the start (the solver's failure is reported as before).
    failed = verify_solution(query, chain.invert(Solution(None, "solver_error", "crashed"), inverse))
    assert failed.verification is None


def test_start_bound_recorded_under_a_limit():
    net = _net((12, 10, 10, 10, 3), seed=2)
    query, _, _, trivial = _query(net)
    record_start_bound(query)  # no run, no limit: nothing to record, nothing proven
    budget = Budget(time_limit=1000.0)
    with budget.active():
        record_start_bound(query)
    assert budget.best is not None and budget.best[1] == "the layer-by-layer start point"
    _sandwich(net, budget.best[0], trivial)


def test_completion_stops_before_an_iteration_past_the_limit(monkeypatch):
    net = _net((6, 8, 8, 8, 8, 2), seed=3)
    query, _, _, _ = _query(net)
    clock = iter(np.arange(0.0, 1000.0, 1.0))  # every clock read one second later
    monkeypatch.setattr(completion_.time, "perf_counter", lambda: float(next(clock)))
    # Iterations start at t = 1, 2, ...: with a 2.5 s limit the second would end at 3 > 2.5.
    res = CompletionIPM().solve(query.solve, time_limit=2.5)
    assert res.status == "time_limit" and res.iterations == 1, (res.status, res.iterations, res.message)
    assert "would pass it" in res.message


@pytest.mark.parametrize("sizes", [(5, 4, 6, 3), (7, 6, 6, 6, 6, 2)])
def test_chain_layers_as_the_binary_search(sizes):
    lmi = build_lmi(lift(_net(sizes)))
    starts = np.array([b.start for b in lmi.blocks])
    rb = np.searchsorted(starts, lmi.rows, side="right") - 1
    cb = np.searchsorted(starts, lmi.cols, side="right") - 1
    lo = np.full(lmi.n_var, len(lmi.blocks))
    hi = np.full(lmi.n_var, -1)
    np.minimum.at(lo, lmi.var, np.minimum(rb, cb))
    np.maximum.at(hi, lmi.var, np.maximum(rb, cb))
    got = lmi.chain_layers()
    assert got is not None and got.dtype == np.int64 and np.array_equal(got, hi)
    # An entry coupling blocks 0 and 2 makes it no chain.
    far = replace(lmi, rows=np.append(lmi.rows, 0), cols=np.append(lmi.cols, lmi.blocks[2].start),
                  vals=np.append(lmi.vals, 1.0), var=np.append(lmi.var, 1))
    assert far.chain_layers() is None


def test_auto_does_not_start_a_solve_far_beyond_the_time_left(monkeypatch):
    import lipsdp
    import lipsdp.solve as solve_stage

    net = _net((10, 12, 12, 12, 12, 3), seed=4)
    trivial = node_lipschitz(net)[net.output]
    full = lipsdp.certify(net, lower_bound_samples=0)
    assert full.verified and full.solver == "completion"
    # A machine a billion times slower: every solve is estimated far beyond the 100 s limit.
    monkeypatch.setattr(solve_stage, "FLOP_RATE", 1e-3, raising=False)  # (absent before: no skip)
    cert = lipsdp.certify(net, lower_bound_samples=0, time_limit=100)
    assert cert.verified and cert.solver_status == "time_limit", cert.message
    msg = cert.verification["message"]
    assert "start point" in msg and "not solved: completion would need about" in msg, msg
    assert cert.timings["solve"] == 0.0
    _sandwich(net, cert.bound, trivial)
    assert cert.bound >= full.bound * (1 - 1e-9)  # the SDP optimum lies below the start's bound
    # An explicitly chosen solver runs as asked.
    asked = lipsdp.certify(net, lower_bound_samples=0, time_limit=100, solver="completion")
    assert asked.verified and asked.solver_status != "time_limit"
