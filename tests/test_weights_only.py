"""Weights-only files (state_dicts, checkpoints, ``.mat``): every entry is read or the file is refused.

Issue 18: a state_dict's running statistics or custom parameters, and the
imaginary part of ``.mat`` weights, used to be dropped silently, certifying a
bound far below the model's true constant.  Spectrally normalised layers and
numpy metadata in checkpoints are read exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.utils import parametrizations  # noqa: E402

import lipsdp  # noqa: E402
from lipsdp.errors import ModelLoadError, UnsafeModelError  # noqa: E402
from lipsdp.io import load_network  # noqa: E402
from lipsdp.io.checkpoint import spectral_weight  # noqa: E402
from lipsdp.network import Affine  # noqa: E402

from conftest import assert_sandwich, torch_lower_bound  # noqa: E402


# -- entries an MLP reading would drop ---------------------------------------------------------------
class Scaled(nn.Module):
    """``scale * (W x + b)``: a custom parameter beside a Linear's weight and bias."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x):
        return self.scale * self.fc(x)


def test_batchnorm_without_affine_is_refused(tmp_path):
    """Only running statistics are stored; dropping them certified 0.40 where the Jacobian norm is 37.5."""
    bn = nn.BatchNorm1d(4, affine=False)
    with torch.no_grad():
        bn.running_var.fill_(1e-3)
    model = nn.Sequential(nn.Linear(3, 4), bn, nn.ReLU(), nn.Linear(4, 2)).eval()
    torch.save(model.state_dict(), tmp_path / "bn.pt")
    with pytest.raises(ModelLoadError) as info:
        load_network(tmp_path / "bn.pt", activation="relu")
    message = str(info.value)
    for key in ("1.running_mean (4,)", "1.running_var (4,)", "1.num_batches_tracked ()"):
        assert key in message
    assert "\n" not in message


def test_custom_parameter_is_refused(tmp_path):
    torch.save(nn.Sequential(Scaled(), nn.ReLU(), nn.Linear(3, 1)).state_dict(), tmp_path / "s.pt")
    with pytest.raises(ModelLoadError, match=r"cannot use \(0\.scale \(\)\)"):
        load_network(tmp_path / "s.pt", activation="relu")


def test_checkpoint_with_leftover_keys_is_refused(tmp_path):
    state = {"a.weight": torch.ones(2, 2), "a.bias": torch.zeros(2), "b.bias": torch.zeros(2),
             "gain": torch.ones(2)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "c.pt")
    with pytest.raises(ModelLoadError, match=r"checkpoint whose 'state_dict'.*cannot use \(b\.bias \(2,\), gain"):
        load_network(tmp_path / "c.pt", activation="relu")


# -- spectral normalisation ----------------------------------------------------------------------------
def _spectral_mlp(kind: str, seed: int = 5) -> nn.Sequential:
    """A trained-looking spectrally normalised MLP: power iterations in training mode, then weights moved."""
    torch.manual_seed(seed)
    wrap = parametrizations.spectral_norm if kind == "parametrization" else nn.utils.spectral_norm
    model = nn.Sequential(wrap(nn.Linear(4, 8)), nn.Tanh(), wrap(nn.Linear(8, 6)), nn.Tanh(), nn.Linear(6, 2))
    model.train()
    for _ in range(3):
        model(torch.randn(16, 4))
    with torch.no_grad():  # an optimizer step after the last power iteration: u, v no longer match W exactly
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_spectral_weight_matches_torch(kind):
    layer = _spectral_mlp(kind)[0]
    layer(torch.randn(1, 4))  # the hook form computes .weight in its forward pre-hook
    state = layer.state_dict()
    keys = (["parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v"]
            if kind == "parametrization" else ["weight_orig", "weight_u", "weight_v"])
    w = spectral_weight(*(state[k] for k in keys), "layer")
    np.testing.assert_allclose(w, layer.weight.detach().double().numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_spectral_norm_state_dict_certifies(kind, tmp_path):
    """Sandwich against the torch model: sampled lower bound <= certified bound <= trivial bound."""
    model = _spectral_mlp(kind)
    model(torch.randn(1, 4))
    torch.save(model.state_dict(), tmp_path / "sn.pt")
    net = load_network(tmp_path / "sn.pt", activation="tanh")
    weights = [op.weight for op in net.ops() if isinstance(op, Affine)]
    for w, layer in zip(weights, [model[0], model[2], model[4]]):
        np.testing.assert_allclose(w, layer.weight.detach().double().numpy(), rtol=1e-6, atol=1e-7)
    cert = lipsdp.certify(tmp_path / "sn.pt", activation="tanh")
    lower = max(torch_lower_bound(model, 4, scale=s) for s in (0.1, 1.0, 3.0))
    assert_sandwich(cert, lower, rel=1e-6)


def test_spectral_norm_with_a_further_parametrization_is_refused(tmp_path):
    """A second stored parametrization (deel-torchlip's Bjorck buffer) is not read as weights."""
    layer = parametrizations.spectral_norm(nn.Linear(3, 3))
    state = dict(layer.state_dict())
    state["parametrizations.weight.1._w_bjorck"] = torch.eye(3)
    torch.save(state, tmp_path / "p.pt")
    with pytest.raises(ModelLoadError, match=r"parametrizations\.weight\.1\._w_bjorck.*vanilla_export"):
        load_network(tmp_path / "p.pt", activation="relu")


def test_spectral_norm_with_foreign_vectors_is_refused(tmp_path):
    state = {"weight_orig": torch.ones(2, 3), "weight_u": torch.ones(2), "weight_v": torch.ones(3)}
    torch.save(state, tmp_path / "u.pt")
    with pytest.raises(ModelLoadError, match="not the unit vectors"):
        load_network(tmp_path / "u.pt", activation="relu")


# -- numpy metadata in checkpoints ---------------------------------------------------------------------
def test_checkpoint_with_numpy_metadata_loads(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    torch.save({"model": model.state_dict(), "meta": np.arange(3), "best": np.float64(0.5),
                "mask": np.zeros((2, 2), dtype=np.float32)}, tmp_path / "c.pt")
    net = load_network(tmp_path / "c.pt", activation="relu")
    np.testing.assert_array_equal(net.ops()[1].weight, model[0].weight.detach().double().numpy())
    from lipsdp.cli import main

    assert main(["certify", str(tmp_path / "c.pt"), "--activation", "relu"]) == 0


def test_numpy_allow_list_still_refuses_code(tmp_path):
    """Allowing numpy's array reconstruction does not allow arbitrary numpy functions."""
    torch.save({"model": nn.Linear(2, 2).state_dict(), "f": np.save}, tmp_path / "f.pt")
    with pytest.raises(UnsafeModelError, match="numpy.*save"):
        load_network(tmp_path / "f.pt", activation="relu")


# -- .mat files ------------------------------------------------------------------------------------------
def test_mat_complex_weights_are_refused(tmp_path):
    """The imaginary part used to be dropped (a ComplexWarning and a bound of the real part)."""
    scipy.io.savemat(tmp_path / "c.mat", {"weights": np.array([np.eye(2) * (1 + 30j), np.ones((1, 2))],
                                                               dtype=object)})
    with pytest.raises(ModelLoadError, match=r"weights\{1\} is complex"):
        load_network(tmp_path / "c.mat", activation="relu")


def test_mat_params_struct_certifies(tmp_path):
    rng = np.random.default_rng(2)
    ws = [rng.standard_normal((6, 3)), rng.standard_normal((5, 6)), rng.standard_normal((2, 5))]
    bs = [rng.standard_normal(6), rng.standard_normal((1, 5)), rng.standard_normal(2)]
    params = {f"linear_{k}_weight": w for k, w in enumerate(ws, 1)} | {f"linear_{k}_bias": b
                                                                        for k, b in enumerate(bs, 1)}
    scipy.io.savemat(tmp_path / "p.mat", {"params": params})
    net = load_network(tmp_path / "p.mat", activation="relu")
    affine = [op for op in net.ops() if isinstance(op, Affine)]
    for op, w, b in zip(affine, ws, bs):
        np.testing.assert_array_equal(op.weight, w)
        np.testing.assert_array_equal(op.bias, np.ravel(b))
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        for layer, w, b in zip(model[::2], ws, bs):
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(np.ravel(b)))
    cert = lipsdp.certify(tmp_path / "p.mat", activation="relu")
    assert_sandwich(cert, max(torch_lower_bound(model, 3, scale=s) for s in (0.1, 1.0, 10.0)), rel=1e-6)


@pytest.mark.parametrize(("content", "match"), [
    ({"params": {"conv_1_weight": np.ones((2, 1, 3, 3)), "linear_2_weight": np.ones((1, 2))}},
     r"convolution kernels \(conv_1_weight\)"),
    ({"params": {"linear_1_weight": np.ones((2, 2)), "linear_1_scale": np.ones(2), "linear_3_bias": np.ones(2)}},
     r"cannot read \(linear_1_scale, linear_3_bias\)"),
    ({"params": {"linear_1_weight": np.ones((2, 2)) * 1j}}, r"params\.linear_1_weight is complex"),
    ({"weights": np.array([np.eye(2)], dtype=object), "biases": np.ones(2)}, "variables weights, biases"),
])
def test_mat_entries_not_read_are_refused(tmp_path, content, match):
    scipy.io.savemat(tmp_path / "m.mat", content)
    with pytest.raises(ModelLoadError, match=match):
        load_network(tmp_path / "m.mat", activation="relu")


# -- a stated activation without an exact sector -------------------------------------------------------
def test_stated_softplus_with_a_jump_is_refused(tmp_path):
    torch.save(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match=r"jumps by 0\.00336.*threshold >= "):
        load_network(tmp_path / "sd.pt", activation="softplus", activation_params={"beta": 2.0, "threshold": 5.0})
    assert load_network(tmp_path / "sd.pt", activation="softplus", activation_params={"beta": -2.0})
