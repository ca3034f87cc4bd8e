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
from dataclasses import replace

import numpy as np

from lipsdp.certificate import SOLVER_FAILED, UNVERIFIED, VERIFIED, Certificate
from lipsdp.errors import LipSDPError, ResourceError

FORMULATIONS = ("neuron", "layer")
NORMS = ("l2", "linf")


def available_memory() -> int:
    """Bytes of memory available to this process (cgroup limit and free RAM), best effort."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
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
    """A spinner on stderr with the elapsed seconds, shown only if the block runs longer than ``delay``."""
    if not enabled or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    done = threading.Event()
    t0 = time.monotonic()

    def spin():
        if done.wait(delay):
            return
        status = console.status(f"{text} ({delay:.0f} s)")
        status.start()
        try:
            while not done.wait(1.0):
                status.update(f"{text} ({time.monotonic() - t0:.0f} s; Ctrl-C stops, --time-limit bounds it)")
        finally:
            status.stop()

    thread = threading.Thread(target=spin, name="lipsdp-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2.0)


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


def _solve(backend, lmi, time_limit, tol, progress, label):
    """Run ``backend`` on ``lmi``; a crash becomes a ``solver_error`` result, never an exception."""
    from lipsdp.solvers.base import SolveResult, native_output_to_stderr

    t0 = time.perf_counter()
    with _progress(f"solving a {lmi.n}x{lmi.n} LMI{label} with {backend.name}", progress), native_output_to_stderr():
        try:
            result = backend.solve(lmi, time_limit=time_limit, tol=tol)
        except LipSDPError:
            raise
        except Exception as exc:  # a backend crash is a solver failure, not a lipsdp bug
            result = SolveResult("solver_error", None, None, time.perf_counter() - t0,
                                 message=f"{type(exc).__name__}: {exc}")
    if time_limit and not backend.supports_time_limit:
        result.message += f" ({backend.name} has no time limit; --time-limit was not applied)"
    return result, time.perf_counter() - t0


def _certify_split(network, layers, options) -> Certificate:
    """Certify a chain network as a composition of pieces (MATH.md 8.2; :mod:`lipsdp.split`).

    ``layers``: activation nodes per piece; None halves the net recursively until
    every piece's solve fits in memory.  The bound is the product of the pieces'
    verified bounds (rounded up): sound, looser than the full SDP, and labelled so.
    """
    from lipsdp.bounds import node_lipschitz, sampled_lower_bound
    from lipsdp.split import compose_bounds, is_chain, split_chain

    if options["norm"] != "l2":
        raise LipSDPError("--split composes l2 bounds only (the pieces' norms must chain)")
    if not is_chain(network):
        raise LipSDPError("--split needs a chain network (no skip connections, concatenations or implicit layers)")
    t_start = time.perf_counter()
    piece_options = {**options, "lower_bound_samples": 0, "source": "", "load_seconds": 0.0}

    def certify_pieces(net, output_map):
        count = len(net.activations())
        pieces = split_chain(net, layers=layers if layers else max(1, (count + 1) // 2))
        if len(pieces) == 1 and not layers:
            raise ResourceError("even one layer of this network does not fit in memory")
        done = []
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            opts = {**piece_options, "output_map": output_map if last else None}
            try:
                done.append(_certify_network(piece, **opts))
            except ResourceError:
                if layers or len(piece.activations()) < 2:
                    raise
                done.extend(certify_pieces(piece, opts["output_map"]))
        return done

    parts = certify_pieces(network, options["output_map"])
    lips = node_lipschitz(network)
    output_map = options["output_map"]
    trivial = lips[network.output] * (1.0 if output_map is None else float(np.linalg.norm(output_map, 2)))
    lower = sampled_lower_bound(network, samples=options["lower_bound_samples"], output_map=output_map) \
        if options["lower_bound_samples"] else None
    from lipsdp.lifting import lift

    summary = _network_summary(network, lift(network), options["source"] or network.source)
    summary["split"] = [{"bound": c.bound, "status": c.status, "solver": c.solver, "solver_status": c.solver_status,
                         "lmi_size": c.network.get("lmi_size"), "multipliers": c.multipliers,
                         "multiplier_labels": c.multiplier_labels} for c in parts]
    timings = {key: sum(c.timings.get(key, 0.0) for c in parts) for key in ("build", "solve", "verify")}
    timings.update(load=options["load_seconds"], total=options["load_seconds"] + time.perf_counter() - t_start)
    common = dict(norm="l2", formulation=options["formulation"], trivial_bound=trivial, lower_bound=lower,
                  network=summary, timings=timings, solver=parts[0].solver,
                  solver_status=next((c.solver_status for c in parts if c.solver_status != "optimal"), "optimal"),
                  output_map=None if output_map is None else np.atleast_2d(output_map).tolist(),
                  verification={"method": "split", "pieces": len(parts)})
    failed = next((c for c in parts if not c.verified), None)
    if failed is not None:
        return Certificate(None, failed.status, message=f"split into {len(parts)} pieces; a piece was not verified: "
                           f"{failed.message}", **common)
    bound = compose_bounds(c.bound for c in parts)
    return Certificate(bound, VERIFIED,
                       message=f"verified by splitting into {len(parts)} pieces: the product of their LipSDP bounds "
                       f"({' x '.join(f'{c.bound:.6g}' for c in parts)}); sound but looser than the SDP on the "
                       "whole network", **common)


def _exact_recheck(lmi, ver, lifting, output_map):
    """``--strict``: confirm a float-verified point in exact rational arithmetic, or drop it."""
    from lipsdp.exact import exact_negative_definite

    try:
        ok = exact_negative_definite(lmi, ver.x, lifting, output_map=output_map)
    except NotImplementedError as exc:
        raise LipSDPError(f"--strict: {exc}") from exc
    if not ok:
        return replace(ver, verified=False, bound=None, message="the exact rational check rejected the point")
    return replace(ver, method="exact", message=ver.message + "; confirmed exactly (rational arithmetic)")


def certify_network(network, *, solver: str = "auto", formulation: str = "neuron", norm: str = "l2",
                    output_map=None, time_limit: float | None = None, tol: float | None = None,
                    lower_bound_samples: int = 128, memory_limit: int | None = None,
                    progress: bool = False, source: str = "", load_seconds: float = 0.0,
                    compare: bool = True, strict: bool = False, split: int | None = None) -> Certificate:
    """Certify a :class:`~lipsdp.network.Network` (see :func:`certify` for the parameters).

    With ``compare`` (default), nets with MaxMin / GroupSort-2 activations are
    also certified after rewriting them as the two-ReLU residual network of the
    ICLR 2024 paper's baseline (:func:`lipsdp.rewrite.maxmin_as_relu`), and that
    bound is reported in ``network["comparisons"]`` so users see the gain.

    With ``strict``, every verified point is also checked exactly, in rational
    arithmetic (:mod:`lipsdp.exact`), on the LMI of the network as given.
    """
    from lipsdp.equilibrium import attach_well_posedness, check_provable

    check_provable(network.validate())  # implicit layers: refuse what cannot be proved well-posed
    options = dict(solver=solver, formulation=formulation, norm=norm, output_map=output_map, time_limit=time_limit,
                   tol=tol, lower_bound_samples=lower_bound_samples, memory_limit=memory_limit, progress=progress,
                   source=source, load_seconds=load_seconds, strict=strict)
    if split:
        cert = _certify_split(network, split, options)
    else:
        try:
            cert = _certify_network(network, **options)
        except ResourceError as exc:
            from lipsdp.split import is_chain

            # Too big for memory: a chain net can still be certified piece by piece (looser, labelled).
            if norm != "l2" or not is_chain(network) or len(network.activations()) < 2:
                raise
            cert = _certify_split(network, None, options)
            if not cert.verified:  # the pieces' failure alone would hide why lipsdp split at all
                cert.message = f"{exc}; splitting the network instead failed: {cert.message}"
    attach_well_posedness(network, cert, formulation, norm)
    pairs = [n for n in network.activations() if network.op(n).function == "groupsort"
             and (network.op(n).params.get("group_size") == 2 or network.op(n).size == 2)]
    groupsorts = [n for n in network.activations() if network.op(n).function == "groupsort"]
    # The rewrite covers pairs only: a net that also has larger groups gets no comparison.
    if compare and pairs and len(pairs) == len(groupsorts) and norm == "l2" and cert.verified and not split:
        from lipsdp.rewrite import maxmin_as_relu

        t0 = time.perf_counter()
        other = _certify_network(maxmin_as_relu(network, variant="two"), solver=solver, formulation=formulation,
                                 norm=norm, output_map=output_map, time_limit=time_limit, tol=tol,
                                 lower_bound_samples=0, memory_limit=memory_limit, progress=progress)
        cert.network["comparisons"] = {"two_relu_rewrite": other.bound,
                                       "two_relu_rewrite_seconds": time.perf_counter() - t0}
    return cert


#: A verified bound more than this (relative) above the solver's own value sends verification on to
#: the interior-point path's earlier iterates.  At 1e-5, the final points of 16-32x50-4 verified 4e-6
#: above the optimum and stopped there; the path brings them to 1e-7 or so.
PATH_GAP = 1e-6


def _scales(lmi, block_scale, trivial, sweeps=None, deadline=None):
    """``(block_scale, total, start)``: preconditioning scales read off a layer-by-layer feasible
    point on chain LMIs (:mod:`lipsdp.scaling`, improved by ``sweeps`` sweeps of
    :mod:`lipsdp.layer_sweep` on deep nets, none after ``deadline``), that point a start hint; else
    composed norm bounds (any graph) and no hint."""
    from lipsdp.layer_sweep import SWEEPS, sweep
    from lipsdp.scaling import chain_scales

    found = chain_scales(lmi)
    if found is not None:
        found = sweep(lmi, found, SWEEPS if sweeps is None else sweeps, deadline=deadline)
    return (block_scale, trivial, None) if found is None else (found.block_scale, found.total, found.x)


def _fitting_backends(lmi, budget: int) -> str:
    """What to tell a user whose backend does not fit: the usable backends that apply to ``lmi`` and
    fit in ``budget`` bytes, with their estimates, or how to make the problem smaller."""
    from lipsdp.solvers import BACKENDS, usable

    fits = []
    for name in usable():
        cls = BACKENDS[name]
        need = lmi.memory_estimate(cls.family)
        if cls.applies(lmi) and need <= budget:
            fits.append((need, name))
    if not fits:
        return "no installed backend fits: try --split K or a smaller network"
    return "these fit: " + ", ".join(f"--solver {name} (about {need / 2**30:.2g} GiB)" for need, name in sorted(fits))


def _verify(lmi, x, v, objective, candidates=None):
    """:func:`~lipsdp.verify.verify`, retried on a block-balanced congruence when it fails or lands
    far above the solver's ``objective``; the better of the two.  ``candidates``: try only the first
    few candidate multiplier vectors (the solver's earlier iterates: one each, see below)."""
    from lipsdp.verify import verify, verify_balanced

    ver = verify(lmi, x, scale=v, candidates=candidates)
    if not ver.verified or (objective and ver.bound > objective * (1 + 1e-5)):
        # The test's uniform shift may be swamping small blocks (deep nets).
        alt = verify_balanced(lmi, x, scale=v, candidates=candidates)
        if alt.verified and (not ver.verified or alt.bound < ver.bound):
            ver = alt
    return ver


def _certify_network(network, *, solver, formulation, norm, output_map, time_limit, tol, lower_bound_samples,
                     memory_limit, progress, source="", load_seconds=0.0, strict=False) -> Certificate:
    from lipsdp.bounds import node_lipschitz, sampled_lower_bound
    from lipsdp.lifting import lift
    from lipsdp.lmi import build_lmi
    from lipsdp.solvers import get_backend

    if formulation not in FORMULATIONS:
        raise LipSDPError(f"unknown formulation {formulation!r}; choose from {', '.join(FORMULATIONS)} "
                          "(LipSDP-Network's coupled multipliers are unsound and not offered)")
    if norm not in NORMS:
        raise LipSDPError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    t_start = time.perf_counter()
    network.validate()
    _check_constraints_exist(network)
    m = network.output_dim
    if output_map is not None:
        output_map = np.atleast_2d(np.asarray(output_map, dtype=np.float64))
        if output_map.shape[1] != m or not np.all(np.isfinite(output_map)):
            raise LipSDPError(f"output_map must be a finite matrix with {m} columns, got shape {output_map.shape}")
    lips = node_lipschitz(network)
    comparator = node_lipschitz(network, norm="linf") if norm == "linf" else lips
    C_out = np.eye(m) if output_map is None else output_map
    if norm == "l2":
        trivial = comparator[network.output] * (1.0 if output_map is None else float(np.linalg.norm(C_out, 2)))
    else:
        trivial = comparator[network.output] * float(np.abs(C_out).sum(axis=1).max())
    lower = sampled_lower_bound(network, samples=lower_bound_samples, norm=norm, output_map=output_map) \
        if lower_bound_samples else None

    t0 = time.perf_counter()
    lifting = lift(network)
    summary = _network_summary(network, lifting, source or network.source)
    t_build = time.perf_counter() - t0
    common = dict(norm=norm, formulation=formulation, trivial_bound=trivial, lower_bound=lower, network=summary,
                  output_map=None if output_map is None else output_map.tolist())
    if network.is_constant():
        # Some all-zero layer cuts every input-output path: f is constant and L = 0 exactly.
        timings = {"load": load_seconds, "build": t_build, "solve": 0.0, "verify": 0.0,
                   "total": load_seconds + time.perf_counter() - t_start}
        return Certificate(0.0, VERIFIED, solver="closed-form", solver_status="optimal",
                           message="verified: the network is constant (an all-zero layer cuts every path from "
                           "input to output)", rho=0.0, verification={"method": "structural"}, timings=timings,
                           **common)

    # l2 certifies the whole (mapped) output at once; l_inf one scalar output at a time (MATH.md section 2).
    queries = [(output_map, "")] if norm == "l2" else [(C_out[i:i + 1], f" (output {i})") for i in range(len(C_out))]
    block_scale = np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]])
    linear = len(lifting.blocks) == 1
    backend = None
    t_solve = t_verify = 0.0
    outcomes, duals, iterations = [], [], []
    for omap, label in queries:
        t0 = time.perf_counter()
        full = build_lmi(lifting, formulation, output_map=omap, norm=norm)
        # Input reduction rotates the input space: exact for l2 (rho I is rotation invariant), not for l_inf.
        reduced = lifting.reduce_input() if norm == "l2" else lifting
        lmi = full if reduced is lifting else build_lmi(reduced, formulation, output_map=omap, norm=norm)
        # Same LMIs up to an exact (powers of two) congruence and variable scaling:
        # rho and multipliers of order one, for the solver and for the float test.
        # The sweeps may take a tenth of a time limit (seconds on 64 layers of width 64).
        scales, total, start = _scales(lmi, block_scale, trivial,
                                       deadline=None if not time_limit else t_start + 0.1 * time_limit)
        lmi, _ = replace(lmi, start=start).preconditioned(scales, total)
        full_pre, v = full.preconditioned(scales, total)
        summary["solved_lmi_size"] = lmi.n
        t_build += time.perf_counter() - t0
        if linear:
            # No activation: an eigenvalue problem (l2) or |c| ||c||_1 (l_inf); verify() finishes it.
            if norm == "l2":
                x = np.zeros(full.n_var)
            else:  # min sum(lambda) s.t. diag(lambda) >= c c^T is lambda = |c| ||c||_1
                c = np.abs(np.asarray(omap @ lifting.output.toarray())[0])
                x = c * c.sum() / v[: full.n_var]
            result_status, objective, message = "optimal", None, ""
            backend_name = "closed-form"
        else:
            if backend is None:
                backend = get_backend(solver, n=lmi.n, free_multipliers=not bool(lmi.nonneg.all()),
                                      factored=lmi.factors is not None, single_input=lmi.n_in == 1, lmi=lmi)
                need = lmi.memory_estimate(backend.family)
                budget = memory_limit or int(0.8 * available_memory())
                if need > budget:
                    raise ResourceError(f"solving this {lmi.n}x{lmi.n} LMI with {backend.name} needs about "
                                        f"{need / 2**30:.1f} GiB but {budget / 2**30:.1f} GiB are available; "
                                        f"{_fitting_backends(lmi, budget)}")
            backend_name = backend.name
            result, seconds = _solve(backend, lmi, time_limit, tol, progress, label)
            t_solve += seconds
            if solver.lower() == "auto" and backend.name in ("ipm", "chordal", "completion", "fo") and \
                    result.status not in ("optimal", "optimal_inaccurate", "time_limit"):
                # The ipm stalls on some badly conditioned LMIs (e.g. very deep nets, whose composed
                # norm bounds overshoot by orders of magnitude), fo may find no feasible start: let
                # the general solver auto would otherwise pick have a go, and keep its point if it converged.
                alt = get_backend("auto", n=lmi.n, free_multipliers=not bool(lmi.nonneg.all()))
                left = None if not time_limit else time_limit - seconds  # one budget for both solves
                alt_result, seconds = _solve(alt, lmi, left, tol, progress, label) if left is None or left > 0 \
                    else (result, 0.0)
                t_solve += seconds
                if alt_result.status == "optimal" and alt_result.x is not None:
                    alt_result.message = (f"{alt_result.message}; {backend.name} stopped ({result.status}: "
                                          f"{result.message}), re-solved with {alt.name}").lstrip("; ")
                    result, backend_name = alt_result, alt.name
            x, result_status, message = result.x, result.status, result.message
            iterations.append(result.iterations)
            # The preconditioned objective is (c^T x) / g with g = v[0].
            objective = None if result.objective is None or not np.isfinite(result.objective) \
                else float(np.sqrt(max(result.objective * v[0], 0.0)))
            dual = result.extras.get("dual_objective") if isinstance(result.extras, dict) else None
            if dual is not None and np.isfinite(dual) and result.status in ("optimal", "optimal_inaccurate"):
                duals.append(float(np.sqrt(max(dual * v[0], 0.0))))
        t0 = time.perf_counter()
        ver = _verify(full_pre, x, v, objective) if x is not None else None
        path = result.extras.get("path") if not linear and isinstance(result.extras, dict) else None
        if ver is not None and path and objective and (not ver.verified or ver.bound > objective * (1 + PATH_GAP)):
            # An interior-point method's last iterates: the final point can sit so close to the boundary
            # that rounding hides its margin (deep nets), while a slightly earlier one, further inside,
            # proves a bound closer to the optimum.  Newest first; stop where none can do better.
            for xk in reversed(path[:-1]):
                obj_k = float(np.sqrt(max(float(full_pre.objective @ xk) * v[0], 0.0)))
                if ver.verified and obj_k >= ver.bound:
                    break
                # The multipliers as returned only: an earlier iterate is worth having where it sits
                # inside with margin, and the floors and scalings that rescue a boundary point cost a
                # dozen dense factorisations each (17 s of 68 at depth 50, before).
                alt = _verify(full_pre, xk, v, obj_k, candidates=1)
                if alt.verified and (not ver.verified or alt.bound < ver.bound):
                    ver = alt
        if strict and ver is not None and ver.verified:
            ver = _exact_recheck(full, ver, lifting, omap)
        t_verify += time.perf_counter() - t0
        outcomes.append((label, ver, result_status, objective, message, full.labels))

    timings = {"load": load_seconds, "build": t_build, "solve": t_solve, "verify": t_verify,
               "total": load_seconds + time.perf_counter() - t_start}
    statuses = [o[2] for o in outcomes]
    worst = next((s for s in statuses if s != "optimal"), "optimal")
    objectives = [o[3] for o in outcomes]
    common.update(solver=backend_name, solver_status=worst, timings=timings,
                  solver_objective=None if None in objectives else max(objectives),
                  solver_dual_objective=max(duals) if len(duals) == len(outcomes) and duals else None,
                  solver_iterations=sum(iterations) if iterations and None not in iterations else None)
    if norm == "linf":
        summary["per_output"] = [{"output": i, "bound": o[1].bound if o[1] else None, "solver_status": o[2]}
                                 for i, o in enumerate(outcomes)]
    for label, ver, status, _, message, _ in outcomes:
        if ver is None:
            return Certificate(None, SOLVER_FAILED, message=f"{backend_name} returned no solution{label} "
                               f"({status}{': ' + message if message else ''})", **common)
        if not ver.verified:
            return Certificate(None, UNVERIFIED, message=f"{backend_name} finished{label} ({status}) but its "
                               f"multipliers could not be verified: {ver.message}",
                               verification={"method": ver.method, "message": ver.message}, **common)
    best = max(outcomes, key=lambda o: o[1].bound)[1]
    note = "" if worst == "optimal" else f" (solver status {worst}: the bound is valid, maybe not tight)"
    if len(outcomes) == 1:
        multipliers, labels = best.x.tolist(), list(outcomes[0][5])
    else:
        multipliers = [o[1].x.tolist() for o in outcomes]
        labels = list(outcomes[0][5])
    return Certificate(best.bound, VERIFIED, message=f"verified{note}", rho=best.rho, multipliers=multipliers,
                       multiplier_labels=labels,
                       verification={"method": best.method, "inflation": max(o[1].inflation for o in outcomes),
                                     "margin": min(o[1].margin for o in outcomes), "message": best.message},
                       **common)


def load_model(model, activation=None, activation_params=None, input_shape=None, trust_pickle=False):
    """``(Network, source)`` from a path, an ``nn.Module`` / ScriptModule / ExportedProgram, or a Network."""
    from lipsdp.network import Network

    if isinstance(model, Network):
        return model, ""
    if isinstance(model, (str, os.PathLike)):
        from lipsdp.io import load_network

        return load_network(model, activation=activation, activation_params=activation_params,
                            input_shape=input_shape, trust_pickle=trust_pickle), os.fspath(model)
    from lipsdp.io import network_from_module

    return network_from_module(model, input_shape=input_shape), type(model).__name__


def _stored_output_map(cert, m: int):
    """The certificate's ``output_map`` as a finite ``(k, m)`` array, or None (the whole output)."""
    if cert.output_map is None:
        return None
    try:
        omap = np.atleast_2d(np.asarray(cert.output_map, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise LipSDPError(f"the certificate's output_map is not a matrix (edited or corrupt): {exc}") from None
    if omap.ndim != 2 or omap.shape[1] != m or len(omap) == 0 or not np.all(np.isfinite(omap)):
        raise LipSDPError(f"the certificate's output_map (shape {omap.shape}) does not fit this model's "
                          f"{m} outputs (edited or corrupt)")
    return omap


def check_certificate(cert, model, **load_options) -> Certificate:
    """Re-check a saved certificate against a model without solving anything.

    The model must be the one certified (same architecture and weights: SHA-256
    of the graph).  Every LMI the certificate stands for is rebuilt from the
    model and the stored ``formulation``, ``norm`` and ``output_map``: one for
    l2, one per certified output for l_inf (MATH.md section 2.1).  The stored
    multipliers must then pass the rigorous test of :mod:`lipsdp.verify` as
    they are (nothing is repaired or re-derived), and the stated bounds must
    cover them exactly: ``bound >= sqrt(rho)`` (l2) or
    ``bound >= sqrt(sum lambda_in)`` for every output (l_inf, also each entry
    of ``network["per_output"]``).  So an edit that makes the certificate claim
    more than it proves (a lowered bound, a changed multiplier, another output)
    fails; an edit that keeps the claim true (a larger bound) is still a valid
    certificate and passes.

    Returns the certificate with refreshed verification details; raises
    :class:`~lipsdp.errors.LipSDPError` (exit 2) otherwise.
    """
    import math
    from fractions import Fraction

    from lipsdp.bounds import node_lipschitz
    from lipsdp.lifting import lift
    from lipsdp.lmi import build_lmi
    from lipsdp.verify import balanced_scales, rigorous_negative_definite, round_up_sqrt

    if isinstance(cert, dict):
        cert = Certificate.from_dict(cert)
    if cert.norm not in NORMS or cert.formulation not in FORMULATIONS:
        raise LipSDPError(f"the certificate names an unknown norm {cert.norm!r} or formulation "
                          f"{cert.formulation!r} (edited or corrupt)")
    if not cert.verified:
        raise LipSDPError("the certificate holds no verified bound to check")
    if (cert.verification or {}).get("method") == "split":
        raise LipSDPError("re-checking split certificates (--split or the memory fallback) is not supported yet: "
                          "certify again without splitting, or re-run the split certification")
    if not isinstance(cert.bound, (int, float)) or isinstance(cert.bound, bool) \
            or not math.isfinite(cert.bound) or cert.bound < 0:
        raise LipSDPError(f"the certificate's bound {cert.bound!r} is not a finite number (edited or corrupt)")
    t0 = time.perf_counter()
    network, _ = load_model(model, **load_options)
    network.validate()
    if network.fingerprint() != (cert.network or {}).get("sha256"):
        raise LipSDPError("the model does not match the certificate (architecture or weights changed)")
    margins = []
    if (cert.verification or {}).get("method") == "structural":
        # L = 0 was read off the graph (an all-zero layer cuts every path), not from multipliers.
        if not network.is_constant():
            raise LipSDPError("the certificate does not verify: it claims a constant network (edited?)")
    else:
        m = network.output_dim
        omap = _stored_output_map(cert, m)
        C_out = np.eye(m) if omap is None else omap
        # The same queries as certification: the whole (mapped) output for l2, each row for l_inf.
        queries = [omap] if cert.norm == "l2" else [C_out[i:i + 1] for i in range(len(C_out))]
        stored = [cert.multipliers] if len(queries) == 1 else cert.multipliers
        if not stored or not isinstance(stored, list) or len(stored) != len(queries):
            raise LipSDPError(f"the certificate holds {len(stored or [])} multiplier vectors for "
                              f"{len(queries)} outputs (edited or corrupt)")
        per_output = (cert.network or {}).get("per_output") if cert.norm == "linf" else None
        if per_output is not None and (not isinstance(per_output, list) or len(per_output) != len(queries)):
            raise LipSDPError("the certificate's per-output bounds do not match its outputs (edited or corrupt)")
        lifting = lift(network)
        lips = node_lipschitz(network)
        block_scale = np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]])
        for i, (omap_i, x) in enumerate(zip(queries, stored)):
            where = f" (output {i})" if len(queries) > 1 else ""
            raw = build_lmi(lifting, cert.formulation, output_map=omap_i, norm=cert.norm)
            try:
                x = np.asarray(x, dtype=np.float64)
            except (TypeError, ValueError):
                x = None
            if x is None or x.shape != (raw.n_var,) or not np.all(np.isfinite(x)) or np.any(x[raw.nonneg] < 0):
                raise LipSDPError(f"the certificate's multipliers{where} do not fit this model's LMI "
                                  "(edited or corrupt)")
            # sqrt(rho) or sqrt(sum lambda_in), summed in rationals and rounded up, as verify() does.
            proven = round_up_sqrt(sum((Fraction(float(t)) for t in x[:raw.n_in]), Fraction(0)))
            claims = [cert.bound]
            if per_output is not None:
                claims.append((per_output[i] or {}).get("bound") if isinstance(per_output[i], dict) else None)
            for claim in claims:
                if not isinstance(claim, (int, float)) or isinstance(claim, bool) or not proven <= claim:
                    raise LipSDPError(f"the certificate does not verify{where}: a stated bound {claim!r} is below "
                                      f"what its multipliers prove ({proven!r}; edited?)")
            # The same exact congruences certify() may have proven it in: its preconditioning
            # (:func:`_scales`), composed norm bounds, and blocks balanced at x (verify_balanced).
            ok = exact = False
            for scales in (_scales(raw, block_scale, lips[network.output])[:2], (block_scale, lips[network.output]),
                           balanced_scales(raw, x)):
                lmi, v = raw.preconditioned(*scales)
                xs = x / v
                if not np.array_equal(xs * v, x):  # v holds powers of two: exact unless under/overflow
                    continue
                exact = True
                ok, margin = rigorous_negative_definite(lmi, xs)
                if ok:
                    break
            if not exact:
                raise LipSDPError(f"the certificate's multipliers{where} are out of range (edited or corrupt)")
            if not ok:
                raise LipSDPError(f"the certificate does not verify{where}: M is not provably negative definite "
                                  "at its multipliers (edited multipliers, bound or output?)")
            margins.append(margin)
        # Implicit layers: the bound means something only if the equilibrium is proved unique.
        from lipsdp.equilibrium import attach_well_posedness, implicit_nodes

        if implicit_nodes(network):
            attach_well_posedness(network, cert, cert.formulation, cert.norm)
            if not cert.network["well_posedness"].get("proved"):
                raise LipSDPError("the certificate does not verify: " + cert.network["well_posedness"]["message"])
    cert.verification = {**cert.verification, "rechecked": True,
                         "recheck_margin": min(margins) if margins else None,
                         "recheck_seconds": time.perf_counter() - t0}
    return cert


def certify(model, *, solver: str = "auto", formulation: str = "neuron", norm: str = "l2", output_map=None,
            output_index: int | None = None,
            activation: str | None = None, activation_params: dict | None = None,
            input_shape: tuple | None = None, time_limit: float | None = None, tol: float | None = None,
            trust_pickle: bool = False, lower_bound_samples: int = 128, memory_limit: int | None = None,
            progress: bool = False, strict: bool = False, split: int | None = None) -> Certificate:
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
    norm : {"l2", "linf"}
        ``l2``: ``||f(x) - f(y)||_2 <= L ||x - y||_2``.  ``linf``: for every
        output ``i``, ``|f_i(x) - f_i(y)| <= L ||x - y||_inf`` (so L bounds the
        l_inf -> l_inf gain); the per-output bounds are in ``network["per_output"]``.
    output_map : ndarray, shape (k, m), optional
        Certify ``output_map @ f`` instead of ``f`` (a logit, or a difference ``e_y - e_j``).
    output_index : int, optional
        Certify the single output ``f_i`` (shorthand for ``output_map = e_i``).
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
    strict : bool
        Also prove the certificate exactly in rational arithmetic (slope-restricted activations).
    split : int, optional
        Certify chain networks in pieces of at most this many activation layers and
        multiply their bounds (MATH.md 8.2: sound, looser; l2 only).  Without it,
        lipsdp splits only when the whole LMI does not fit in memory.

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
    network, source = load_model(model, activation, activation_params, input_shape, trust_pickle)
    if output_index is not None:
        m = network.output_dim
        if not 0 <= output_index < m:
            raise LipSDPError(f"output {output_index} does not exist: the network has {m} outputs (0..{m - 1})")
        output_map = np.eye(m)[output_index:output_index + 1]
    return certify_network(network, solver=solver, formulation=formulation, norm=norm, output_map=output_map,
                           time_limit=time_limit,
                           tol=tol, lower_bound_samples=lower_bound_samples, memory_limit=memory_limit,
                           progress=progress, source=source, load_seconds=time.perf_counter() - t0, strict=strict,
                           split=split)
