"""lipsdp.compose: a model certified as the product of its blocks' certified bounds (docs/math.md §8.2, §11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.nn.attention import DotMultiheadSelfAttention, L2MultiheadSelfAttention, Residual


def _mlp(sizes, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).double()


def test_split_sequential_sandwich():
    net = _mlp([6, 10, 10, 10, 3], seed=1)
    whole = lipsdp.certify(net)
    cert = lipsdp.compose(net, split_at=[2, 4])
    assert cert.verified and len(cert.network["blocks"]) == 3
    bounds = [b["bound"] for b in cert.network["blocks"]]
    assert cert.bound >= np.prod(bounds) and cert.bound <= np.prod(bounds) * (1 + 1e-12)
    assert cert.lower_bound <= whole.bound <= cert.bound <= cert.trivial_bound * (1 + 1e-9)


def test_list_of_blocks_and_files(tmp_path):
    a, b = _mlp([5, 8, 4], seed=2), _mlp([4, 8, 2], seed=3)
    torch.save(b, tmp_path / "b.pt")
    cert = lipsdp.compose([a, str(tmp_path / "b.pt")], trust_pickle=True)
    direct = lipsdp.compose([a, b])
    assert cert.verified and cert.bound == pytest.approx(direct.bound, rel=1e-5)
    assert cert.lower_bound is None  # a file is not a torch module here: no composed sampling
    assert direct.lower_bound <= direct.bound


def test_transformer_stack_sandwich():
    """L2 attention + residual + token-wise MLP, twice: a global bound that passes the sandwich."""
    torch.manual_seed(4)
    dim, n = 6, 5
    stack = [Residual(L2MultiheadSelfAttention(dim, heads=2)), Residual(_mlp([dim, 12, dim], seed=5)),
             Residual(L2MultiheadSelfAttention(dim, heads=2)), Residual(_mlp([dim, 12, dim], seed=6))]
    stack = [b.double() for b in stack]
    cert = lipsdp.compose(stack, seq_len=n, lower_bound_samples=12)
    assert cert.verified and [r["method"] for r in cert.network["blocks"]] == ["residual"] * 4
    assert 0 < cert.lower_bound <= cert.bound <= cert.trivial_bound * (1 + 1e-9)
    x = torch.randn(3, n, dim, dtype=torch.float64)  # the stack runs on batches of sequences
    assert nn.Sequential(*stack)(x).shape == x.shape


def test_refusals():
    with pytest.raises(UnsupportedLayerError, match="not globally Lipschitz"):
        lipsdp.compose([DotMultiheadSelfAttention(4)], seq_len=3)
    box = (-np.ones((3, 4)), np.ones((3, 4)))
    with pytest.raises(UnsupportedLayerError, match="first block only"):
        lipsdp.compose([_mlp([4, 4], seed=0), DotMultiheadSelfAttention(4).double()], box=box)
    with pytest.raises(LipSDPError, match="l2"):
        lipsdp.compose([_mlp([4, 4], seed=0)], norm="linf")
    with pytest.raises(LipSDPError, match="split_at"):
        lipsdp.compose(_mlp([4, 4, 4], seed=0), split_at=[0])


def test_unsound_block_is_caught():
    """A block whose own certificate understates its constant: the composed sandwich refuses it."""
    class Liar(nn.Module):
        def forward(self, x):
            return 10.0 * x

        def lipsdp_bound(self, certify, **_):
            return {"bound": 1.0, "trivial_bound": 1.0, "verified": True, "method": "lie", "message": "",
                    "network": {}}

    with pytest.raises(LipSDPError, match="below the sampled lower bound"):
        lipsdp.compose([_mlp([3, 3], seed=0), Liar()], lower_bound_samples=4)


def test_local_dot_attention_stack_sandwich():
    """Dot-product attention first, over a box, then a token-wise MLP: a local bound, sampled inside the box."""
    torch.manual_seed(7)
    dim, n = 4, 3
    stack = [Residual(DotMultiheadSelfAttention(dim, heads=2)).double(), Residual(_mlp([dim, 8, dim], seed=8))]
    box = (-0.5 * np.ones((n, dim)), 0.5 * np.ones((n, dim)))
    cert = lipsdp.compose(stack, box=box, lower_bound_samples=12)
    assert cert.verified and cert.network["domain"] != "global"
    assert 0 < cert.lower_bound <= cert.bound <= cert.trivial_bound * (1 + 1e-9)


def test_split_convolutional_net():
    """A block that starts with a convolution gets its input shape from a forward pass."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8, 3)).double()
    cert = lipsdp.compose(net, split_at=[2], input_shape=(1, 6, 6), lower_bound_samples=8)
    whole = lipsdp.certify(net, input_shape=(1, 6, 6))
    assert cert.verified and cert.lower_bound <= whole.bound <= cert.bound <= cert.trivial_bound * (1 + 1e-9)
    assert net[0].weight.dtype == torch.float64
