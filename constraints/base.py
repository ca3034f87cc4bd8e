"""The contract every quadratic constraint (QC) honours.

An activation node maps its pre-activation ``v`` (rows ``P`` of the lifting,
``v = P z``) to its output ``w`` (rows ``Q``, ``w = Q z``), where ``z`` is the
stacked vector ``[x0; phi_1; ...; phi_n]`` (:mod:`lipsdp.lifting`).  A QC is an
incremental inequality that holds for *every* pair of inputs,

.. math::

    \\begin{bmatrix}\\Delta v\\\\ \\Delta w\\end{bmatrix}^T \\Psi(y)
    \\begin{bmatrix}\\Delta v\\\\ \\Delta w\\end{bmatrix} \\ge 0 ,

with :math:`\\Psi` affine in the constraint's multipliers ``y`` (some of them
sign-constrained, ``y_j >= 0``, the others free).  Lifted to ``z`` it adds
``sum_j y_j F_j`` to the LMI of (3.1) in docs/math.md, where each
``F_j = [P; Q]^T Psi_j [P; Q]`` is symmetric.  A constraint returns the ``F_j``
as one COO triple list (:class:`QCTerms`) so that thousands of neurons are
assembled with array operations, never a Python loop per neuron.

Soundness is the whole point: a constraint must hold for all true
(input, output) pairs of its activation; :func:`lipsdp.testing.check_constraint`
samples pairs and checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from lipsdp.errors import ResourceError
from lipsdp.resources import available_memory


@dataclass
class QCTerms:
    """Lifted multiplier terms ``sum_j y_j F_j`` of one activation node, as COO.

    ``F_j[rows[k], cols[k]] += vals[k]`` for every ``k`` with ``mult[k] == j``.
    Both triangles are stored (``F_j`` symmetric); duplicates add up.

    Attributes
    ----------
    rows, cols : ndarray of int64, shape (K,)
    vals : ndarray of float64, shape (K,)
    mult : ndarray of int64, shape (K,)
        Local multiplier index, ``0 <= mult < n_mult``.
    n_mult : int
    nonneg : ndarray of bool, shape (n_mult,)
        True where the multiplier must be >= 0.
    labels : list of str
        One readable label per multiplier (for certificates).
    factors : list of tuple
        The same terms in factored form, ``(A, B, coef, mult)`` per call of
        :func:`outer_terms`: ``F_j = sum_{i: mult_i = j} coef_i (a_i b_i^T + b_i a_i^T)``.
        Structure-exploiting solvers (:mod:`lipsdp.solvers.ipm_`) use it to form
        ``tr(F_i X F_j Z)`` from Gram matrices of the rows instead of from the
        COO entries; empty when a family does not provide it.
    """

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray
    mult: np.ndarray
    n_mult: int
    nonneg: np.ndarray
    labels: list
    factors: list = field(default_factory=list)


#: Bytes :func:`outer_terms` holds per product ``a_ij b_ik`` at its peak: indices, values and
#: multipliers of both triangles, and the temporaries that compute them.
BYTES_PER_TERM = 96
#: Share of the available memory one call of :func:`outer_terms` may take.
MEMORY_SHARE = 0.5


def _check_memory(terms: int) -> None:
    """Refuse, with a clear error, an assembly that would exhaust memory (the kernel would kill the
    process instead of Python raising): rows made dense, e.g. by the input reduction's rotation of a
    wide input, give ``nnz(a_i) nnz(b_i)`` terms per neuron."""
    need, budget = BYTES_PER_TERM * terms, int(MEMORY_SHARE * available_memory())
    if need > budget:
        raise ResourceError(f"building the LMI needs about {need / 2**30:.1f} GiB for {2 * terms:,} terms of one "
                            f"layer's quadratic constraint, but {budget / 2**30:.1f} GiB are available; "
                            "try --split K or a smaller network")


#: Bytes one stored entry of the LMI holds through the build: row, column, variable and value (32), and the
#: joined copy of the pieces in flight and the preconditioned values that follow.
BYTES_PER_ENTRY = 48


def check_lmi_memory(entries: int) -> None:
    """Refuse up front, with a clear error, an LMI whose stored entries (all layers together) would not fit:
    the per-layer check of :func:`outer_terms` alone lets a deep net grow past the memory it has."""
    need, budget = BYTES_PER_ENTRY * int(entries), int(MEMORY_SHARE * available_memory())
    if need > budget:
        raise ResourceError(f"building the LMI needs about {need / 2**30:.1f} GiB for {int(entries):,} terms, "
                            f"but {budget / 2**30:.1f} GiB are available; try --split K or a smaller network")


def outer_terms(A: sp.csr_matrix, B: sp.csr_matrix, coef: np.ndarray, mult: np.ndarray):
    """COO of ``coef_i (a_i b_i^T + b_i a_i^T)`` for every row ``i`` of ``A`` and ``B``.

    Vectorised over rows: row ``i`` contributes ``nnz(a_i) * nnz(b_i)`` entries
    (twice), tagged with multiplier ``mult[i]``.  When ``B is A`` the term is
    ``2 coef_i a_i a_i^T`` and each place gets *one* entry, ``fl(2 coef_i fl(a_ij a_ik))``:
    symmetric (the product commutes), with the three roundings of the general path (the
    doubling is exact), in half the entries.  That halves the ``alpha beta p_i p_i^T``
    terms of a slope QC with ``alpha beta != 0``, ``nnz(p_i)^2`` entries per neuron,
    most of a wide LeakyReLU / GELU / SiLU layer's LMI.

    Parameters
    ----------
    A, B : scipy.sparse.csr_matrix, shape (N, n)
    coef : ndarray, shape (N,)
    mult : ndarray of int, shape (N,)
    """
    return joined_outer_terms([(A, B, coef, mult)])


def joined_outer_terms(specs) -> tuple:
    """:func:`outer_terms` of every ``(A, B, coef, mult)`` in ``specs``, concatenated in that order.

    Each part is written straight into the joined arrays: a wide layer's terms are allocated (and
    their fresh pages touched) once, not once per part and again by a concatenation.
    """
    plans = [_plan(*spec) for spec in specs]
    entries = [p[-1] for p in plans]
    _check_memory((sum(entries) + 1) // 2)  # BYTES_PER_TERM is per pair of entries
    total = sum(entries)
    out = (np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total), np.empty(total, np.int64))
    at = 0
    for plan, k in zip(plans, entries):
        if k:
            _fill(*plan[:-1], tuple(o[at:at + k] for o in out))
        at += k
    return out


def _plan(A, B, coef, mult):
    """Canonical rows of one part, the rows kept, their counts, and how many entries the part stores."""
    same = B is A
    A = sp.csr_matrix(A)
    A.sum_duplicates()
    B = A if same else sp.csr_matrix(B)
    B.sum_duplicates()
    coef = np.broadcast_to(np.asarray(coef, dtype=np.float64), (A.shape[0],))
    mult = np.broadcast_to(np.asarray(mult, dtype=np.int64), (A.shape[0],))
    ka, kb = np.diff(A.indptr), np.diff(B.indptr)
    keep = (coef != 0) & (ka > 0) & (kb > 0)
    cnt = np.where(keep, ka * kb, 0)
    total = int(cnt.sum())
    return same, A, B, coef, mult, keep, cnt, total, (total if same else 2 * total)


def _fill(same, A, B, coef, mult, keep, cnt, total, out) -> None:
    """Write one part's entries into ``out = (rows, cols, vals, mult)`` (views of the joined arrays).

    The general part is ``[a-side, b-side]`` for rows and ``[b-side, a-side]`` for columns, values
    ``fl(fl(coef a) b)`` twice; the ``same`` part (``B is A``) one entry ``fl(2 coef fl(a a))`` per place.
    """
    r_out, c_out, v_out, m_out = out
    ka, kb = np.diff(A.indptr), np.diff(B.indptr)
    halves = [slice(0, total)] if same else [slice(0, total), slice(total, 2 * total)]
    if np.all(ka == ka[0]) and np.all(kb == kb[0]):
        # Every row with the same number of entries (a dense layer's rows): the products by broadcasting,
        # in the order (and with the roundings) of the general path below, without its index arrays.
        rows = np.flatnonzero(keep)
        ai, ad = A.indices.reshape(-1, ka[0])[rows], A.data.reshape(-1, ka[0])[rows]
        bi, bd = B.indices.reshape(-1, kb[0])[rows], B.data.reshape(-1, kb[0])[rows]
        shape = (len(rows), ka[0], kb[0])
        first = v_out[halves[0]].reshape(shape)
        if same:
            np.multiply(ad[:, :, None], bd[:, None, :], out=first)
            first *= (2.0 * coef[rows])[:, None, None]  # 2 coef: exact
        else:
            np.multiply((coef[rows][:, None] * ad)[:, :, None], bd[:, None, :], out=first)
        a_side, b_side = ai[:, :, None], bi[:, None, :]
        mult_rows = mult[rows][:, None, None]
    else:
        row = np.repeat(np.arange(A.shape[0]), cnt)
        local = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        kb_r = kb[row]
        ia = A.indptr[row] + local // kb_r
        ib = B.indptr[row] + local % kb_r
        shape = (total,)
        if same:
            np.multiply(A.data[ia], B.data[ib], out=v_out[halves[0]])
            v_out[halves[0]] *= 2.0 * coef[row]
        else:
            v_out[halves[0]] = coef[row] * A.data[ia] * B.data[ib]
        a_side, b_side, mult_rows = A.indices[ia], B.indices[ib], mult[row]
    r_out[halves[0]].reshape(shape)[...] = a_side
    c_out[halves[0]].reshape(shape)[...] = b_side
    m_out[halves[0]].reshape(shape)[...] = mult_rows
    if not same:
        r_out[halves[1]] = c_out[halves[0]]
        c_out[halves[1]] = r_out[halves[0]]
        v_out[halves[1]] = v_out[halves[0]]
        m_out[halves[1]] = m_out[halves[0]]


class QuadraticConstraint:
    """Base class of the constraint families; one subclass per family, one file each.

    Class attributes
    ----------------
    functions : tuple of str
        Activation keys (``Activation.function``) this family describes.
    citation : str
        Where the constraint comes from.

    Subclasses implement :meth:`evaluate` (the activation itself, in numpy),
    :meth:`lipschitz` (an incremental l2 Lipschitz constant of the activation, for
    the trivial bound) and :meth:`terms` (the lifted QC).
    """

    functions: ClassVar[tuple[str, ...]] = ()
    citation: ClassVar[str] = ""
    formulations: ClassVar[tuple[str, ...]] = ("neuron", "layer")

    def evaluate(self, x: np.ndarray, op) -> np.ndarray:
        """The activation on a batch ``x`` of shape ``(batch, size)``."""
        raise NotImplementedError

    def derivative(self, x: np.ndarray, op) -> np.ndarray:
        """Elementwise ``phi'(x)`` for elementwise activations (used by :meth:`jacobian`)."""
        raise NotImplementedError

    def jacobian(self, x: np.ndarray, J: np.ndarray, op) -> np.ndarray:
        """Chain rule: Jacobian of ``phi(v)`` given ``v`` = ``x`` (batch, size) and ``dv/dx0`` = ``J`` (batch, size, n0).

        The default is for elementwise activations; group activations override it.
        """
        return self.derivative(x, op)[:, :, None] * J

    def lipschitz(self, op) -> float:
        """An incremental l2 Lipschitz constant of the activation (max absolute slope)."""
        raise NotImplementedError

    def terms(self, op, P: sp.csr_matrix, Q: sp.csr_matrix, formulation: str = "neuron") -> QCTerms:
        """Lifted multiplier terms for one node with pre-activation rows ``P`` and output rows ``Q``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.functions)})"
