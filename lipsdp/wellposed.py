r"""Well-posedness of implicit layers: proving, from the verified multipliers, that the equilibrium exists.

An implicit layer ``z = phi(F z + u)`` (:mod:`lipsdp.equilibrium`) is a function of
``u`` only when the equilibrium exists and is unique for every ``u``; without that a
Lipschitz bound means nothing.  lipsdp proves it from the verified multipliers
``T`` of the layer's own block: with ``A = diag(alpha)``, ``B = diag(beta)``
(``beta > alpha``) the slope sector of ``phi``,

.. math::

    N(T) = 2T + 2F^T T A B F - F^T T (A + B) - (A + B) T F \succ 0

(checked rigorously, as the LMI itself, by :func:`lipsdp.verify.rigorous_negative_definite`).
For ``ReLU`` this is :math:`2T - TF - F^T T \succ 0`; the LMI's own-block
diagonal already forces it when nothing else touches the block.

Why it suffices (docs/math.md §5.2): ``N(T) > 0`` says
:math:`\sum_i t_i (\Delta z_i - \alpha_i \Delta v_i)(\beta_i \Delta v_i - \Delta z_i) < 0`
for every :math:`\Delta z \ne 0`, :math:`\Delta v = F \Delta z`.  Write
:math:`\phi = A + (B - A)\psi` with :math:`\psi` monotone and slope-restricted in
:math:`[0, 1]` (the loop transformation) and :math:`\Delta z = A\Delta v + (B-A)\Delta w`.
Then ``I - F A`` is invertible (otherwise :math:`\Delta w = 0`,
:math:`\Delta z = A \Delta v \ne 0` makes the sum 0), the equilibrium is
:math:`w = \psi(\tilde F w + \tilde u)` with :math:`\tilde F = (I - FA)^{-1} F (B - A)`,
and the inequality becomes :math:`2\Lambda - \Lambda\tilde F - \tilde F^T\Lambda \succ 0`
with the diagonal :math:`\Lambda = T (B - A)^2 \succ 0` (its diagonal entries
:math:`\lambda_i (1 - \tilde F_{ii}) > 0` force :math:`\lambda_i > 0`).  That is the
condition of Revay, Wang and Manchester for monotone slope-:math:`[0, 1]` activations:
the equilibrium exists and is unique for every input.  Every slope-restricted
activation is covered (non-monotone SiLU/GELU too: ``psi`` is monotone).
GroupSort / Householder implicit layers are refused: no such argument is known to lipsdp.

A strictly negative definite LMI alone also gives *uniqueness* of the whole network's
state (two states for one input would make the quadratic form nonnegative on a
nonzero vector), but not existence; hence the separate check.

References
----------
M. Revay, R. Wang, I. R. Manchester, "Lipschitz Bounded Equilibrium Networks", arXiv:2010.01732, 2020.
M. Fazlyab et al., "Efficient and Accurate Estimation of Lipschitz Constants for Deep Neural Networks",
NeurIPS 2019 (the slope QC).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp.certificate import UNVERIFIED
from lipsdp.constraints import SlopeRestricted, get_constraint
from lipsdp.equilibrium import dense
from lipsdp.errors import WellPosednessError
from lipsdp.lifting import lift
from lipsdp.lmi import LMIProblem, build_lmi
from lipsdp.verify import rigorous_negative_definite

__all__ = ["attach_well_posedness", "check_provable", "implicit_nodes", "own_block_lmi", "prove_well_posed"]

#: What the certificate says was proved (stored in ``cert.network["well_posedness"]["condition"]``).
CONDITION = ("2T + 2F^T T A B F - F^T T (A+B) - (A+B) T F > 0 for the verified T "
             "(docs/math.md §5.2; Revay, Wang, Manchester 2020)")


def implicit_nodes(network) -> list[int]:
    """The nodes of ``network`` that are implicit layers."""
    return [n for n in network.activations() if network.op(n).implicit]


def _sector(op, qc):
    lo, hi = qc.sector(op)
    return (np.broadcast_to(np.asarray(lo, dtype=np.float64), (op.size,)),
            np.broadcast_to(np.asarray(hi, dtype=np.float64), (op.size,)))


def check_provable(network) -> None:
    """Refuse implicit layers whose well-posedness lipsdp cannot prove, before any solve.

    Raises :class:`~lipsdp.errors.WellPosednessError` (exit 2) for a non-slope-restricted
    activation (GroupSort, Householder), for mixed degenerate sectors, and when the
    own-block condition ``N(T) > 0`` is impossible: with ``alpha_i = 0`` its diagonal is
    ``2 t_i (1 - beta_i F_ii)``, so ``beta_i F_ii >= 1`` rules out every ``T``.
    """
    for node in implicit_nodes(network):
        op = network.op(node)
        qc = get_constraint(op.function)
        if not isinstance(qc, SlopeRestricted):
            raise WellPosednessError(f"implicit layer {op.name!r} uses {op.function!r}: lipsdp proves "
                                     "well-posedness for slope-restricted activations only")
        alpha, beta = _sector(op, qc)
        flat = alpha == beta
        if flat.any() and not flat.all():
            raise WellPosednessError(f"implicit layer {op.name!r}: some neurons are linear and some not; "
                                     "lipsdp cannot prove its well-posedness")
        diag = np.diag(dense(op.feedback))
        bad = np.flatnonzero((alpha == 0) & (beta * diag >= 1.0))
        if bad.size:
            i = int(bad[0])
            raise WellPosednessError(f"implicit layer {op.name!r} is not provably well-posed: feedback "
                                     f"F[{i},{i}] = {diag[i]:g} >= 1/beta = {1 / beta[i]:g}, so no diagonal T "
                                     "gives 2T - TF - F^T T > 0 (the equilibrium may not exist or be unique)")


def own_block_lmi(op) -> LMIProblem:
    """``M_own(t) = -N(T)``: the slope QC of the layer on its own block (``P = F``, ``Q = I``), as an LMI."""
    n = op.size
    F = sp.csr_matrix(dense(op.feedback))
    I = sp.identity(n, format="csr")
    terms = get_constraint(op.function).terms(op, F, I, "neuron")
    zero = sp.csr_matrix((n, n))
    return LMIProblem(n=n, input_dim=0, const=zero, const_abs=zero, rows=terms.rows, cols=terms.cols,
                      vals=terms.vals, var=terms.mult, objective=np.zeros(terms.n_mult), nonneg=terms.nonneg,
                      labels=terms.labels, formulation="neuron", n_in=0)


def prove_well_posed(op, t: np.ndarray) -> tuple[bool, float]:
    """Prove ``N(T) > 0`` rigorously for the layer's multipliers ``t`` (one per neuron, or one shared).

    Returns ``(proved, margin)`` as :func:`lipsdp.verify.rigorous_negative_definite`.
    """
    t = np.maximum(np.asarray(t, dtype=np.float64).ravel(), 0.0)
    if t.size == 1:
        t = np.full(op.size, t[0])
    return rigorous_negative_definite(own_block_lmi(op), t)


def _multipliers_by_node(network, cert, formulation: str, norm: str) -> dict[int, np.ndarray]:
    """The certificate's multipliers of each implicit layer's own block, by node."""
    lifting = lift(network)
    # The variables' layout (and so var_block) does not depend on the output map.
    omap = np.eye(network.output_dim)[:1] if norm == "linf" else None
    lmi = build_lmi(lifting, formulation, output_map=omap, norm=norm)
    x = np.asarray(cert.multipliers[0] if cert.multipliers and isinstance(cert.multipliers[0], list)
                   else cert.multipliers, dtype=np.float64)
    block = {b.node: k for k, b in enumerate(lifting.blocks)}
    return {node: x[lmi.var_block == block[node]] for node in implicit_nodes(network)}


def attach_well_posedness(network, cert, formulation: str, norm: str = "l2") -> None:
    """Record in ``cert.network["well_posedness"]`` whether every implicit layer is proved well-posed.

    The multipliers of each implicit layer's own block are read from the verified
    certificate and :func:`prove_well_posed` is run on them.  If some layer is not
    proved, the bound is withdrawn (status ``unverified``): without an equilibrium
    the network is not a function and a Lipschitz bound means nothing.
    """
    nodes = implicit_nodes(network)
    if not nodes:
        return
    names = [network.op(n).name for n in nodes]
    report = {"implicit_layers": names, "proved": False, "condition": CONDITION}
    cert.network["well_posedness"] = report
    if not cert.verified:
        report["message"] = "not proved: no verified certificate"
        return
    margins = {}
    for node, t in _multipliers_by_node(network, cert, formulation, norm).items():
        name = network.op(node).name
        ok, margin = prove_well_posed(network.op(node), t)
        margins[name] = float(margin)
        if not ok:
            report["message"] = f"not proved for {name!r}; the bound is withdrawn"
            cert.status, cert.bound = UNVERIFIED, None
            cert.message = (f"the LMI verified but the well-posedness of implicit layer {name!r} could not be "
                            "proved, so there is no bound")
            return
    report.update(proved=True, margins=margins,
                  message="proved: each implicit layer has a unique equilibrium for every input")
