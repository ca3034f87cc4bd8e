"""``lipsdp.certify``: model in, verified :class:`~lipsdp.certificate.Certificate` out.

The driver of the stages, in the order data flows::

    load (lipsdp.io) -> graph (Network) -> lift -> reductions -> LMI -> solve -> verify -> certificate

* **load**: :func:`load_model` (a file, a module, or a :class:`~lipsdp.network.Network`);
* **lift**: :func:`lipsdp.lifting.lift`, one :class:`~lipsdp.reductions.Query` per LMI of the certificate;
* **reductions**: :class:`~lipsdp.reductions.ReduceInput`, :class:`~lipsdp.reductions.Precondition` on each
  query; :class:`~lipsdp.reductions.Split`, :class:`~lipsdp.reductions.MaxMinAsReLU` on the network;
* **solve**: :class:`lipsdp.solve.Solve` (backend choice, memory, fallback);
* **verify**: :func:`lipsdp.verification.verify_solution`, always on the LMI of the
  network as given, so nothing the solver or a reduction did can make a bound unsound;
* **certificate**: :func:`lipsdp.certificate.certificate_from_outcomes`.

``lipsdp verify`` (:func:`lipsdp.checking.check_certificate`): load -> lift -> verify, same queries and congruences.
"""

from __future__ import annotations

import os
import time

import numpy as np

from lipsdp import local, threads as thread_pools
from lipsdp.activations import caveats as activation_caveats
from lipsdp.bounds import node_lipschitz, sampled_lower_bound
from lipsdp.budget import checkpoint, current, step
from lipsdp.certificate import (Certificate, certificate_from_outcomes, network_summary, split_certificate,
                                trivial_certificate, falls_back)
from lipsdp.constraints import registered
from lipsdp.wellposed import attach_well_posedness, check_provable
from lipsdp.errors import LipSDPError, ResourceError, UnsupportedLayerError
from lipsdp.io import load_network, network_from_module
from lipsdp.jacobian import local_lipschitz_jacobian
from lipsdp.lifting import lift
from lipsdp.network import Network
from lipsdp.recurrent import certify_all_horizons, horizon_shape
from lipsdp.reductions import (Chain, MaxMinAsReLU, Precondition, Query, ReduceInput, Split,
                               preconditioning_scales, readouts)
from lipsdp.resources import available_memory  # noqa: F401  (public here for scripts and benchmarks)
from lipsdp.sampled_scales import gain_scales
from lipsdp.session import run
from lipsdp.solve import ClosedForm, Solve, sweep_deadline
from lipsdp.split import is_chain
from lipsdp.structured import certify_by_structure
from lipsdp.verification import (FORMULATIONS, NORMS, closed_form, proven_trivial_bound, record_proven_trivial,
                                 record_start_bound, verify_solution)

#: How the preconditioning scales are chosen; one name here so tests and experiments can substitute it.
_scales = preconditioning_scales
#: Share of a time limit the preconditioning sweeps may take.
SWEEP_SHARE = 0.1


def load_model(model, activation=None, activation_params=None, input_shape=None, trust_pickle=False):
    """``(Network, source)`` from a path, an ``nn.Module`` / ScriptModule / ExportedProgram, or a Network."""
    if isinstance(model, Network):
        return model, ""
    if isinstance(model, (str, os.PathLike)):
        return load_network(model, activation=activation, activation_params=activation_params,
                            input_shape=input_shape, trust_pickle=trust_pickle), os.fspath(model)
    return network_from_module(model, input_shape=input_shape), type(model).__name__


def _check_network(network, formulation: str, norm: str, output_map):
    """The validated ``output_map`` (None or a finite ``(k, m)`` array); refuses what cannot be certified."""
    if formulation not in FORMULATIONS:
        raise LipSDPError(f"unknown formulation {formulation!r}; choose from {', '.join(FORMULATIONS)} "
                          "(LipSDP-Network's coupled multipliers are unsound and not offered)")
    if norm not in NORMS:
        raise LipSDPError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    network.validate()
    known = registered()  # every activation needs a registered quadratic constraint; list all that lack one
    missing = [(network.op(n).name, n, f"{network.op(n).kind} (no quadratic constraint for "
                f"{network.op(n).function!r})") for n in network.activations()
               if network.op(n).function not in known]
    if missing:
        raise UnsupportedLayerError(missing)
    if output_map is None:
        return None
    m = network.output_dim
    output_map = np.atleast_2d(np.asarray(output_map, dtype=np.float64))
    if output_map.shape[1] != m or not np.all(np.isfinite(output_map)):
        raise LipSDPError(f"output_map must be a finite matrix with {m} columns, got shape {output_map.shape}")
    return output_map


def _trivial_bound(network, lips, norm: str, output_map) -> float:
    """The product of norms (composed node by node), for the read-out certified, in ``norm``."""
    comparator = node_lipschitz(network, norm="linf") if norm == "linf" else lips
    C_out = np.eye(network.output_dim) if output_map is None else output_map
    if norm == "l2":
        return comparator[network.output] * (1.0 if output_map is None else float(np.linalg.norm(C_out, 2)))
    return comparator[network.output] * float(np.abs(C_out).sum(axis=1).max())


def _certify_network(network, *, solver, formulation, norm, output_map, time_limit, tol, lower_bound_samples,
                     memory_limit, progress, source="", load_seconds=0.0, strict=False) -> Certificate:
    """One certificate from the whole network: the stages, once per query."""
    t_start = time.perf_counter()
    checkpoint("build")
    output_map = _check_network(network, formulation, norm, output_map)
    lips = node_lipschitz(network)
    trivial = _trivial_bound(network, lips, norm, output_map)
    record_proven_trivial(network, norm, output_map)
    checkpoint("lower bound")
    lower = sampled_lower_bound(network, samples=lower_bound_samples, norm=norm, output_map=output_map) \
        if lower_bound_samples else None
    checkpoint("build")
    thread_pools.fit()  # the lower bound may have loaded torch: its pool too
    t0 = time.perf_counter()
    lifting = lift(network)
    summary = network_summary(network, lifting, source or network.source)
    t_build, t_verify = time.perf_counter() - t0, 0.0
    common = dict(norm=norm, formulation=formulation, trivial_bound=trivial, lower_bound=lower, network=summary,
                  output_map=None if output_map is None else output_map.tolist())

    def timings(t_solve=0.0):
        return {"load": load_seconds, "build": t_build, "solve": t_solve, "verify": t_verify,
                "total": load_seconds + time.perf_counter() - t_start}

    if (quick := closed_form(network, common, lower, output_map, strict, timings())) is not None:
        return quick  # constant, or the proven composition reached by the lower bound (docs/math.md §2.5)
    block_scale = np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]])
    chain = Chain([ReduceInput(), Precondition(block_scale, trivial, scales=gain_scales(network, lifting, output_map, _scales),
                                               deadline=sweep_deadline(t_start, time_limit, solver, SWEEP_SHARE))])
    solve = ClosedForm() if len(lifting.blocks) == 1 else \
        Solve(solver, time_limit=time_limit, tol=tol, memory_limit=memory_limit, progress=progress)
    outcomes, todo = [], list(readouts(network.output_dim, norm, output_map))
    for omap, label in todo:
        step(len(outcomes), len(todo))  # an ETA for the progress display once one query is done
        checkpoint("build")
        t0 = time.perf_counter()
        query, inverse = chain.apply(Query.build(lifting, formulation, norm, omap, label))
        summary["solved_lmi_size"] = query.solve.n
        thread_pools.fit(query.solve.n)
        t_build, t0 = t_build + time.perf_counter() - t0, time.perf_counter()
        record_start_bound(query)  # under a limit only: the bound a limit reached in the solve reports
        t_verify += time.perf_counter() - t0
        checkpoint("solve")
        solution = chain.invert(solve(query), inverse)
        checkpoint("verify")
        t0 = time.perf_counter()
        outcomes.append(verify_solution(query, solution, strict=strict))
        t_verify += time.perf_counter() - t0
        _record(outcomes[-1], norm, label)
    cert = certificate_from_outcomes(outcomes, common, timings(solve.seconds))
    return cert if strict else _at_most_trivial(cert, network, norm, output_map)


def _record(outcome, norm: str, label: str) -> None:
    """Tell the run's budget about a bound verified for the whole certificate (l2: its one query), so a
    limit reached afterwards still reports it."""
    budget = current()
    ver = outcome.verification
    if budget is not None and norm == "l2" and ver is not None and ver.verified:
        budget.verified(ver.bound, f"l2{label}")


def _at_most_trivial(cert, network, norm: str, output_map) -> Certificate:
    """Never certify above the trivial bound: where the SDP's verified bound exceeds the float product of norms,
    prove the product (:func:`lipsdp.verification.proven_trivial_bound`) and keep the better of the two, with the
    proven product as the trivial bound reported (also where an l_inf SDP of order statistics did not verify:
    :func:`~lipsdp.certificate.falls_back`).  Not with ``strict`` (the proof of norms is in floating point)."""
    if cert.trivial_bound is None or (cert.bound <= cert.trivial_bound if cert.verified else not falls_back(network, norm)):
        return cert
    t0 = time.perf_counter()
    proven = proven_trivial_bound(network, norm, output_map)
    cert.timings["verify"] = cert.timings.get("verify", 0.0) + time.perf_counter() - t0
    if proven is None:
        return cert
    if cert.verified and cert.bound <= proven:
        cert.trivial_bound = proven
        return cert
    return trivial_certificate(cert, proven)


def _certify_pieces(network, layers, output_map, options) -> list[Certificate]:
    """Certificates of the pieces of a chain network; with ``layers`` None, a piece too big for memory
    is halved again until every piece's solve fits."""
    pieces, _ = Split(layers).apply(network)
    if len(pieces) == 1 and not layers:
        raise ResourceError("even one layer of this network does not fit in memory")
    done = []
    for k, piece in enumerate(pieces):
        piece_map = output_map if k == len(pieces) - 1 else None
        try:
            done.append(_certify_network(piece, **{**options, "output_map": piece_map}))
        except ResourceError:
            if layers or len(piece.activations()) < 2:
                raise
            done.extend(_certify_pieces(piece, None, piece_map, options))
    return done


def _certify_split(network, layers, options) -> Certificate:
    """Certify a chain network as a composition of pieces (docs/math.md §8.2; :class:`~lipsdp.reductions.Split`).

    ``layers``: activation nodes per piece; None halves the net recursively until
    every piece's solve fits in memory.  The bound is the product of the pieces'
    verified bounds (rounded up): sound, looser than the full SDP, and labelled so.
    """
    if options["norm"] != "l2":
        raise LipSDPError("--split composes l2 bounds only (the pieces' norms must chain)")
    if not is_chain(network):
        raise LipSDPError("--split needs a chain network (no skip connections, concatenations or implicit layers)")
    t_start = time.perf_counter()
    output_map = options["output_map"]
    parts = _certify_pieces(network, layers, output_map,
                            {**options, "lower_bound_samples": 0, "source": "", "load_seconds": 0.0})
    lips = node_lipschitz(network)
    trivial = lips[network.output] * (1.0 if output_map is None else float(np.linalg.norm(output_map, 2)))
    lower = sampled_lower_bound(network, samples=options["lower_bound_samples"], output_map=output_map) \
        if options["lower_bound_samples"] else None
    summary = network_summary(network, lift(network), options["source"] or network.source)
    timings = {key: sum(c.timings.get(key, 0.0) for c in parts) for key in ("build", "solve", "verify")}
    timings.update(load=options["load_seconds"], total=options["load_seconds"] + time.perf_counter() - t_start)
    bound = Split(layers).invert([c.bound for c in parts]) if all(c.verified for c in parts) else None
    return split_certificate(parts, bound, dict(
        norm="l2", formulation=options["formulation"], trivial_bound=trivial, lower_bound=lower, network=summary,
        timings=timings, output_map=None if output_map is None else np.atleast_2d(output_map).tolist()))


def _certify_whole_or_split(network, split, options) -> Certificate:
    """``--split K`` as asked; otherwise the whole network, split only when its LMI does not fit in memory."""
    if split:
        return _certify_split(network, split, options)
    try:
        return _certify_network(network, **options)
    except ResourceError as exc:
        # A chain net can still be certified piece by piece (looser, labelled).
        if options["norm"] != "l2" or not is_chain(network) or len(network.activations()) < 2:
            raise
        cert = _certify_split(network, None, options)
        if not cert.verified:  # the pieces' failure alone would hide why lipsdp split at all
            cert.message = f"{exc}; splitting the network instead failed: {cert.message}"
        return cert


def _compare_maxmin(network, cert, options) -> None:
    """Record the bound of the ICLR 2024 paper's baseline, MaxMin as two-ReLU residual maps, next to ours."""
    t0 = time.perf_counter()
    rewrite = MaxMinAsReLU("two")
    relu_net, inverse = rewrite.apply(network)
    other = _certify_network(relu_net, **{**options, "lower_bound_samples": 0, "source": "", "load_seconds": 0.0,
                                          "strict": False})
    cert.network["comparisons"] = {"two_relu_rewrite": rewrite.invert(other.bound, inverse),
                                   "two_relu_rewrite_seconds": time.perf_counter() - t0}


def certify_network(network, *, solver: str = "auto", formulation: str = "neuron", norm: str = "l2",
                    output_map=None, time_limit: float | None = None, tol: float | None = None,
                    lower_bound_samples: int = 128, memory_limit: int | None = None,
                    progress: bool | str = False, source: str = "", load_seconds: float = 0.0,
                    compare: bool = True, strict: bool = False, split: int | None = None,
                    threads: int | None = None, verbose: bool = False, structure: str = "auto") -> Certificate:
    """Certify a :class:`~lipsdp.network.Network` (see :func:`certify` for the parameters).

    With ``compare`` (default), nets with MaxMin / GroupSort-2 activations are
    also certified after rewriting them as the two-ReLU residual network of the
    ICLR 2024 paper's baseline (:class:`~lipsdp.reductions.MaxMinAsReLU`), and that
    bound is reported in ``network["comparisons"]`` so users see the gain.

    With ``strict``, every verified point is also checked exactly, in rational
    arithmetic (:mod:`lipsdp.exact`), on the LMI of the network as given.

    ``memory_limit`` here is what the build and the solve plan against; :func:`certify` also enforces
    it over the run.  ``time_limit`` covers the whole call (:mod:`lipsdp.budget`).
    """
    with run(time_limit, None, threads=threads, progress=progress, verbose=verbose):
        return _certify_network_run(network, solver=solver, formulation=formulation, norm=norm,
                                    output_map=output_map, time_limit=time_limit, tol=tol,
                                    lower_bound_samples=lower_bound_samples, memory_limit=memory_limit,
                                    progress=progress, source=source, load_seconds=load_seconds,
                                    compare=compare, strict=strict, split=split, structure=structure)


def _certify_network_run(network, *, compare, split, structure="auto", **options) -> Certificate:
    """:func:`certify_network` within its run (limits, thread pools, quiet, progress)."""
    check_provable(network.validate())  # implicit layers: refuse what cannot be proved well-posed
    solver, formulation, norm = options["solver"], options["formulation"], options["norm"]
    cert = certify_by_structure(network, structure, split, options, _certify_whole_or_split)  # docs/math.md §7.4
    attach_well_posedness(network, cert, formulation, norm)
    cert.caveats = activation_caveats(network)  # where torch's function is not the one certified
    if compare and MaxMinAsReLU.applies(network) and norm == "l2" and cert.verified and not split:
        _compare_maxmin(network, cert, options)
    return cert


def _with_jacobian_bound(cert, network, center, radius, norm, output_map) -> Certificate:
    """A local certificate, or the Clarke-Jacobian bound on the region's bounding box (docs/math.md §6.3,
    rounded outwards: proven like the SDP's) where that is smaller; for the whole output of graphs it bounds."""
    if output_map is not None or not cert.region:
        return cert
    c = np.asarray(center, dtype=np.float64).ravel()
    try:
        jac, details = local_lipschitz_jacobian(network, c - radius, c + radius, norm=norm)
    except UnsupportedLayerError as exc:
        cert.region["jacobian_bound"] = f"not applicable: {exc}"
        return cert
    cert.region["jacobian_bound"] = jac
    if cert.verified and jac < cert.bound:
        cert.bound, cert.region["bound_from"] = jac, "clarke-jacobian"
        cert.verification = {**cert.verification, "method": "clarke-jacobian", "boxes": details["boxes"]}
        cert.message += f"; the Clarke-Jacobian bound on the region's box is smaller: {jac:.6g}"
    return cert


def certify(model, *, solver: str = "auto", formulation: str = "neuron", norm: str = "l2", output_map=None,
            output_index: int | None = None, activation: str | None = None, activation_params: dict | None = None,
            input_shape: tuple | None = None, time_limit: float | None = None, tol: float | None = None,
            trust_pickle: bool = False, lower_bound_samples: int = 128, memory_limit: int | None = None,
            progress: bool | str = False, strict: bool = False, split: int | None = None,
            threads: int | None = None, verbose: bool = False, center=None, radius=None, region_norm=None,
            horizon: int | str | None = None, structure: str = "auto") -> Certificate:
    """Certify an upper bound on the l2 Lipschitz constant of a network, globally or on a region.

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
        Seconds for the whole call: load, build, solve and verify.  The solver gets most of what is
        left when it starts, and its unfinished point is still verified (then ``solver_status`` is
        ``time_limit``); :class:`~lipsdp.budget.LimitReached` is raised when the call runs past the
        limit otherwise (checked between phases and steps: in-process, a native call in progress
        finishes first; the command line ends the process).
    tol : float, optional
        Solver tolerance (backend default otherwise).
    trust_pickle : bool
        Allow arbitrary pickled classes (executes code from the file!).
    lower_bound_samples : int
        Random inputs for the sampled lower bound (0 to skip).
    memory_limit : int, optional
        Bytes of resident memory the call may add to what the process holds when it starts (solver
        worker processes included).  Builds and solves that would not fit are refused before they start
        (:class:`~lipsdp.errors.ResourceError`); :class:`~lipsdp.budget.LimitReached` is raised when
        the limit is passed anyway.  Default: plans use 80% of the available memory.
    progress : bool or "always"
        The phase, its work and the time left on stderr, for calls longer than a second, when stderr
        is a terminal (``"always"``: also into a file or pipe).
    threads : int, optional
        Threads for BLAS, OpenMP and torch during the call; default: chosen for the problem size and
        the idle cores (:func:`lipsdp.threads.choose`).
    center, radius, region_norm : optional
        A local bound, valid for pairs of inputs in the ball ``||x - center|| <= radius`` in
        ``region_norm`` (default: ``norm``): per-neuron slope sectors from pre-activation bounds
        (docs/math.md §6; :func:`lipsdp.local.regional`).  ``bound`` is the better verified one of the
        local and the global bound; ``global_bound`` and ``region`` are reported too.
    horizon : int or "all", optional
        ``nn.RNN`` models: unroll over ``T`` input steps, or ``"all"``: one bound for every ``T`` (docs/math.md §13).
    verbose : bool
        Let solvers' own output (SDPA's C++ messages, ARPACK and cvxpy warnings) through to stderr;
        by default it is dropped (:mod:`lipsdp.quiet`).
    strict : bool
        Also prove the certificate exactly in rational arithmetic (slope-restricted activations).
    split : int, optional
        Certify chain networks in pieces of at most this many activation layers and
        multiply their bounds (docs/math.md §8.2: sound, looser; l2 only).  Without it,
        lipsdp splits only when the whole LMI does not fit in memory.
    structure : {"auto", "unrolled", "state-space", "both"}
        CNNs unrolled (docs/math.md §7.1) or as 2-D state-space LMIs (§7.4): see :mod:`lipsdp.structured`.

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
    with run(time_limit, memory_limit, threads=threads, progress=progress, verbose=verbose) as budget:
        budget.enter("load")
        t0 = time.perf_counter()
        if horizon == "all":
            return certify_all_horizons(model, input_shape, trust_pickle, lower_bound_samples, norm=norm,
                                        strict=strict, split=split, solver=solver, formulation=formulation,
                                        output=(output_map, output_index), center=center)
        input_shape = horizon_shape(model, horizon, input_shape, trust_pickle)
        network, source = load_model(model, activation, activation_params, input_shape, trust_pickle)
        thread_pools.fit()  # loading may have imported torch: limit its pool too
        if output_index is not None:
            m = network.output_dim
            if not 0 <= output_index < m:
                raise LipSDPError(f"output {output_index} does not exist: the network has {m} outputs "
                                  f"(0..{m - 1})")
            output_map = np.eye(m)[output_index:output_index + 1]
        run_network = local.regional(certify_network, center, radius, region_norm)
        cert = run_network(network, solver=solver, formulation=formulation, norm=norm, output_map=output_map,
                           time_limit=time_limit, tol=tol, lower_bound_samples=lower_bound_samples,
                           memory_limit=memory_limit, progress=progress, source=source,
                           load_seconds=time.perf_counter() - t0, strict=strict, split=split, threads=threads,
                           verbose=verbose, structure=structure)
        return _with_jacobian_bound(cert, network, center, radius, norm, output_map)
