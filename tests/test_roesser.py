"""The structured (2-D state-space / Roesser) path for CNNs: docs/math.md §7.4."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

torch = pytest.importorskip("torch")
pytest.importorskip("cvxpy")

import lipsdp  # noqa: E402
from lipsdp.conv_lmi import certify_chain, layer_blocks, layer_matrix, verify_chain  # noqa: E402
from lipsdp.convnet import conv_chain, recover_conv  # noqa: E402
from lipsdp.errors import UnsupportedLayerError  # noqa: E402
from lipsdp.io import network_from_module  # noqa: E402
from lipsdp.io.linmaps import conv_matrix  # noqa: E402
from lipsdp.roesser import causal_kernel, realise, simulate  # noqa: E402

from conftest import autograd_lower_bound  # noqa: E402


def cnn(channels=3, convs=2, size=5, slope=0.01, seed=0, kernel=3, padding=1, act=None):
    torch.manual_seed(seed)
    layers, c, s = [], 1, size
    for _ in range(convs):
        layers += [torch.nn.Conv2d(c, channels, kernel, padding=padding),
                   act() if act else torch.nn.LeakyReLU(slope)]
        c, s = channels, s + 2 * padding - kernel + 1
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(c * s * s, 4)).double().eval()


@pytest.mark.parametrize("shape", [(3, 2, 3, 3), (2, 3, 1, 3), (2, 2, 3, 1), (1, 1, 1, 1), (2, 3, 2, 4)])
def test_realisation_is_torch_conv2d(shape):
    rng = np.random.default_rng(0)
    K = rng.standard_normal(shape)
    co, ci, kh, kw = shape
    H, W = 5, 6
    u = np.zeros((ci, H + kh - 1, W + kw - 1))
    u[:, :H, :W] = rng.standard_normal((ci, H, W))
    y = simulate(realise(causal_kernel(K)), u)
    ref = torch.nn.functional.conv2d(torch.tensor(u[None, :, :H, :W]), torch.tensor(K), padding=(kh - 1, kw - 1))
    assert np.abs(y - ref[0].numpy()).max() < 1e-12


@pytest.mark.parametrize("pad", [(1, 1, 1, 1), (0, 0, 0, 0), (2, 1, 0, 1)])
def test_recover_conv_exactly(pad):
    K = np.random.default_rng(1).standard_normal((3, 2, 3, 3))
    M, out = conv_matrix((2, 6, 5), K, (1, 1), pad[:2], pad[2:], (1, 1), 1)
    weight, got = recover_conv(M, (2, 6, 5), out)
    assert got == pad and np.array_equal(weight, K)


def test_recover_conv_refuses_strides():
    K = np.random.default_rng(2).standard_normal((2, 2, 3, 3))
    M, out = conv_matrix((2, 8, 8), K, (2, 2), (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(UnsupportedLayerError, match="stride-1"):
        recover_conv(M, (2, 8, 8), out)
    with pytest.raises(UnsupportedLayerError):  # a dense map that is no convolution
        recover_conv(sp.csr_matrix(np.random.default_rng(3).random((128, 128))), (2, 8, 8), (2, 8, 8))


def test_masked_positions_telescope_and_vanish():
    """docs/math.md §7.4: on the plane, with inputs and outputs zero off the image, the storage sums
    telescope to 0 and the sector-[0, b] constraint vanishes at masked positions, so the plane's sums
    are the image's."""
    rng = np.random.default_rng(3)
    K = rng.standard_normal((2, 2, 3, 3))
    sys = realise(causal_kernel(K))
    H = W = 5
    u = np.zeros((2, H + 4, W + 4))
    u[:, :H, :W] = rng.standard_normal((2, H, W))
    v = simulate(sys, u)  # the causal conv on a window large enough to hold every non-zero output
    mask = np.zeros_like(v, dtype=bool)
    mask[:, 1:H + 1, 1:W + 1] = True  # padding 1: the image's outputs
    w = np.where(mask, np.where(v > 0, v, 0.01 * v), 0.0)
    qc_plane = (w * (v - w)).sum()  # sector [0, 1]: (w - 0 v)(1 v - w)
    qc_image = (w * (v - w))[mask].sum()
    assert qc_plane == pytest.approx(qc_image)
    # the same with the leaky slope as lower sector bound would count -a b v^2 < 0 off the image
    a = 0.01
    assert ((w - a * v) * (v - w))[~mask].sum() < 0


@pytest.mark.parametrize("seed,channels,convs,slope,kernel,padding", [
    (0, 3, 2, 0.01, 3, 1), (1, 2, 3, 0.01, 3, 1), (2, 2, 2, 0.5, 2, 0)])
def test_structured_sandwich(seed, channels, convs, slope, kernel, padding):
    model = cnn(channels, convs, size=5, seed=seed, slope=slope, kernel=kernel, padding=padding)
    net = network_from_module(model, input_shape=(1, 5, 5))
    res = certify_chain(conv_chain(net))
    assert res.verified
    lower = autograd_lower_bound(model, (1, 5, 5))
    unrolled = lipsdp.certify(net, structure="unrolled", lower_bound_samples=0)
    assert lower <= unrolled.bound * (1 + 1e-9)
    assert res.bound >= unrolled.bound * (1 - 1e-6)  # the structured LMIs relax the unrolled SDP
    cert = lipsdp.certify(net, structure="state-space", lower_bound_samples=64)
    assert cert.verified and cert.lower_bound <= cert.bound <= cert.trivial_bound * (1 + 1e-12)
    assert lower <= cert.bound and cert.network["structure"] == "state-space"


def test_tampered_multipliers_do_not_verify():
    net = network_from_module(cnn(2, 2, size=4), input_shape=(1, 4, 4))
    chain = conv_chain(net)
    res = certify_chain(chain)
    assert res.verified
    blocks = [layer_blocks(layer) for layer in chain.layers]
    n = [b.Ew.shape[0] for b in blocks]
    zero = {"P1": [np.zeros((b.Sh.shape[0],) * 2) for b in blocks],
            "P2": [np.zeros((b.Sv.shape[0],) * 2) for b in blocks],
            "lam": [np.zeros(k) for k in n], "x": [np.eye(k) for k in n], "Y": np.eye(n[-1]), "rho": 1.0}
    assert not verify_chain(chain, blocks, zero).verified  # no multiplier: the w block is not negative
    M = layer_matrix(blocks[0], zero["P1"][0], zero["P2"][0], np.eye(1), np.eye(n[0]), zero["lam"][0])
    assert np.linalg.eigvalsh(M)[-1] > 0


@pytest.mark.parametrize("model", [
    torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                        torch.nn.Linear(2 * 3 * 3, 2)),
    torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                        torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                        torch.nn.Linear(2 * 2 * 2, 2)),
    torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(25, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)),
], ids=["stride", "pool", "mlp"])
def test_refusals_and_auto_fallback(model):
    shape = (1, 5, 5) if isinstance(model[0], torch.nn.Conv2d) and model[0].stride == (2, 2) else (1, 4, 4)
    shape = (1, 5, 5) if isinstance(model[0], torch.nn.Flatten) else shape
    model = model.double().eval()
    with pytest.raises(UnsupportedLayerError, match="structured"):
        lipsdp.certify(model, input_shape=shape, structure="state-space", lower_bound_samples=0)
    assert lipsdp.certify(model, input_shape=shape, structure="auto", lower_bound_samples=0).verified


def test_cli_structure(tmp_path, capsys):
    from lipsdp.cli import main

    path = tmp_path / "cnn.pt"
    torch.save(cnn(2, 2, size=4), path)
    rc = main(["certify", str(path), "--input-shape", "1,4,4", "--structure", "both", "--json",
               "--trust-pickle", "--samples", "16"], own_process=False)
    import json

    cert = json.loads(capsys.readouterr().out)
    assert rc == 0 and cert["status"] == "verified"
    both = cert["network"]["structures"]
    assert both["state-space"] >= both["unrolled"] * (1 - 1e-6)
    assert cert["lower_bound"] <= cert["bound"] <= min(both["state-space"], both["unrolled"]) * (1 + 1e-12)


def test_auto_takes_the_structured_path_for_large_conv_chains():
    from lipsdp.structured import AUTO_MIN_NEURONS, structured_chain

    small = network_from_module(cnn(2, 2, size=4), input_shape=(1, 4, 4))
    assert structured_chain(small, "auto", "l2", None) is None
    assert structured_chain(small, "state-space", "l2", None) is not None
    side = int(np.ceil(np.sqrt(AUTO_MIN_NEURONS / 4)))
    large = network_from_module(cnn(2, 2, size=side), input_shape=(1, side, side))
    assert structured_chain(large, "auto", "l2", None) is not None
    assert structured_chain(large, "auto", "linf", None) is None
    with pytest.raises(UnsupportedLayerError, match="l2"):
        structured_chain(large, "state-space", "linf", None)


class _Regrouped(torch.nn.Module):
    """Two convolutions with a view between them that regroups 2 channels of 4x4 as 4 channels of 2x4."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.out = torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Conv2d(4, 2, 3, padding=1), \
            torch.nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.c1(x)).reshape(-1, 4, 2, 4)
        return self.out(torch.relu(self.c2(h)).flatten(1))


def test_channels_must_carry_over():
    model = _Regrouped().double().eval()
    with pytest.raises(UnsupportedLayerError, match="structured"):
        conv_chain(network_from_module(model, input_shape=(1, 4, 4)))


def test_a_limit_on_the_structured_path_reports_the_proven_product(monkeypatch):
    """Before: a limit reached in the structured solve said "no bound verified"; the product of norms proven on
    the kernels (docs/math.md §7.5) is a verified bound from the start of the build."""
    import time

    import lipsdp.structured as structured
    from lipsdp.budget import LimitReached
    from lipsdp.convnet import chain_proven_trivial_bound

    def slow_chain(*args, **kwargs):
        time.sleep(1.6)  # past the deadline and its grace, as an overrunning solve would be
        structured.checkpoint("solve")
        raise AssertionError("not stopped")

    model = cnn(2, 2, size=5, seed=3)
    net = network_from_module(model, input_shape=(1, 5, 5))
    monkeypatch.setattr(structured, "certify_chain", slow_chain)
    with pytest.raises(LimitReached) as err:
        lipsdp.certify(net, structure="state-space", time_limit=0.3, lower_bound_samples=1)
    proven = chain_proven_trivial_bound(conv_chain(net))
    assert f"best verified bound so far {proven:.6g} (product of norms)" in str(err.value), str(err.value)
    assert autograd_lower_bound(model, (1, 5, 5)) <= proven
