"""An interior-point solve of the conv-chain SDP on its chain structure (docs/math.md §7.4, §7.4.1).

The SDP of :func:`lipsdp.conv_lmi.solve_chain` has one small block per convolution (size
``kh C_out + kw C_in``), the read-out's ``q x q`` Gram block and ``2 C x 2 C`` coupling block, and four
storage-bound blocks per layer (``B_P I -+ P`` for ``P1`` and ``P2``: the spectral norm of each storage
at most ``B_P = bound sqrt(n_P)``).  Every variable enters its blocks by congruence (``G^T P G`` with a
small ``G``), as a diagonal multiplier (``sym(L^T diag(lam) R)``) or through a few explicit matrices
(``rho``, the read-out's ``Y``).

With the variables grouped ``[rho, P1_1, P2_1, lam_1, X_1 | P1_2, P2_2, lam_2, X_2 | ... | ..., X_L, Y]``,
only the channel supply ``X_k`` (the tail of group ``k``) is shared by two layers' blocks, so the Schur
complement ``H_ij = tr(F_i X F_j Z)`` of the HKM direction is block-tridiagonal and couples group ``k`` to
the tail of group ``k - 1`` only.  Its entries come from products of small matrices (``G X K^T``, the
"symmetric Kronecker" form of docs/math.md §7.4.1), never from the constraint matrices one by one; it is
factored by a block Cholesky recursion with Jacobi scaling.  Memory and flops are linear in depth.

The iteration itself is :class:`lipsdp.interior.InteriorPoint`.  The point is only a candidate:
:func:`lipsdp.conv_lmi.verify_chain` proves (or refuses) the bound from it, as for every other solver.
"""

from __future__ import annotations

import time
import numpy as np
from scipy.linalg import LinAlgError

from lipsdp import conv_factor, progress, threads
from lipsdp.budget import checkpoint
from lipsdp.conv_schur import Entry, Var, adjoint_entry, apply_entry, pair_schur, skron, triangle, unpack
from lipsdp.errors import ResourceError
from lipsdp.interior import InteriorPoint
from lipsdp.resources import available_memory

#: Name reported to the progress display and in the certificate.
NAME = "conv-ipm"


#: Multiples of ``I`` (in the Jacobi-scaled units of the Schur complement) tried in turn to factor it: free
#: storages and supplies can make it singular near the optimum.
REGULARISATIONS = (1e-14, 1e-11, 1e-8)


#: Largest Schur group from which the iteration factors in single precision first (:meth:`ConvChainSDP.newton`):
#: below it the factor is cheap next to the refinement's extra products.
SINGLE_FROM = 1000


class OutOfTime(Exception):
    """The next iteration would not finish within the time limit (caught in :func:`solve`)."""


class Singular(Exception):
    """No regularisation factors the Schur complement, found in a solve (caught in :func:`solve`)."""


class Settled(Exception):
    """The gap is small enough, or the primal objective stopped moving while the dual residual floors (caught
    in :func:`solve`)."""


def storage_bound(bound: float, size: int) -> float:
    """``||P||_2 <= bound sqrt(size)`` for a ``size x size`` storage (docs/math.md §7.4.1)."""
    return bound * float(np.sqrt(size))


class ConvChainSDP:
    """The conv-chain SDP in the interface :class:`lipsdp.interior.InteriorPoint` iterates on.

    ``blocks``: the layers' :class:`lipsdp.conv_lmi.LayerBlocks`; ``grams``: ``W_c W_d^T`` (``C x C x q x q``)
    of the read-out normalised to unit spectral norm; ``margin``, ``bound`` (one number, or one per layer): the
    layer blocks' ``M_l <= -margin I`` and the storages' ``||P||_2 <= bound sqrt(n_P)`` in those units
    (docs/math.md §7.4.1).
    """

    def __init__(self, blocks, grams: np.ndarray, margin, bound):
        margins = np.broadcast_to(np.asarray(margin, dtype=np.float64), (len(blocks),))
        bounds = np.broadcast_to(np.asarray(bound, dtype=np.float64), (len(blocks),))
        self.rho = Var("rho", "scalar", 1)
        self.P1, self.P2, self.lam, self.X = [], [], [], []
        groups = []
        for k, B in enumerate(blocks):
            P1, P2 = Var(f"P1_{k}", "sym", B.Sh.shape[0]), Var(f"P2_{k}", "sym", B.Sv.shape[0])
            lam, X = Var(f"lam_{k}", "vec", B.Ew.shape[0]), Var(f"X_{k}", "sym", B.Ew.shape[0])
            self.P1.append(P1), self.P2.append(P2), self.lam.append(lam), self.X.append(X)
            groups.append(([self.rho] if k == 0 else []) + [v for v in (P1, P2) if v.size] + [lam, X])
        C, q = grams.shape[0], grams.shape[2]
        self.Y = Var("Y", "sym", C)
        groups[-1].append(self.Y)
        offset, self.group_sizes, self.group_offsets = 0, [], []
        for g, members in enumerate(groups):
            self.group_offsets.append(offset)
            local = 0
            for v in members:
                v.group, v.local, v.offset = g, local, offset
                v.tri = triangle(v.size) if v.kind == "sym" else ()
                local += v.dim
                offset += v.dim
            self.group_sizes.append(local)
        self.m = offset
        self.tails = [None] + [self.tail(g) for g in range(len(groups) - 1)]  # what group g couples to
        self.sizes, self.F0s, self.entries, self.history, self.refinements = [], [], [], [], []
        for k, B in enumerate(blocks):
            P1, P2 = self.P1[k], self.P2[k]
            ents = [Entry(P, "cong", [(1.0, F), (-1.0, S)]) for P, F, S in ((P1, B.Fh, B.Sh), (P2, B.Fv, B.Sv))
                    if P.size]
            ents.append(Entry(self.rho, "basis", -(B.Eu.T @ B.Eu).reshape(-1, 1)) if k == 0
                        else Entry(self.X[k - 1], "cong", [(-1.0, B.Eu)]))
            ents += [Entry(self.X[k], "cong", [(1.0, B.Ew)]), Entry(self.lam[k], "qc", (B.L, B.R))]
            self._block(margins[k] * np.eye(B.n), ents)
            for P in (P1, P2):
                for sign in (1.0, -1.0):  # B_P I - P >= 0 and B_P I + P >= 0
                    if P.size:
                        self._block(-storage_bound(bounds[k], P.size) * np.eye(P.size),
                                    [Entry(P, "cong", [(sign, np.eye(P.size))])])
        eye, zero = np.eye(C), np.zeros((C, C))
        self._block(-np.block([[zero, eye], [eye, zero]]),
                    [Entry(self.X[-1], "cong", [(-1.0, np.hstack([eye, zero]))]),
                     Entry(self.Y, "cong", [(-1.0, np.hstack([zero, eye]))])])
        ia, ib, w = self.Y.tri
        F = (grams[ia, ib] + grams[ib, ia]) * w[:, None, None]  # W (E_ab (x) I) W^T, symmetric
        self._block(-np.eye(q), [Entry(self.Y, "basis", F.reshape(len(ia), q * q).T)])
        self.nonneg = np.zeros(self.m, dtype=bool)
        for lam in self.lam:
            self.nonneg[lam.offset:lam.offset + lam.dim] = True
        self.objective = np.zeros(self.m)
        self.objective[self.rho.offset] = 1.0

    #: ``time.perf_counter()`` value the iteration must stop by (None: no limit), and the start of the last one.
    deadline: float | None = None
    last: float | None = None
    #: The lists holding the current factor (emptied when the next iteration starts).
    live: tuple = ()
    #: The Schur complement's diagonal blocks, reused by every iteration (:meth:`_buffers`), and their
    #: single-precision copies (:meth:`_singles`).
    diagonal: list | None = None
    single_blocks: list | None = None
    #: A copy of one diagonal block, to factor it again with more regularisation (:meth:`_double`).
    spare: np.ndarray | None = None
    #: Whether the next iteration factors in single precision first (:meth:`newton`), and the refinement
    #: steps each solve took (-1: not converged, the double factor took over).
    single: bool = True
    single_factors: int = 0
    refinements: list
    #: The :class:`~lipsdp.interior.InteriorPoint` iterating on this structure, the primal objectives seen,
    #: and the relative change under which the primal objective counts as settled (:meth:`_settled`).
    state = None
    history: list
    settle: float = 1e-7
    #: The relative gap at which the iteration stops (:meth:`_settled`): the verified bound then moves by
    #: less than ``1e-6`` relatively in the iterations after it (docs/performance.md).
    close: float = 1e-6

    def _block(self, F0, entries):
        self.sizes.append(F0.shape[0])
        self.F0s.append(F0)
        self.entries.append(entries)

    def tail(self, g: int) -> slice:
        """Local span of group ``g``'s channel supply ``X_g``, the only part the next group couples to."""
        X = self.X[g]
        return slice(X.local, X.local + X.dim)

    def memory_estimate(self, single: bool = True) -> int:
        """Bytes of one iteration: the Schur blocks (with ``single``, their single-precision copies too), a spare
        block and the couplings, the pair products, the iterates."""
        gs = np.array(self.group_sizes, dtype=np.float64)
        dims = max(v.dim for v in self.P1 + self.P2 + self.X + [self.Y])
        coupling = sum(g * x.dim for g, x in zip(gs[1:], self.X))
        return int(8 * ((1.7 if single else 1.2) * float(np.sum(gs ** 2)) + float(np.max(gs)) ** 2 + coupling
                        + 8 * dims ** 2 + 16 * sum(n * n for n in self.sizes) + 30 * self.m))

    # -- the interface InteriorPoint iterates on ------------------------------------------------------
    def linear(self, y):
        out = []
        for n, ents in zip(self.sizes, self.entries):
            M = np.zeros((n, n))
            for e in ents:
                M += apply_entry(e, y[e.var.offset:e.var.offset + e.var.dim], n)
            out.append(M)
        return out

    def adjoint(self, Gs):
        out = np.zeros(self.m)
        for G, ents in zip(Gs, self.entries):
            for e in ents:
                out[e.var.offset:e.var.offset + e.var.dim] += adjoint_entry(e, G)
        return out

    def newton(self, Xs, Zs, N, lp):
        """A solver for ``(H + diag_N(lp)) dy = rhs`` by block Cholesky, or None if singular.

        While :attr:`single` holds, ``H`` is factored in single precision and each solve refined to the
        double solve's residual (:func:`lipsdp.conv_factor.refine`); the first solve that does not get
        there factors ``H`` in double precision and turns :attr:`single` off for the rest of the run.
        Raises :class:`OutOfTime` when the iteration it starts would end past :attr:`deadline` (the
        previous iteration's duration as the estimate): the last point is then the answer.
        """
        checkpoint()  # the run's limits (lipsdp.budget), once per iteration
        self._settled()
        now = time.perf_counter()
        if self.deadline is not None and self.last is not None and now + (now - self.last) > self.deadline:
            raise OutOfTime
        self.last = now
        for held in self.live:  # the previous iteration's factor: freed before the next one is assembled
            held.clear()
        D, C, hd = self._assemble(Xs, Zs, N, lp)
        low = conv_factor.single_factor(D, C, self.tails, self._singles()) if self.single else None
        if low is None:
            self.single, self.single_blocks = False, None  # their memory back for good
            exact = self._double(Xs, Zs, N, lp, (D, C))
            if exact is None:
                return None
            self.live = exact
            return lambda rhs: self._join(conv_factor.substitute(*exact, self.tails, self._split(rhs, hd)), hd)
        self.live, held = low, []
        self.single_factors += 1

        def solve(rhs):
            bs = self._split(rhs, hd)
            if not held:
                xs, ok, steps = conv_factor.refine(D, C, self.tails, low, bs)
                self.refinements.append(steps if ok else -1)
                if ok:
                    return self._join(xs, hd)
                self.single, self.single_blocks = False, None  # H is now too ill-conditioned for it
                exact = self._double(Xs, Zs, N, lp, (D, C))
                if exact is None:  # (D now holds the failed attempts: the iteration ends here)
                    raise Singular
                low[0].clear()
                held.extend(exact)
                self.live = exact
            return self._join(conv_factor.substitute(*held, self.tails, bs), hd)
        return solve

    def _double(self, Xs, Zs, N, lp, first):
        """The double-precision factor ``(L, E)`` of ``H`` (``first``: ``(D, C)`` already assembled, overwritten),
        each block regularised by the first of :data:`REGULARISATIONS` that factors; None when none does.

        Until a block first fails, the blocks are factored without a copy and a failure assembles ``H``
        again; from then on (near the optimum) each block is copied first and only the failing one redone."""
        for k in range(len(REGULARISATIONS)):
            D, C = first if first is not None else self._assemble(Xs, Zs, N, lp)[:2]
            first = None
            try:
                return conv_factor.factor(D, C, self.tails, REGULARISATIONS[k:], self.spare)
            except LinAlgError:
                D = C = None  # noqa: F841  (one Schur complement in memory at a time)
                if self.spare is not None:
                    return None
                self.spare = np.empty(max(self.group_sizes) ** 2)
        return None

    def _split(self, rhs, hd):
        off = self.group_offsets + [self.m]
        return [rhs[off[g]:off[g + 1]] / hd[g] for g in range(len(hd))]

    @staticmethod
    def _join(xs, hd):
        return np.concatenate([x / h for x, h in zip(xs, hd)])

    def _singles(self) -> list[np.ndarray]:
        """The single-precision copies of the diagonal blocks, allocated once (as :meth:`_buffers`)."""
        if self.single_blocks is None:
            self.single_blocks = [np.zeros((g, g), dtype=np.float32) for g in self.group_sizes]
        return self.single_blocks

    def _settled(self) -> None:
        """Raise :class:`Settled` at a primal-feasible point once the relative gap is at most :attr:`close`
        with a dual residual of at most ``1e-4`` (the bound, ``sqrt`` of the objective, is then within about
        half the gap of the SDP's value), or once the primal objective (the point that gets verified) has
        moved less than :attr:`settle` relatively over three iterations with a gap under ``1e-3``: the
        shared iteration's own test also needs a smaller dual residual, which on these problems can floor
        near ``1e-5`` and keep it iterating to its limit."""
        state = self.state
        if state is None:
            return
        self.history.append(float(state.c @ state.y))
        last = self.history[-3:]
        if state.pinf < 1e-9 and state.gap <= self.close and state.dinf <= 1e-4:
            raise Settled(f"relative gap {state.gap:.1e} at iteration {state.iterations}")
        if len(last) == 3 and state.pinf < 1e-9 and state.gap < 1e-3 and \
                max(last) - min(last) <= self.settle * abs(last[-1]):
            raise Settled(f"primal objective settled at iteration {state.iterations}")

    def _assemble(self, Xs, Zs, N, lp):
        """Jacobi-scaled diagonal blocks ``D[g]`` and couplings ``C[g]`` (rows of group ``g``, columns of
        the tail of group ``g - 1``) of the Schur complement, and the scaling ``hd``."""
        D = self._buffers()
        C = [None] + [np.zeros((g, x.dim)) for g, x in zip(self.group_sizes[1:], self.X)]
        congruent = {}  # (row var, column var) -> the products of every block, summed in one _skron
        for ents, X, Z in zip(self.entries, Xs, Zs):
            for i, first in enumerate(ents):
                for second in ents[i:]:
                    e1, e2 = (first, second) if (first.var.group, first.var.local) >= \
                        (second.var.group, second.var.local) else (second, first)  # rows: the later variable
                    if e1.kind == e2.kind == "cong":
                        congruent.setdefault((e1.var.name, e2.var.name), (e1.var, e2.var, []))[2].extend(
                            (s * t, G @ X @ K.T, G @ Z @ K.T) for s, G in e1.data for t, K in e2.data)
                    else:
                        self._place(D, C, e1.var, e2.var, pair_schur(e1, e2, X, Z))
        for v1, v2, pairs in congruent.values():
            self._place(D, C, v1, v2, skron(pairs, v1.tri, v2.tri))
        starts = np.asarray(self.group_offsets)
        group = np.searchsorted(starts, N, side="right") - 1
        for g in np.unique(group):
            at = group == g
            pos = N[at] - starts[g]
            D[g][pos, pos] += lp[at]
        hd = [np.sqrt(np.maximum(np.diag(Dg), 1e-300)) for Dg in D]
        for g, Dg in enumerate(D):
            Dg /= hd[g][:, None]
            Dg /= hd[g][None, :]
            if C[g] is not None:
                C[g] /= hd[g][:, None]
                C[g] /= hd[g - 1][self.tail(g - 1)][None, :]
        return D, C, hd

    def _buffers(self) -> list[np.ndarray]:
        """The diagonal blocks, zeroed: allocated once and refilled every iteration (the factor of the last
        iteration, which lives in them, is dropped first by :meth:`newton`).  A fresh ``np.zeros`` per
        iteration maps new pages that the first write then faults in, one by one: at 32 channels that cost
        more than the products written into them."""
        if self.diagonal is None:
            self.diagonal = [np.zeros((g, g)) for g in self.group_sizes]
        else:
            for Dg in self.diagonal:
                Dg.fill(0.0)
        return list(self.diagonal)

    @staticmethod
    def _place(D, C, v1, v2, h):
        """Add ``h`` (rows: ``v1``, not before ``v2``) to the lower triangle (the factorisation reads no more)
        or, ``v2`` being the previous group's supply, to the coupling."""
        s1 = slice(v1.local, v1.local + v1.dim)
        if v1.group == v2.group:
            D[v1.group][s1, v2.local:v2.local + v2.dim] += h
        else:
            C[v1.group][s1, :] += h


def grams_of(tail: np.ndarray, channels: int) -> np.ndarray:
    """``W_c W_d^T`` (``C x C x q x q``) of the read-out ``tail`` (``q x C*space``), channel by channel."""
    Wc = tail.reshape(tail.shape[0], channels, -1)
    return np.einsum("icn,jdn->cdij", Wc, Wc, optimize=True)


def solve(blocks, tail: np.ndarray, *, margin, bound, time_limit: float | None = None,
          tol: float = 1e-7, max_iters: int = 100, verbose: bool = False) -> dict:
    """Minimise ``rho`` over the conv-chain SDP (docs/math.md §7.4) with :class:`ConvChainSDP`.

    The read-out is normalised to unit spectral norm for the iteration (every condition is homogeneous)
    and the point scaled back.  Returns the multipliers in the format of
    :func:`lipsdp.conv_lmi.solve_chain`; ``time_limit`` stops the iteration with its last point.

    ``earlier``: the points of the last iterations near the optimum before the final one, newest first
    (:attr:`lipsdp.interior.InteriorPoint.path`), in the same format: near the end the iterates can come
    too close to the boundary for the verification's margin (trained 32x4: iterations 50 and 51 verified,
    52 to 54 did not), and an earlier one may still prove a bound.

    Raises
    ------
    ResourceError
        When :meth:`ConvChainSDP.memory_estimate` exceeds the memory available
        (:func:`lipsdp.resources.available_memory`, which honours the run's ``memory_limit``).
    """
    t0 = time.perf_counter()
    scale = float(np.linalg.norm(tail, 2)) ** 2 or 1.0
    C = blocks[-1].Ew.shape[0]
    sdp = ConvChainSDP(blocks, grams_of(tail / np.sqrt(scale), C), margin, bound)
    sdp.single = max(sdp.group_sizes) >= SINGLE_FROM
    need, have = sdp.memory_estimate(sdp.single), available_memory()
    if need > have:  # without the single-precision copies (each factor in double precision)
        sdp.single, need = False, sdp.memory_estimate(single=False)
    if need > have:
        raise ResourceError(f"the structured interior-point solve needs about {need / 2**30:.2f} GiB, "
                            f"{have / 2**30:.2f} GiB available")
    threads.fit(max(sdp.group_sizes))  # the group factorisations are the BLAS-3 work (no-op outside a run)
    state = InteriorPoint(sdp, sdp.objective, sdp.nonneg, tol, time_limit, t0, verbose, max_iters, 0.95)
    state.report = NAME
    progress.objective_scale(scale)
    sdp.deadline = None if time_limit is None else t0 + time_limit
    sdp.state = state
    try:
        status, message = state.run()
    except OutOfTime:
        status, message = "time_limit", f"time limit after {state.iterations} iterations (the next would not finish)"
    except Singular:
        status = "optimal_inaccurate" if state.gap < 1e-4 else "solver_error"
        message = f"singular Schur complement at iteration {state.iterations} (gap {state.gap:.1e})"
    except Settled as stop:
        status, message = "optimal_inaccurate", f"{stop} (gap {state.gap:.1e}, dual residual {state.dinf:.1e})"
    earlier = [point(sdp, y, scale) for y in reversed(state.path) if not np.array_equal(y, state.y)]
    return {**point(sdp, state.y, scale), "solver": NAME, "status": status, "message": message,
            "iterations": state.iterations, "gap": state.gap, "memory_estimate": need,
            "single_factors": sdp.single_factors, "earlier": earlier}


def point(sdp: ConvChainSDP, y: np.ndarray, scale: float) -> dict:
    """The multipliers of ``y`` in the format of :func:`lipsdp.conv_lmi.solve_chain`, in original units."""
    def mat(v: Var, factor: float) -> np.ndarray:
        return unpack(y[v.offset:v.offset + v.dim], v) * factor if v.size else np.zeros((0, 0))

    return {"P1": [mat(v, scale) for v in sdp.P1], "P2": [mat(v, scale) for v in sdp.P2],
            "lam": [y[v.offset:v.offset + v.dim] * scale for v in sdp.lam],
            "x": [mat(v, scale) for v in sdp.X], "Y": mat(sdp.Y, 1.0 / scale), "rho": float(y[sdp.rho.offset]) * scale}
