"""Strided convolutions and average pooling on the structured (state-space) path (docs/math.md §7.6)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lipsdp  # noqa: E402
from lipsdp import convops, polyphase  # noqa: E402
from lipsdp.certificate import Certificate  # noqa: E402
from lipsdp.checking import check_certificate  # noqa: E402
from lipsdp.convnet import conv_chain, recover_conv  # noqa: E402
from lipsdp.errors import UnsupportedLayerError  # noqa: E402
from lipsdp.io import network_from_module  # noqa: E402
from lipsdp.io.linmaps import conv_matrix  # noqa: E402
from lipsdp.network import activation_function  # noqa: E402

from conftest import autograd_lower_bound  # noqa: E402

T = torch.nn


def model(kind: str, c: int = 3, size: int = 8, seed: int = 0):
    """Small CNNs of the shapes the issue names (stride 2 with 3x3 / 4x4 kernels and padding 1, AvgPool2d(2)
    between convolutions or before the read-out), LeakyReLU(0.01)."""
    torch.manual_seed(seed)
    act = T.LeakyReLU(0.01)
    layers = {
        "stride3": [T.Conv2d(1, c, 3, stride=2, padding=1), act, T.Conv2d(c, c, 3, padding=1), act],
        "stride4": [T.Conv2d(1, c, 3, padding=1), act, T.Conv2d(c, c, 4, stride=2, padding=1), act],
        "avgpool": [T.Conv2d(1, c, 3, padding=1), act, T.AvgPool2d(2), T.Conv2d(c, c, 3, padding=1), act],
        "two-strides": [T.Conv2d(1, c, 3, stride=2, padding=1), act, T.Conv2d(c, c, 4, stride=2, padding=1), act,
                        T.AvgPool2d(2)],
        "patchify": [T.Conv2d(1, c, 2, stride=2), act, T.Conv2d(c, c, 3, padding=1), act],
        "rect-depthwise": [T.Conv2d(1, c, 3, stride=(2, 1), padding=1), act,
                           T.Conv2d(c, c, 3, stride=2, padding=1, groups=c), act],
    }[kind]
    with torch.no_grad():
        out = T.Sequential(*layers)(torch.zeros(1, 1, size, size)).numel()
    return T.Sequential(*layers, T.Flatten(), T.Linear(out, 3)).double().eval()


def save(m, path, fmt: str, size: int = 8):
    if fmt == "pt":
        torch.save(m, path)
        return path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m.float(), (torch.randn(1, 1, size, size),), str(path), dynamo=False, input_names=["x"])
    m.double()
    return path


@pytest.mark.parametrize("shape,stride,f_out,k,pad", [
    ((2, 8, 6), (2, 2), (1, 1), 3, 1), ((2, 16, 12), (2, 2), (2, 3), 4, 1), ((1, 9, 8), (3, 2), (1, 2), 3, 1)])
def test_strided_conv_is_a_stride_one_conv_between_phase_images(shape, stride, f_out, k, pad):
    """docs/math.md §7.6: P_out S P_in^T is exactly a stride-1 zero-padded convolution."""
    rng = np.random.default_rng(0)
    S, out = conv_matrix(shape, rng.standard_normal((3, shape[0], k, k)), stride, (pad, pad), (pad, pad), (1, 1), 1)
    f_in = polyphase.times(stride, f_out)
    assert polyphase.stride_of(shape, out) == tuple(stride)
    perm = polyphase.phase_order(shape, f_in)
    assert sorted(perm) == list(range(int(np.prod(shape))))  # a permutation: orthogonal
    M = polyphase.to_phases(S, shape, out, f_in, f_out)
    i2, o2 = polyphase.phase_shape(shape, f_in), polyphase.phase_shape(out, f_out)
    weight, p = recover_conv(M, i2, o2)
    R, _ = conv_matrix(i2, weight, (1, 1), p[:2], p[2:], (1, 1), 1)
    assert abs(R - M).max() == 0.0


@pytest.mark.parametrize("kind", ["stride3", "stride4", "avgpool", "two-strides", "patchify", "rect-depthwise"])
def test_phase_chain_computes_the_network(kind):
    """The recovered chain, run on the phase image of x, is the network (last activation, exactly up to rounding)."""
    net = network_from_module(model(kind), input_shape=(1, 8, 8))
    chain = conv_chain(net)
    x = np.random.default_rng(1).standard_normal((5, 64))
    first = chain.layers[0]
    f0 = chain.input_phases  # the product of the strides
    assert first.in_shape == polyphase.phase_shape((1, 8, 8), f0)
    h = x[:, polyphase.phase_order((1, 8, 8), f0)].reshape(5, *first.in_shape).transpose(1, 0, 2, 3)
    for layer in chain.layers:
        pre = convops.conv(h, layer.weight, layer.pad) + layer.bias.reshape(layer.out_shape)[:, None]
        flat = pre.transpose(1, 0, 2, 3).reshape(5, -1)
        h = activation_function(layer.activation).evaluate(flat, layer.activation_op)
        h = h.reshape(5, *layer.out_shape).transpose(1, 0, 2, 3)
    assert chain.layers[-1].phases == (1, 1)
    ref = net.node_values(x)[net.activations()[-1]].reshape(5, -1)
    assert np.abs(h.transpose(1, 0, 2, 3).reshape(5, -1) - ref).max() < 1e-12


@pytest.mark.parametrize("kind,fmt", [("stride4", "pt"), ("avgpool", "onnx"), ("two-strides", "pt")])
def test_strided_and_pooled_cnns_certify_structurally(kind, fmt, tmp_path):
    """Sandwich against the real torch model's autograd lower bound, and never below the unrolled SDP."""
    m = model(kind)
    path = save(m, tmp_path / f"m.{fmt}", fmt)
    opts = dict(trust_pickle=True, input_shape=(1, 8, 8) if fmt == "pt" else None)
    cert = lipsdp.certify(str(path), structure="state-space", lower_bound_samples=32, **opts)
    assert cert.verified and cert.network["structure"] == "state-space"
    assert cert.network["phases"]["input"] == ([2, 2] if kind != "two-strides" else [4, 4])
    lower = autograd_lower_bound(m, (1, 8, 8), samples=16)
    assert max(lower, cert.lower_bound) <= cert.bound <= cert.trivial_bound * (1 + 1e-12)
    saved = Certificate.from_dict(json.loads(cert.to_json()))
    assert check_certificate(saved, str(path), **opts).verification["rechecked"]  # lipsdp verify
    if fmt == "pt":
        unrolled = lipsdp.certify(str(path), structure="unrolled", lower_bound_samples=0, **opts)
        assert unrolled.verified and lower <= unrolled.bound * (1 + 1e-9)
        assert cert.bound >= unrolled.bound * (1 - 1e-6)  # the structured LMIs relax the unrolled SDP


def test_refusals_are_one_line(tmp_path, capsys):
    from lipsdp.cli import main

    maxpool = T.Sequential(T.Conv2d(1, 2, 3, padding=1), T.ReLU(), T.MaxPool2d(2), T.Conv2d(2, 2, 3, padding=1),
                           T.ReLU(), T.Flatten(), T.Linear(2 * 4 * 4, 2)).double().eval()
    odd = T.Sequential(T.Conv2d(1, 2, 3, stride=2, padding=1), T.ReLU(), T.Flatten(),
                       T.Linear(2 * 3 * 3, 2)).double().eval()  # 5x5 -> 3x3: the phases do not tile the image
    for m, shape, reason in [(maxpool, (1, 8, 8), "max pooling"), (odd, (1, 5, 5), "not a stride-1")]:
        with pytest.raises(UnsupportedLayerError, match=reason) as info:
            conv_chain(network_from_module(m, input_shape=shape))
        assert "\n" not in str(info.value)
    torch.save(maxpool, tmp_path / "maxpool.pt")
    rc = main(["certify", str(tmp_path / "maxpool.pt"), "--input-shape", "1,8,8", "--trust-pickle",
               "--structure", "state-space"], own_process=False)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "max pooling" in err and len(err.splitlines()) == 1



@pytest.mark.slow
def test_mnist_sized_strided_cnn_certifies():
    """28x28, two 3x3 stride-2 convolutions of 8 channels (phase channels 16, 32, 8): verified, sandwiched."""
    torch.manual_seed(0)
    act = T.LeakyReLU(0.01)
    m = T.Sequential(T.Conv2d(1, 8, 3, stride=2, padding=1), act, T.Conv2d(8, 8, 3, stride=2, padding=1), act,
                     T.Flatten(), T.Linear(8 * 7 * 7, 10)).double().eval()
    cert = lipsdp.certify(m, input_shape=(1, 28, 28), structure="state-space", lower_bound_samples=32)
    assert cert.network["phases"]["channels"] == [16, 32, 8]
    lower = autograd_lower_bound(m, (1, 28, 28), samples=8)
    assert cert.verified and max(lower, cert.lower_bound) <= cert.bound <= cert.trivial_bound * (1 + 1e-12)
