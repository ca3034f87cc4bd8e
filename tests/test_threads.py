"""lipsdp chooses the BLAS / OpenMP / torch thread counts itself (:mod:`lipsdp.threads`); ``threads=`` and
``--threads`` override; everything is put back after the call.

On a shared 2-core machine the default pools (one thread per core) made the README's first command's solve
tens of times slower than with ``OMP_NUM_THREADS=1``; users do not set environment variables.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import lipsdp
from lipsdp import threads
from lipsdp.network import Network
from lipsdp.solvers import BACKENDS
from lipsdp.solvers.ipm_ import LowRankIPM
from conftest import EXAMPLES


def _net():
    rng = np.random.default_rng(0)
    return Network.sequential([rng.standard_normal((8, 4)), rng.standard_normal((8, 8)),
                               rng.standard_normal((2, 8))], activation="relu")


def _recording(monkeypatch, seen):
    """``ipm``, recording the thread counts in force while it solves."""
    class Recording(LowRankIPM):
        name = "recording"

        def solve(self, lmi, **kwargs):
            seen.append({"blas": {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"},
                         "torch": torch.get_num_threads(), "env": os.environ.get("OMP_NUM_THREADS")})
            return super().solve(lmi, **kwargs)

    monkeypatch.setitem(BACKENDS, "recording", Recording)


def test_choose():
    assert threads.choose(None) == 1 and threads.choose(300) == 1 and threads.choose(3999) == 1
    assert 1 <= threads.choose(10**6) <= threads.cores()
    assert threads.cores() >= 1


def test_small_problems_solve_single_threaded_and_the_pools_are_restored(monkeypatch):
    """Before: the pools stayed at one thread per core (or whatever the environment said) during the solve."""
    seen = []
    _recording(monkeypatch, seen)
    with threadpool_limits(limits=2):
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        before = {i["filepath"]: i["num_threads"] for i in threadpool_info()}
        cert = lipsdp.certify(_net(), solver="recording", lower_bound_samples=16)
        assert cert.verified and cert.lower_bound <= cert.bound <= cert.trivial_bound
        assert seen and seen[-1] == {"blas": {1}, "torch": 1, "env": "1"}, seen
        assert {i["filepath"]: i["num_threads"] for i in threadpool_info()} == before
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        cert = lipsdp.certify(_net(), solver="recording", lower_bound_samples=0, threads=2)
        assert seen[-1]["torch"] == 2 and seen[-1]["env"] == "2"
        assert seen[-1]["blas"] <= {1, 2} and 2 in seen[-1]["blas"], seen  # (SDPA's own BLAS is single-threaded)
    torch.set_num_threads(1)


def test_cli_threads_option(capsys):
    from lipsdp.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["certify", str(EXAMPLES / "digits_mlp.pt"), "--threads", "0"])
    assert exit_.value.code == 2 and "at least 1" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "lipsdp", "certify", str(EXAMPLES / "digits_mlp.pt"), "--threads", "1",
                           "--json", "--samples", "16"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["verified"]


def _solve_seconds(env, runs=5):
    times = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-m", "lipsdp", "certify", str(EXAMPLES / "digits_mlp.pt"), "--json"],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        t = json.loads(proc.stdout)["timings"]
        times.append(t["build"] + t["solve"] + t["verify"])
    return statistics.median(times)


@pytest.mark.slow
def test_readme_command_needs_no_thread_variables():
    """The README's first command, without OMP/OPENBLAS/MKL variables, within 20% (+ 0.1 s) of its time with them
    (build + solve + verify: loading is torch's import, the same either way)."""
    clean = {k: v for k, v in os.environ.items() if k not in threads.ENVIRONMENT}
    pinned = {**clean, **{k: "1" for k in threads.ENVIRONMENT}}
    with_vars, without = _solve_seconds(pinned), _solve_seconds(clean)
    assert without <= 1.2 * with_vars + 0.1, (without, with_vars)


def test_freed_memory_is_reused_without_page_faults():
    """Before: a freed 64 MB numpy array went back to the OS, and the next one faulted all its pages in again."""
    script = ("import resource, numpy as np\n"
              "from lipsdp.resources import keep_freed_memory\n"
              "import sys\n"
              "if sys.argv[1] == 'keep': assert keep_freed_memory()\n"
              "a = np.ones(2**23); del a\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "a = np.ones(2**23); del a\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("keep", "plain")}
    assert faults["plain"] >= 32, faults  # the 64 MB faulted in again (fewer faults with huge pages)
    assert faults["keep"] <= faults["plain"] // 10, faults


def test_busy_elsewhere_counts_another_process_at_once():
    """Before: the load average, a minute's memory, so a run right after another one (a loop, a benchmark)
    counted the finished run as a busy core; and a process busy right now counted only partly."""
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.5)
        assert threads.busy_elsewhere() >= 0.6  # one CPU spun by the child (others' load only adds)
    finally:
        spin.kill()
        spin.wait()


def test_busy_elsewhere_leaves_out_this_process_and_falls_back_to_the_load_average(monkeypatch):
    # Two CPUs over 10 ticks each (20 in all), 12 of them idle: 0.8 CPU busy, of which this process's
    # threads (0.5 CPU over the 0.1 s window) are not the others'.
    ticks = iter([(100, 1000), (112, 1020)])
    cpu = iter([1.0, 1.05])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(ticks))
    monkeypatch.setattr(threads, "_own_cpu", lambda: next(cpu))
    monkeypatch.setattr(threads, "_pause", lambda s: None)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert threads.busy_elsewhere(0.1) == pytest.approx(0.8 - 0.5)

    def unreadable():
        raise OSError("no /proc")

    monkeypatch.setattr(threads, "_cpu_times", unreadable)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.5, 0.0, 0.0))
    assert threads.busy_elsewhere() == pytest.approx(1.5)
