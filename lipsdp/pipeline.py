"""``lipsdp.certify``: model in, verified :class:`~lipsdp.certificate.Certificate` out.

The path is the house's chain of module boundaries::

    load (lipsdp.io) -> Network -> lift -> LMI -> backend.solve -> verify -> Certificate

The solve runs on the input-reduced LMI (:meth:`Lifting.reduce_input`, same
optimum, smaller matrix); verification always runs on the full LMI of the
network as given, so nothing the solver or the reduction did can make a bound
unsound.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np

from lipsdp.certificate import SOLVER_FAILED, UNVERIFIED, VERIFIED, Certificate
from lipsdp.errors import LipSDPError, ResourceError

FORMULATIONS = ("neuron", "layer")
NORMS = ("l2",)


def available_memory() -> int:
    """Bytes of memory available to this process (cgroup limit and free RAM), best effort."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
            if text.isdigit():
                limits.append(int(text))
        except OSError:
            pass
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        limits.append(info.get("MemAvailable", info.get("MemTotal")))
    except (OSError, ValueError, IndexError):
        pass
    return min(limits) if limits else 8 * 2 ** 30


@contextmanager
def _progress(text: str, enabled: bool, delay: float = 1.0):
    """A spinner on stderr, shown only if the block runs longer than ``delay`` seconds."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    state = {"status": None}
    done = threading.Event()

    def start():
        if not done.is_set():
            state["status"] = console.status(text)
            state["status"].start()

    timer = threading.Timer(delay, start)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        done.set()
        timer.cancel()
        if state["status"] is not None:
            state["status"].stop()


def _check_constraints_exist(network) -> None:
    """Every activation needs a registered quadratic constraint; list all that lack one."""
    from lipsdp.constraints import registered
    from lipsdp.errors import UnsupportedLayerError

    known = registered()
    missing = [(network.op(n).name, n, f"{network.op(n).kind} (no quadratic constraint for "
                f"{network.op(n).function!r})") for n in network.activations()
               if network.op(n).function not in known]
    if missing:
        raise UnsupportedLayerError(missing)


def _network_summary(network, lifting, source) -> dict:
    layers = [f"{op.kind}{list(op.shape)}" for op in network.ops()]
    return {"source": str(source), "input_dim": network.input_dim, "output_dim": network.output_dim,
            "hidden_neurons": int(sum(b.size for b in lifting.blocks[1:])), "layers": layers,
            "lmi_size": lifting.n, "feedforward": network.is_feedforward(), "sha256": network.fingerprint()}


def certify_network(network, *, solver: str = "auto", formulation: str = "neuron", norm: str = "l2",
                    time_limit: float | None = None, tol: float | None = None,
                    lower_bound_samples: int = 128, memory_limit: int | None = None,
                    progress: bool = False, source: str = "", load_seconds: float = 0.0) -> Certificate:
    """Certify a :class:`~lipsdp.network.Network` (see :func:`certify` for the parameters)."""
    from lipsdp.bounds import node_lipschitz, sampled_lower_bound
    from lipsdp.lifting import lift
    from lipsdp.lmi import build_lmi
    from lipsdp.solvers import get_backend
    from lipsdp.verify import verify

    if formulation not in FORMULATIONS:
        raise LipSDPError(f"unknown formulation {formulation!r}; choose from {', '.join(FORMULATIONS)} "
                          "(LipSDP-Network's coupled multipliers are unsound and not offered)")
    if norm not in NORMS:
        raise LipSDPError(f"norm {norm!r} is not supported yet; choose from {', '.join(NORMS)}")
    t_start = time.perf_counter()
    network.validate()
    _check_constraints_exist(network)
    lips = node_lipschitz(network)
    trivial = lips[network.output]
    lower = sampled_lower_bound(network, samples=lower_bound_samples) if lower_bound_samples else None

    t0 = time.perf_counter()
    lifting = lift(network)
    full = build_lmi(lifting, formulation)
    reduced = lifting.reduce_input()
    lmi = full if reduced is lifting else build_lmi(reduced, formulation)
    # Same LMIs up to an exact (powers of two) congruence and variable scaling:
    # rho and multipliers of order one, for the solver and for the float test.
    block_scale = np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]])
    lmi, unscale = lmi.preconditioned(block_scale, trivial)
    full_pre, v_full = full.preconditioned(block_scale, trivial)  # same v as the solved LMI
    t_build = time.perf_counter() - t0
    summary = _network_summary(network, lifting, source or network.source)
    summary["solved_lmi_size"] = lmi.n

    if network.is_constant():
        # Some all-zero layer cuts every input-output path: f is constant and L = 0 exactly.
        timings = {"load": load_seconds, "build": t_build, "solve": 0.0, "verify": 0.0,
                   "total": load_seconds + time.perf_counter() - t_start}
        return Certificate(0.0, VERIFIED, norm=norm, formulation=formulation, solver="closed-form",
                           solver_status="optimal", message="verified: the network is constant (an all-zero layer "
                           "cuts every path from input to output)", trivial_bound=trivial, lower_bound=lower,
                           rho=0.0, multipliers=[], multiplier_labels=[], verification={"method": "structural"},
                           timings=timings, network=summary)
    if len(lifting.blocks) == 1:
        # No activation: f is linear and the bound is ||C||_2, an eigenvalue problem.
        backend_name, result_status, objective, x, t_solve = "closed-form", "optimal", None, np.zeros(1), 0.0
    else:
        backend = get_backend(solver, n=lmi.n)
        backend_name = backend.name
        need = lmi.memory_estimate(backend.family)
        budget = memory_limit or int(0.8 * available_memory())
        if need > budget:
            raise ResourceError(f"solving this {lmi.n}x{lmi.n} LMI with {backend.name} needs about "
                                f"{need / 2**30:.1f} GiB but {budget / 2**30:.1f} GiB are available; "
                                f"try --solver scs or a smaller network")
        t0 = time.perf_counter()
        from lipsdp.solvers.base import native_output_to_stderr

        with _progress(f"solving a {lmi.n}x{lmi.n} LMI with {backend.name}", progress), native_output_to_stderr():
            try:
                result = backend.solve(lmi, time_limit=time_limit, tol=tol)
            except LipSDPError:
                raise
            except Exception as exc:  # a backend crash is a solver failure, not a lipsdp bug
                from lipsdp.solvers.base import SolveResult
                result = SolveResult("solver_error", None, None, time.perf_counter() - t0,
                                     message=f"{type(exc).__name__}: {exc}")
        t_solve = time.perf_counter() - t0
        result_status = result.status
        x = result.x  # in the preconditioned variables (x_original = unscale * x)
        if time_limit and not backend.supports_time_limit:
            result.message += f" ({backend.name} has no time limit; --time-limit was not applied)"
        objective = None if result.objective is None or not np.isfinite(result.objective) \
            else float(np.sqrt(max(result.objective * unscale[0], 0.0)))  # preconditioned objective is rho / g

    timings = {"load": load_seconds, "build": t_build, "solve": t_solve}
    common = dict(norm=norm, formulation=formulation, solver=backend_name, solver_status=result_status,
                  trivial_bound=trivial, lower_bound=lower, solver_objective=objective, network=summary,
                  multiplier_labels=list(full.labels))
    if x is None:
        timings.update(verify=0.0, total=load_seconds + time.perf_counter() - t_start)
        return Certificate(None, SOLVER_FAILED, message=f"{backend_name} returned no solution ({result_status})",
                           timings=timings, **common)
    t0 = time.perf_counter()
    ver = verify(full_pre, x, scale=v_full)
    timings["verify"] = time.perf_counter() - t0
    timings["total"] = load_seconds + time.perf_counter() - t_start
    verification = {"method": ver.method, "inflation": ver.inflation, "margin": ver.margin, "message": ver.message}
    if not ver.verified:
        return Certificate(None, UNVERIFIED, message=f"{backend_name} finished ({result_status}) but its "
                           f"multipliers could not be verified: {ver.message}", verification=verification,
                           timings=timings, **common)
    note = "" if result_status == "optimal" else f" (solver status {result_status}: the bound is valid, maybe not tight)"
    return Certificate(ver.bound, VERIFIED, message=f"verified{note}", rho=ver.rho,
                       multipliers=ver.x.tolist(), verification=verification, timings=timings, **common)


def _load(model, activation=None, activation_params=None, input_shape=None, trust_pickle=False):
    from lipsdp.network import Network

    if isinstance(model, Network):
        return model, ""
    if isinstance(model, (str, os.PathLike)):
        from lipsdp.io import load_network

        return load_network(model, activation=activation, activation_params=activation_params,
                            input_shape=input_shape, trust_pickle=trust_pickle), os.fspath(model)
    from lipsdp.io import network_from_module

    return network_from_module(model, input_shape=input_shape), type(model).__name__


def check_certificate(cert, model, **load_options) -> Certificate:
    """Re-check a saved certificate against a model without solving anything.

    The model must be the one certified (same architecture and weights: SHA-256
    of the graph), and the stored multipliers must pass the rigorous test of
    :mod:`lipsdp.verify` again; ``rho`` is taken from the certificate, so an
    edited bound fails.  Returns the certificate with refreshed verification
    details; raises :class:`~lipsdp.errors.LipSDPError` (exit 2) otherwise.
    """
    from lipsdp.lifting import lift
    from lipsdp.lmi import build_lmi
    from lipsdp.verify import rigorous_negative_definite, round_up_sqrt

    if isinstance(cert, dict):
        cert = Certificate.from_dict(cert)
    if not cert.verified or not cert.multipliers:
        raise LipSDPError("the certificate holds no verified bound to check")
    t0 = time.perf_counter()
    network, _ = _load(model, **load_options)
    network.validate()
    if network.fingerprint() != cert.network.get("sha256"):
        raise LipSDPError("the model does not match the certificate (architecture or weights changed)")
    from lipsdp.bounds import node_lipschitz

    lifting = lift(network)
    lips = node_lipschitz(network)
    lmi, v = build_lmi(lifting, cert.formulation).preconditioned(
        np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]]), lips[network.output])
    x = np.asarray(cert.multipliers, dtype=np.float64)
    if x.shape != (lmi.n_var,) or not np.all(np.isfinite(x)) or np.any(x[lmi.nonneg] < 0):
        raise LipSDPError("the certificate's multipliers do not fit this model's LMI (edited or corrupt)")
    if cert.bound is None or round_up_sqrt(float(x[0])) > cert.bound:
        raise LipSDPError(f"the certificate does not verify: its bound {cert.bound!r} is below sqrt(rho) (edited?)")
    ok, margin = rigorous_negative_definite(lmi, x / v)  # v holds powers of two: exact
    if not ok:
        raise LipSDPError("the certificate does not verify: M(rho, T) is not provably negative definite "
                          "(edited multipliers or bound?)")
    cert.verification = {**cert.verification, "rechecked": True, "recheck_margin": margin,
                         "recheck_seconds": time.perf_counter() - t0}
    return cert


def certify(model, *, solver: str = "auto", formulation: str = "neuron", norm: str = "l2",
            activation: str | None = None, activation_params: dict | None = None,
            input_shape: tuple | None = None, time_limit: float | None = None, tol: float | None = None,
            trust_pickle: bool = False, lower_bound_samples: int = 128, memory_limit: int | None = None,
            progress: bool = False) -> Certificate:
    """Certify an upper bound on the l2 Lipschitz constant of a network.

    Parameters
    ----------
    model : str, os.PathLike, torch.nn.Module or Network
        A model file (``torch.save`` pickle, TorchScript, ``torch.export`` ``.pt2``,
        ONNX, checkpoint dict / state_dict, LipSDP ``.mat``), a module, or a
        :class:`~lipsdp.network.Network`.
    solver : str
        ``"auto"`` (licensed MOSEK, else the best open-source backend), or a
        backend name from :func:`lipsdp.solvers.usable`.
    formulation : {"neuron", "layer"}
        LipSDP-Neuron (one multiplier per neuron, tighter) or LipSDP-Layer.
    norm : {"l2"}
    activation, activation_params :
        For weights-only files: the activation between the layers.
    input_shape : tuple of int, optional
        Input shape without batch axis, where the loader cannot infer it.
    time_limit : float, optional
        Seconds for the solver; an unfinished solve is still verified.
    tol : float, optional
        Solver tolerance (backend default otherwise).
    trust_pickle : bool
        Allow arbitrary pickled classes (executes code from the file!).
    lower_bound_samples : int
        Random inputs for the sampled lower bound (0 to skip).
    memory_limit : int, optional
        Bytes the solve may use; default 80% of available memory.
    progress : bool
        Spinner on stderr for solves longer than a second.

    Returns
    -------
    Certificate
        ``bound`` is set only when verified.

    Examples
    --------
    >>> import torch, lipsdp
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cert = lipsdp.certify(net)
    >>> cert.verified and cert.lower_bound <= cert.bound <= cert.trivial_bound
    True
    """
    t0 = time.perf_counter()
    network, source = _load(model, activation, activation_params, input_shape, trust_pickle)
    return certify_network(network, solver=solver, formulation=formulation, norm=norm, time_limit=time_limit,
                           tol=tol, lower_bound_samples=lower_bound_samples, memory_limit=memory_limit,
                           progress=progress, source=source, load_seconds=time.perf_counter() - t0)
