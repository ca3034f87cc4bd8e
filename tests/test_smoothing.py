"""Randomized smoothing with a certified Lipschitz margin (lipsdp.smoothing, docs/math.md §12): the radius
formulas, and on the digits classifier every certified sample survives PGD at its radius against the
smoothed classifier's Monte-Carlo estimate; an understated L is caught by the same attack."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import beta, norm

from digits_classifier import digits_classifier
from lipsdp.errors import LipSDPError
from lipsdp.robustness import global_lipschitz
from lipsdp.smoothing import bernstein_lower, clopper_pearson_lower, combined_radius, smoothed_radii

ALPHA = 1e-3


@pytest.fixture(scope="module")
def global_L():
    """The digits classifier's verified global l2 bound (one SDP for the whole file)."""
    return global_lipschitz(digits_classifier()[0])


def test_confidence_bounds():
    assert clopper_pearson_lower(100, 100, 0.01) == pytest.approx(0.01 ** (1 / 100))
    assert clopper_pearson_lower(0, 100, 0.01) == 0.0
    rng = np.random.default_rng(0)
    v = rng.uniform(0.6, 1.0, 2000)
    assert 0.6 < bernstein_lower(v, 0.01) < v.mean()
    # coverage: the lower bounds sit below the true mean in (almost) every one of 400 trials
    misses = sum(clopper_pearson_lower(int(rng.binomial(200, 0.7)), 200, 0.05) > 0.7 for _ in range(400))
    misses_b = sum(bernstein_lower(rng.uniform(0.4, 1.0, 200), 0.05) > 0.7 for _ in range(400))
    assert misses <= 40 and misses_b <= 40


@pytest.mark.parametrize("sigma,tau", [(0.25, 0.1), (0.25, 1.0), (0.05, 2.0), (1.0, 4.0)])
def test_combined_radius_is_the_integral(sigma, tau):
    for s in (0.5, 0.6, 0.9, 0.999):
        exact, _ = quad(lambda u: max(tau, sigma / norm.pdf(norm.ppf(u))), 0.5, s, limit=200)
        got = combined_radius(s, sigma, tau)
        assert got == pytest.approx(exact, rel=1e-6, abs=1e-12) and got <= exact + 1e-12
        assert got >= max(sigma * norm.ppf(s), tau * (s - 0.5)) * (1 - 1e-6)


def _pgd(net, x0, target, radius, sigma, draws=128, steps=25, temperature=0.05, seed=1):
    """l2 PGD on the smoothed classifier's Monte-Carlo estimate (soft votes over fixed noise draws)."""
    gen = torch.Generator().manual_seed(seed)
    noise = sigma * torch.randn(draws, x0.size, generator=gen, dtype=torch.float64)
    x0 = torch.tensor(x0)
    delta = torch.zeros_like(x0, requires_grad=True)
    for _ in range(steps):
        logits = net(x0 + delta + noise)
        others = torch.cat([logits[:, :target], logits[:, target + 1:]], dim=1)
        # soft votes (temperature) plus the mean logit margin, which does not saturate far from the boundary
        p = torch.softmax(logits / temperature, dim=1).mean(0)
        loss = torch.cat([p[:target], p[target + 1:]]).max() - p[target] + 0.1 * (others.max(1).values
                                                                                 - logits[:, target]).mean()
        grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += 2.5 * radius / steps * grad / (grad.norm() + 1e-12)
            delta *= min(1.0, radius / float(delta.norm() + 1e-300))
    return (x0 + delta).detach().numpy()


def _violations(result, x, sigma, n=2000):
    """Certified samples whose PGD point has p_A significantly below 1/2 (Clopper-Pearson upper bound)."""
    net = copy.deepcopy(digits_classifier()[0]).double()
    rng = np.random.default_rng(2)
    bad = []
    for i in np.flatnonzero(result.radii > 0):
        target = result.predictions[i]
        adv = _pgd(net, x[i], target, result.radii[i], sigma)
        with torch.no_grad():
            votes = net(torch.tensor(adv + sigma * rng.standard_normal((n, adv.size)))).argmax(1).numpy()
        k = int(np.sum(votes == target))
        upper = beta.ppf(1 - ALPHA, k + 1, n - k) if k < n else 1.0
        if upper < 0.5:
            bad.append(i)
    return bad


def test_digits_certified_radii_survive_pgd(global_L):
    model, x, y, _ = digits_classifier()
    x, y = x[:16], y[:16]
    sigma = 0.05  # small noise: the Lipschitz-margin radius beats Cohen's on a share of the samples
    result = smoothed_radii(model, x, y, sigma=sigma, samples=1000, alpha=ALPHA, L=global_L)
    assert result.clean_accuracy > 0.8 and np.sum(result.radii > 0) >= 12
    assert result.lipschitz_wins.any() and result.certified_accuracy(0.05) > 0.5
    assert _violations(result, x, sigma) == []


def test_understated_lipschitz_bound_is_caught(global_L):
    """The attack has teeth: with L understated 1000 times, the Lipschitz-margin radii are unsound, and PGD finds it."""
    model, x, y, _ = digits_classifier()
    x, y = x[:8], y[:8]
    sigma, tau = 0.05, 10.0
    fake = global_L / 1000
    result = smoothed_radii(model, x, y, sigma=sigma, samples=500, alpha=ALPHA, L=fake, tau=tau)
    assert result.lipschitz_wins.sum() >= 4
    assert len(_violations(result, x, sigma)) >= 4
    honest = smoothed_radii(model, x, y, sigma=sigma, samples=500, alpha=ALPHA, L=global_L, tau=tau)
    assert honest.radii.max() < result.radii.max() / 2


def test_bad_arguments():
    model, x, y, _ = digits_classifier()
    with pytest.raises(LipSDPError, match="sigma"):
        smoothed_radii(model, x[:2], sigma=0.0, L=1.0)
    with pytest.raises(LipSDPError, match="alpha"):
        smoothed_radii(model, x[:2], sigma=0.1, alpha=1.5, L=1.0)
    with pytest.raises(LipSDPError, match="features"):
        smoothed_radii(model, x[:2, :10], sigma=0.1, L=1.0)


def test_cli_smoothing(tmp_path, capsys):
    import json

    from lipsdp.cli import main

    model, x, y, _ = digits_classifier()
    torch.save(model, tmp_path / "model.pt")
    np.savez(tmp_path / "d.npz", x=x[:10], y=y[:10])
    common = ["robustness", str(tmp_path / "model.pt"), "--data", str(tmp_path / "d.npz"), "--trust-pickle",
              "--method", "global"]
    assert main([*common, "--smoothing", "0.25", "--samples", "200", "--alpha", "0.01", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 10 and report["alpha"] == 0.01 and "0.99" in report["confidence"]
    assert all(r >= 0 for r in report["radii"]) and 0.0 <= report["clean_accuracy"] <= 1.0
    assert main([*common, "--smoothing", "-1"]) == 2
    assert "sigma" in capsys.readouterr().err
    assert main([*common, "--smoothing", "0.25", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "does not support --out" in capsys.readouterr().err
