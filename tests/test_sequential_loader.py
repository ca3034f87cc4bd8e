"""The untraced path for plain ``nn.Sequential`` models (:mod:`lipsdp.io.sequential`).

It must give exactly the network ``torch.export`` gives (same nodes, names, weights and
fingerprint, so certificates recheck across the two), and step aside for anything whose
forward might not be the composition of its stock layers.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipsdp.io.sequential as sequential  # noqa: E402
from lipsdp.io import network_from_module  # noqa: E402
from lipsdp.io.torch_module import _eval_copy  # noqa: E402
from lipsdp.network import Activation, Affine  # noqa: E402

from models import ACTIVATIONS, mlp, torch_forward  # noqa: E402


def _with_batch_stats(model):
    """Non-trivial running statistics, so a BatchNorm that were dropped or misread would show."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _models():
    torch.manual_seed(0)
    yield "mlp", mlp([6, 8, 8, 3]), None
    for name, act in ACTIVATIONS.items():
        yield f"act-{name}", nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 2)), None
    yield "relu6-elu-softplus", nn.Sequential(nn.Linear(5, 6), nn.ReLU6(), nn.Linear(6, 6), nn.ELU(0.5),
                                              nn.Linear(6, 6), nn.Softplus(beta=2.0), nn.Linear(6, 2)), None
    yield "nested-bn-dropout", _with_batch_stats(nn.Sequential(
        nn.Linear(4, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3), nn.Tanh()),
        nn.Dropout(0.3), nn.Identity(), nn.Linear(3, 2))), None
    yield "conv2d", _with_batch_stats(nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.LeakyReLU(0.2),
        nn.Conv2d(3, 4, 2, dilation=1, groups=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))), (2, 8, 8)
    yield "bias-free-bn-without-affine", nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6, affine=False),
                                                       nn.ReLU(), nn.Linear(6, 2)).eval(), None
    yield "grouped-conv", nn.Sequential(nn.Conv2d(4, 4, 3, groups=2, bias=False, padding=(1, 0)), nn.ReLU(),
                                        nn.Flatten(), nn.Linear(4 * 6 * 4, 3)), (4, 6, 6)
    yield "flatten-first", nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2)), (3, 4)
    yield "conv3d", nn.Sequential(nn.Conv3d(1, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 8, 2)), (1, 3, 3, 3)
    yield "conv1d-unflatten", nn.Sequential(
        nn.Linear(12, 12), nn.Unflatten(1, (3, 4)), nn.Conv1d(3, 2, 2), nn.GELU(approximate="tanh"),
        nn.Flatten(), nn.Linear(6, 2)), None


MODELS = list(_models())


def _exported(model, shape, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(sequential, "network_from_sequential", lambda *a, **k: None)
        return network_from_module(model, input_shape=shape)


def _example(model, shape):
    if shape is None:
        shape = (next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features,)
    return torch.randn((2,) + tuple(shape), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,model,shape", MODELS, ids=[m[0] for m in MODELS])
def test_same_network_as_torch_export(name, model, shape, monkeypatch):
    fast = sequential.network_from_sequential(_eval_copy(model), _example(model, shape), "m")
    assert fast is not None, "a plain Sequential of stock layers must take the untraced path"
    traced = _exported(model, shape, monkeypatch)
    assert list(fast.graph.nodes) == list(traced.graph.nodes)
    for n in fast.graph.nodes:
        a, b = fast.op(n), traced.op(n)
        assert (type(a), a.name, a.kind, a.shape, fast.parents(n)) == (type(b), b.name, b.kind, b.shape,
                                                                         traced.parents(n))
        if isinstance(a, Affine):
            dense = lambda w: w.toarray() if sp.issparse(w) else np.asarray(w)  # noqa: E731
            np.testing.assert_allclose(dense(a.weight), dense(b.weight), rtol=0, atol=1e-12)
            assert (a.bias is None) == (b.bias is None)
            if a.bias is not None:
                np.testing.assert_allclose(a.bias, b.bias, rtol=0, atol=1e-12)
        if isinstance(a, Activation):
            assert (a.function, a.params) == (b.function, b.params)
    assert fast.fingerprint() == traced.fingerprint()
    # And it computes the model (an evaluator independent of the translation's own check).
    x = np.random.default_rng(3).standard_normal((5, fast.input_dim))
    np.testing.assert_allclose(fast.numpy_forward(x), torch_forward(model, x, shape), rtol=1e-4, atol=1e-5)


class _Doubled(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


class _Custom(nn.Module):
    def forward(self, x):
        return x * 3


def _declined():
    torch.manual_seed(0)
    yield "subclass", _Doubled(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    yield "custom-leaf", nn.Sequential(nn.Linear(4, 3), _Custom(), nn.Linear(3, 2))
    hooked = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    hooked[1].register_forward_hook(lambda mod, inp, out: out * 0.5)
    yield "forward-hook", hooked
    pre = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    pre[2].register_forward_pre_hook(lambda mod, inp: (inp[0] + 1.0,))
    yield "pre-hook", pre
    patched = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    patched[1].forward = lambda x: torch.tanh(x)
    yield "instance-forward", patched
    yield "circular-padding", nn.Sequential(nn.Linear(4, 8), nn.Unflatten(1, (2, 4)),
                                            nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"),
                                            nn.Flatten(), nn.Linear(8, 2))
    yield "batch-statistics", nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False),
                                            nn.ReLU(), nn.Linear(3, 2))


DECLINED = list(_declined())


@pytest.mark.parametrize("name,model", DECLINED, ids=[m[0] for m in DECLINED])
def test_declines_what_might_not_compose_stock_layers(name, model):
    assert sequential.network_from_sequential(_eval_copy(model), _example(model, None), "m") is None


@pytest.mark.parametrize("name", ["subclass", "forward-hook", "pre-hook"])
def test_declined_models_still_load_exactly(name):
    model = dict(DECLINED)[name]
    net = network_from_module(model)
    x = np.random.default_rng(0).standard_normal((4, 4))
    np.testing.assert_allclose(net.numpy_forward(x), torch_forward(model, x), rtol=1e-4, atol=1e-5)


def test_global_hook_declines():
    model = mlp([4, 5, 2])
    handle = nn.modules.module.register_module_forward_hook(lambda mod, inp, out: out)
    try:
        assert sequential.network_from_sequential(_eval_copy(model), _example(model, None), "m") is None
    finally:
        handle.remove()
    assert sequential.network_from_sequential(_eval_copy(model), _example(model, None), "m") is not None


def test_mistranslation_is_caught_by_the_forward_check(monkeypatch):
    """A wrong table entry (tanh read as sigmoid) fails the comparison with the model's output."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    monkeypatch.setitem(sequential.LAYER_OPS, "Tanh", lambda m: ("sigmoid", ()))
    assert sequential.network_from_sequential(_eval_copy(model), _example(model, None), "m") is None
    net = network_from_module(model)  # falls back to torch.export: right again
    assert [net.op(n).function for n in net.activations()] == ["tanh"]


def test_shape_mismatch_is_left_to_torch_export():
    from lipsdp.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="torch.export could not trace"):
        network_from_module(mlp([4, 5, 2]), input_shape=(6,))


def test_inconsistent_module_gets_torch_exports_error():
    """A weight whose shape contradicts the layer (a hand-edited or damaged model) is not translated
    here; the traced path names the problem."""
    from lipsdp.errors import ModelLoadError

    model = mlp([4, 5, 2])
    model[2].weight = nn.Parameter(torch.randn(2, 7))
    assert sequential.network_from_sequential(_eval_copy(model), _example(model, None), "m") is None
    with pytest.raises(ModelLoadError):
        network_from_module(model)


def test_nan_weight_is_refused_as_before():
    from lipsdp.errors import InvalidNetworkError

    model = mlp([4, 5, 2])
    with torch.no_grad():
        model[0].weight[1, 1] = float("inf")
    with pytest.raises(InvalidNetworkError, match=r"0 \(Linear\) has"):
        sequential.network_from_sequential(_eval_copy(model), _example(model, None), "m")


def test_loading_a_saved_mlp_skips_torchdynamo(tmp_path):
    """The point of the path: ``lipsdp certify mlp.pt`` does not import TorchDynamo."""
    path = tmp_path / "mlp.pt"
    torch.save(mlp([6, 8, 3]), path)
    code = ("import sys; from lipsdp.io import load_network; "
            f"net = load_network({str(path)!r}); "
            "print(net.input_dim, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "False"]
