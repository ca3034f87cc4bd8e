"""Hardswish, added to lipsdp as one file (lipsdp/activations/hardswish.py): loaded, certified, sound.

A model using ``nn.Hardswish`` loads in every format that carries an architecture
(in-memory module, ``torch.save`` pickle through the safe loader, TorchScript traced
and scripted, ``torch.export``, ONNX) and, with ``activation="hardswish"``, as a
weights-only state_dict; all give the same network and the same certified bound,
which lies between a sampled Jacobian norm of the torch model and the product of
the weights' spectral norms times the slope bound 3/2.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lipsdp
from lipsdp import activations
from lipsdp.network import Activation

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
from torch import nn  # noqa: E402

from lipsdp.io import load_network  # noqa: E402
from lipsdp.io.torch_module import network_from_module  # noqa: E402

from conftest import torch_lower_bound  # noqa: E402
from models import save_all_formats, torch_forward  # noqa: E402

SIZES = [4, 8, 8, 3]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    layers = []
    for k, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if k < len(SIZES) - 2:
            layers.append(nn.Hardswish())
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardswish")
    paths = save_all_formats(model, folder, (SIZES[0],))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths["script"] = folder / "model.script.pt"
        torch.jit.save(torch.jit.script(model), str(paths["script"]))
    return paths


@pytest.fixture(scope="module")
def reference(model):
    return lipsdp.certify(model, lower_bound_samples=0)


@pytest.fixture(scope="module")
def sandwich(model):
    """The sampled lower bound (autograd on the torch model) and the product of norms times 3/2."""
    lower = torch_lower_bound(model, SIZES[0], samples=512, scale=3.0)
    norms = [np.linalg.norm(m.weight.detach().double().numpy(), 2) for m in model if isinstance(m, nn.Linear)]
    return lower, float(np.prod(norms)) * 1.5 ** (len(norms) - 1)


FORMATS = ["module", "pickle", "torchscript", "script", "export", "onnx", "state_dict"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_hardswish_model_certifies_in_every_format(model, files, sandwich, reference, fmt):
    if fmt == "module":
        source, options = model, {}
    elif fmt == "state_dict":
        source, options = files[fmt], {"activation": "hardswish"}
    else:
        source, options = files[fmt], {}
    network = network_from_module(model) if fmt == "module" else load_network(source, **options)
    acts = [op for op in network.ops() if isinstance(op, Activation)]
    assert [(op.function, op.params) for op in acts] == [("hardswish", {})] * (len(SIZES) - 2)
    x = np.random.default_rng(0).uniform(-6, 6, (16, SIZES[0]))
    np.testing.assert_allclose(network.numpy_forward(x), torch_forward(model, x), atol=1e-5, rtol=0)

    cert = lipsdp.certify(source, lower_bound_samples=0, **options)
    lower, upper = sandwich
    assert cert.verified, cert.message
    assert lower <= cert.bound * (1 + 1e-7), f"UNSOUND: sampled {lower} > certified {cert.bound}"
    assert cert.bound <= upper * (1 + 1e-7)
    assert cert.bound == pytest.approx(reference.bound, rel=1e-6)


def test_hardswish_sector_is_exact():
    entry = activations.get("hardswish")
    assert entry.sector({}) == (-0.5, 1.5)
    assert entry.derivative(np.array([-3.0 + 1e-12, 3.0 - 1e-12]), {}) == pytest.approx([-0.5, 1.5])


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.floats(-1e9, 1e9), st.floats(-4.0, 4.0)), st.one_of(st.floats(-1e9, 1e9), st.floats(-4.0, 4.0)))
def test_hardswish_difference_quotients_lie_in_the_sector(a, b):
    """Hypothesis: ``-1/2 <= (phi(a) - phi(b)) / (a - b) <= 3/2`` on the whole real line."""
    if a == b:
        return
    entry = activations.get("hardswish")
    fa, fb = (float(entry.evaluate(np.array([v]), {})[0]) for v in (a, b))
    q = (fa - fb) / (a - b)
    tol = 1e-12 + 1e-15 * (abs(fa) + abs(fb) + abs(a) + abs(b)) / abs(a - b)
    assert -0.5 - tol <= q <= 1.5 + tol
