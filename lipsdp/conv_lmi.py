"""The structured LMIs of a conv chain: build, solve and rigorous verification (docs/math.md §7.4).

One small LMI per convolution, of size ``kh C_out + kw C_in`` (independent of the image), coupled
only through channel supplies ``X_l`` (symmetric ``C_l x C_l``, the same at every position); the flatten +
linear read-out enters through ``q x q`` Gram matrices.  The solver's point is never trusted: :func:`verify_chain` re-derives the
supplies backwards from the read-out to the input (each one a Schur complement of a small block) and
proves every block negative definite in floating point with the error bounds of docs/math.md §10.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import scipy.linalg as sla

from lipsdp import conv_ipm
from lipsdp.convnet import ConvChain, ConvLayer
from lipsdp.errors import LipSDPError, SolverError
from lipsdp.roesser import causal_kernel, realise
from lipsdp.conv_readout import (ReadOut, least_proving, prove_negative_definite, prove_read_out,  # noqa: F401
                                 read_outs, tail_gain)

#: Relative margin the SDP asks of every block, so that the verified point is strictly feasible.
MARGIN = 1e-6
#: Bound on the storage matrices' spectral norms, relative to the read-out's squared norm and the square root of
#: their size (:func:`lipsdp.conv_ipm.storage_bound`, docs/math.md §7.4.1).
STORAGE_BOUND = 100.0


@dataclass
class LayerBlocks:
    """The constant matrices of one layer's LMI in ``z = (x_h, x_v, u, w)`` (docs/math.md §7.4)."""

    Fh: np.ndarray  # next horizontal state
    Fv: np.ndarray  # next vertical state
    Sh: np.ndarray  # current horizontal state
    Sv: np.ndarray
    Eu: np.ndarray
    Ew: np.ndarray
    L: np.ndarray  # QC: (L z)^T diag(lam) (R z) >= 0, L = Ew - a V, R = b V - Ew
    R: np.ndarray

    @property
    def n(self) -> int:
        return self.Eu.shape[1]


def layer_blocks(layer: ConvLayer) -> LayerBlocks:
    """The matrices of ``layer``'s dissipation inequality, with the sector widened to contain 0."""
    sys = realise(causal_kernel(layer.weight))
    n1, n2, ci, co = sys.n1, sys.n2, sys.inputs, sys.outputs
    n = n1 + n2 + ci + co
    F = np.hstack([sys.state_map(), np.zeros((n1 + n2, co))])
    V = np.hstack([sys.output_map(), np.zeros((co, co))])
    eye = np.eye(n)
    a, b = min(layer.sector[0], 0.0), max(layer.sector[1], 0.0)  # masked positions: docs/math.md §7.4
    Ew = eye[n1 + n2 + ci:]
    return LayerBlocks(F[:n1], F[n1:], eye[:n1], eye[n1:n1 + n2], eye[n1 + n2:n1 + n2 + ci], Ew,
                       Ew - a * V, b * V - Ew)


def layer_matrix(B: LayerBlocks, P1, P2, X_in, X_out, lam) -> np.ndarray:
    """``M_l`` in float64 (symmetric by construction); ``X_in``, ``X_out`` symmetric matrices."""
    QC = B.L.T @ (lam[:, None] * B.R)
    return (B.Fh.T @ P1 @ B.Fh + B.Fv.T @ P2 @ B.Fv - B.Sh.T @ P1 @ B.Sh - B.Sv.T @ P2 @ B.Sv
            - B.Eu.T @ X_in @ B.Eu + B.Ew.T @ X_out @ B.Ew + 0.5 * (QC + QC.T))


def _abs_matrix(B: LayerBlocks, P1, P2, X_in, X_out, lam) -> np.ndarray:
    a = np.abs
    QC = a(B.L.T) @ (a(lam)[:, None] * a(B.R))
    return (a(B.Fh.T) @ a(P1) @ a(B.Fh) + a(B.Fv.T) @ a(P2) @ a(B.Fv) + B.Sh.T @ a(P1) @ B.Sh
            + B.Sv.T @ a(P2) @ B.Sv + B.Eu.T @ a(X_in) @ B.Eu + B.Ew.T @ a(X_out) @ B.Ew + 0.5 * (QC + QC.T))


def _terms(B: LayerBlocks) -> int:
    """Longest chain of roundings in one entry of ``M_l``: two products of ``n``-sums plus the sums."""
    return 2 * B.n + 16


@dataclass
class StructuredResult:
    """Outcome of the structured path.

    Attributes
    ----------
    verified : bool
    bound : float or None
        ``sqrt(rho * t)`` rounded up, proven; None when nothing verified.
    rho : float or None
        Input supply (``X_0 = rho I``) verified with the read-out normalised to ``t``.
    tail_gain : float or None
        ``t``: proven ``W^T W <= t X_L (x) I`` for the read-out ``W``.
    message : str
    timings : dict
    details : dict
        LMI sizes, solver and the verified supplies.
    """

    verified: bool
    bound: float | None
    rho: float | None
    tail_gain: float | None
    message: str
    timings: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)


def repair_layer(B: LayerBlocks, P1, P2, lam, X_out, scalar: bool) -> np.ndarray | None:
    """The input supply that makes the layer's block provably negative definite, given the rest.

    ``X_in`` enters only the ``u`` block, so the least admissible one is the Schur complement ``S`` of the
    other rows; it is raised by ``eta I`` (the least eta of a grid, within 2x) until
    :func:`prove_negative_definite` passes (``scalar``: ``X_in = rho I`` with ``rho >= lambda_max(S)``)."""
    ci = B.Eu.shape[0]
    M0 = layer_matrix(B, P1, P2, np.zeros((ci, ci)), X_out, lam)
    u = np.flatnonzero(B.Eu.sum(axis=0))
    rest = np.setdiff1d(np.arange(B.n), u)
    try:
        Lc = sla.cho_factor(-M0[np.ix_(rest, rest)], check_finite=False)
    except sla.LinAlgError:
        return None
    S = _sym(M0[np.ix_(u, u)] + M0[np.ix_(u, rest)] @ sla.cho_solve(Lc, M0[np.ix_(rest, u)], check_finite=False))
    X = float(np.linalg.eigvalsh(S)[-1]) * np.eye(ci) if scalar else S
    scale = float(np.abs(X).max()) + np.finfo(float).tiny

    def proven(eta: float) -> np.ndarray | None:
        X_try = X + eta * scale * np.eye(ci)
        M = layer_matrix(B, P1, P2, X_try, X_out, lam)
        return X_try if prove_negative_definite(M, _abs_matrix(B, P1, P2, X_try, X_out, lam), _terms(B)) else None
    # The least eta within 2x: the excess becomes the previous block's output supply (docs/math.md §7.4.1)
    return least_proving(proven, (1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2))


def _layer_constraint(cp, B: LayerBlocks, P1, P2, X_in, X_out, lam, margin: float):
    """``M_l(P1, P2, X_in, X_out, lam) <= -margin I`` as a cvxpy constraint."""
    M = (B.Fh.T @ P1 @ B.Fh + B.Fv.T @ P2 @ B.Fv - B.Sh.T @ P1 @ B.Sh - B.Sv.T @ P2 @ B.Sv
         - B.Eu.T @ X_in @ B.Eu + B.Ew.T @ X_out @ B.Ew)
    QC = B.L.T @ cp.diag(lam) @ B.R
    M = M + 0.5 * (QC + QC.T)
    return 0.5 * (M + M.T) + margin * np.eye(B.n) << 0


def _zero_or_sym(cp, n: int):
    return cp.Variable((n, n), symmetric=True) if n else np.zeros((0, 0))


def solve_chain(chain: ConvChain, blocks: list[LayerBlocks], solver: str = "auto",
                time_limit: float | None = None) -> dict:
    """Solve the structured SDP: minimise ``rho`` (docs/math.md §7.4).  Returns float multipliers
    ``{"P1": [...], "P2": [...], "lam": [...], "x": [X_1, ..., X_L], "Y": Y, "rho": float, "solver": name}``.

    ``auto`` and ``conv-ipm`` run :func:`lipsdp.conv_ipm.solve` (the chain-structured interior point,
    docs/math.md §7.4.1); ``auto`` falls back to cvxpy (:func:`fallback_solver`) when its point is not
    finite.  Another name (``clarabel``, ``scs``, ...) asks cvxpy for that solver.  Whatever solves,
    :func:`verify_chain` proves the bound.
    """
    if solver in ("auto", conv_ipm.NAME):
        sup = supply_scales(chain)
        margins = [MARGIN * min(a, b) for a, b in zip(sup[:-1], sup[1:])]
        bounds = [STORAGE_BOUND * max(a, b) for a, b in zip(sup[:-1], sup[1:])]
        sol = conv_ipm.solve(blocks, chain.tail, margin=margins, bound=bounds, time_limit=time_limit)
        if solver != "auto" or all(np.all(np.isfinite(v)) for v in _flat(sol)):
            return sol
        solver = _pick_solver(blocks)
    return _solve_cvxpy(chain, blocks, solver, time_limit)


def supply_scales(chain: ConvChain) -> list[float]:
    """``s_0, ..., s_L``: the size to expect of layer ``k``'s input supply (``s_0`` for ``rho``, ``s_L = 1`` for
    the read-out's), relative to the read-out's squared norm: the squared gains of the layers after it
    (norm of the unrolled convolution times the largest slope).  The margins and storage bounds of each
    layer's block scale with them (docs/math.md §7.4.1): with one scale for all layers, a trained net whose
    layers' gains compound is solved with storages too small to be feasible and margins too small to
    survive rounding.  Only the solver's point depends on them; the verification does not."""
    s, out = 1.0, [1.0]
    for layer in reversed(chain.layers):
        slope = max(abs(layer.sector[0]), abs(layer.sector[1]))
        s *= max(layer.norm() * slope, 1e-3) ** 2
        out.append(s)
    return out[::-1]


def fallback_solver(blocks: list[LayerBlocks], sol: dict) -> str | None:
    """The cvxpy solver ``auto`` tries when the structured interior point's point did not verify: Clarabel
    while it fits (:func:`_pick_solver`), None when the point ran out of time or the chain is too large
    for Clarabel (SCS would not finish those either)."""
    if sol["solver"] != conv_ipm.NAME or sol["status"] == "time_limit" or _pick_solver(blocks) != "clarabel":
        return None
    return "clarabel"


def _flat(sol: dict) -> list:
    return [np.asarray(v) for key in ("P1", "P2", "lam", "x") for v in sol[key]] + [sol["Y"], np.asarray(sol["rho"])]


def _solve_cvxpy(chain: ConvChain, blocks: list[LayerBlocks], name: str, time_limit: float | None) -> dict:
    """The structured SDP through cvxpy (Clarabel, SCS or another installed conic solver)."""
    import cvxpy as cp  # the optional solver stack loads only when the structured path runs

    if name.upper() not in cp.installed_solvers():
        raise LipSDPError(f"unknown solver {name!r} for the structured SDP: auto, {conv_ipm.NAME} or a cvxpy "
                          f"solver ({', '.join(s.lower() for s in cp.installed_solvers())})")

    scale = float(np.linalg.norm(chain.tail, 2)) ** 2 or 1.0
    rho = cp.Variable()
    xs = [cp.Variable((layer.out_shape[0],) * 2, symmetric=True) for layer in chain.layers]
    C = chain.layers[-1].out_shape[0]
    Y = cp.Variable((C, C), symmetric=True)
    P1s = [_zero_or_sym(cp, B.Sh.shape[0]) for B in blocks]
    P2s = [_zero_or_sym(cp, B.Sv.shape[0]) for B in blocks]
    lams = [cp.Variable(B.Ew.shape[0], nonneg=True) for B in blocks]
    q = chain.tail.shape[0]
    Wc = chain.tail.reshape(q, C, -1)
    grams = np.einsum("icn,jdn->cdij", Wc, Wc).reshape(C * C, q * q)  # W_c W_d^T
    A = cp.reshape(grams.T @ cp.vec(Y, order="C"), (q, q), order="C")
    cons = [0.5 * (A + A.T) << np.eye(q), cp.bmat([[xs[-1], np.eye(C)], [np.eye(C), Y]]) >> 0]
    sup = supply_scales(chain)
    for k, B in enumerate(blocks):
        x_in = rho * np.eye(B.Eu.shape[0]) if k == 0 else xs[k - 1]
        cons.append(_layer_constraint(cp, B, P1s[k], P2s[k], x_in, xs[k], lams[k],
                                      MARGIN * scale * min(sup[k], sup[k + 1])))
        # bounded storages (spectral norm, as lipsdp.conv_ipm): the infimum can send them to infinity,
        # leaving a point the margin cannot protect (docs/math.md §7.4.1)
        for P in (P1s[k], P2s[k]):
            if not isinstance(P, np.ndarray):
                eye = conv_ipm.storage_bound(STORAGE_BOUND * scale * max(sup[k], sup[k + 1]), P.shape[0]) \
                    * np.eye(P.shape[0])
                cons += [eye - P >> 0, eye + P >> 0]
    prob = cp.Problem(cp.Minimize(rho), cons)
    opts = {"clarabel": {}, "scs": {"eps_abs": 1e-7, "eps_rel": 1e-7, "max_iters": 50000}}.get(name, {})
    if time_limit is not None:  # the run's limit (lipsdp.budget): an unfinished point is still verified
        opts["time_limit_secs" if name == "scs" else "time_limit"] = float(time_limit)
    try:
        prob.solve(solver=name.upper(), **opts)
    except cp.error.SolverError as exc:
        raise SolverError(f"the structured SDP failed in {name}: {exc}") from None
    if rho.value is None:
        raise SolverError(f"the structured SDP returned no point ({name}: {prob.status})")
    val = (lambda v: np.zeros((0, 0)) if isinstance(v, np.ndarray) else np.asarray(v.value, dtype=np.float64))
    return {"P1": [val(P) for P in P1s], "P2": [val(P) for P in P2s],
            "lam": [np.asarray(v.value, dtype=np.float64) for v in lams],
            "x": [np.asarray(v.value, dtype=np.float64) for v in xs], "Y": np.asarray(Y.value, dtype=np.float64),
            "rho": float(rho.value),
            "solver": name, "status": prob.status, "iterations": prob.solver_stats.num_iters}


def _pick_solver(blocks: list[LayerBlocks]) -> str:
    """Clarabel (interior point, accurate) while its dense cone blocks stay small, SCS beyond."""
    svec = sum((B.n * (B.n + 1) // 2) ** 2 for B in blocks)
    return "clarabel" if svec <= 4e7 else "scs"


def verify_chain(chain: ConvChain, blocks: list[LayerBlocks], sol: dict) -> StructuredResult:
    """Re-derive and prove the bound from the solver's multipliers, backwards along the chain.

    The read-out fixes ``t`` and ``X_L`` (:func:`lipsdp.conv_readout.read_outs`: the solver's ``Y`` as it
    is first, then regularised candidates); each layer then gets the least input supply its block allows
    (:func:`repair_layer`) and is proven negative definite; the first layer's input supply is ``rho I``.
    The first read-out whose layers all prove gives the bound ``sqrt(rho t)`` rounded up (docs/math.md
    §7.4); when none does, the first read-out's failure is reported.
    """
    first = None
    for got in read_outs(chain, sol["Y"], sol["x"][-1] if len(sol["x"]) else None):
        res = _prove_layers(chain, blocks, sol, got)
        if res.verified:
            return res
        first = first or res
    return first or StructuredResult(False, None, None, None, "the read-out's Gram bound was not proven")


def _prove_layers(chain: ConvChain, blocks: list[LayerBlocks], sol: dict, got: ReadOut) -> StructuredResult:
    """The layers' supplies repaired backwards from a proven read-out ``got`` (:func:`verify_chain`)."""
    t, x_out = got.t, got.X_L
    supplies = [x_out]
    for k in range(len(blocks) - 1, -1, -1):
        P1, P2 = _sym(sol["P1"][k]), _sym(sol["P2"][k])
        lam = np.maximum(sol["lam"][k], 0.0)
        x_in = repair_layer(blocks[k], P1, P2, lam, x_out, scalar=k == 0)
        if x_in is None:
            return StructuredResult(False, None, None, t, f"layer {chain.layers[k].name}: the block was not "
                                    "proven negative definite")
        supplies.append(x_in)
        x_out = x_in
    rho = float(x_out[0, 0])
    bound = _round_up_sqrt(Fraction(rho) * Fraction(t))
    return StructuredResult(True, bound, rho, t, "verified", details={
        "supplies": [s.tolist() for s in reversed(supplies)], "read_out_Y": got.Y})


def _sym(P: np.ndarray) -> np.ndarray:
    return 0.5 * (P + P.T)


def _round_up_sqrt(target: Fraction) -> float:
    """Smallest float ``L`` with ``L * L >= target`` exactly."""
    L = math.sqrt(float(target))
    while Fraction(L) ** 2 < target:
        L = math.nextafter(L, math.inf)
    return L


def certify_chain(chain: ConvChain, solver: str = "auto", time_limit: float | None = None) -> StructuredResult:
    """Build, solve and verify the structured LMIs of ``chain``."""
    t0 = time.perf_counter()
    blocks = [layer_blocks(layer) for layer in chain.layers]
    t1 = time.perf_counter()
    sol = solve_chain(chain, blocks, solver, time_limit)
    t2 = time.perf_counter()
    res = verify_chain(chain, blocks, sol)
    if not res.verified:
        sol, res = _earlier_point(chain, blocks, sol, res, None if time_limit is None else t1 + time_limit)
    fallback = fallback_solver(blocks, sol) if solver == "auto" and not res.verified else None
    if fallback is not None:  # the solver is never trusted, and auto does not give up on its first point
        left = None if time_limit is None else max(time_limit - (time.perf_counter() - t1), 1.0)
        try:
            again = _solve_cvxpy(chain, blocks, fallback, left)
        except SolverError:  # the first point's unverified result stands, with its reason
            again = None
        if again is not None:
            sol, t2 = again, time.perf_counter()
            res = verify_chain(chain, blocks, sol)
    # what lipsdp verify proves again, with the read-out's Y the proof used (the solver's, or regularised)
    res.details["point"] = stored_point(sol, res.details.pop("read_out_Y")) if res.verified else None
    t3 = time.perf_counter()
    res.timings = {"build": t1 - t0, "solve": t2 - t1, "verify": t3 - t2}
    res.details.update({"solver": sol["solver"], "solver_status": sol["status"],
                        "solver_objective": math.sqrt(max(sol["rho"], 0.0)),
                        "solver_iterations": sol["iterations"], "lmi_sizes": [B.n for B in blocks],
                        "read_out": "W^T W <= t X_L (x) I_space: t I >= sum_cd Y_cd W_c W_d^T (q x q), X_L >= Y^-1"})
    return res


def _earlier_point(chain: ConvChain, blocks: list[LayerBlocks], sol: dict, res: StructuredResult,
                   deadline: float | None) -> tuple[dict, StructuredResult]:
    """The newest of the solver's earlier iterates (``sol["earlier"]``, newest first) that verifies, when the
    final one does not: near the optimum the last iterates can come closer to the boundary than the
    verification's rounding margin allows, while the ones just before still prove a bound (trained 32x4 CNN:
    iterations 50 and 51 verified, 52 to 54 did not).  Each is verified as any point is; ``(sol, res)``
    unchanged when none does or ``deadline`` (``time.perf_counter``) has passed."""
    for back, earlier in enumerate(sol.get("earlier") or (), start=1):
        if deadline is not None and time.perf_counter() > deadline:
            break
        candidate = {**sol, **earlier}
        got = verify_chain(chain, blocks, candidate)
        if got.verified:
            got.message = f"verified at the solver's iterate {back} before its last ({res.message} at the last)"
            return candidate, got
    return sol, res


# ---------------------------------------------------------------------------------------------------
# ``lipsdp verify``: the stored point and supplies proven again, nothing solved (lipsdp.structured_check).


def stored_point(sol: dict, Y: np.ndarray | None = None) -> dict:
    """The solver's storages, slope multipliers and the read-out's ``Y`` (``Y``: the one the read-out was
    proven with, :func:`lipsdp.conv_readout.read_out`; default the solver's) as JSON lists (the supplies
    are stored beside them): with them :func:`recheck_chain` proves every block again."""
    return {"P1": [np.asarray(P).tolist() for P in sol["P1"]], "P2": [np.asarray(P).tolist() for P in sol["P2"]],
            "lam": [np.asarray(v).tolist() for v in sol["lam"]],
            "Y": np.asarray(sol["Y"] if Y is None else Y).tolist()}


def recheck_chain(chain: ConvChain, point: dict, supplies: list, t: float) -> tuple[float | None, str]:
    """The bound ``sqrt(rho t)`` proven at a stored point (:func:`stored_point`), supplies ``X_0 = rho I,
    X_1, ..., X_L`` and read-out gain ``t``, with the tests of :func:`verify_chain`; ``(None, reason)``
    when a test fails.  Raises ``ValueError`` / ``IndexError`` / ``TypeError`` for a malformed point."""
    blocks = [layer_blocks(layer) for layer in chain.layers]
    X = [np.asarray(x, dtype=np.float64) for x in supplies]
    if len(X) != len(blocks) + 1 or any(len(point[k]) != len(blocks) for k in ("P1", "P2", "lam")):
        raise ValueError("the stored point does not fit the chain's layers")
    if not (np.all([np.all(np.isfinite(x)) for x in X]) and math.isfinite(t) and t >= 0):
        raise ValueError("the stored supplies or read-out gain are not finite")
    if (why := prove_read_out(chain, _sym(np.asarray(point["Y"], dtype=np.float64)), X[-1], t)) is not None:
        return None, why
    rho = float(X[0][0, 0])
    if not np.array_equal(X[0], rho * np.eye(X[0].shape[0])):
        return None, "the first supply is not rho I"
    for k, B in enumerate(blocks):
        P1, P2 = _sym(np.asarray(point["P1"][k], dtype=np.float64)), _sym(np.asarray(point["P2"][k], dtype=np.float64))
        lam = np.maximum(np.asarray(point["lam"][k], dtype=np.float64), 0.0)
        M = layer_matrix(B, P1, P2, X[k], X[k + 1], lam)
        if not prove_negative_definite(M, _abs_matrix(B, P1, P2, X[k], X[k + 1], lam), _terms(B)):
            return None, f"layer {chain.layers[k].name}: the block is not proven negative definite"
    return _round_up_sqrt(Fraction(rho) * Fraction(t)), "verified"
