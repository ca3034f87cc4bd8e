r"""GroupSort (and FullSort): the quadratic constraint of Pauli et al. (ICLR 2024).

GroupSort splits its input into disjoint groups :math:`G_j` of ``g``
consecutive coordinates and sorts each group in ascending order (deel-torchlip's
``GroupSort``, ``GroupSort2`` and ``FullSort``).  For any two inputs, on every
group (docs/math.md §4.1):

- **(P1) sum preservation** :math:`\\mathbf 1^T \\Delta w_j = \\mathbf 1^T \\Delta v_j`;
- **(P2) incremental 1-Lipschitz** :math:`\\|\\Delta w_j\\|_2 \\le \\|\\Delta v_j\\|_2`
  (rearrangement inequality).

With :math:`U_j = \\mathbf 1_g / \\sqrt g` spanning the preserved direction,
:math:`T_j = \\lambda_j I + \\gamma_j U_j U_j^T`, :math:`S_j = s_j U_j U_j^T`,
:math:`P_j = p_j U_j U_j^T`, block-diagonal over groups, the quadratic constraint
(4.1) is

.. math::

    \\begin{bmatrix}\\Delta v\\\\ \\Delta w\\end{bmatrix}^T
    \\begin{bmatrix} T - 2S & P + S \\\\ P + S & -T - 2P \\end{bmatrix}
    \\begin{bmatrix}\\Delta v\\\\ \\Delta w\\end{bmatrix} \\ge 0,
    \\qquad \\lambda_j \\ge 0,\\ \\gamma_j, s_j, p_j \\text{ free}.

Writing :math:`a_j = U_j^T \\Delta v`, :math:`b_j = U_j^T \\Delta w` (equal by P1),
the form is

.. math::

    \\sum_j \\lambda_j (\\|\\Delta v_j\\|^2 - \\|\\Delta w_j\\|^2)
    + \\gamma_j (a_j^2 - b_j^2) + 2 s_j a_j (b_j - a_j) + 2 p_j b_j (a_j - b_j) .

The :math:`\\gamma_j` term is *exactly* the :math:`s_j = -\\gamma_j/2`,
:math:`p_j = \\gamma_j/2` combination of the other two, so it is not offered as a
variable (a linearly dependent free variable only makes interior-point solves
ill-posed; the feasible set of bounds is unchanged).  Each group therefore has
one multiplier :math:`\\lambda_j \\ge 0` and two free ones, :math:`s_j, p_j`.

Lifted to ``z`` (pre-activation rows ``P_v``, output rows ``Q_w``), with
:math:`\\hat a_j = U_j^T P_v` and :math:`\\hat b_j = U_j^T Q_w` (rows of a sparse
group-summing matrix times ``P_v``, ``Q_w``):

.. math::

    F^{\\lambda}_j = \\sum_{i \\in G_j} (p_i p_i^T - q_i q_i^T),\\quad
    F^{s}_j = \\hat a_j \\hat b_j^T + \\hat b_j \\hat a_j^T - 2 \\hat a_j \\hat a_j^T,\\quad
    F^{p}_j = \\hat a_j \\hat b_j^T + \\hat b_j \\hat a_j^T - 2 \\hat b_j \\hat b_j^T .

Conditioning: :math:`F^s_j + F^p_j = -2 (\hat a_j - \hat b_j)(\hat a_j - \hat b_j)^T \preceq 0`,
so :math:`s_j = p_j = t \to \infty` is a zero-cost recession direction (it enforces
P1 as a penalty): the optimal multipliers form an unbounded set and the dual SDP has
no interior point.  Any feasible point still verifies, but interior-point codes can
stop early (CVXOPT: singular KKT matrix).  Eliminating :math:`\hat a_j = \hat b_j`
in the lifting instead would give the same bound from the :math:`\lambda_j` alone.

Formulations: ``neuron`` gives each group its own :math:`\\lambda_j`; ``layer``
shares one :math:`\\lambda` per activation node (:math:`T = \\lambda I` on the
whole node, as LipSDP-Layer) and keeps :math:`s_j, p_j` per group (free
variables that cost little and keep the P1 information of every group).

:class:`PreservedDirections` holds this machinery for any activation that acts
group-wise, is incrementally 1-Lipschitz on each group and is the identity on
known directions of each group; :class:`~lipsdp.constraints.householder.Householder`
is the other instance.

References
----------
P. Pauli, A. Havens, A. Araujo, S. Garg, F. Khorrami, F. Allgöwer, B. Hu,
"Novel Quadratic Constraints for Extending LipSDP beyond Slope-Restricted
Activations", ICLR 2024, arXiv:2401.14033.
C. Anil, J. Lucas, R. Grosse, "Sorting out Lipschitz function approximation",
ICML 2019 (GroupSort).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp.constraints.base import QCTerms, QuadraticConstraint, outer_terms


class PreservedDirections(QuadraticConstraint):
    """Group-wise 1-Lipschitz activations that preserve known directions of each group.

    Subclasses define :meth:`groups` (the group of every coordinate) and
    :meth:`directions` (rows :math:`U_j^T`, embedded in the node's coordinates,
    with the group each row belongs to); :meth:`terms` builds the QC (4.1) of the
    module docstring from them, vectorised over groups.

    A direction row ``d`` promises :math:`d^T \\Delta w = d^T \\Delta v` for every
    pair of inputs; each group promises :math:`\\|\\Delta w_j\\| \\le \\|\\Delta v_j\\|`.
    Rows of one group should be orthonormal (then :math:`s_j, p_j` are the diagonals
    of the :math:`r \\times r` matrices of docs/math.md §4.2; off-diagonal entries are not offered).
    """

    def groups(self, op) -> tuple[np.ndarray, int]:
        """``(group, m)``: group index of every coordinate, shape ``(op.size,)``, and the number of groups."""
        raise NotImplementedError

    def directions(self, op) -> tuple[sp.csr_matrix, np.ndarray]:
        """``(D, group)``: preserved directions as rows of ``D`` (shape ``(R, op.size)``) and their groups."""
        raise NotImplementedError

    def lipschitz(self, op) -> float:
        return 1.0

    def terms(self, op, P, Q, formulation="neuron"):
        P, Q = sp.csr_matrix(P), sp.csr_matrix(Q)
        n = P.shape[0]
        if n != op.size or Q.shape[0] != n:
            raise ValueError(f"{op.name}: expected {op.size} pre-activation and output rows, "
                             f"got {P.shape[0]} and {Q.shape[0]}")
        group, m = self.groups(op)
        D, dgroup = self.directions(op)
        D = sp.csr_matrix(D)
        R = D.shape[0]
        if formulation == "neuron":
            lam, n_lam = np.asarray(group, dtype=np.int64), m
            lam_labels = [f"{op.name}.lambda[{j}]" for j in range(m)]
        elif formulation == "layer":
            lam, n_lam, lam_labels = np.zeros(n, dtype=np.int64), 1, [f"{op.name}.lambda"]
        else:
            raise ValueError(f"unknown formulation {formulation!r}; use 'neuron' or 'layer'")
        # lambda_j (||dv_j||^2 - ||dw_j||^2): outer_terms doubles, hence the 1/2.
        half = np.full(n, 0.5)
        factors = [(P, P, half, lam), (Q, Q, -half, lam)]
        parts = [outer_terms(*f) for f in factors]
        if R:
            a, b = (D @ P).tocsr(), (D @ Q).tocsr()  # rows U_j^T P_v and U_j^T Q_w
            ms = n_lam + np.arange(R)
            mp = ms + R
            ones = np.ones(R)
            # s_j: a b^T + b a^T - 2 a a^T;   p_j: a b^T + b a^T - 2 b b^T.
            factors.append((sp.vstack([a, a, a, b]).tocsr(), sp.vstack([b, a, b, b]).tocsr(),
                            np.concatenate([ones, -ones, ones, -ones]), np.concatenate([ms, ms, mp, mp])))
            parts.append(outer_terms(*factors[-1]))
        rows, cols, vals, mult = (np.concatenate(x) for x in zip(*parts))
        labels = (lam_labels + [f"{op.name}.s[{int(j)}]" for j in dgroup]
                  + [f"{op.name}.p[{int(j)}]" for j in dgroup])
        nonneg = np.concatenate([np.ones(n_lam, dtype=bool), np.zeros(2 * R, dtype=bool)])
        return QCTerms(rows, cols, vals, mult, n_lam + 2 * R, nonneg, labels, factors)


class GroupSort(PreservedDirections):
    """Ascending sort of consecutive groups of ``op.params["group_size"]`` coordinates.

    ``group_size`` defaults to ``op.size`` (FullSort).  ``group_size`` 2 is
    GroupSort2; deel-torchlip's ``MaxMin`` (``[relu(x), relu(-x)]``) is a different
    map and is handled as an affine map and a ReLU.

    Shape: the node's pre-activation and output both have ``op.size`` entries,
    a multiple of the group size.

    Note: the constraint is the one of Pauli et al., ICLR 2024 (arXiv:2401.14033);
    see the module docstring for the multipliers.
    """

    functions = ("groupsort",)
    citation = "Pauli et al., ICLR 2024 (arXiv:2401.14033)"

    def group_size(self, op) -> int:
        n = op.size
        g = op.params.get("group_size")
        g = n if g is None else int(g)
        if g < 1 or n % g:
            raise ValueError(f"{op.name}: groupsort needs a size ({n}) that is a multiple of group_size ({g})")
        return g

    # -- the activation ------------------------------------------------
    def evaluate(self, x, op):
        x = np.asarray(x, dtype=np.float64)
        g = self.group_size(op)
        return np.sort(x.reshape(len(x), -1, g), axis=2).reshape(x.shape)

    def jacobian(self, x, J, op):
        """Rows of ``J`` permuted as the sort permutes each group (a permutation matrix per sample)."""
        x = np.asarray(x, dtype=np.float64)
        b, n = x.shape
        g = self.group_size(op)
        order = np.argsort(x.reshape(b, -1, g), axis=2, kind="stable")
        order = (order + g * np.arange(n // g)[None, :, None]).reshape(b, n)
        return np.take_along_axis(np.asarray(J), order[:, :, None], axis=1)

    # -- the groups ----------------------------------------------------
    def groups(self, op):
        g = self.group_size(op)
        return np.arange(op.size) // g, op.size // g

    def directions(self, op):
        """``U_j^T = 1_g^T / sqrt(g)`` on each group: ``kron(I_m, 1_g^T / sqrt(g))``."""
        g = self.group_size(op)
        m = op.size // g
        D = sp.kron(sp.identity(m, format="csr"), np.full((1, g), 1.0 / np.sqrt(g)), format="csr")
        return D, np.arange(m)
