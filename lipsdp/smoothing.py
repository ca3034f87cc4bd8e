r"""Certified radii of a Gaussian-smoothed classifier, helped by the base classifier's certified Lipschitz bounds.

The smoothed classifier of a base classifier ``c(x) = argmax_k f_k(x)`` (logits ``f``) is
``G(x) = argmax_k P[c(x + delta) = k]``, ``delta ~ N(0, sigma^2 I)`` (Cohen, Rosenfeld, Kolter 2019).
For an input ``x`` (docs/math.md §12):

1. ``n0`` noisy copies choose the candidate class ``A`` (the most frequent base prediction);
2. ``n`` fresh copies give two lower confidence bounds, each at level ``1 - alpha/2``:
   Clopper-Pearson on ``p_A = P[c(x + delta) = A]``, and empirical Bernstein (Maurer and Pontil 2009) on
   ``S = E[s(x + delta)]``, with ``s(z) = clip(r_A(z) / tau, 0, 1)`` and ``r_A(z) = min_j (f_A - f_j)(z) / L_Aj``
   the base classifier's certified radius at ``z`` (the certified ``L_Aj`` make ``s`` ``1/tau``-Lipschitz);
3. the radius is the larger of Cohen's ``sigma Phi^{-1}(p_A_low)`` and the radius that ``S_low`` gives under the
   combined gradient bound ``||grad S|| <= min(1/tau, phi(Phi^{-1}(S)) / sigma)`` (the Lipschitz-variance-margin
   view of Delattre, Araujo, Barthelemy, Allauzen, ICLR 2024: the base classifier's Lipschitz constant bounds the
   smoothed classifier's as well as Gaussian smoothing does).  ``G`` predicts ``A`` within it.

Both confidence bounds hold together with probability at least ``1 - alpha`` (union bound), per input; when
neither exceeds 1/2 the sample abstains (prediction -1, radius 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from lipsdp.errors import LipSDPError
from lipsdp.pipeline import load_model
from lipsdp.robustness import certified_radii

__all__ = ["SmoothingResult", "combined_radius", "clopper_pearson_lower", "bernstein_lower", "smoothed_radii",
           "smoothing_report"]

#: Relative amount each radius is lowered by, for the rounding of its few float operations.
_SAFETY = 1e-9
ABSTAIN = -1

#: The standard normal law (the standard library's: scipy.stats costs most of a second to import).
_NORMAL = NormalDist()


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided ``1 - alpha`` Clopper-Pearson lower bound on a binomial proportion."""
    if successes <= 0:
        return 0.0
    from scipy.stats import beta as beta_dist  # scipy.stats costs most of a second to import: only here

    return float(beta_dist.ppf(alpha, successes, trials - successes + 1))


def bernstein_lower(values: np.ndarray, alpha: float) -> float:
    """One-sided ``1 - alpha`` empirical Bernstein lower bound on the mean of ``[0, 1]``-valued samples
    (Maurer and Pontil 2009, Theorem 4)."""
    n = len(values)
    if n < 2:
        return 0.0
    log_term = math.log(2.0 / alpha)
    var = float(np.var(values, ddof=1))
    return max(0.0, float(np.mean(values)) - math.sqrt(2.0 * var * log_term / n) - 7.0 * log_term / (3.0 * (n - 1)))


def combined_radius(s_low: float, sigma: float, tau: float) -> float:
    r"""``\int_{1/2}^{s_low} max(tau, sigma / phi(Phi^{-1}(u))) du``: the distance over which ``S`` stays above 1/2
    when ``||grad S|| <= min(1/tau, phi(Phi^{-1}(S))/sigma)`` (docs/math.md §12), lowered by a safety margin."""
    if s_low <= 0.5:
        return 0.0
    t_star = math.sqrt(2.0 * math.log(tau / (sigma * math.sqrt(2.0 * math.pi)))) \
        if tau > sigma * math.sqrt(2.0 * math.pi) else 0.0
    u_star = float(_NORMAL.cdf(t_star))  # where the two gradient bounds cross
    linear = tau * max(0.0, min(s_low, u_star) - 0.5)
    gauss = sigma * max(0.0, float(_NORMAL.inv_cdf(s_low)) - t_star)
    return (linear + gauss) * (1.0 - _SAFETY)


@dataclass
class SmoothingResult:
    """Per-sample results of :func:`smoothed_radii` (abstentions: prediction -1, radius 0)."""

    predictions: np.ndarray
    radii: np.ndarray
    labels: np.ndarray | None
    p_lower: np.ndarray       # Clopper-Pearson lower bound on p_A
    s_lower: np.ndarray       # Bernstein lower bound on S
    lipschitz_wins: np.ndarray  # the Lipschitz-margin radius beat Cohen's
    sigma: float
    samples: int
    n0: int
    alpha: float
    tau: float
    seed: int
    L: np.ndarray = field(repr=False)
    method: str = "global"

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels if self.labels is not None else self.predictions != ABSTAIN

    def certified_accuracy(self, radius: float) -> float:
        """Share of samples predicted correctly (not abstained) with a certified radius above ``radius``."""
        if not len(self.radii):
            return 0.0
        return float(np.mean(self.correct & (self.radii > radius)))

    @property
    def clean_accuracy(self) -> float:
        """Share of samples the smoothed classifier (its Monte-Carlo prediction) gets right."""
        return float(np.mean(self.correct)) if len(self.radii) else 0.0


def _base_scores(network, z: np.ndarray, L: np.ndarray, target: int, tau: float):
    """``(base class, s)`` for noisy inputs ``z``: the predicted class and the Lipschitz margin score."""
    logits = np.asarray(network.numpy_forward(z), dtype=np.float64)
    pred = logits.argmax(axis=1)
    margins = logits[:, [target]] - logits
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(L[target] > 0, margins / L[target], np.where(margins > 0, np.inf, -np.inf))
    ratio[:, target] = np.inf
    return pred, np.clip(ratio.min(axis=1) / tau, 0.0, 1.0)


def smoothed_radii(model_or_network, X, labels=None, *, sigma: float, samples: int = 1000, n0: int = 100,
                   alpha: float = 0.001, L="global", tau: float | None = None, seed: int = 0, batch: int = 4096,
                   solver: str = "auto", **load_options) -> SmoothingResult:
    """Certified l2 radii of the Gaussian-smoothed classifier (module docstring; docs/math.md §12).

    Parameters
    ----------
    model_or_network : str, os.PathLike, torch.nn.Module or Network
        The base classifier (logits).
    X, labels : array_like
        Inputs ``(N, ...)`` and optional labels (abstentions and wrong predictions count as not certified).
    sigma : float
        Standard deviation of the Gaussian noise.
    samples, n0 : int
        Monte-Carlo samples for the bounds, and for choosing the class (separate draws).
    alpha : float
        Each sample's radius holds with probability at least ``1 - alpha``.
    L : "global", "pairwise", float, Certificate or (K, K) array
        The base classifier's certified l2 bounds, as for :func:`lipsdp.certified_radii`.
    tau : float, optional
        Scale of the margin score ``s = clip(r_A / tau, 0, 1)`` (default ``4 sigma``; chosen before sampling).
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise LipSDPError(f"--smoothing sigma must be a positive number, got {sigma}")
    if not 0 < alpha < 1:
        raise LipSDPError(f"alpha must lie in (0, 1), got {alpha}")
    if samples < 2 or n0 < 1:
        raise LipSDPError(f"need samples >= 2 and n0 >= 1, got {samples} and {n0}")
    tau = 4.0 * sigma if tau is None else float(tau)
    if not tau > 0:
        raise LipSDPError(f"tau must be positive, got {tau}")
    network, _ = load_model(model_or_network, **load_options)
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    if X.shape[1] != network.input_dim:
        raise LipSDPError(f"inputs have {X.shape[1]} features but the network expects {network.input_dim}")
    base = certified_radii(network, np.zeros((1, network.input_dim)), L=L, solver=solver)  # for its L_yj matrix
    rng = np.random.default_rng(seed)
    out = {key: np.zeros(len(X)) for key in ("radii", "p_lower", "s_lower")}
    pred = np.full(len(X), ABSTAIN, dtype=np.int64)
    wins = np.zeros(len(X), dtype=bool)
    k = network.output_dim
    for i, x in enumerate(X):
        first = network.numpy_forward(x + sigma * rng.standard_normal((n0, x.size))).argmax(axis=1)
        target = int(np.bincount(first, minlength=k).argmax())
        hits, scores = 0, []
        for start in range(0, samples, batch):
            m = min(batch, samples - start)
            cls, s = _base_scores(network, x + sigma * rng.standard_normal((m, x.size)), base.L, target, tau)
            hits += int(np.sum(cls == target))
            scores.append(s)
        p_low = clopper_pearson_lower(hits, samples, alpha / 2)
        s_low = bernstein_lower(np.concatenate(scores), alpha / 2)
        cohen = sigma * float(_NORMAL.inv_cdf(p_low)) * (1.0 - _SAFETY) if p_low > 0.5 else 0.0
        lip = combined_radius(s_low, sigma, tau)
        out["p_lower"][i], out["s_lower"][i] = p_low, s_low
        if max(cohen, lip) > 0:
            pred[i], out["radii"][i], wins[i] = target, max(cohen, lip), lip > cohen
    labels = None if labels is None else np.asarray(labels).astype(np.int64).reshape(-1)
    if labels is not None and labels.shape != (len(X),):
        raise LipSDPError(f"labels must have shape ({len(X)},), got {labels.shape}")
    return SmoothingResult(predictions=pred, labels=labels, lipschitz_wins=wins, sigma=sigma, samples=samples,
                           n0=n0, alpha=alpha, tau=tau, seed=seed, L=base.L, method=base.method, **out)


def smoothing_report(result: SmoothingResult, radii) -> dict:
    """The JSON-ready report of ``lipsdp robustness --smoothing`` (docs/robustness.md)."""
    finite = result.L[np.isfinite(result.L) & (result.L > 0)]
    return {"method": f"smoothing ({result.method} L)", "norm": "l2", "n": int(len(result.radii)),
            "sigma": result.sigma, "samples": result.samples, "n0": result.n0, "alpha": result.alpha, "tau": result.tau,
            "seed": result.seed,
            "confidence": f"each radius holds with probability >= {1 - result.alpha:g} over the Monte-Carlo noise",
            "clean_accuracy": result.clean_accuracy, "abstained": int(np.sum(result.predictions == ABSTAIN)),
            "certified_accuracy": {repr(float(r)): result.certified_accuracy(r) for r in radii},
            "lipschitz_radius_used": int(np.sum(result.lipschitz_wins)),
            "L_range": [float(finite.min()), float(finite.max())] if finite.size else None,
            "radii": result.radii.tolist(), "predictions": result.predictions.tolist(),
            "labels": None if result.labels is None else result.labels.tolist()}
