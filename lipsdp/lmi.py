"""The LMI ``M(x) = M_c + sum_j x_j M_j <= 0`` that certifies a Lipschitz bound.

For the l2 gain (LipSDP, docs/math.md §1.1 and §3.1) the variables are
``x = (rho, y)``: ``rho`` multiplies ``-E0^T E0`` and the QC multipliers ``y``
come from :mod:`lipsdp.constraints`; the constant part is ``C^T C``:

.. math::

    M(\\rho, y) = C^T C - \\rho E_0^T E_0 + \\sum_j y_j F_j \\preceq 0
    \\;\\Rightarrow\\; \\|f(x) - f(x')\\|_2 \\le \\sqrt{\\rho}\\,\\|x - x'\\|_2 .

The SDP minimises ``rho``.  Everything is stored as one COO list over
``(row, col, variable)`` so a backend can vectorise it in its own convention
(:meth:`LMIProblem.svec`), and so verification can rebuild ``M`` and its
entrywise absolute value for rounding-error bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from lipsdp.constraints import get_constraint
from lipsdp.lifting import Lifting

_U = 2.0 ** -53


@dataclass
class LMIProblem:
    """``min c^T x  s.t.  M(x) = M_c + sum_j x_j M_j <= 0,  x_j >= 0 where nonneg[j]``.

    Attributes
    ----------
    n : int
        Matrix size (``n_z`` of the lifting).
    input_dim : int
        Size of the input block (the first ``input_dim`` rows/columns).
    const : scipy.sparse.csr_matrix, shape (n, n)
        ``M_c = C^T C``.
    rows, cols, vals, var : ndarray
        COO of ``sum_j x_j M_j``, both triangles.
    objective : ndarray, shape (n_var,)
    nonneg : ndarray of bool, shape (n_var,)
    labels : list of str
        One per variable: ``"rho"``, then the multipliers.
    formulation : str
    const_terms : int
        Longest sum behind one entry of ``M_c`` (for rounding bounds).
    lift_err_terms : tuple or None
        COO of the entrywise bound on the lifting's rounding error (None if exact).
    """

    n: int
    input_dim: int
    const: sp.csr_matrix
    const_abs: sp.csr_matrix
    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    var: np.ndarray
    objective: np.ndarray
    nonneg: np.ndarray
    labels: list
    formulation: str
    blocks: list = field(default_factory=list)
    const_terms: int = 1
    lift_err: tuple | None = None
    var_block: np.ndarray | None = None
    norm: str = "l2"
    n_in: int = 1  # input variables (rho, or lambda_in for l_inf) come first
    #: ``(R, iu, iw, coef, var)``: the ``M_j`` as sums of rank-two terms,
    #: ``M_j = sum_{t: var_t = j} coef_t (R[iu_t] R[iw_t]^T + R[iw_t] R[iu_t]^T)`` with
    #: ``R`` (csr, shape ``(r, n)``) the distinct lifted rows; None when some
    #: constraint family gives no factored form.  Only structure-exploiting
    #: solvers read it; verification always uses the COO entries.
    factors: tuple | None = None
    #: A feasible point known before solving (in this LMI's variables), or None: the layer-by-layer
    #: point of :mod:`lipsdp.scaling`.  A hint for a backend's start, never a result.
    start: np.ndarray | None = None
    #: ``fl(A A^T)`` of an input block ``-rho A A^T`` (docs/math.md §10.1; None: ``-rho I``) and about its
    #: smallest eigenvalue; congruences keep the input block's scale (``d_0 = 1``), so these too.
    input_metric: np.ndarray | None = None
    input_floor: float = 1.0

    def preconditioned(self, block_scale: np.ndarray, total: float) -> tuple["LMIProblem", np.ndarray]:
        r"""A congruent, rescaled copy of the LMI that solvers (and the float test) find well conditioned.

        With ``D = diag(d)``, ``d`` = ``block_scale[k]`` on block ``k`` (the
        composed norm bound of that block: its values move about that much per
        unit input move) and ``g = total**2``:

        .. math:: M'(x') = D M(V x') D / g,\qquad V = \operatorname{diag}(v),\;
                  v_j = g / d_{k(j)}^2 ,

        so ``rho`` and every multiplier are of order one.  ``D M D <= 0`` iff ``M <= 0``: the optimum is
        the same, and ``x = v * x'`` maps a solution back.  Every scale is rounded to a power of two, so
        the congruence and ``x = v * x'`` are *exact* in floating point: verifying ``M'`` at ``x'``
        verifies ``M`` at ``v * x'``.  The objective is divided by ``g`` (``v[0] == g``).  Returns ``(lmi', v)``.
        """
        def pow2(a):
            a = np.asarray(a, dtype=np.float64)
            return np.where((a > 0) & np.isfinite(a), np.exp2(np.round(np.log2(np.where(a > 0, a, 1.0)))), 1.0)

        d_block = pow2(block_scale)
        d = np.repeat(d_block, [b.size for b in self.blocks])
        g = float(pow2(total ** 2 if total > 0 else 1.0))
        v = g / d_block[self.var_block] ** 2
        v[: self.n_in] = g  # rho / lambda_in sit on the input block, d_0 = 1
        # vals * (d[rows] * d[cols] * v[var] / g) in that order, in two buffers instead of six (same roundings)
        scale, other = np.take(d, self.rows), np.take(d, self.cols)
        np.multiply(scale, other, out=scale)
        np.multiply(scale, np.take(v, self.var, out=other), out=scale)
        np.divide(scale, g, out=scale)
        Dm = sp.diags(d)
        const = (Dm @ self.const @ Dm / g).tocsr()
        const_abs = (Dm @ self.const_abs @ Dm / g).tocsr()
        lift_err = None
        if self.lift_err is not None:
            r, c, e, m, cerr = self.lift_err
            lift_err = (r, c, e * d[r] * d[c] * v[m] / g, m, (Dm @ cerr @ Dm / g).tocsr())
        # objective' = objective * v / g keeps c' of order one; its value is (c^T x) / g.
        factors = None
        if self.factors is not None:
            R, iu, iw, coef, fvar = self.factors
            factors = ((R @ Dm).tocsr(), iu, iw, coef * v[fvar] / g, fvar)
        return replace(self, vals=np.multiply(self.vals, scale, out=other), const=const, const_abs=const_abs,
                       objective=self.objective * v / g, lift_err=lift_err, factors=factors,
                       start=None if self.start is None else self.start / v), v

    n_var = property(lambda self: len(self.objective))

    def block_of(self, idx) -> np.ndarray:
        """The block (0 = input) that each row/column index in ``idx`` belongs to."""
        starts = np.array([b.start for b in self.blocks])
        return np.searchsorted(starts, np.asarray(idx), side="right") - 1

    def chain_layers(self) -> np.ndarray | None:
        """For each variable, the last block its matrix touches (-1 if none), or None unless this is a
        layer chain: ``sum_j x_j M_j`` block-tridiagonal and every ``M_j`` inside two neighbouring blocks.

        The pattern that :mod:`~lipsdp.solvers.chordal_` (cliques ``{k-1, k}``) and
        :mod:`lipsdp.scaling` (one multiplier per layer) rely on; the constant term is theirs to check.
        """
        if not self.blocks:
            return None
        # A gather from every index's block in int16, not a binary search into int64 (fresh pages: most of a build).
        starts = np.array([b.start for b in self.blocks] + [self.n])
        table = np.repeat(np.arange(len(self.blocks), dtype=np.int16 if len(starts) < 2 ** 15 else np.int64),
                          np.diff(starts)) if starts[0] == 0 and np.all(np.diff(starts) >= 0) else \
            self.block_of(np.arange(self.n))
        rb, cb = table[self.rows], table[self.cols]
        lo_b, hi_b = np.minimum(rb, cb), np.maximum(rb, cb)
        if np.any(np.subtract(hi_b, lo_b, out=rb) > 1):
            return None
        lo, hi = np.full(self.n_var, len(self.blocks), table.dtype), np.full(self.n_var, -1, table.dtype)
        np.minimum.at(lo, self.var, lo_b)
        np.maximum.at(hi, self.var, hi_b)
        return None if np.any((hi >= 0) & (hi - lo > 1)) else hi.astype(np.int64)

    # -- evaluation -----------------------------------------------------
    @cached_property
    def entry_index(self) -> np.ndarray:
        """``rows * n + cols`` of the COO entries: where each lands in the flattened ``n x n`` matrix."""
        return np.asarray(self.rows, dtype=np.int64) * self.n + np.asarray(self.cols, dtype=np.int64)

    @cached_property
    def max_entry_terms(self) -> int:
        """The most COO entries that add up into one matrix entry (the ``K`` of the rounding bounds)."""
        return int(np.bincount(self.entry_index).max(initial=0)) if len(self.entry_index) else 0

    def _coo_matrix(self, vals: np.ndarray, x: np.ndarray) -> np.ndarray:
        # bincount adds each entry's terms one after another (a recursive sum), so the rounding
        # bounds of lipsdp.verify (gamma_K with K = max_entry_terms) hold for it.
        flat = np.bincount(self.entry_index, weights=vals * x[self.var], minlength=self.n * self.n)
        return flat.reshape(self.n, self.n)

    def matrix(self, x: np.ndarray) -> np.ndarray:
        """Dense ``M(x)``, shape ``(n, n)``."""
        return self._coo_matrix(self.vals, np.asarray(x, dtype=np.float64)) + self.const.toarray()

    @cached_property
    def _diagonal_entries(self) -> np.ndarray:
        return np.flatnonzero(self.rows == self.cols)

    def diagonal(self, x: np.ndarray) -> np.ndarray:
        """The diagonal of ``M(x)`` without forming the matrix (linear in the number of terms)."""
        d, x = self._diagonal_entries, np.asarray(x, dtype=np.float64)
        return np.bincount(self.rows[d], weights=self.vals[d] * x[self.var[d]], minlength=self.n) + \
            self.const.diagonal()

    def abs_matrix(self, x: np.ndarray) -> np.ndarray:
        """Entrywise ``sum |x_j| |M_j| + |C|^T |C|``: what rounding errors scale with."""
        return self._coo_matrix(np.abs(self.vals), np.abs(np.asarray(x, dtype=np.float64))) + self.const_abs.toarray()

    def lifting_error(self, x: np.ndarray) -> np.ndarray | None:
        """Entrywise bound on ``|M(x) - M_exact(x)|`` due to rounded lifted rows, or None if exact."""
        if self.lift_err is None:
            return None
        rows, cols, vals, var, const = self.lift_err
        x = np.abs(np.asarray(x, dtype=np.float64))
        M = np.bincount(np.asarray(rows, dtype=np.int64) * self.n + cols, weights=vals * x[var],
                        minlength=self.n * self.n).reshape(self.n, self.n)
        return M + const.toarray()

    def basis(self) -> sp.csc_matrix:
        """``[vec(M_1) ... vec(M_k)]``, shape ``(n*n, n_var)`` (column-major vec)."""
        idx = self.cols * self.n + self.rows
        return sp.csc_matrix((self.vals, (idx, self.var)), shape=(self.n * self.n, self.n_var))

    def svec(self, triangle: str = "lower", scale: float = np.sqrt(2.0)):
        """Vectorise for a conic solver.

        Returns ``(A, b)`` with ``svec(M(x)) = A x + b`` (``A`` csc of shape ``(n(n+1)/2, n_var)``, ``b`` of
        ``n(n+1)/2``): the lower (or upper) triangle in column-major order, off-diagonal entries times
        ``scale`` (``sqrt(2)`` makes the vectorisation an isometry, as SCS and Clarabel expect).
        """
        n = self.n

        def index(r, c):
            if triangle == "lower":
                keep = r >= c
                r, c = r[keep], c[keep]
                idx = c * n - (c * (c - 1)) // 2 + (r - c)
            else:
                keep = r <= c
                r, c = r[keep], c[keep]
                idx = (c * (c + 1)) // 2 + r
            return keep, idx, np.where(r == c, 1.0, scale)

        m = n * (n + 1) // 2
        keep, idx, s = index(self.rows, self.cols)
        A = sp.csc_matrix((self.vals[keep] * s, (idx, self.var[keep])), shape=(m, self.n_var))
        C = sp.coo_matrix(self.const)
        keep, idx, s = index(C.row.astype(np.int64), C.col.astype(np.int64))
        b = np.zeros(m)
        np.add.at(b, idx, C.data[keep] * s)
        return A, b


@dataclass
class _Parts:
    """The LMI's COO entries, variables and factors, gathered block by block by :func:`build_lmi`."""

    rows: list
    cols: list
    vals: list
    var: list
    labels: list
    nonneg: list
    var_block: list
    factors: list | None
    err: list = field(default_factory=list)

    def add(self, t, k: int) -> int:
        """Append the terms ``t`` (:class:`~lipsdp.constraints.QCTerms`) of block ``k``; return their offset."""
        offset = len(self.labels)
        self.rows.append(t.rows)
        self.cols.append(t.cols)
        self.vals.append(t.vals)
        self.var.append(t.mult + offset)
        self.labels.extend(t.labels)
        self.var_block.extend([k] * t.n_mult)
        self.nonneg.extend(t.nonneg.tolist())
        if self.factors is not None and t.factors:
            self.factors.extend((A, B, coef, np.asarray(mult) + offset) for A, B, coef, mult in t.factors)
        elif t.n_mult:
            self.factors = None
        return offset


def _output_rows(lifting: Lifting, output_map) -> tuple[sp.csr_matrix, sp.csr_matrix, bool]:
    """``C`` (through ``output_map``), the bound on its rounding error, and whether the map is exact."""
    C, C_err = lifting.output, lifting.output_err
    map_exact = True
    if output_map is not None:
        cm = sp.csr_matrix(np.atleast_2d(np.asarray(output_map, dtype=np.float64)))
        # Rows that pick one output (times +-1) are exact; sums of outputs are rounded.
        map_exact = bool(np.all(np.diff(cm.indptr) <= 1) and np.all(np.abs(cm.data) == 1.0))
        C_err = abs(cm) @ C_err + (0 if map_exact else (abs(cm) @ abs(C)) * (2 * cm.shape[1] * _U))
        C = cm @ C
    return sp.csr_matrix(C), C_err, map_exact


def _input_block(n0: int, n: int, norm: str, metric=None) -> _Parts:
    """``-E0^T E0`` times ``rho`` (l2) or ``-E0^T diag(lambda_in) E0`` (l_inf); with ``metric`` (l2 only)
    ``-E0^T G E0`` times ``rho``, ``G = metric`` dense (docs/math.md §10.1), factored as
    ``sum_i -1/2 (e_i g_i^T + g_i e_i^T)`` (``G`` symmetric) so the layers' factors are kept."""
    if metric is not None:
        G = np.asarray(metric, dtype=np.float64)
        r, c = (i.ravel() for i in np.indices((n0, n0)))
        rows_g = sp.hstack([sp.csr_matrix(G), sp.csr_matrix((n0, n - n0))]).tocsr()
        return _Parts([r], [c], [-G.ravel()], [np.zeros(r.size, np.int64)], ["rho"], [True], [0],
                      [(sp.eye(n0, n, format="csr"), rows_g, np.full(n0, -0.5), np.zeros(n0, np.int64))])
    if norm == "l2":
        var, labels = [np.zeros(n0, dtype=np.int64)], ["rho"]
    else:
        var, labels = [np.arange(n0, dtype=np.int64)], [f"lambda_in[{i}]" for i in range(n0)]
    # -E0^T diag(x_in) E0 = sum_i x_in[i] * (-1/2) (e_i e_i^T + e_i e_i^T).
    E0 = sp.eye(n0, n, format="csr")
    return _Parts(rows=[np.arange(n0)], cols=[np.arange(n0)], vals=[-np.ones(n0)], var=var, labels=labels,
                  nonneg=[True] * len(labels), var_block=[0] * len(labels),
                  factors=[(E0, E0, np.full(n0, -0.5), var[0])])


def _constraint_error(qc, op, P, P_err, Q, formulation: str, offset: int) -> list:
    """COO bound on how much the rounding ``P_err`` of the rows ``P`` moves the QC's terms: ``|F(P+d) - F(P)|
    <= F_abs(|P|+|d|) - F_abs(|P|)`` (bilinear terms).  One piece ``|hi| - |lo|`` rounded upward where both lay
    out their entries alike (a dense first layer), else ``+|hi|`` and ``-|lo|`` for the sum to join."""
    lo, hi = qc.terms(op, abs(P), abs(Q), formulation), qc.terms(op, abs(P) + P_err, abs(Q), formulation)
    if all(np.array_equal(getattr(hi, a), getattr(lo, a)) for a in ("rows", "cols", "mult")):
        diff = np.abs(hi.vals)
        diff -= np.abs(lo.vals)
        np.maximum(np.nextafter(diff, np.inf, out=diff), 0.0, out=diff)  # >= the difference of the two floats
        return [(hi.rows, hi.cols, diff, np.asarray(hi.mult) + offset)]
    return [(hi.rows, hi.cols, np.abs(hi.vals), np.asarray(hi.mult) + offset),
            (lo.rows, lo.cols, -np.abs(lo.vals), np.asarray(lo.mult) + offset)]


def _lift_error(C: sp.csr_matrix, C_err, err_parts: list) -> tuple:
    """``(rows, cols, vals, var, const)``: the bound on ``|M - M_exact|`` of :meth:`LMIProblem.lifting_error`."""
    absC = abs(C)
    c_err = (C_err.T @ absC + absC.T @ C_err + C_err.T @ C_err).tocsr()
    columns = [[], [], [], []]
    while err_parts:  # each piece released once joined (the first layer's can be most of the LMI)
        [col.append(a) for col, a in zip(columns, err_parts.pop(0))]
    return (*(_joined(z, t) for z, t in zip(columns, (np.int64, np.int64, np.float64, np.int64))), c_err)


def build_lmi(lifting: Lifting, formulation: str = "neuron", output_map: np.ndarray | None = None,
              norm: str = "l2", span=None) -> LMIProblem:
    """The LipSDP LMI of a lifted network.

    Parameters
    ----------
    lifting : Lifting
    formulation : {"neuron", "layer"}
        Diagonal multipliers per neuron (LipSDP-Neuron) or one per activation node (LipSDP-Layer).
    output_map : ndarray, shape (k, m), optional
        Certify ``c f`` instead of ``f`` (e.g. a logit difference ``e_y - e_j``).
    norm : {"l2", "linf"}
        ``l2``: one variable ``rho`` on ``-E0^T E0``, bound ``sqrt(rho)`` (l2 -> l2).
        ``linf``: the square-root form of docs/math.md §2.1 for a *scalar*
        output ``g = c f``: a diagonal input multiplier ``lambda_in >= 0`` on
        ``-E0^T diag(lambda_in) E0``, objective ``sum(lambda_in)``, and
        ``|g(x) - g(x')| <= sqrt(sum lambda_in) ||x - x'||_inf``.
    span : InputSpan, optional
        ``lifting.span_input()`` (l2): the LMI restricted to the first layer's input rows (docs/math.md §10.1).
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"unknown norm {norm!r}")
    if span is not None and norm != "l2":
        raise ValueError("the input span is for the l2 LMI (rho I is what it restricts)")
    lifting = lifting if span is None else span.lifting
    n, n0 = lifting.n, lifting.input_dim
    C, C_err, map_exact = _output_rows(lifting, output_map)
    if norm == "linf" and C.shape[0] != 1:
        raise ValueError("the l_inf LMI certifies one scalar output: pass output_map with one row")
    parts = _input_block(n0, n, norm, None if span is None else span.metric)
    n_in = len(parts.labels)
    lift_exact = lifting.exact and map_exact and span is None
    if span is not None:  # the rounding of fl(A A^T) in the rho term (variable 0)
        r, c = (i.ravel() for i in np.indices((n0, n0)))
        parts.err.append((r, c, np.asarray(span.metric_err, dtype=np.float64).ravel(), np.zeros(r.size, np.int64)))
    for k, P in enumerate(lifting.pre, start=1):
        op = lifting.network.op(lifting.blocks[k].node)
        qc = get_constraint(op.function)
        Q = lifting.selector(k)
        offset = parts.add(qc.terms(op, P, Q, formulation), k)
        if not lift_exact and lifting.pre_err[k - 1].nnz:  # exact rows add no error terms
            parts.err.extend(_constraint_error(qc, op, P, lifting.pre_err[k - 1], Q, formulation, offset))
    objective = (np.arange(len(parts.labels)) < n_in).astype(np.float64)
    coo = [_joined(parts.rows, np.int64), _joined(parts.cols, np.int64), _joined(parts.vals, np.float64),
           _joined(parts.var, np.int64)]
    return LMIProblem(
        n=n, input_dim=n0, const=(C.T @ C).tocsr(), const_abs=(abs(C).T @ abs(C)).tocsr(),
        rows=coo[0], cols=coo[1], vals=coo[2], var=coo[3],
        objective=objective, nonneg=np.array(parts.nonneg, dtype=bool), labels=parts.labels,
        formulation=formulation, blocks=list(lifting.blocks), const_terms=max(C.shape[0], 1),
        lift_err=None if lift_exact else _lift_error(C, C_err, parts.err),
        var_block=np.array(parts.var_block, dtype=np.int64), norm=norm, n_in=n_in,
        factors=None if parts.factors is None else _stack_factors(parts.factors, n),
        input_metric=None if span is None else span.metric, input_floor=1.0 if span is None else span.floor,
    )


def _joined(pieces: list, dtype) -> np.ndarray:
    """The pieces concatenated, each released once copied (holding both would double the build's peak)."""
    out, at = np.empty(sum(len(p) for p in pieces), dtype=dtype), 0
    while pieces:
        p = pieces.pop(0)
        out[at:at + len(p)], at = p, at + len(p)
    return out


def _stack_factors(factors, n):
    """``(R, iu, iw, coef, var)`` from ``(A, B, coef, mult)`` parts; each distinct row matrix is stored once."""
    mats, where = [], {}
    iu, iw, coefs, var = [], [], [], []
    offset = 0
    for A, B, coef, mult in factors:
        idx = []
        for X in (A, B):
            if id(X) not in where:  # the callers' objects stay alive in ``factors``
                where[id(X)] = offset
                mats.append(sp.csr_matrix(X))
                offset += X.shape[0]
            idx.append(where[id(X)])
        k = A.shape[0]
        coef = np.broadcast_to(np.asarray(coef, dtype=np.float64), (k,))
        keep = coef != 0
        iu.append(idx[0] + np.arange(k)[keep])
        iw.append(idx[1] + np.arange(k)[keep])
        coefs.append(coef[keep])
        var.append(np.broadcast_to(np.asarray(mult, dtype=np.int64), (k,))[keep])
    R = sp.vstack(mats, format="csr") if mats else sp.csr_matrix((0, n))
    return R, *(np.concatenate(z) for z in (iu, iw, coefs, var))
