r"""Implicit (equilibrium / DEQ) layers: solving them, differentiating them, proving them well-posed.

An implicit layer maps its input ``u`` (an affine map ``U x + b`` of the
network's values) to the solution ``z`` of

.. math:: z = \phi(F z + u),

with ``phi`` elementwise and slope-restricted in :math:`[\alpha, \beta]` and
``F`` the feedback matrix (:class:`~lipsdp.network.Equilibrium`).  In the LFT
form of MATH.md section 3 the node's pre-activation rows read its own block,
``P_k = L_u + F Q_k`` (:func:`lipsdp.lifting.lift`), so ``C_vw`` is not
triangular (section 5.2), and the slope QC of LipSDP enters the LMI unchanged.
For ReLU and ``y = C z`` the LMI reads
:math:`\begin{bmatrix}-\rho I & U^T T\\ T U & TF + F^T T - 2T + C^T C\end{bmatrix} \preceq 0`.

**Well-posedness** (the equilibrium exists and is unique for every ``u``) is
needed for the bound to mean anything.  lipsdp proves it from the verified
multipliers ``T`` of the layer's own block: with ``A = diag(alpha)``,
``B = diag(beta)`` (``beta > alpha``),

.. math::

    N(T) = 2T + 2F^T T A B F - F^T T (A + B) - (A + B) T F \succ 0

(checked rigorously, as the LMI itself, by :func:`lipsdp.verify.rigorous_negative_definite`).
For ``ReLU`` this is :math:`2T - TF - F^T T \succ 0`; the LMI's own-block
diagonal already forces it when nothing else touches the block.  Why it
suffices [D]: ``N(T) > 0`` says
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
condition of Revay, Wang and Manchester for monotone slope-:math:`[0, 1]` activations
[R]: the equilibrium exists and is unique for every input.  Every slope-restricted
activation of :mod:`lipsdp.constraints.slope` is covered (non-monotone SiLU/GELU too:
``psi`` is monotone).  GroupSort / Householder implicit layers are refused: no such
argument is known to lipsdp.

A strictly negative definite LMI alone also gives *uniqueness* of the whole network's
state (two states for one input would make the quadratic form nonnegative on a
nonzero vector), but not existence; hence the separate check above.

The forward pass (:func:`solve`) is Picard iteration ``z <- phi(F z + u)`` with
semismooth Newton steps on ``z - phi(F z + u) = 0`` and a backtracking line search;
Jacobians follow from the implicit function theorem,
:math:`\partial z / \partial u = (I - D F)^{-1} D`, :math:`D = \operatorname{diag}\phi'(F z + u)`.

References
----------
M. Revay, R. Wang, I. R. Manchester, "Lipschitz Bounded Equilibrium Networks", arXiv:2010.01732, 2020.
E. Winston, J. Z. Kolter, "Monotone operator equilibrium networks", NeurIPS 2020.
S. Bai, J. Z. Kolter, V. Koltun, "Deep Equilibrium Models", NeurIPS 2019.
M. Fazlyab et al., "Efficient and Accurate Estimation of Lipschitz Constants for Deep Neural Networks",
NeurIPS 2019 (the slope QC).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp.activations import IMPLICIT_PARAMS, implicit_params
from lipsdp.errors import WellPosednessError

#: Activations of :class:`lipsdp.nn.ImplicitLayer`: name -> the key of its one scalar parameter (or None).
#: Derived from the catalogue :mod:`lipsdp.activations` (entries with ``implicit = True``).
ACTIVATION_PARAMS = IMPLICIT_PARAMS

#: ``Activation.params`` for ``function`` with its scalar parameter ``param``.
activation_params = implicit_params


def _dense(F) -> np.ndarray:
    return F.toarray() if sp.issparse(F) else np.asarray(F, dtype=np.float64)


def solve(op, u: np.ndarray, tol: float = 1e-12, max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Equilibria ``z = phi(F z + u)`` of a batch ``u`` (shape ``(batch, size)``).

    Newton steps ``z <- z - a (I - D F)^{-1} r`` on the residual ``r = z - phi(F z + u)``
    with backtracking on ``||r||``, and a Picard step ``z <- phi(F z + u)`` wherever
    the Newton system is singular or the line search fails.  A sample has converged
    when ``max|r| <= tol (1 + max|z|)``.

    Returns
    -------
    z : ndarray, shape (batch, size)
    converged : ndarray of bool, shape (batch,)
    """
    from lipsdp.constraints import get_constraint

    qc = get_constraint(op.function)
    F = _dense(op.feedback)
    u = np.asarray(u, dtype=np.float64).reshape(len(u), -1)
    b, n = u.shape
    eye = np.eye(n)

    def residual(z, uu):
        v = z @ F.T + uu
        return v, z - qc.evaluate(v, op)

    z = np.zeros_like(u)
    v, r = residual(z, u)
    norm = np.abs(r).max(axis=1, initial=0.0)
    done = norm <= tol * (1.0 + np.abs(z).max(axis=1, initial=0.0))
    for _ in range(max_iter):
        if done.all():
            break
        act = ~done
        za, va, ra, na = z[act], v[act], r[act], norm[act]
        J = eye - qc.derivative(va, op)[:, :, None] * F[None]
        ok = np.ones(len(za), dtype=bool)
        try:
            step = np.linalg.solve(J, ra[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # one singular system must not spoil the others: per sample
            step = np.zeros_like(za)
            for i in range(len(za)):
                try:
                    step[i] = np.linalg.solve(J[i], ra[i])
                except np.linalg.LinAlgError:
                    ok[i] = False
        ok &= np.all(np.isfinite(step), axis=1)
        new = za - ra  # Picard step: phi(F z + u)
        accepted = ~ok
        a = 1.0
        for _ in range(30):
            if accepted.all():
                break
            trial = za - a * step
            _, rt = residual(trial, u[act])
            nt = np.abs(rt).max(axis=1, initial=0.0)
            good = ~accepted & (nt <= (1.0 - 1e-4 * a) * na)
            new[good] = trial[good]
            accepted |= good
            a *= 0.5
        z[act] = new
        v, r = residual(z, u)
        norm = np.abs(r).max(axis=1, initial=0.0)
        done = np.isfinite(norm) & (norm <= tol * (1.0 + np.abs(z).max(axis=1, initial=0.0)))
    return z, done


def equilibrium(op, u: np.ndarray, strict: bool = False, **options) -> np.ndarray:
    """The equilibria of :func:`solve`; rows that did not converge are NaN (``strict``: an error)."""
    z, done = solve(op, u, **options)
    if not done.all():
        if strict:
            raise WellPosednessError(f"implicit layer {op.name!r}: no equilibrium found for "
                                     f"{int((~done).sum())} of {len(done)} inputs (is it well-posed?)")
        z[~done] = np.nan
    return z


def jacobian(op, u: np.ndarray, z: np.ndarray, Ju: np.ndarray) -> np.ndarray:
    """Implicit function theorem: ``dz/dx = (I - D F)^{-1} D du/dx`` at equilibria ``z``.

    ``u``, ``z``: shape ``(batch, size)``; ``Ju``: ``(batch, size, n0)``.
    """
    from lipsdp.constraints import get_constraint

    F = _dense(op.feedback)
    D = get_constraint(op.function).derivative(z @ F.T + u, op)
    n = F.shape[0]
    J = np.full(np.shape(Ju), np.nan)
    ok = np.all(np.isfinite(z), axis=1)
    if ok.any():
        A = np.eye(n)[None] - D[ok][:, :, None] * F[None]
        J[ok] = np.linalg.solve(A, D[ok][:, :, None] * np.asarray(Ju)[ok])
    return J


def lipschitz(op, slope: float) -> float:
    """``slope / (1 - slope ||F||)`` (inf when ``slope ||F|| >= 1``): the layer's gain from ``u`` to ``z``.

    From :math:`\\|\\Delta z\\| \\le s (\\|F\\| \\|\\Delta z\\| + \\|\\Delta u\\|)`.
    """
    from lipsdp.bounds import spectral_norm

    k = slope * spectral_norm(op.feedback) * (1 + 1e-12)
    return slope / (1.0 - k) if k < 1.0 else float("inf")


# ---------------------------------------------------------------------------
# well-posedness
# ---------------------------------------------------------------------------
def implicit_nodes(network) -> list[int]:
    from lipsdp.network import Equilibrium

    return [n for n in network.activations() if isinstance(network.op(n), Equilibrium)]


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
    from lipsdp.constraints import SlopeRestricted, get_constraint

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
        diag = np.diag(_dense(op.feedback))
        bad = np.flatnonzero((alpha == 0) & (beta * diag >= 1.0))
        if bad.size:
            i = int(bad[0])
            raise WellPosednessError(f"implicit layer {op.name!r} is not provably well-posed: feedback "
                                     f"F[{i},{i}] = {diag[i]:g} >= 1/beta = {1 / beta[i]:g}, so no diagonal T "
                                     "gives 2T - TF - F^T T > 0 (the equilibrium may not exist or be unique)")


def own_block_lmi(op):
    """``M_own(t) = -N(T)``: the slope QC of the layer on its own block (``P = F``, ``Q = I``), as an LMI."""
    from lipsdp.constraints import get_constraint
    from lipsdp.lmi import LMIProblem

    n = op.size
    F = sp.csr_matrix(_dense(op.feedback))
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
    from lipsdp.verify import rigorous_negative_definite

    t = np.maximum(np.asarray(t, dtype=np.float64).ravel(), 0.0)
    if t.size == 1:
        t = np.full(op.size, t[0])
    return rigorous_negative_definite(own_block_lmi(op), t)


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
    from lipsdp.certificate import UNVERIFIED
    from lipsdp.lifting import lift
    from lipsdp.lmi import build_lmi

    names = [network.op(n).name for n in nodes]
    report = {"implicit_layers": names, "proved": False,
              "condition": "2T + 2F^T T A B F - F^T T (A+B) - (A+B) T F > 0 for the verified T "
                           "(MATH.md section 5.2; Revay, Wang, Manchester 2020)"}
    cert.network["well_posedness"] = report
    if not cert.verified:
        report["message"] = "not proved: no verified certificate"
        return
    lifting = lift(network)
    # The variables' layout (and so var_block) does not depend on the output map.
    omap = np.eye(network.output_dim)[:1] if norm == "linf" else None
    lmi = build_lmi(lifting, formulation, output_map=omap, norm=norm)
    x = np.asarray(cert.multipliers[0] if cert.multipliers and isinstance(cert.multipliers[0], list)
                   else cert.multipliers, dtype=np.float64)
    block = {b.node: k for k, b in enumerate(lifting.blocks)}
    margins = {}
    for node, name in zip(nodes, names):
        t = x[lmi.var_block == block[node]]
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
