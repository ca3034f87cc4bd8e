"""Householder activation: the quadratic constraint of Pauli et al. (ICLR 2024).

deel-torchlip's ``HouseHolder`` (Singla et al.) pairs coordinate ``k`` with
``k + n/2`` (the two halves of the channel axis, flattened) and, for a pair
:math:`z = (x, y)` with angle :math:`\\theta` and unit normal
:math:`u = (\\sin(\\theta/2), -\\cos(\\theta/2))`, keeps :math:`z` where
:math:`u^T z \\le 0` and reflects it where :math:`u^T z > 0`:

.. math::

    \\sigma(z) = \\begin{cases} z & u^T z \\le 0 \\\\
        (I - 2uu^T) z = \\begin{bmatrix}\\cos\\theta & \\sin\\theta\\\\
        \\sin\\theta & -\\cos\\theta\\end{bmatrix} z & u^T z > 0 \\end{cases}
    \\;=\\; (I - uu^T) z - |u^T z|\\, u .

So on each pair (docs/math.md §4.1):

- **(H1)** :math:`U^T \\Delta w = U^T \\Delta v` for :math:`U = (\\cos(\\theta/2), \\sin(\\theta/2))`,
  the unit vector spanning :math:`u^\\perp` (the map is the identity there);
- **(H2)** :math:`|u^T \\Delta w| \\le |u^T \\Delta v|` (:math:`t \\mapsto -|t|` is 1-Lipschitz),
  hence :math:`\\|\\Delta w\\| \\le \\|\\Delta v\\|` given H1.

These are the two facts GroupSort's constraint uses, with this :math:`U_j` in place
of :math:`\\mathbf 1/\\sqrt 2`: per pair a multiplier :math:`\\lambda_j \\ge 0` on
:math:`\\|\\Delta v_j\\|^2 - \\|\\Delta w_j\\|^2` (equal to
:math:`(u^T\\Delta v)^2 - (u^T\\Delta w)^2` once H1 holds) and free :math:`s_j, p_j`
on the preserved direction (see :mod:`lipsdp.constraints.groupsort`, whose
:class:`~lipsdp.constraints.groupsort.PreservedDirections` builds the terms).

``op.params``: ``"theta"`` (array of ``op.size / 2`` angles, default zeros) and
``"pairing"`` (only ``"halves"``, the deel-torchlip layout, is defined).

References
----------
P. Pauli, A. Havens, A. Araujo, S. Garg, F. Khorrami, F. Allgöwer, B. Hu,
"Novel Quadratic Constraints for Extending LipSDP beyond Slope-Restricted
Activations", ICLR 2024, arXiv:2401.14033.
S. Singla, S. Singla, S. Feizi, "Improved deterministic l2 robustness on CIFAR-10
and CIFAR-100", ICLR 2022 (the Householder activation).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp.constraints.groupsort import PreservedDirections


class Householder(PreservedDirections):
    """deel-torchlip ``HouseHolder``: a reflection of each pair ``(k, k + n/2)`` on one side of a line.

    Shape: the node's pre-activation and output both have ``op.size`` entries
    (even); ``op.params["theta"]`` has ``op.size / 2`` entries.

    Note: the constraint is the one of Pauli et al., ICLR 2024 (arXiv:2401.14033).
    """

    functions = ("householder",)
    citation = "Pauli et al., ICLR 2024 (arXiv:2401.14033)"

    def theta(self, op) -> np.ndarray:
        """The ``op.size / 2`` angles (zeros when ``op.params`` has none)."""
        n = op.size
        pairing = op.params.get("pairing", "halves")
        if pairing != "halves":
            raise ValueError(f"{op.name}: householder pairing {pairing!r} is not supported (only 'halves')")
        if n % 2:
            raise ValueError(f"{op.name}: householder needs an even size (pairs k, k + n/2), got {n}")
        theta = op.params.get("theta")
        if theta is None:
            return np.zeros(n // 2)
        theta = np.asarray(theta, dtype=np.float64).ravel()
        if theta.size == 1:
            theta = np.full(n // 2, theta[0])
        if theta.size != n // 2:
            raise ValueError(f"{op.name}: householder of size {n} needs {n // 2} angles, got {theta.size}")
        return theta

    # -- the activation ------------------------------------------------
    def _flip(self, x, op):
        th = self.theta(op)
        h = len(th)
        a, b = x[:, :h], x[:, h:]
        return a, b, th, a * np.sin(0.5 * th) - b * np.cos(0.5 * th) > 0

    def evaluate(self, x, op):
        x = np.asarray(x, dtype=np.float64)
        a, b, th, flip = self._flip(x, op)
        c, s = np.cos(th), np.sin(th)
        return np.concatenate([np.where(flip, c * a + s * b, a), np.where(flip, s * a - c * b, b)], axis=1)

    def jacobian(self, x, J, op):
        """Per pair: ``I`` where kept, the reflection ``[[cos, sin], [sin, -cos]]`` where reflected."""
        x = np.asarray(x, dtype=np.float64)
        J = np.asarray(J)
        _, _, th, flip = self._flip(x, op)
        h = len(th)
        Ja, Jb = J[:, :h], J[:, h:]
        c, s, f = np.cos(th)[None, :, None], np.sin(th)[None, :, None], flip[:, :, None]
        return np.concatenate([np.where(f, c * Ja + s * Jb, Ja), np.where(f, s * Ja - c * Jb, Jb)], axis=1)

    # -- the groups ----------------------------------------------------
    def groups(self, op):
        h = len(self.theta(op))
        return np.tile(np.arange(h), 2), h

    def directions(self, op):
        """``U_j^T = (cos(theta_j/2), sin(theta_j/2))`` on coordinates ``(j, j + n/2)``."""
        th = self.theta(op)
        h = len(th)
        j = np.arange(h)
        D = sp.csr_matrix((np.concatenate([np.cos(0.5 * th), np.sin(0.5 * th)]),
                           (np.concatenate([j, j]), np.concatenate([j, j + h]))), shape=(h, 2 * h))
        return D, j
