r"""Recurrent (Elman) networks: Lipschitz bounds over a horizon ``T`` and over every horizon at once.

An ``nn.RNN`` model maps an input sequence ``x = (x_1, ..., x_T)`` (shape ``(T, input_size)``,
flattened) to what the model returns: the read-out of the last state or of every state.  Its
Lipschitz constant is taken in the l2 norm of the flattened sequences (docs/math.md §13).

* **Horizon T** (:func:`lipsdp.io.rnn.horizon_shape`): the loader unrolls the RNN over
  the traced horizon (:mod:`lipsdp.io.rnn`: ``T`` copies of one ``Affine`` + ``Activation`` per
  layer, with shared weights) and the ordinary LipSDP pipeline certifies the unrolled network.
* **Every horizon** (:func:`certify_all_horizons`): the state-space form ``h_t = phi(W h_{t-1} + U x_t + b)``
  (a loop unrolled by the exporter: :mod:`lipsdp.recurrent_cell`) with a read-out ``y = C h`` is certified by one
  dissipation LMI (:func:`dissipation_lmi`, docs/math.md §13.2) in a storage matrix ``P``, the
  slope multipliers ``t`` and the gain ``rho``, of size ``input_size + 2 * hidden`` whatever
  ``T``.  It is verified rigorously as every LMI is (:func:`lipsdp.verify.verify`), and so is
  the storage condition (``P - C^T C > 0`` for the last state, ``P > 0`` for every state), which
  also proves that the recurrence is an incremental contraction.  Without a solution there is no
  finite all-horizon bound lipsdp can prove, and the request is refused with the reason.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import networkx as nx
import numpy as np
import scipy.sparse as sp

from lipsdp.bounds import sampled_lower_bound
from lipsdp.certificate import VERIFIED, Certificate
from lipsdp.errors import LipSDPError, ModelLoadError, WellPosednessError
from lipsdp.io import load_network, network_from_module
from lipsdp.io.rnn import fixed_horizon, horizon_shape
from lipsdp.lmi import LMIProblem
from lipsdp.network import Affine, Concat, Network, Reshape
from lipsdp.recurrent_cell import all_horizon_trivial_bound, recognise
from lipsdp.verify import rigorous_negative_definite, verify

__all__ = ["StateSpace", "all_horizon_trivial_bound", "certify_all_horizons", "dissipation_lmi", "horizon_shape",
           "solve_dissipation", "state_space", "storage_lmi"]

#: Horizon at which a model is unrolled to read its state-space form (and to sample a lower bound).
PROBE_HORIZON = 12
#: Slope sector ``(alpha, beta)`` of ``nn.RNN``'s two nonlinearities (docs/math.md §0).
SECTOR = {"tanh": (0.0, 1.0), "relu": (0.0, 1.0)}
#: Beyond this many variables (``P`` has ``S (S + 1) / 2`` of them) SCS is tried before Clarabel.
IPM_MAX_VARS = 800
#: Margin the SDP asks for (``M <= -eps I``), so that its point lies inside the cone and verifies.
MARGIN = 1e-7


# -- the state-space form ---------------------------------------------------------
@dataclass
class StateSpace:
    r"""An Elman RNN with an affine read-out, as a state-space system (docs/math.md §13.2).

    ``h^l_t = phi(W[l] h^l_{t-1} + U[l] h^{l-1}_t + b_l)`` with ``h^0_t = x_t``; the output is
    ``C h^L_T`` (``mode == "last"``) or the sequence ``(C h^L_1, ..., C h^L_T)`` (``"all"``).
    Biases and the initial state do not enter any bound.
    """

    U: list
    W: list
    activation: str
    C: np.ndarray
    mode: str
    name: str = "rnn"

    @property
    def input_size(self) -> int:
        return int(self.U[0].shape[1])

    @property
    def sizes(self) -> list[int]:
        return [int(w.shape[0]) for w in self.W]


def _refuse(network, why: str):
    raise LipSDPError(f"{network.source or 'model'}: no all-horizon bound: {why}; certify a horizon "
                      "(horizon=T, --horizon T) instead")


def _stacked_states(network: Network, top: list[int], prefix: str) -> int:
    """The ``Concat`` of the top layer's states; refuses any other node after the RNN or inside it."""
    rnn = set(top).union(*(nx.ancestors(network.graph, n) for n in top)) - {network.input}
    if any(not network.op(n).name.startswith(prefix) for n in rnn):
        _refuse(network, "something other than the RNN computes its states")
    after = [n for n in network.graph.nodes if n not in rnn and n != network.input]
    stacked = None
    for node in after:
        op, parents = network.op(node), network.parents(node)
        if isinstance(op, Reshape) and parents[0] in top:
            continue
        steps = [network.parents(p)[0] if isinstance(network.op(p), Reshape) else p for p in parents]
        if isinstance(op, Concat) and op.axis == 0 and steps == top and stacked is None:
            stacked = node
        elif not (isinstance(op, Affine) and node == network.output and parents == [stacked]):
            _refuse(network, f"{op.name} ({op.kind}) follows the RNN, and only an affine read-out of its "
                    "states (Linear on the last step or on every step) is supported")
    if stacked is None:
        _refuse(network, "the RNN's states are not read as one sequence")
    return stacked


def _readout(network: Network, top: list[int], prefix: str) -> tuple[np.ndarray, str]:
    """``(C, mode)``: the output as ``C h_T`` (``"last"``) or ``C h_t`` at every step (``"all"``)."""
    stacked = _stacked_states(network, top, prefix)
    T, H = len(top), network.op(top[0]).size
    if network.output == stacked:
        W = np.eye(T * H)
    else:
        if network.op(network.output).weight_err is not None:  # its rounding is not carried here (docs/math.md §10.3)
            _refuse(network, "the read-out was composed in floating point at load (a folded linear chain)")
        W = network.op(network.output).weight
        W = W.toarray() if sp.issparse(W) else np.asarray(W, dtype=np.float64)
    if not np.any(W[:, :(T - 1) * H]):
        return W[:, (T - 1) * H:], "last"
    m = W.shape[0] // T
    C = W[:m, :H]
    if W.shape[0] == m * T and np.array_equal(W, np.kron(np.eye(T), C)):
        return C, "all"
    _refuse(network, "the read-out mixes time steps (neither the last state nor the same map at every step)")


def state_space(network: Network) -> StateSpace:
    """The state-space form of a network loaded from an RNN model unrolled over ``T >= 2`` steps.

    Raises
    ------
    LipSDPError
        Not exactly one RNN (or unrolled loop), reading the network input itself, then an affine read-out."""
    try:
        return _recorded(network)
    except LipSDPError as exc:  # a loop unrolled by the exporter, or a read-out of h_n: the cell read from the graph
        try:
            U, W, activation, C, mode = recognise(network)
        except LipSDPError:
            if not network.meta.get("recurrent"):
                raise  # no nn.RNN: the reason the unrolled graph is not one cell
            raise exc from None
        return StateSpace(U=U, W=W, activation=activation, C=C, mode=mode, name="unrolled")


def _recorded(network: Network) -> StateSpace:
    """:func:`state_space` from the loader's record of the one ``nn.RNN`` (``network.meta["recurrent"]``)."""
    records = network.meta.get("recurrent", [])
    if len(records) != 1:
        _refuse(network, f"the model has {len(records)} nn.RNN modules (lipsdp reads exactly one)")
    rec = records[0]
    if not rec["reads_input"]:
        _refuse(network, "the RNN reads a transformed input (only a model whose input goes straight "
                "into the RNN has a state-space form here)")
    if len(rec["steps"][0]) < 2:
        _refuse(network, "the model was saved for one step, which does not show how it reads its states")
    names = {network.op(n).name: n for n in network.graph.nodes}
    if any(s not in names for layer in rec["steps"] for s in layer):
        _refuse(network, "some of the RNN's states are not in the network")
    C, mode = _readout(network, [names[s] for s in rec["steps"][-1]], rec["name"] + ".")
    return StateSpace(U=[np.asarray(u, dtype=np.float64) for u, _ in rec["weights"]],
                      W=[np.asarray(w, dtype=np.float64) for _, w in rec["weights"]],
                      activation=rec["activation"], C=np.asarray(C, dtype=np.float64), mode=mode,
                      name=rec["name"])


# -- the dissipation LMI ------------------------------------------------------------
class _Coo:
    """COO triplets ``(row, col, val, var)`` of ``sum_j x_j M_j``, both triangles."""

    def __init__(self):
        self.parts: list = []

    def put(self, r, c, v, j) -> None:
        r, c = np.atleast_1d(r), np.atleast_1d(c)
        r, c = np.broadcast_arrays(r, c)
        self.parts.append((r.ravel(), c.ravel(), np.broadcast_to(v, r.shape).ravel().astype(np.float64),
                           np.broadcast_to(j, r.shape).ravel().astype(np.int64)))

    def arrays(self):
        return tuple(np.concatenate([p[k] for p in self.parts]) for k in range(4))


def _layout(ss: StateSpace) -> tuple[int, list, list]:
    """``(n, s_idx, h_idx)``: the LMI's size and the indices of each layer's old and new state in
    ``z = (dx, ds, dh)``."""
    n_in, sizes = ss.input_size, ss.sizes
    S, off = sum(sizes), np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    s_idx = [n_in + off[k] + np.arange(h) for k, h in enumerate(sizes)]
    h_idx = [n_in + S + off[k] + np.arange(h) for k, h in enumerate(sizes)]
    return n_in + 2 * S, s_idx, h_idx


def _storage_terms(coo: _Coo, S: int, first: int, s_of, h_of, sign_s: float, sign_h: float) -> list[str]:
    """``sign_s ds^T P ds + sign_h dh^T P dh`` with ``P``'s upper triangle as variables from ``first``."""
    a, b = np.triu_indices(S)
    j = first + np.arange(len(a))
    for (ra, rb), sign in (((s_of[a], s_of[b]), sign_s), ((h_of[a], h_of[b]), sign_h)):
        if sign:
            coo.put(ra, rb, sign, j)
            off = a != b
            coo.put(rb[off], ra[off], sign, j[off])
    return [f"P[{i},{k}]" for i, k in zip(a, b)]


def _output_const(ss: StateSpace, idx: np.ndarray, n: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """``C^T C`` (and ``|C|^T |C|``) placed on the rows ``idx`` of an ``n x n`` matrix."""
    full = sp.csr_matrix((np.ones(len(idx)), (np.arange(len(idx)), idx)), shape=(len(idx), n))
    C = sp.csr_matrix(ss.C)
    return ((full.T @ (C.T @ C) @ full).tocsr(), (full.T @ (abs(C).T @ abs(C)) @ full).tocsr())


def dissipation_lmi(ss: StateSpace) -> LMIProblem:
    r"""The dissipation LMI of docs/math.md §13.2 in ``x = (rho, t, P)`` on ``z = (dx, ds, dh)``:

    .. math:: M = \operatorname{blkdiag}(-\rho I, -P, P) + [\text{read-out}] + \sum_i t_i F_i \preceq 0,

    with ``F_i`` the slope QC of neuron ``i`` (pre-activation ``W ds + U dx`` or ``U dh`` of the
    layer below, output ``dh_i``) and the read-out term ``E^T C^T C E`` on the top layer's new
    state when every state is read (``mode == "all"``; for ``"last"`` it is the storage condition
    :func:`storage_lmi`).
    """
    n, s_idx, h_idx = _layout(ss)
    alpha, beta = SECTOR[ss.activation]
    coo, n_in = _Coo(), ss.input_size
    coo.put(np.arange(n_in), np.arange(n_in), -1.0, 0)
    labels, j = ["rho"], 1
    for k, (U, W) in enumerate(zip(ss.U, ss.W)):
        src = np.arange(n_in) if k == 0 else h_idx[k - 1]
        for i in range(W.shape[0]):
            p_idx, p_val = np.concatenate([s_idx[k], src]), np.concatenate([W[i], U[i]])
            p_idx, p_val, q = p_idx[p_val != 0], p_val[p_val != 0], h_idx[k][i]
            coo.put(p_idx, q, (alpha + beta) * p_val, j)
            coo.put(q, p_idx, (alpha + beta) * p_val, j)
            coo.put(q, q, -2.0, j)
            if alpha * beta:
                coo.put(p_idx[:, None], p_idx[None, :], -2.0 * alpha * beta * np.outer(p_val, p_val), j)
            labels.append(f"t[{k}][{i}]")
            j += 1
    s_all, h_all = np.concatenate(s_idx), np.concatenate(h_idx)
    labels += _storage_terms(coo, len(s_all), j, s_all, h_all, -1.0, 1.0)
    rows, cols, vals, var = coo.arrays()
    if ss.mode == "all":
        const, const_abs = _output_const(ss, h_idx[-1], n)
    else:
        const = const_abs = sp.csr_matrix((n, n))
    n_var = len(labels)
    return LMIProblem(n=n, input_dim=n_in, const=const, const_abs=const_abs, rows=rows, cols=cols, vals=vals,
                      var=var, objective=np.eye(n_var)[0], nonneg=np.arange(n_var) < j, labels=labels,
                      formulation="dissipation", const_terms=max(1, ss.C.shape[0]))


def storage_lmi(ss: StateSpace, lmi: LMIProblem) -> LMIProblem:
    """``E^T C^T C E - P < 0`` (``mode == "last"``) or ``-P < 0`` (``"all"``) in ``lmi``'s variables."""
    S = sum(ss.sizes)
    first = int(np.sum(lmi.nonneg))
    coo = _Coo()
    idx = np.arange(S)
    _storage_terms(coo, S, first, idx, idx, -1.0, 0.0)
    rows, cols, vals, var = coo.arrays()
    if ss.mode == "last":
        const, const_abs = _output_const(ss, idx[S - ss.sizes[-1]:], S)
    else:
        const = const_abs = sp.csr_matrix((S, S))
    return LMIProblem(n=S, input_dim=0, const=const, const_abs=const_abs, rows=rows, cols=cols, vals=vals,
                      var=var, objective=np.zeros(lmi.n_var), nonneg=lmi.nonneg, labels=lmi.labels,
                      formulation="storage", const_terms=max(1, ss.C.shape[0]), n_in=0)


def _cvx_matrix(cp, lmi: LMIProblem, x):
    """``M(x)`` as a symmetric cvxpy expression."""
    n = lmi.n
    A = sp.csr_matrix((lmi.vals, (lmi.rows.astype(np.int64) * n + lmi.cols, lmi.var)), shape=(n * n, lmi.n_var))
    M = cp.reshape(A @ x, (n, n), order="C") + lmi.const.toarray()
    return (M + M.T) / 2


def solve_dissipation(lmi: LMIProblem, storage: LMIProblem, solver: str) -> tuple[np.ndarray | None, str]:
    """``min rho`` subject to ``M(x) <= -eps I``, ``storage(x) <= -eps I``, ``rho, t >= 0`` with the cvxpy
    ``solver``: ``(x, status)``; ``x`` is None without a solution.  Never trusted: see :func:`verify`.
    SCS runs to ``1e-6`` (its default, ``1e-4``, leaves the verified bound ~1e-4 relative above the optimum)."""
    import cvxpy as cp

    x = cp.Variable(lmi.n_var)
    cons = [_cvx_matrix(cp, lmi, x) << -MARGIN * np.eye(lmi.n),
            _cvx_matrix(cp, storage, x) << -MARGIN * np.eye(storage.n), x[np.flatnonzero(lmi.nonneg)] >= 0]
    problem = cp.Problem(cp.Minimize(x[0]), cons)
    try:
        problem.solve(solver=solver, **({"eps_abs": 1e-6, "eps_rel": 1e-6} if solver == "SCS" else {}))
    except cp.error.SolverError as exc:
        return None, f"solver_error ({exc})"
    value = None if x.value is None or problem.status not in ("optimal", "optimal_inaccurate") else x.value
    return value, problem.status


def _solve_and_verify(ss: StateSpace, lmi: LMIProblem, storage: LMIProblem):
    """Clarabel (an interior-point method: accurate) then SCS, or SCS first beyond :data:`IPM_MAX_VARS`
    variables (each interior-point step costs about ``n_var^3``); the first point that verifies."""
    import cvxpy as cp

    status = "no solver"
    order = ("CLARABEL", "SCS") if lmi.n_var <= IPM_MAX_VARS else ("SCS", "CLARABEL")
    for solver in [s for s in order if s in cp.installed_solvers()]:
        x, status = solve_dissipation(lmi, storage, solver)
        if x is None and status.startswith("infeasible"):
            break  # refusing is always safe: no second solver for a problem reported infeasible
        if x is None:
            continue
        ver = verify(lmi, x)
        if ver.verified:
            return ver, status, solver.lower()
        status = f"{status}, not verified: {ver.message}"
    raise _no_gain(ss, status)


def _probe(model, input_shape, trust_pickle: bool) -> Network:
    """The model unrolled over :data:`PROBE_HORIZON` steps (or the steps a file was saved for)."""
    if isinstance(model, Network):
        return model
    fixed = fixed_horizon(model)
    shape = input_shape if input_shape is not None or fixed else horizon_shape(model, PROBE_HORIZON,
                                                                               trust_pickle=trust_pickle)
    if isinstance(model, (str, os.PathLike)):
        return load_network(model, input_shape=shape, trust_pickle=trust_pickle)
    return network_from_module(model, input_shape=shape)


def _stability(ss: StateSpace, storage: LMIProblem, ver) -> dict:
    """Prove the storage condition on the verified point; refuse without it."""
    ok, margin = rigorous_negative_definite(storage, ver.x)
    what = "P - C^T C > 0" if ss.mode == "last" else "P > 0"
    if not ok:
        raise WellPosednessError(f"no all-horizon bound: the storage condition {what} could not be proved "
                                 "for the verified multipliers")
    return {"proved": True, "condition": f"M(rho, t, P) < 0 and {what}, both verified (docs/math.md §13.2)",
            "storage_margin": float(margin), "lmi_margin": float(ver.margin),
            "message": "proved: the recurrence is an incremental contraction in the P-norm, so the bound holds "
                       "for every horizon and the state forgets its initial value"}


def _no_gain(ss: StateSpace, status: str) -> WellPosednessError:
    norms = ", ".join(f"{np.linalg.norm(W, 2):.4g}" for W in ss.W)
    return WellPosednessError(
        f"no all-horizon bound: the dissipation LMI has no solution ({status}); ||W_hh|| = {norms}: the recurrence "
        "is not proved to be an incremental contraction, and its gain over unbounded horizons may be infinite; "
        "certify a horizon (horizon=T, --horizon T) instead")


#: Options of :func:`lipsdp.certify` the all-horizon bound does not offer, with their defaults.
_DEFAULTS = {"norm": "l2", "strict": False, "split": None, "solver": "auto", "formulation": "neuron",
             "output": (None, None), "center": None}


def certify_all_horizons(model, input_shape=None, trust_pickle: bool = False, lower_bound_samples: int = 128,
                         **options) -> Certificate:
    """Certify one bound on the l2 Lipschitz constant of an RNN model valid for every horizon ``T``.

    Parameters
    ----------
    model : str, os.PathLike, torch.nn.Module or Network
        An ``nn.RNN`` model (whole-module pickle, TorchScript, ``torch.export``), or a network
        already unrolled by the loader over at least two steps.  The model must feed its input
        straight into one ``nn.RNN`` and return an affine read-out of its last state or of every
        state (docs/math.md §13.2).
    input_shape : tuple of int, optional
        ``(T, input_size)`` to unroll at when reading the model (default ``T = 12``).
    lower_bound_samples : int
        Random sequences (of the probe horizon) for the sampled lower bound.
    **options
        :func:`lipsdp.certify`'s ``norm``, ``strict``, ``split``, ``solver``, ``formulation`` and
        ``output`` (``(output_map, output_index)``): only their defaults; others are refused, never
        ignored (the bound is the l2 gain of the whole output, from Clarabel or SCS, float-verified).

    Returns
    -------
    Certificate
        ``formulation == "dissipation"``; ``network["horizon"] == "all"``, ``network["output"]`` the
        read-out (``"last"`` or ``"all"``), ``network["stability"]`` the proof.

    Raises
    ------
    LipSDPError
        The model has no such state-space form (the reason is in the message).
    WellPosednessError
        No verified solution: no finite all-horizon bound is proved.
    """
    for name, value in options.items():
        if name not in _DEFAULTS or value != _DEFAULTS[name]:
            raise LipSDPError(f"horizon='all' does not support {name}={value!r}: it certifies the l2 gain of the "
                              "whole output with its own LMI (docs/math.md §13.2)")
    t0 = time.perf_counter()
    network = _probe(model, input_shape, trust_pickle)
    ss = state_space(network)
    t1 = time.perf_counter()
    lmi = dissipation_lmi(ss)
    storage = storage_lmi(ss, lmi)
    ver, status, solver = _solve_and_verify(ss, lmi, storage)
    t2 = time.perf_counter()
    stability = _stability(ss, storage, ver)
    t3 = time.perf_counter()
    lower = sampled_lower_bound(network, lower_bound_samples) if lower_bound_samples else None
    summary = {"source": network.source, "input_dim": ss.input_size, "output_dim": int(ss.C.shape[0]),
               "hidden_neurons": int(sum(ss.sizes)), "layers": [f"RNN[{h}]" for h in ss.sizes],
               "lmi_size": lmi.n, "horizon": "all", "output": ss.mode, "activation": ss.activation,
               "lower_bound_horizon": network.op(network.input).shape[0], "stability": stability,
               "sha256": network.fingerprint()}  # of the network unrolled at that horizon: lipsdp verify
    return Certificate(ver.bound, VERIFIED, formulation="dissipation", solver=solver, solver_status=status,
                       message=f"verified for every horizon: L <= {ver.bound:.6g} (read-out of the "
                               f"{'last state' if ss.mode == 'last' else 'states at every step'})",
                       trivial_bound=all_horizon_trivial_bound(ss), lower_bound=lower, rho=ver.rho,
                       multipliers=[float(v) for v in ver.x[1:]], multiplier_labels=lmi.labels[1:],
                       verification={"method": ver.method, "inflation": ver.inflation, "margin": ver.margin,
                                     "message": ver.message},
                       timings={"load": t1 - t0, "solve": t2 - t1, "verify": t3 - t2,
                                "total": time.perf_counter() - t0}, network=summary)
