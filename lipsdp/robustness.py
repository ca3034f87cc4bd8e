"""Certified robustness radii of classifiers from verified Lipschitz bounds (docs/math.md §9).

A classifier with logits :math:`f(x)\\in\\mathbb R^K` predicts :math:`y=\\arg\\max_i f_i(x)`. Its
margins are :math:`m_j(x)=f_y(x)-f_j(x)` for :math:`j\\ne y`. If :math:`L_{yj}` bounds the
Lipschitz constant of the scalar :math:`f_y-f_j` (the LipSDP read-out :math:`c=e_y-e_j`, docs/math.md
§1.3 and §2), then for every perturbation with :math:`\\|\\delta\\|<r(x)`,

.. math::

    f_y(x+\\delta)-f_j(x+\\delta)\\ \\ge\\ m_j(x)-L_{yj}\\|\\delta\\|\\ >\\ 0\\quad\\text{for all } j\\ne y,
    \\qquad r(x)=\\min_{j\\ne y}\\frac{m_j(x)}{L_{yj}},

so the prediction cannot change inside the open ball of radius :math:`r(x)`.

Two ways to get the :math:`L_{yj}`:

* :func:`pairwise_lipschitz` certifies each pair separately (``K(K-1)/2`` SDPs). This is the tightest
  option with global bounds. docs/math.md §9 calls it "best".
* A single global bound :math:`L` of :math:`f` (one SDP, :func:`lipsdp.certify`) gives
  :math:`L_{yj}\\le\\sqrt2\\,L` in :math:`\\ell_2`, because :math:`\\|e_y-e_j\\|_2=\\sqrt2`. In
  :math:`\\ell_\\infty` it gives :math:`L_{yj}\\le2L`, where :math:`L=\\max_i\\sup_x\\|\\nabla f_i(x)\\|_1`
  is what ``certify(norm="linf")`` returns, and the triangle inequality gives the factor 2.

:func:`local_radii` adds local bounds (docs/math.md §6, :mod:`lipsdp.local`): each sample's bound on
the ball of a radius :math:`R` around it, whose radius is capped at :math:`R`. Margins come from a float64 forward pass
(:meth:`lipsdp.network.Network.numpy_forward`). As docs/math.md §9 says, the guarantee is for the
real-arithmetic function with the given weights. Inference rounding error is not subtracted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lipsdp import pipeline
from lipsdp.local import localize
from lipsdp.certificate import Certificate
from lipsdp.errors import LipSDPError

__all__ = ["RadiusResult", "pair_certificate", "global_certificate", "pairwise_lipschitz", "global_lipschitz",
           "certified_radii", "local_radii", "REGION_WIDENING"]

NORMS = ("l2", "linf")
#: Global-to-pairwise factor :math:`\\|e_y-e_j\\|`: sqrt(2) for l2, 2 for l_inf (see the module docstring).
GLOBAL_FACTOR = {"l2": math.sqrt(2.0), "linf": 2.0}
#: :func:`local_radii` certifies on a ball this much wider than the largest radius asked for, so that a
#: sample can count as certified at that radius itself (radii certify strictly smaller perturbations).
REGION_WIDENING = 1.0 + 1e-6


def _as_network(model_or_network, **load_options):
    """The model as a validated :class:`~lipsdp.network.Network`. It is loaded once."""
    network, _ = pipeline.load_model(model_or_network, **load_options)
    return network.validate()


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise LipSDPError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")


def pair_certificate(network, y: int, j: int, *, norm: str = "l2", solver: str = "auto",
                     formulation: str = "neuron", time_limit: float | None = None) -> Certificate:
    """The LipSDP certificate of one logit difference :math:`f_y-f_j` (read-out :math:`c=e_y-e_j`).

    One unit of :func:`pairwise_lipschitz`, independent of every other pair, so that
    :mod:`lipsdp.parallel` can run pairs on separate processes or machines (docs/math.md §9).
    ``network`` is a validated :class:`~lipsdp.network.Network`. The certificate may be unverified;
    the caller decides what that means.
    """
    _check_norm(norm)
    c = np.zeros((1, network.output_dim))
    c[0, y], c[0, j] = 1.0, -1.0
    return pipeline.certify_network(network, solver=solver, formulation=formulation, norm=norm, output_map=c,
                                    time_limit=time_limit, lower_bound_samples=0, compare=False)


def global_certificate(network, *, norm: str = "l2", solver: str = "auto", formulation: str = "neuron",
                       time_limit: float | None = None) -> Certificate:
    """The LipSDP certificate of the whole logit map (see :func:`global_lipschitz`); may be unverified."""
    _check_norm(norm)
    return pipeline.certify_network(network, solver=solver, formulation=formulation, norm=norm,
                                    time_limit=time_limit, lower_bound_samples=0, compare=False)


def pairwise_lipschitz(model_or_network, norm: str = "l2", solver: str = "auto", pairs=None, *,
                       formulation: str = "neuron", time_limit: float | None = None,
                       **load_options) -> np.ndarray:
    """Verified Lipschitz bounds :math:`L_{yj}` of every logit difference :math:`f_y-f_j`.

    For each pair, LipSDP certifies the scalar network :math:`c^Tf` with :math:`c=e_y-e_j`
    (docs/math.md §1.3 and §9):

    .. math::

        |(f_y-f_j)(x)-(f_y-f_j)(x')|\\ \\le\\ L_{yj}\\,\\|x-x'\\|
        \\quad\\text{for all }x,x'.

    Here :math:`\\|\\cdot\\|` is :math:`\\ell_2` or :math:`\\ell_\\infty` (``norm``). In
    :math:`\\ell_\\infty`, :math:`L_{yj}` bounds :math:`\\sup_x\\|\\nabla(f_y-f_j)(x)\\|_1`. The bound is
    symmetric in :math:`(y,j)`, so only ``K(K-1)/2`` SDPs are solved. For :math:`\\ell_2`, always
    :math:`L_{yj}\\le\\sqrt2\\,L` for the global bound :math:`L` of :math:`f`.

    Parameters
    ----------
    model_or_network : str, os.PathLike, torch.nn.Module or Network
        The classifier. Its output is the logit vector of size ``K``. It is loaded once.
    norm : {"l2", "linf"}
        Input norm.
    solver : str
        Backend name, or ``"auto"`` (see :func:`lipsdp.certify`).
    pairs : iterable of (int, int), optional
        Only these unordered pairs. The other off-diagonal entries are ``inf``, and any radius
        that depends on them is 0. The default is all pairs.
    formulation : {"neuron", "layer"}
        The LipSDP multiplier set.
    time_limit : float, optional
        Solver seconds per pair.
    **load_options
        Passed to the loader for model files, e.g. ``trust_pickle=True``.

    Returns
    -------
    ndarray, shape (K, K)
        ``L[y, j] = L[j, y]`` is the verified (rounded-up) bound for :math:`f_y-f_j`. The
        diagonal is 0.

    Raises
    ------
    LipSDPError
        A pair did not verify, or a pair index is out of range.
    """
    _check_norm(norm)
    network = _as_network(model_or_network, **load_options)
    k = network.output_dim
    if k < 2:
        raise LipSDPError(f"a classifier needs at least 2 outputs; this network has {k}")
    if pairs is None:
        todo = [(y, j) for y in range(k) for j in range(y + 1, k)]
    else:
        todo = set()
        for y, j in pairs:
            y, j = int(y), int(j)
            if not (0 <= y < k and 0 <= j < k):
                raise LipSDPError(f"pair ({y}, {j}) is out of range: the network has {k} outputs (0..{k - 1})")
            if y != j:
                todo.add((min(y, j), max(y, j)))
        todo = sorted(todo)
    L = np.full((k, k), np.inf)
    np.fill_diagonal(L, 0.0)
    for y, j in todo:
        cert = pair_certificate(network, y, j, norm=norm, solver=solver, formulation=formulation,
                                time_limit=time_limit)
        if not cert.verified:
            raise LipSDPError(f"the Lipschitz bound of f_{y} - f_{j} ({norm}) did not verify: "
                              f"{cert.status}: {cert.message}")
        L[y, j] = L[j, y] = cert.bound
    return L


def global_lipschitz(model_or_network, norm: str = "l2", solver: str = "auto", *,
                     formulation: str = "neuron", **load_options) -> float:
    """One verified global bound :math:`L` of the logit map (a single call to :func:`lipsdp.certify`).

    ``l2``: :math:`\\|f(x)-f(x')\\|_2\\le L\\|x-x'\\|_2`. ``linf``: :math:`|f_i(x)-f_i(x')|\\le
    L\\|x-x'\\|_\\infty` for every output :math:`i`. :func:`certified_radii` turns it into
    :math:`L_{yj}\\le\\sqrt2L` (l2) or :math:`2L` (linf).

    Raises
    ------
    LipSDPError
        The bound did not verify.
    """
    _check_norm(norm)
    network = _as_network(model_or_network, **load_options)
    cert = global_certificate(network, norm=norm, solver=solver, formulation=formulation)
    if not cert.verified:
        raise LipSDPError(f"the global Lipschitz bound ({norm}) did not verify: {cert.status}: {cert.message}")
    return float(cert.bound)


@dataclass
class RadiusResult:
    """Certified radii of a batch of inputs (docs/math.md §9).

    Attributes
    ----------
    predictions : ndarray of int, shape (N,)
        :math:`y(x)=\\arg\\max_i f_i(x)` from the float64 forward pass.
    labels : ndarray of int or None
        True labels, if they were given.
    correct : ndarray of bool, shape (N,)
        ``predictions == labels``. All True when no labels were given, so radii then certify
        that the prediction does not change.
    logits : ndarray, shape (N, K)
    margins : ndarray, shape (N, K)
        :math:`m_j(x)=f_y(x)-f_j(x)` for the predicted :math:`y`. The entry at :math:`j=y` is 0.
    radii : ndarray, shape (N,)
        :math:`r(x)=\\min_{j\\ne y}m_j(x)/L_{yj}` for correctly classified points, 0 otherwise.
        The prediction is constant on the open ball :math:`\\|\\delta\\|<r(x)`.
    binding : ndarray of int, shape (N,)
        The class :math:`j` that attains the minimum, or -1 where the radius is 0 by definition.
    L : ndarray, shape (K, K)
        The pairwise bounds used. With a global bound, every off-diagonal entry is
        :math:`\\sqrt2L` (l2) or :math:`2L` (linf).
    norm : str
        ``"l2"`` or ``"linf"``.
    method : str
        ``"pairwise"`` or ``"global"``.
    """

    predictions: np.ndarray
    labels: np.ndarray | None
    correct: np.ndarray
    logits: np.ndarray
    margins: np.ndarray
    radii: np.ndarray
    binding: np.ndarray
    L: np.ndarray
    norm: str
    method: str

    def certified_accuracy(self, eps):
        """The fraction of points that are correct and certified at radius ``eps``: :math:`r(x)>\\epsilon`.

        The comparison is strict because the certificate covers the open ball
        :math:`\\|\\delta\\|<r(x)`. At ``eps = 0`` the result is the clean accuracy, except for exact
        ties in the logits.

        Parameters
        ----------
        eps : float or array_like
            Radius or radii, in the norm of the result.

        Returns
        -------
        float or ndarray
            The same shape as ``eps``.
        """
        e = np.asarray(eps, dtype=np.float64)
        acc = (self.radii[:, None] > e.reshape(1, -1)).mean(axis=0) if len(self.radii) else np.zeros(e.size)
        return float(acc[0]) if e.ndim == 0 else acc.reshape(e.shape)

    @property
    def clean_accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else 0.0


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _pairwise_bounds(network, L, norm: str, solver: str) -> tuple[np.ndarray, str]:
    """``(L_yj matrix, method)`` from :func:`certified_radii`'s ``L`` argument (computed here if asked)."""
    k = network.output_dim
    method = "pairwise"
    if L is None or (isinstance(L, str) and L == "pairwise"):
        Lmat = pairwise_lipschitz(network, norm=norm, solver=solver)
    elif isinstance(L, str) and L == "global":
        Lmat, method = global_lipschitz(network, norm=norm, solver=solver), "global"
    elif isinstance(L, Certificate):
        if not L.verified:
            raise LipSDPError(f"the certificate holds no verified bound ({L.status})")
        if L.norm != norm:
            raise LipSDPError(f"the certificate is for the {L.norm} norm, not {norm}")
        Lmat, method = float(L.bound), "global"
    elif isinstance(L, str):
        raise LipSDPError(f"unknown L {L!r}; use None, 'pairwise', 'global', a number or a (K, K) matrix")
    elif np.ndim(L) == 0:
        Lmat, method = float(L), "global"
    else:
        Lmat = np.array(L, dtype=np.float64)
        if Lmat.shape != (k, k):
            raise LipSDPError(f"pairwise L must have shape ({k}, {k}), got {Lmat.shape}")
    if method == "global":
        if not (Lmat >= 0):  # also rejects NaN
            raise LipSDPError(f"a Lipschitz bound must be >= 0, got {Lmat}")
        # Round sqrt(2) L up so that the float used is >= the real sqrt(2) L.
        scaled = np.nextafter(GLOBAL_FACTOR[norm] * Lmat, np.inf) if Lmat > 0 else 0.0
        Lmat = np.full((k, k), scaled)
        np.fill_diagonal(Lmat, 0.0)
    if np.isnan(Lmat).any() or (Lmat < 0).any():
        raise LipSDPError("pairwise Lipschitz bounds must be >= 0 (inf allowed for unknown pairs)")
    return Lmat, method


def certified_radii(model_or_network, X, labels=None, L=None, norm: str = "l2", *, solver: str = "auto",
                    **load_options) -> RadiusResult:
    """Certified :math:`\\ell_2` or :math:`\\ell_\\infty` robustness radii from global Lipschitz bounds.

    For a prediction :math:`y` with margins :math:`m_j=f_y(x)-f_j(x)` (docs/math.md §9),

    .. math::

        r(x)=\\min_{j\\ne y}\\frac{m_j}{L_{yj}},\\qquad
        \\|\\delta\\|<r(x)\\ \\Rightarrow\\ \\arg\\max_i f_i(x+\\delta)=y ,

    because :math:`f_y(x+\\delta)-f_j(x+\\delta)\\ge m_j-L_{yj}\\|\\delta\\|>0`. A global bound
    :math:`L` for :math:`f` uses :math:`L_{yj}=\\sqrt2L` (l2, docs/math.md §1.3) or :math:`2L`
    (linf), which gives :math:`r(x)=(f_y-\\max_{j\\ne y}f_j)/(\\sqrt2L)`. Pairwise radii are never
    smaller than global ones, up to solver tolerance. In l2, doubling a global certificate
    :math:`(\\rho,T)` gives a feasible point :math:`(2\\rho,2T)` of the pairwise LMI, because
    :math:`W^Tcc^TW\\preceq2W^TW`.

    Parameters
    ----------
    model_or_network : str, os.PathLike, torch.nn.Module or Network
        The classifier. It is loaded once. The forward pass is
        :meth:`~lipsdp.network.Network.numpy_forward` in float64.
    X : array_like, shape (N, ...)
        Inputs. They are flattened to ``(N, input_dim)``. Torch tensors are accepted.
    labels : array_like of int, shape (N,), optional
        True labels. Misclassified points get radius 0. Without labels, the radius certifies that
        the predicted label does not change.
    L : None, "pairwise", "global", float, Certificate or ndarray (K, K)
        ``None`` or ``"pairwise"``: compute :func:`pairwise_lipschitz`. ``"global"``: compute
        :func:`global_lipschitz`. A float or a verified :class:`~lipsdp.certificate.Certificate`
        for :math:`f` (no ``output_map``): a global bound, converted with
        :math:`\\sqrt2` (l2) or 2 (linf). A ``(K, K)`` matrix: pairwise bounds, e.g. from an
        earlier :func:`pairwise_lipschitz` call.
    norm : {"l2", "linf"}
        The norm of the perturbation. It must match the norm that ``L`` was certified in.
    solver : str
        The backend, when ``L`` is computed here.
    **load_options
        Passed to the loader for model files.

    Returns
    -------
    RadiusResult
    """
    _check_norm(norm)
    network = _as_network(model_or_network, **load_options)
    k = network.output_dim
    Lmat, method = _pairwise_bounds(network, L, norm, solver)

    X = _to_numpy(X)
    X = X.reshape(len(X), -1)
    if X.shape[1] != network.input_dim:
        raise LipSDPError(f"inputs have {X.shape[1]} features but the network expects {network.input_dim}")
    logits = np.asarray(network.numpy_forward(X), dtype=np.float64).reshape(len(X), k)
    n = len(X)
    pred = logits.argmax(axis=1) if n else np.zeros(0, dtype=int)
    if labels is not None:
        labels = _to_numpy(labels).astype(np.int64).reshape(-1)
        if labels.shape != (n,):
            raise LipSDPError(f"labels must have shape ({n},), got {labels.shape}")
        correct = pred == labels
    else:
        correct = np.ones(n, dtype=bool)
    margins = logits[np.arange(n), pred][:, None] - logits  # (N, K), 0 at the prediction
    Lrows = Lmat[pred]  # (N, K): L_{y j} for the predicted y
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(Lrows > 0, margins / Lrows, np.where(margins > 0, np.inf, 0.0))
    ratio[np.arange(n), pred] = np.inf  # j = y is not a constraint
    ratio = np.maximum(ratio, 0.0)  # a negative ratio cannot occur for the argmax; keep radii >= 0
    binding = ratio.argmin(axis=1) if n else np.zeros(0, dtype=int)
    radii = ratio[np.arange(n), binding] if n else np.zeros(0)
    radii = np.where(correct, radii, 0.0)
    binding = np.where(correct & (radii > 0), binding, -1)
    return RadiusResult(predictions=pred, labels=labels, correct=correct, logits=logits, margins=margins,
                        radii=radii, binding=binding, L=Lmat, norm=norm, method=method)


def local_radii(network, X, labels, L_global, radius: float, norm: str = "l2", *, solver: str = "auto",
                formulation: str = "neuron", time_limit: float | None = None) -> dict:
    """Certified radii from each sample's local bound on its own ball, at least the global radii.

    For a correctly classified sample ``x`` whose global radius (from ``L_global``, a float, a matrix or
    ``inf`` where nothing verified) is below ``R = radius * REGION_WIDENING``, LipSDP certifies ``f`` on
    the ball ``||x' - x|| <= R`` in ``norm`` with per-neuron sectors (:func:`lipsdp.local.localize`); with
    that bound ``L_x`` (never above the global one), ``r(x) = min(margin / (sqrt2 L_x), R)`` (l2; ``2 L_x``
    in l_inf): a perturbation smaller than it keeps ``x + delta`` inside the ball, where ``L_x`` holds
    (docs/math.md §6 and §9).  The radius is the larger of that and the global radius.

    Returns
    -------
    dict
        ``radii``, ``predictions``, ``binding`` (as :func:`certified_radii`) and ``local_bounds``: the
        verified local bound per sample, None where none was computed or verified.
    """
    res = certified_radii(network, X, labels, L=L_global, norm=norm)
    X = _to_numpy(X).reshape(len(res.radii), -1)
    labels = None if labels is None else _to_numpy(labels).astype(np.int64).reshape(-1)
    region = float(radius) * REGION_WIDENING
    radii, binding, local = res.radii.copy(), res.binding.copy(), [None] * len(res.radii)
    for i in np.flatnonzero(res.correct & (res.radii < region)):
        local_net, _ = localize(network, X[i], region, norm)
        cert = pipeline.certify_network(local_net, solver=solver, formulation=formulation, norm=norm,
                                        time_limit=time_limit, lower_bound_samples=0, compare=False)
        if not cert.verified:
            continue
        local[i] = float(cert.bound)
        one = certified_radii(network, X[i:i + 1], None if labels is None else labels[i:i + 1],
                              L=float(cert.bound), norm=norm)
        capped = min(float(one.radii[0]), region)  # L_x holds only inside the ball
        if capped > radii[i]:
            radii[i], binding[i] = capped, int(one.binding[0])
    return {"radii": radii, "predictions": res.predictions, "binding": binding, "local_bounds": local}
