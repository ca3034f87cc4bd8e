"""Benchmark: lipsdp's solver backends against the naive cvxpy LipSDP-Neuron.

Runs every configuration on every network side by side, each run in its own
subprocess (peak memory = the child's ``ru_maxrss``; a per-run time-out kills
runaway solves), and reports medians of ``--repeats`` runs and speed-ups.

Configurations
--------------
``naive-<solver>``
    LipSDP-Neuron written straight from the paper (docs/math.md (1.1)): ``rho`` a
    ``cp.Variable``, ``T = cp.diag(t)``, ``Q`` assembled with ``cp.bmat``,
    ``M = [A; B]^T Q [A; B] - rho E0^T E0 + El^T Wl^T Wl El`` and ``M << 0``,
    solved by cvxpy with its default options for SCS, CVXOPT and SDPA.  Its bound
    ``sqrt(rho)`` is the solver's word, **not verified**.
``lipsdp-<solver>``
    ``lipsdp.certify(net, solver=..., formulation="neuron", lower_bound_samples=0)``:
    input-reduced LMI, native backend, verified bound.  ``ipm`` is lipsdp's own
    interior-point method on the factored (rank-two) constraints, ``chordal`` the same method
    on the clique chain of the layer-by-layer LMI (linear in depth), ``completion`` a primal-dual
    method whose iterates both keep the block-tridiagonal pattern; ``fo`` its L-BFGS descent
    on the smoothed exact ``rho(T)`` (approximate, verified).  Clarabel is skipped where
    the LMI lipsdp solves is larger than 150 (its KKT system needs O(n^4) memory), the ipm
    above 3000, SCS above 2000, chordal on nets wider than 64 or with one hidden layer,
    completion on nets wider than 512.

Usage::

    python benchmarks/bench_solvers.py --quick      # two smallest nets, 1 repeat
    python benchmarks/bench_solvers.py              # default nets, 3 repeats
    python benchmarks/bench_solvers.py --large      # also 784-256-256-10
    python benchmarks/bench_solvers.py --deep       # also 16-32xL-4, L = 4..50 (depth curve)
    python benchmarks/bench_solvers.py --xl         # also 784-1024x4-10 (4,096 hidden neurons)
    python benchmarks/bench_solvers.py --deep-wide  # also 784-64x64-10 (64 layers of width 64)

Writes ``benchmarks/results/solvers.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ANCHORS = Path("/work/shared/anchors")

#: Thread settings of every child: single-threaded BLAS so timings compare algorithms, not cores.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

NAIVE_SOLVERS = ("scs", "cvxopt", "sdpa")
#: Peers (pip-installable): ECLipsE (Xu and Sivaranjani, NeurIPS 2024; ``pip install eclipse-nn``), its
#: layer-wise SDPs re-routed to an interior-point solver (its default SCS silently degrades), and the
#: closed-form ECLipsE-Fast.  Their numbers are their own, not verified by lipsdp.
PEER_SOLVERS = ("eclipse", "eclipse-fast")
PEER_SDP_SOLVER = "CVXOPT"
LIPSDP_SOLVERS = ("ipm", "completion", "chordal", "fo", "scs", "sdpa", "cvxopt", "clarabel")
#: Solver family of each backend: ``× vs naive`` compares with the fastest naive run of the same family.
FAMILY = {"ipm": "interior-point", "completion": "interior-point", "chordal": "interior-point",
          "sdpa": "interior-point", "cvxopt": "interior-point",
          "clarabel": "interior-point", "scs": "first-order", "fo": "first-order"}
#: Beyond these LMI sizes a configuration is not run: the naive formulation and the cvxpy-based
#: backends timed out (300 s) on the 1296 x 1296 LMI of 784-256-256-10 in earlier runs.
NAIVE_MAX_N = 900
CVXPY_MAX_N = 900
CLARABEL_MAX_N = 150
#: lipsdp's ipm: dense n x n iterates, about 25 n^3 flops an iteration (20 min at n = 4880).
IPM_MAX_N = 3000
#: lipsdp's chordal: a Newton system of about (w^2/2)^3 flops per layer of width w; it needs
#: two or more hidden layers (a chain of cliques).
CHORDAL_MAX_WIDTH = 64
#: lipsdp's completion: about 16 l w^2 r + 6 w r^2 flops an iteration for r ~ 2 l w factor rows; at
#: width 1024 (784-1024x4-10) that is about 3e12, over an hour in all.
COMPLETION_MAX_WIDTH = 512
#: SCS: one eigendecomposition of the n x n iterate per iteration, thousands of iterations.
SCS_MAX_N = 2000
#: Bounds of two configurations that differ by more than this (relative) are reported.
REL_TOL = 1e-4
#: lipsdp backends without a dual certificate of tightness: a verified bound above the SDP value is
#: expected of them (sound, looser); one below it would still be a bug.
APPROXIMATE = ("fo", "scs")
#: Source directories copied at start so every child of a run measures the same code (lipsdp is
#: installed editable, and the checkout may change while a long benchmark runs).
SNAPSHOT_DIRS = ("lipsdp", "constraints", "solvers")


# ----------------------------------------------------------------------------- networks
@dataclass(frozen=True)
class NetSpec:
    """A benchmark network: a published weight file or seeded random Gaussian weights.

    Random weights are ``N(0, 1) / sqrt(fan_in)`` from ``numpy.random.default_rng(seed)``,
    drawn layer by layer in order; ReLU between the layers.
    """

    name: str
    mat: str | None = None
    sizes: tuple[int, ...] | None = None
    seed: int = 0
    published: float | None = None  # LipSDP-Neuron value published for the anchor

    def weights(self) -> list:
        import numpy as np

        if self.mat is not None:
            from scipy.io import loadmat

            return [np.asarray(w, dtype=np.float64) for w in loadmat(self.mat)["weights"][0]]
        rng = np.random.default_rng(self.seed)
        return [rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)
                for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:])]


def default_nets(large: bool, deep: bool = False, xl: bool = False, deep_wide: bool = False) -> list[NetSpec]:
    nets = [
        NetSpec("anchor-random 2-10-30-20-2", mat=str(ANCHORS / "lipsdp_random_weights.mat"), published=36.482),
        NetSpec("anchor-mnist 784-50-10", mat=str(ANCHORS / "lipsdp_mnist_weights.mat"), published=24.366),
        NetSpec("random 20-50-50-10", sizes=(20, 50, 50, 10), seed=0),
        NetSpec("random 64-100-100-100-10", sizes=(64, 100, 100, 100, 10), seed=1),
    ]
    if large:
        nets.append(NetSpec("random 784-256-256-10", sizes=(784, 256, 256, 10), seed=2))
    if deep:
        nets += [NetSpec(f"deep 16-32x{d}-4", sizes=(16,) + (32,) * d + (4,), seed=100 + d) for d in DEPTHS]
    if xl:
        nets.append(NetSpec("random 784-1024x4-10", sizes=(784,) + (1024,) * 4 + (10,), seed=3))
    if deep_wide:  # the MNIST-shaped MLP of GLipSDP's benchmark: 64 hidden layers of width 64
        nets.append(NetSpec("deep 784-64x64-10", sizes=(784,) + (64,) * 64 + (10,), seed=164))
    return nets


#: Depths of the deep narrow 16-32x...-4 nets (``--deep``).
DEPTHS = (4, 8, 16, 32, 50)


def lmi_sizes(weights) -> tuple[int, int]:
    """``(n0 + N, n_solved)``: the LMI of (1.1) and the input-reduced one lipsdp solves."""
    from lipsdp.lifting import lift
    from lipsdp.network import Network

    lifting = lift(Network.sequential(weights, activation="relu"))
    return lifting.n, lifting.reduce_input().n


# ----------------------------------------------------------------------------- the child
def naive_lipsdp_neuron(weights, solver: str):
    """LipSDP-Neuron as written from the paper, (1.1) of docs/math.md, solved by cvxpy.

    Returns ``(sqrt(rho), cvxpy status, extras)``; the bound is the solver's, unverified; ``extras``
    splits the time into cvxpy's compilation and the solver's own time.
    """
    import cvxpy as cp
    import numpy as np
    from scipy.linalg import block_diag

    alpha, beta = 0.0, 1.0  # ReLU is slope-restricted in [0, 1]
    hidden_w, W_out = weights[:-1], weights[-1]
    n0 = hidden_w[0].shape[1]
    n_hidden = [W.shape[0] for W in hidden_w]
    N, n_l = sum(n_hidden), n_hidden[-1]
    nz = n0 + N

    A = np.hstack([block_diag(*hidden_w), np.zeros((N, n_l))])
    B = np.hstack([np.zeros((N, n0)), np.eye(N)])
    AB = np.vstack([A, B])
    E0 = np.hstack([np.eye(n0), np.zeros((n0, N))])
    El = np.hstack([np.zeros((n_l, nz - n_l)), np.eye(n_l)])

    rho = cp.Variable()
    t = cp.Variable(N)
    T = cp.diag(t)
    Q = cp.bmat([[-2 * alpha * beta * T, (alpha + beta) * T],
                 [(alpha + beta) * T, -2 * T]])
    M = AB.T @ Q @ AB - rho * (E0.T @ E0) + El.T @ (W_out.T @ W_out) @ El
    prob = cp.Problem(cp.Minimize(rho), [M << 0, t >= 0])
    prob.solve(solver=solver.upper())
    value = rho.value
    bound = None if value is None else float(math.sqrt(max(float(value), 0.0)))
    extras = {"compile_s": getattr(prob, "compilation_time", None),
              "solver_s": getattr(prob.solver_stats, "solve_time", None),
              "iterations": getattr(prob.solver_stats, "num_iters", None)}
    return bound, str(prob.status), extras


def peer_eclipse(weights, variant: str):
    """ECLipsE / ECLipsE-Fast on ReLU nets (slopes [0, 1]); returns ``(bound or None, status)``.

    ECLipsE solves one small SDP per layer with cvxpy and hard-codes SCS; its SDPs are re-routed
    to :data:`PEER_SDP_SOLVER` (interior point) by wrapping ``cvxpy.Problem.solve`` for the call.
    """
    import cvxpy as cp
    import torch
    from eclipse_nn import ECLipsE, ECLipsE_Fast

    W = [torch.tensor(w, dtype=torch.float64) for w in weights]
    alphas, betas = [0.0] * (len(W) - 1), [1.0] * (len(W) - 1)
    if variant == "eclipse-fast":
        value = ECLipsE_Fast(W, alphas, betas)
        return float(value), "closed form"
    original = cp.Problem.solve

    def interior_point(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("solver", "max_iters", "eps")}
        return original(self, *args, solver=PEER_SDP_SOLVER, **kwargs)

    cp.Problem.solve = interior_point
    try:
        value, code = ECLipsE(W, alphas, betas)
    finally:
        cp.Problem.solve = original
    return (None, f"ECLipsE exit code {code}") if value is None else (float(value), f"exit code {code}")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_main(spec: dict, result_path: str) -> None:
    """One run of one configuration on one network; writes a JSON result."""
    if spec.get("mem_limit"):
        limit = int(spec["mem_limit"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    net = NetSpec(**{k: (tuple(v) if k == "sizes" and v else v) for k, v in spec["net"].items()})
    kind, solver = spec["kind"], spec["solver"]
    out = {"ok": False}
    try:
        import numpy  # noqa: F401

        weights = net.weights()
        if kind == "naive":
            import cvxpy  # noqa: F401  (import time is not the formulation's cost)
        elif kind == "peer":
            import cvxpy  # noqa: F401
            import eclipse_nn  # noqa: F401
            import torch  # noqa: F401
        else:
            import scipy.linalg  # noqa: F401  (import time is not the method's cost, as cvxpy's is not
            import scipy.optimize  # noqa: F401  for the naive runs: fo's L-BFGS and LP live here)

            import lipsdp
            from lipsdp.network import Network
            from lipsdp.solvers import get_backend

            get_backend(solver)  # fail early and import nothing heavy twice
            out["lipsdp_file"] = lipsdp.__file__
            if solver in ("sdpa", "cvxopt"):
                import cvxpy  # noqa: F401
        out["import_rss_mib"] = _rss_mib()
        t0, c0 = time.perf_counter(), time.process_time()
        if kind == "naive":
            bound, status, extras = naive_lipsdp_neuron(weights, solver)
            out.update(bound=bound, status=status, verified=False, naive=extras)
        elif kind == "peer":
            bound, status = peer_eclipse(weights, solver)
            out.update(bound=bound, status=status, verified=False)
        else:
            cert = lipsdp.certify(Network.sequential(weights, activation="relu"), solver=solver,
                                  formulation="neuron", lower_bound_samples=0)
            out.update(bound=cert.bound, status=cert.status, verified=cert.status == "verified",
                       solver_status=cert.solver_status, solver_objective=cert.solver_objective,
                       solver_iterations=cert.solver_iterations, solver_dual_objective=cert.solver_dual_objective,
                       timings=dict(cert.timings), solved_lmi_size=cert.network.get("solved_lmi_size"),
                       message=cert.message)
        out["seconds"] = time.perf_counter() - t0
        out["cpu_seconds"] = time.process_time() - c0
        out["loadavg"] = list(os.getloadavg())
        out["ok"] = out["bound"] is not None
    except MemoryError:
        out.update(status="out of memory")
    except Exception as exc:  # a benchmark reports failures, it does not stop on them
        out.update(status="error", message=f"{type(exc).__name__}: {exc}"[:500])
    out["peak_mib"] = _rss_mib()
    Path(result_path).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- the parent
@dataclass
class Row:
    net: str
    lmi_n: int
    solved_n: int
    config: str
    kind: str
    solver: str
    status: str = ""
    bound: float | None = None
    verified: bool = False
    seconds: list = field(default_factory=list)
    cpu_seconds: list = field(default_factory=list)
    peak_mib: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    note: str = ""
    vs_same: float | None = None  # naive same-solver median / this median
    vs_best: float | None = None  # fastest naive median / this median

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def median_cpu_s(self) -> float | None:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else None

    @property
    def peak(self) -> float | None:
        return max(self.peak_mib) if self.peak_mib else None

    @property
    def ok(self) -> bool:
        return self.bound is not None and bool(self.seconds)

    @property
    def gap(self) -> float | None:
        """``bound / dual - 1`` where the backend reported a dual lower bound (ipm, completion, chordal, fo)."""
        duals = [r["solver_dual_objective"] for r in self.runs if r.get("solver_dual_objective")]
        return self.bound / max(duals) - 1.0 if duals and self.bound is not None else None


def snapshot_sources(dest: Path) -> str:
    """Copy lipsdp's sources and this script into ``dest``; return a hash of what was copied.

    Children import ``lipsdp`` from ``dest`` (first on ``PYTHONPATH``, ahead of the editable
    install's finder), so edits to the checkout during a run do not leak into it.
    """
    digest = hashlib.sha256()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SNAPSHOT_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy2(Path(__file__).resolve(), dest / "bench_solvers.py")
    for path in sorted(p for p in dest.rglob("*.py")):
        digest.update(str(path.relative_to(dest)).encode())
        digest.update(path.read_bytes())
    sys.path.insert(0, str(dest))
    return digest.hexdigest()[:12]


def run_child(net: NetSpec, kind: str, solver: str, timeout: float, mem_limit: int | None,
              snapshot: Path) -> dict:
    env = dict(os.environ, **THREAD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(snapshot), env.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory(prefix="bench_solvers_") as tmp:
        result = Path(tmp) / "result.json"
        log = Path(tmp) / "log.txt"
        spec = {"net": asdict(net), "kind": kind, "solver": solver, "mem_limit": mem_limit}
        cmd = [sys.executable, str(snapshot / "bench_solvers.py"), "--child", json.dumps(spec), "--result", str(result)]
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and nothing else
                proc.wait()
                return {"ok": False, "status": "timeout", "message": f"killed after {timeout:.0f} s"}
        if result.exists():
            return json.loads(result.read_text())
        tail = log.read_text(errors="replace")[-400:]
        status = "killed (out of memory?)" if rc < 0 else f"crashed (exit {rc})"
        return {"ok": False, "status": status, "message": tail}


def configs_for(only: set | None) -> list[tuple[str, str, str]]:
    import importlib.util

    out = [(f"naive-{s}", "naive", s) for s in NAIVE_SOLVERS]
    out += [(f"lipsdp-{s}", "lipsdp", s) for s in LIPSDP_SOLVERS]
    if importlib.util.find_spec("eclipse_nn") is not None:
        out += [(f"peer-{s}", "peer", s) for s in PEER_SOLVERS]
    if only:
        out = [c for c in out if c[0] in only]
    return out


def run_all(nets, repeats, timeout, mem_limit, only, snapshot: Path) -> list[Row]:
    """Run every configuration ``repeats`` times, round-robin within a net.

    Round-robin (repeat 1 of every configuration, then repeat 2, ...) spreads a transient load
    from other processes over all configurations instead of penalising the one running then.
    A configuration that fails or times out is not run again.
    """
    rows = []
    for net in nets:
        lmi_n, solved_n = lmi_sizes(net.weights())
        group = []
        for config, kind, solver in configs_for(only):
            row = Row(net.name, lmi_n, solved_n if kind == "lipsdp" else lmi_n, config, kind, solver)
            rows.append(row)
            skip = None
            if kind == "lipsdp" and solver == "clarabel" and solved_n > CLARABEL_MAX_N:
                skip = f"LMI {solved_n} > {CLARABEL_MAX_N}"
            elif kind == "naive" and lmi_n > NAIVE_MAX_N:
                skip = f"LMI {lmi_n} > {NAIVE_MAX_N}"
            elif kind == "lipsdp" and solver in ("sdpa", "cvxopt") and solved_n > CVXPY_MAX_N:
                skip = f"LMI {solved_n} > {CVXPY_MAX_N}"
            elif kind == "lipsdp" and solver == "ipm" and solved_n > IPM_MAX_N:
                skip = f"LMI {solved_n} > {IPM_MAX_N}"
            elif kind == "lipsdp" and solver == "chordal" and (len(net.weights()) < 3 or max(
                    w.shape[0] for w in net.weights()[:-1]) > CHORDAL_MAX_WIDTH):
                skip = f"needs >= 2 hidden layers of width <= {CHORDAL_MAX_WIDTH}"
            elif kind == "lipsdp" and solver == "completion" and max(
                    w.shape[0] for w in net.weights()[:-1]) > COMPLETION_MAX_WIDTH:
                skip = f"hidden width > {COMPLETION_MAX_WIDTH}"
            elif kind == "lipsdp" and solver == "scs" and solved_n > SCS_MAX_N:
                skip = f"LMI {solved_n} > {SCS_MAX_N}"
            if skip:
                row.status, row.note = "skipped", skip
                print(f"  {net.name:34s} {config:16s} skipped ({row.note})", flush=True)
            else:
                group.append(row)
        failed = set()
        for rep in range(repeats):
            for row in group:
                if row.config in failed:
                    continue
                res = run_child(net, row.kind, row.solver, timeout, mem_limit, snapshot)
                row.runs.append(res)
                row.status = res.get("status", "")
                if not res.get("ok"):
                    failed.add(row.config)
                    row.note, row.bound, row.seconds, row.cpu_seconds = res.get("message", ""), None, [], []
                    continue
                row.bound = res["bound"] if row.bound is None else max(row.bound, res["bound"])
                row.verified = bool(res.get("verified"))
                row.seconds.append(res["seconds"])
                row.cpu_seconds.append(res["cpu_seconds"])
                row.peak_mib.append(res["peak_mib"])
                shown = f"{res['bound']:.6f}"
                print(f"  [{rep + 1}/{repeats}] {net.name:28s} {row.config:16s} {shown:>14s} "
                      f"{res['seconds']:9.2f} s", flush=True)
            for row in group:
                if row.config in failed and len(row.runs) == rep + 1:
                    print(f"  [{rep + 1}/{repeats}] {net.name:28s} {row.config:16s} {row.status:>14s}", flush=True)
    return rows


# ----------------------------------------------------------------------------- reporting
def environment() -> dict:
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "absent"

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *SNAPSHOT_DIRS], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        dirty = [ln[3:] for ln in dirty if ln.strip()]
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", []
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu, "threads": THREAD_ENV, "python": platform.python_version(),
        "versions": {p: version(p) for p in ("lipsdp", "cvxpy", "scs", "cvxopt", "sdpa-python", "clarabel",
                                             "numpy", "scipy")},
        "commit": commit, "uncommitted": dirty, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def add_ratios(rows: list[Row]) -> None:
    by_net: dict[str, list[Row]] = {}
    for r in rows:
        by_net.setdefault(r.net, []).append(r)
    for group in by_net.values():
        naive = {r.solver: r for r in group if r.kind == "naive" and r.ok}
        best = min(naive.values(), key=lambda r: r.median_s, default=None)
        for r in group:
            r.vs_same = r.vs_best = None
            if not r.ok:
                continue
            family = [x for x in naive.values() if FAMILY.get(x.solver) == FAMILY.get(r.solver)]
            if r.kind == "lipsdp" and family:
                r.vs_same = min(x.median_s for x in family) / r.median_s
            if best is not None and r is not best:
                r.vs_best = best.median_s / r.median_s


def discrepancies(rows: list[Row], nets: list[NetSpec]) -> list[dict]:
    """Every pair (lipsdp row, reference) whose bounds differ by more than REL_TOL (relative).

    References: each successful naive baseline on the same net and the published anchor value.
    ``suspect`` marks what would be a lipsdp bug: a gap to an interior-point baseline (CVXOPT, SDPA;
    accurate to ~1e-7) or to a published value, except a verified bound *above* it from one of
    lipsdp's approximate backends (``APPROXIMATE``: looser, and sound).  A bound below the SDP value
    is always suspect.  A gap to naive SCS alone is that first-order baseline's inaccuracy when naive
    SCS itself is off the interior-point baselines.
    """
    out = []
    published = {n.name: n.published for n in nets}
    for r in rows:
        if not r.ok or r.kind == "peer":  # a different relaxation: its bound is not LipSDP's
            continue
        refs = [(b.config, b.bound) for b in rows if b.net == r.net and b.kind == "naive" and b.ok and b is not r]
        if published.get(r.net):
            refs.append(("published", published[r.net]))
        for name, ref in refs:
            if r.kind == "naive" and name.startswith("naive"):
                continue  # baseline vs baseline: each pair is reported once, against the published value only
            rel = (r.bound - ref) / ref
            tol = max(REL_TOL, 5e-4 / ref) if name == "published" else REL_TOL  # published: 3 decimals
            if abs(rel) > tol:
                interior = name in ("published", "naive-cvxopt", "naive-sdpa")
                looser = r.kind == "lipsdp" and r.solver in APPROXIMATE and rel > 0
                out.append({"net": r.net, "config": r.config, "bound": r.bound, "reference": name,
                            "reference_bound": ref, "rel_diff": rel, "looser": looser,
                            "suspect": r.kind == "lipsdp" and interior and not looser})
    return out


def fastest(rows: list[Row]) -> list[dict]:
    out = []
    for net in dict.fromkeys(r.net for r in rows):
        group = [r for r in rows if r.net == net and r.ok]
        lip = [r for r in group if r.kind == "lipsdp" and r.verified]
        if lip:  # only configurations as tight as the best verified bound count as "fastest"
            best = min(r.bound for r in lip)
            lip = [r for r in lip if r.bound <= best * (1 + REL_TOL)]
        nav = [r for r in group if r.kind == "naive"]
        entry = {"net": net, "lmi_n": next(r.lmi_n for r in rows if r.net == net),
                 "solved_n": lip[0].solved_n if lip else None}
        if lip:
            b = min(lip, key=lambda r: r.median_s)
            entry.update(lipsdp=b.config, lipsdp_s=b.median_s)
        if nav:
            b = min(nav, key=lambda r: r.median_s)
            entry.update(naive=b.config, naive_s=b.median_s)
        out.append(entry)
    return out


def _fmt(x, spec, none="—"):
    return none if x is None else format(x, spec)


def markdown(rows, env, disc, fast, args) -> str:
    threads = " ".join(f"{k}={v}" for k, v in env["threads"].items())
    lines = [
        "# LipSDP-Neuron: lipsdp backends vs the naive cvxpy formulation", "",
        f"Environment: {env['cpus']} CPUs ({env['cpus_usable']} usable, {env['cpu_model']}); children run with "
        f"{threads}; Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f"; lipsdp at commit {env['commit'] or '?'}"
        + (f" + uncommitted {', '.join(env['uncommitted'])}" if env["uncommitted"] else "")
        + f" (source snapshot {env['snapshot']}); {env['date']}; load average (1 min) "
        f"{env['loadavg_start'][0]} at start, {env['loadavg_end'][0]} at end."
        + (f" Merged (`--merge`): re-measured in this run: {'; '.join(env['merged']['rerun'])}; every other row "
           f"from the run of {env['merged']['others_from']['date']} (commit {env['merged']['others_from']['commit']})."
           if env.get("merged") else ""), "",
        f"Median of {args.repeats} run(s), each in a fresh subprocess, repeats round-robin over the configurations "
        f"(wall time excludes interpreter start-up and imports; CPU s = the child's process time over the same "
        f"span, less sensitive to other load on a shared machine; peak = the child's ru_maxrss, imports "
        f"included); time-out {args.timeout:.0f} s per run.", "",
        "| net | LMI n | solved n | config | bound | verified? | gap to dual | median s | CPU s | peak MiB "
        "| × vs naive same family | × vs best naive |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.ok:
            ver = "yes" if r.verified else ("no (solver's value)" if r.kind == "naive" else
                                             "no (peer's value)" if r.kind == "peer" else r.status)
            bound = f"{r.bound:.6f}"
        else:
            ver, bound = "—", r.status + (f" ({r.note})" if r.status == "skipped" else "")
        lines.append(f"| {r.net} | {r.lmi_n} | {r.solved_n} | {r.config} | {bound} | {ver} | {_fmt(r.gap, '.1e')} | "
                     f"{_fmt(r.median_s, '.3f')} | {_fmt(r.median_cpu_s, '.3f')} | {_fmt(r.peak, '.0f')} | "
                     f"{_fmt(r.vs_same, '.2f')} | {_fmt(r.vs_best, '.2f')} |")
    lines += [
        "",
        "Notes:",
        "- `naive-*`: LipSDP-Neuron written from the paper in cvxpy (`cp.diag(t)`, `cp.bmat`, "
        "`AB.T @ Q @ AB`, `M << 0`) on the full LMI of size n0+N, solved with cvxpy's default options; "
        "its bound sqrt(rho) is the solver's value and is **not verified** (a first-order solver's can lie "
        "below the true optimum). cvxpy's SCS default is eps_abs = eps_rel = 1e-5; lipsdp runs SCS at 1e-6 and "
        "then verifies, so naive-scs vs lipsdp-scs compares a looser, unchecked answer with a certified one.",
        "- `lipsdp-*`: `lipsdp.certify(..., formulation='neuron', lower_bound_samples=0)`: input-reduced LMI "
        "(`solved n`), native backend at lipsdp's tolerances, bound verified on the full LMI. Time = the whole "
        "certify call (build + solve + verify).",
        "- bound: identical across repeats in every run so far (the largest is shown if they ever differ); "
        "per-run values, lipsdp's build/solve/verify split and cvxpy's compile/solve split are in solvers.json.",
        f"- Clarabel is skipped where the solved LMI is larger than {CLARABEL_MAX_N} (O(n^4) memory); the naive "
        f"formulation where the LMI is larger than {NAIVE_MAX_N}, and lipsdp-sdpa / lipsdp-cvxopt (through cvxpy) "
        f"where the solved LMI is larger than {CVXPY_MAX_N}: they timed out (300 s) there in earlier runs; "
        f"lipsdp-ipm above {IPM_MAX_N} (about 20 min at n = 4880), lipsdp-scs above {SCS_MAX_N}, "
        f"lipsdp-completion on nets wider than {COMPLETION_MAX_WIDTH} (about 3e12 flops an iteration at width 1024).",
        "- `peer-eclipse`, `peer-eclipse-fast`: ECLipsE and ECLipsE-Fast (Xu and Sivaranjani, NeurIPS 2024; "
        f"`pip install eclipse-nn`), ECLipsE's layer-wise SDPs solved with {PEER_SDP_SOLVER} instead of its "
        "hard-coded SCS; a compositional relaxation of LipSDP, so its bound is expected at or above LipSDP's; "
        "its number is its own, not verified by lipsdp, and it is left out of the bound-differences table.",
        "- `ipm`: lipsdp's interior-point method on the factored rank-two constraints (solvers/ipm_.py); "
        "`chordal`: the same iteration on the clique chain of the layer-by-layer LMI, Newton system "
        f"block-tridiagonal, linear in depth (solvers/chordal_.py; skipped on nets wider than {CHORDAL_MAX_WIDTH} "
        "or with one hidden layer); `completion`: a primal-dual method that keeps the slack and the "
        "primal on the block-tridiagonal pattern (max-det completion), Newton system in the multipliers "
        "only (solvers/completion_.py); "
        "`fo`: lipsdp's L-BFGS on the smoothed exact rho(T) (solvers/firstorder_.py), approximate, verified, "
        "with a dual lower bound from a repaired dual feasible point; `same family` = interior-point (ipm, "
        "chordal, completion, SDPA, CVXOPT, Clarabel) or first-order (SCS, fo).",
        "- gap to dual = bound / (the backend's dual lower bound on the SDP optimum) - 1, where it reports one: "
        "an upper bound on how far the verified bound lies above the best this SDP can give.",
        "- × = median seconds of the baseline / median seconds of the row (> 1: faster than the baseline); "
        "`best naive` is the fastest naive configuration on the same net.",
        "",
        "## Fastest per net", "",
        f"| net | LMI n | solved n | fastest lipsdp (verified, bound within {REL_TOL:g} of the best) | s | "
        "fastest naive | s |",
        "|---|---:|---:|---|---:|---|---:|",
    ]
    for f in fast:
        lines.append(f"| {f['net']} | {f['lmi_n']} | {_fmt(f.get('solved_n'), 'd')} | {f.get('lipsdp', '—')} | "
                     f"{_fmt(f.get('lipsdp_s'), '.3f')} | {f.get('naive', '—')} | {_fmt(f.get('naive_s'), '.3f')} |")
    lines += ["", f"## Bounds differing by more than {REL_TOL:g} (relative)", ""]
    if disc:
        lines += ["| net | config | bound | reference | reference bound | rel. diff | lipsdp bug? |",
                  "|---|---|---:|---|---:|---:|---|"]
        for d in disc:
            verdict = "**yes: check**" if d["suspect"] else (
                "no: approximate backend, looser (sound)" if d.get("looser") else
                "no: baseline inexact" if d["config"].startswith("lipsdp") else "no: baseline vs published")
            lines.append(f"| {d['net']} | {d['config']} | {d['bound']:.6f} | {d['reference']} | "
                         f"{d['reference_bound']:.6f} | {d['rel_diff']:+.2e} | {verdict} |")
    else:
        lines.append("None: every bound agrees with every successful baseline and with the published anchors.")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> bool:
    """Grouped bars, one group per net, log time axis; failed runs are labelled where their bar would be."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not any(r.ok for r in rows):
        return False
    nets = list(dict.fromkeys(r.net for r in rows))
    configs = list(dict.fromkeys(r.config for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(nets)), 5))
    width = 0.84 / len(configs)
    floor = min(r.median_s for r in rows if r.ok) / 2
    for j, config in enumerate(configs):
        xs, ys = [], []
        for i, net in enumerate(nets):
            r = next((r for r in rows if r.net == net and r.config == config), None)
            if r is None:
                continue
            x = i + (j - (len(configs) - 1) / 2) * width
            if r.ok:
                xs.append(x)
                ys.append(r.median_s)
            else:
                ax.text(x, floor * 1.1, r.status.split(" ")[0], rotation=90, ha="center", va="bottom", fontsize=7)
        ax.bar(xs, ys, width, label=config,
               hatch="//" if config.startswith("naive") else ("xx" if config.startswith("peer") else None),
               edgecolor="black", linewidth=0.4)
    lmi = {r.net: (r.lmi_n, max(x.solved_n for x in rows if x.net == r.net and x.kind == "lipsdp")
                   if any(x.net == r.net and x.kind == "lipsdp" for x in rows) else r.lmi_n) for r in rows}
    ax.set_xticks(range(len(nets)))
    ax.set_xticklabels([f"{n}\n(LMI {lmi[n][0]}" + (f", lipsdp solves {lmi[n][1]})" if lmi[n][1] != lmi[n][0] else ")")
                        for n in nets], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_ylabel("median wall time per certificate [s] (log scale)")
    ax.set_xlabel("network")
    ax.set_title("LipSDP-Neuron: naive cvxpy formulation (//), ECLipsE (xx) vs lipsdp.certify")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="configuration", title_fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True


def rows_from_json(path: Path) -> list[Row]:
    """Rows of a saved ``solvers.json`` (to redraw the plot without re-running)."""
    names = set(Row.__dataclass_fields__)
    return [Row(**{k: v for k, v in d.items() if k in names}) for d in json.loads(path.read_text())["rows"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (median reported); default 3")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is killed; default 300")
    p.add_argument("--quick", action="store_true", help="only the two smallest nets, 1 repeat (smoke test)")
    p.add_argument("--large", action="store_true", help="also the 784-256-256-10 net")
    p.add_argument("--deep", action="store_true", help="also deep narrow 16-32xL-4 nets, L in DEPTHS")
    p.add_argument("--xl", action="store_true", help="also the 784-1024x4-10 net (4,096 hidden neurons)")
    p.add_argument("--deep-wide", action="store_true", help="also the 784-64x64-10 net (64 hidden layers of 64)")
    p.add_argument("--nets", nargs="+", metavar="TEXT", help="only nets whose name contains one of these")
    p.add_argument("--configs", nargs="+", metavar="CONFIG",
                   help="only these configurations (e.g. naive-scs lipsdp-scs)")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="address-space limit per child (default: 90%% of available memory)")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--merge", action="store_true",
                   help="replace only the re-measured (net, config) rows of the saved solvers.json in --out-dir")
    p.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the plot of a saved solvers.json")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="only rewrite solvers.{md,json,png} next to a saved solvers.json (no runs)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child), args.result)
        return 0
    if args.replot:
        out = args.replot.with_suffix(".png")
        return 0 if plot(rows_from_json(args.replot), out) else 1
    if args.report:
        return report_again(args.report, args)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")

    nets = default_nets(args.large, args.deep, args.xl, args.deep_wide)
    if args.nets:
        nets = [n for n in nets if any(t in n.name for t in args.nets)]
        if not nets:
            p.error("--nets matched no network")
    snapshot = Path(tempfile.mkdtemp(prefix="bench_solvers_src_"))
    try:
        return run(args, nets, snapshot)
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def run(args, nets: list[NetSpec], snapshot: Path) -> int:
    source_hash = snapshot_sources(snapshot)
    if args.quick:
        nets = sorted(nets, key=lambda n: lmi_sizes(n.weights())[0])[:2]
        args.repeats = 1
    if args.mem_limit_gib:
        mem_limit = int(args.mem_limit_gib * 2 ** 30)
    else:
        from lipsdp.pipeline import available_memory

        mem_limit = int(0.9 * available_memory())
    env = environment()
    env["snapshot"] = source_hash
    print(f"{env['cpus']} CPUs; children: {' '.join(f'{k}={v}' for k, v in THREAD_ENV.items())}; "
          f"{args.repeats} repeat(s); time-out {args.timeout:.0f} s; memory limit {mem_limit / 2**30:.1f} GiB",
          flush=True)
    rows = run_all(nets, args.repeats, args.timeout, mem_limit, set(args.configs) if args.configs else None,
                   snapshot)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # The raw runs first: a failure in the reporting below must not lose a long run.
    (args.out_dir / "solvers.raw.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    saved = args.out_dir / "solvers.json"
    if args.merge and saved.exists():
        # Re-measured (net, config) rows replace the saved ones; the rest of the saved report stays.
        fresh = {(r.net, r.config) for r in rows}
        old = [r for r in rows_from_json(saved) if (r.net, r.config) not in fresh]
        previous = json.loads(saved.read_text())["environment"]
        env["merged"] = {"rerun": sorted(f"{n} / {c}" for n, c in fresh),
                         "others_from": {k: previous.get(k) for k in ("date", "commit", "snapshot")}}
        order = {name: i for i, name in enumerate(dict.fromkeys(r.net for r in old + rows))}
        rows = sorted(old + rows, key=lambda r: order[r.net])
        names = {r.net for r in rows}
        nets = [n for n in default_nets(True, True, True, True) if n.name in names]
    return write_report(rows, env, nets, args)


def write_report(rows, env, nets, args) -> int:
    """Ratios, bound differences, ``solvers.{md,json,png}`` in ``args.out_dir``."""
    add_ratios(rows)
    disc = discrepancies(rows, nets)
    fast = fastest(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, env, disc, fast, args)
    (args.out_dir / "solvers.md").write_text(md)
    payload = {"environment": env, "repeats": args.repeats, "timeout_s": args.timeout, "quick": args.quick,
               "rel_tol": REL_TOL, "rows": [], "discrepancies": disc, "fastest": fast}
    for r in rows:
        d = asdict(r)
        d.update(median_s=r.median_s, median_cpu_s=r.median_cpu_s, peak_mib_max=r.peak,
                 vs_naive_same_solver=r.vs_same, vs_best_naive=r.vs_best)
        payload["rows"].append(d)
    (args.out_dir / "solvers.json").write_text(json.dumps(payload, indent=1, default=str))
    plotted = plot(rows, args.out_dir / "solvers.png")
    print()
    print(md)
    print(f"wrote {args.out_dir / 'solvers.md'}, solvers.json" + (", solvers.png" if plotted else ""))
    return 0


def report_again(path: Path, args) -> int:
    """Rewrite the report of a saved ``solvers.json`` (same runs, current reporting code)."""
    payload = json.loads(path.read_text())
    rows = rows_from_json(path)
    args.repeats, args.timeout, args.quick = payload["repeats"], payload["timeout_s"], payload.get("quick", False)
    names = {r.net for r in rows}
    nets = [n for n in default_nets(True, True, True, True) if n.name in names]
    args.out_dir = path.parent
    return write_report(rows, payload["environment"], nets, args)

if __name__ == "__main__":
    sys.exit(main())
