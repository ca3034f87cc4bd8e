"""The completion method's products two at a time (``_Completion.workers``, :func:`lipsdp.threads.both`).

- ``both`` returns both values in order, raises either's exception after both finished, and puts the
  BLAS thread limits back;
- the split pattern product equals the whole one;
- a solve with two workers takes the same iterates as with one (the same products, each on one BLAS
  thread), and its bound lies between the sampled Jacobian norm and the product of the norms.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

import lipsdp
from lipsdp import threads
from lipsdp.chain import BlockChain
from lipsdp.solvers.completion_ import CompletionIPM, PatternChain, _Completion

from test_completion import _net, _solved_lmi


def _blas_limits():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_both_runs_the_second_in_another_thread_and_restores_the_limits():
    seen = {}

    def first():
        seen["first"] = (threading.current_thread().name, _blas_limits())
        return "a"

    def second():
        seen["second"] = (threading.current_thread().name, _blas_limits())
        return "b"

    with threadpool_limits(2, user_api="blas"):
        before = _blas_limits()
        assert threads.both(first, second) == ("a", "b")
        assert _blas_limits() == before
    assert seen["second"][0] == "lipsdp-both" and seen["first"][0] != "lipsdp-both"
    assert all(n == 1 for n in seen["first"][1])  # one BLAS thread each while both run
    with threadpool_limits(4, user_api="blas"):
        threads.both(first, second, threads=4)
    # Four threads: two for each (at most: a BLAS loaded under OMP_NUM_THREADS=1 cannot go above one).
    assert all(1 <= n <= 2 for n in seen["first"][1] + seen["second"][1])
    assert threads.both(first, second, threads=1) == ("a", "b")
    assert seen["second"][0] == threading.current_thread().name


@pytest.mark.parametrize("which", ["first", "second"])
def test_both_raises_either_exception_after_both_finished(which):
    done = []

    def ok():
        done.append(1)
        return 1

    def bad():
        raise ValueError(which)

    with pytest.raises(ValueError, match=which):
        threads.both(bad, ok) if which == "first" else threads.both(ok, bad)
    assert done == [1]


def test_split_pattern_product_is_the_whole_one():
    lmi = _solved_lmi((5, 7, 7, 7, 6, 3), function="leaky_relu", params={"alpha": 0.1})
    chain = PatternChain(BlockChain(lmi))
    rng = np.random.default_rng(2)
    Q, Y = rng.standard_normal((lmi.n, chain.r)), rng.standard_normal((lmi.n, chain.r))
    np.testing.assert_array_equal(chain.pattern_product(Q, Y, threads=2), chain.pattern_product(Q, Y))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_two_workers_take_the_same_iterates(norm):
    lmi = _solved_lmi((6, 9, 9, 9, 9, 9, 4), function="leaky_relu", params={"alpha": 0.05}, norm=norm)
    objs = []
    for workers in (1, 2):
        state = _Completion(lmi, PatternChain(BlockChain(lmi)), CompletionIPM.default_tol, None, 0.0, False,
                            CompletionIPM.max_iters, CompletionIPM.step_fraction)
        state.workers = workers
        status, _ = state.run()
        assert status == "optimal"
        objs.append((float(lmi.objective @ state.y), state.iterations, state.y.copy()))
    (f1, i1, y1), (f2, i2, y2) = objs
    assert i1 == i2
    assert f2 == pytest.approx(f1, rel=1e-9)
    np.testing.assert_allclose(y2, y1, rtol=1e-7, atol=1e-12 * np.abs(y1).max())


def test_certify_with_two_threads_pairs_the_products(monkeypatch):
    """Through certify with ``threads=2`` the products run in pairs, and the bound is the one-thread bound,
    between the sampled Jacobian norm and the product of the norms."""
    net = _net((6,) + (8,) * 10 + (3,), "leaky_relu", {"negative_slope": 0.05}, seed=5)
    calls = []
    real = threads.both

    def counting(first, second, threads=2):
        calls.append(threads >= 2)
        return real(first, second, threads)

    monkeypatch.setattr(threads, "both", counting)
    one = lipsdp.certify(net, solver="completion", threads=1, lower_bound_samples=0)
    assert calls and not any(calls)
    calls.clear()
    two = lipsdp.certify(net, solver="completion", threads=2, lower_bound_samples=64)
    assert calls and all(calls)
    assert one.verified and two.verified and two.solver_status == "optimal", two.message
    assert two.bound == pytest.approx(one.bound, rel=1e-9)
    assert two.lower_bound <= two.bound < two.trivial_bound
