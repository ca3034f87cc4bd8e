"""Attention blocks (lipsdp.nn.attention, docs/math.md §11): the L2-attention global bound and the dot-product
local bound pass their sandwiches (autograd Jacobians of the torch module); a global dot-product request is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lipsdp.errors import UnsupportedLayerError
from lipsdp.nn.attention import (DotMultiheadSelfAttention, L2MultiheadSelfAttention, attention_bound,
                                 dot_attention_local_bound, l2_attention_bound, softmax_entropy_bound,
                                 softmax_norm_bound)
from lipsdp.composition import sampled_module_lower_bound


def _module(cls, dim, heads, scale, seed):
    torch.manual_seed(seed)
    m = cls(dim, heads).double()
    with torch.no_grad():
        m.query.mul_(scale)  # sharper attention: larger Jacobians
    return m


@pytest.mark.parametrize("heads,n,scale", [(1, 2, 1.0), (1, 5, 3.0), (2, 6, 1.0), (3, 4, 0.3)])
def test_l2_attention_global_sandwich(heads, n, scale):
    m = _module(L2MultiheadSelfAttention, 6, heads, scale, seed=n)
    cert = attention_bound(m, seq_len=n)
    lower = sampled_module_lower_bound(m, (n, 6), samples=24, scales=(0.1, 0.5, 1.0, 3.0, 10.0))
    assert cert["verified"] and 0 < lower <= cert["bound"]
    bound, per_head = l2_attention_bound(m, n)
    assert bound == cert["bound"] and len(per_head) == heads


def test_dot_attention_local_sandwich():
    m = _module(DotMultiheadSelfAttention, 5, 1, 1.0, seed=0)
    n = 4
    lo, hi = -np.ones((n, 5)), np.ones((n, 5))
    cert = attention_bound(m, box=(lo, hi))
    assert cert["verified"] and cert["network"]["domain"] != "global"
    lower = sampled_module_lower_bound(m, (n, 5), samples=24, box=(lo, hi))
    assert 0 < lower <= cert["bound"]
    # a scalar box needs the sequence length, and gives the same bound
    same, _ = dot_attention_local_bound(m, (-1.0, 1.0), seq_len=n)
    assert same == cert["bound"]


def test_dot_attention_small_box_sandwich():
    """Around one input, the interval bounds on the logits bound ||P||_2 well below sqrt(N)."""
    m = _module(DotMultiheadSelfAttention, 4, 2, 1.0, seed=3)
    n = 6
    x0 = np.random.default_rng(0).uniform(-1, 1, (n, 4))
    box = (x0 - 0.02, x0 + 0.02)
    bound, _ = dot_attention_local_bound(m, box)
    wide, _ = dot_attention_local_bound(m, (-np.abs(x0) - 0.02, np.abs(x0) + 0.02))
    lower = sampled_module_lower_bound(m, (n, 4), samples=16, box=box)
    assert 0 < lower <= bound < wide
    w = m.query.detach().numpy()[0] @ m.key.detach().numpy()[0].T
    assert softmax_norm_bound(x0 - 0.02, x0 + 0.02, w, 0.5) < 1.2 < math.sqrt(n)


def test_dot_attention_global_refused():
    m = _module(DotMultiheadSelfAttention, 4, 2, 1.0, seed=1)
    with pytest.raises(UnsupportedLayerError, match="not globally Lipschitz"):
        attention_bound(m)
    wide, _ = dot_attention_local_bound(m, (-10.0, 10.0), seq_len=3)
    narrow, _ = dot_attention_local_bound(m, (-1.0, 1.0), seq_len=3)
    assert wide > 50 * narrow  # the local bound grows with the box (R^2 in docs/math.md §11.2)


def test_softmax_entropy_lemma():
    """docs/math.md §11.1: sum_j p_j t_j <= W_0((n-1)/e) for p ~ softmax(-t) with one t = 0; equality at
    the symmetric point; ||diag(p) - p p^T||_2 <= 1/2."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 8, 50):
        w = softmax_entropy_bound(n)
        assert w * math.exp(w) >= (n - 1) / math.e  # w lies above W_0((n-1)/e), by at most 1e-8 relative
        t_star = np.r_[0.0, np.full(n - 1, w + 1.0)]
        p = np.exp(-t_star) / np.exp(-t_star).sum()
        assert p @ t_star <= w and p @ t_star == pytest.approx(w, rel=1e-8)
        for _ in range(200):
            t = np.r_[0.0, rng.exponential(rng.uniform(0.1, 5.0), n - 1)]
            p = np.exp(-t) / np.exp(-t).sum()
            assert p @ t <= w
            assert np.linalg.norm(np.diag(p) - np.outer(p, p), 2) <= 0.5
