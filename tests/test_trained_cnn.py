"""The CNN path around the structured solve, on the kernels instead of the unrolled matrices.

- the trained-grid builder (``benchmarks/bench_trained_cnn.py``) writes files that load and certify,
  with the sandwich ``torch autograd lower bound <= bound <= trivial bound``;
- :func:`lipsdp.io.linmaps.conv_matrix` (CSR written directly) equals the COO construction;
- kernel recovery accepts exactly the convolutions and refuses anything else;
- the trivial bound and the sampled lower bound computed on the kernels (:mod:`lipsdp.convops`) agree
  with the sparse computation (the trivial bound never below it, both within 1e-6 relative);
- the fingerprint of a large matrix does not depend on how it is stored, and small ones hash as before.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from lipsdp import convops
from lipsdp.bounds import node_lipschitz, sampled_lower_bound, spectral_norm
from lipsdp.convnet import (NotAConvChain, chain_lower_bound, chain_proven_trivial_bound, chain_trivial_bound,
                            conv_chain, recover_conv)
from lipsdp.io.linmaps import conv_matrix
from lipsdp.hashing import SPARSE_HASH_ENTRIES
from lipsdp.network import Affine

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_trained_cnn.py"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_trained_cnn", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_conv_matrix(in_shape, weight, pad):
    """The unrolled stride-1 convolution entry by entry (COO, summed): what conv_matrix must equal."""
    co, ci, kh, kw = weight.shape
    _, H, W = in_shape
    top, left, bottom, right = pad
    Ho, Wo = H + top + bottom - kh + 1, W + left + right - kw + 1
    rows, cols, vals = [], [], []
    for o in range(co):
        for i in range(Ho):
            for j in range(Wo):
                for c in range(ci):
                    for a in range(kh):
                        for b in range(kw):
                            p, q = i - top + a, j - left + b
                            if 0 <= p < H and 0 <= q < W:
                                rows.append((o * Ho + i) * Wo + j)
                                cols.append((c * H + p) * W + q)
                                vals.append(weight[o, c, a, b])
    return sp.csr_matrix((vals, (rows, cols)), shape=(co * Ho * Wo, ci * H * W))


@pytest.mark.parametrize("seed", range(6))
def test_conv_matrix_equals_the_entrywise_construction(seed):
    rng = np.random.default_rng(seed)
    ci, co, kh, kw = (int(v) for v in rng.integers(1, 4, 4))
    H, W = (int(v) for v in rng.integers(kh, 7, 1)[0:1].tolist() + rng.integers(kw, 7, 1).tolist())
    pad = tuple(int(v) for v in rng.integers(0, 3, 4))
    weight = rng.standard_normal((co, ci, kh, kw))
    weight[rng.random(weight.shape) < 0.2] = 0.0
    M, shape = conv_matrix((ci, H, W), weight, (1, 1), pad[:2], pad[2:], (1, 1), 1)
    ref = _reference_conv_matrix((ci, H, W), weight, pad)
    assert M.shape == ref.shape and M.has_canonical_format
    assert abs(M - ref).max() == 0.0


def test_kernel_recovery_is_exact_and_refuses_other_maps():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((3, 2, 3, 3))
    S, out = conv_matrix((2, 6, 5), weight, (1, 1), (1, 1), (1, 1), (1, 1), 1)
    w, pad = recover_conv(S, (2, 6, 5), out)
    assert pad == (1, 1, 1, 1) and np.array_equal(w, weight)
    changed = S.tolil()
    changed[4, 7] = changed[4, 7] + 1e-9  # one entry off the kernel's value
    with pytest.raises(NotAConvChain):
        recover_conv(changed.tocsr(), (2, 6, 5), out)
    extra = S.tolil()
    zero = next((r, c) for r in range(S.shape[0]) for c in range(S.shape[1]) if S[r, c] == 0 and abs(r % 30 - c % 30) < 3)
    extra[zero] = 0.5  # an entry where the convolution has none
    with pytest.raises(NotAConvChain):
        recover_conv(extra.tocsr(), (2, 6, 5), out)
    strided, out2 = conv_matrix((2, 6, 6), weight, (2, 2), (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(NotAConvChain):
        recover_conv(strided, (2, 6, 6), out2)


@pytest.mark.parametrize("shape", [(2, 3, 9, 8), (2, 2, 24, 24), (1, 4, 24, 24)])  # dense; ARPACK; ARPACK
def test_conv_norm_matches_the_sparse_norm(shape):
    ci, co, H, W = shape
    weight = np.random.default_rng(2).standard_normal((co, ci, 3, 3))
    S, _ = conv_matrix((ci, H, W), weight, (1, 1), (1, 0), (1, 2), (1, 1), 1)
    sparse = spectral_norm(S)
    fast = convops.conv_spectral_norm(weight, (ci, H, W), (1, 0, 1, 2))
    assert sparse <= fast <= sparse * (1 + 1e-6)


def _spectral_cnn(channels=4, convs=2, size=12, seed=0):
    from torch import nn

    torch.manual_seed(seed)
    layers, c_in = [], 1
    for _ in range(convs):
        layers += [nn.Conv2d(c_in, channels, 3, padding=1), nn.LeakyReLU(0.01)]
        c_in = channels
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * size * size, 10)).double().eval()


def test_chain_bounds_match_the_network_bounds():
    from lipsdp.io import network_from_module

    net = network_from_module(_spectral_cnn(channels=3, convs=3, size=11), input_shape=(1, 11, 11))
    chain = conv_chain(net)
    sparse = node_lipschitz(net)[net.output]
    fast = chain_trivial_bound(chain)
    assert sparse <= fast <= sparse * (1 + 1e-6)
    output_map = np.random.default_rng(3).standard_normal((2, 10))
    for omap in (None, output_map):
        a = sampled_lower_bound(net, samples=40, batch=16, output_map=omap)
        b = chain_lower_bound(net, chain, samples=40, batch=16, output_map=omap)
        assert b == pytest.approx(a, rel=1e-9)


def _fingerprint(weight) -> str:
    """The digest of a linear layer's weight, as the network's fingerprint takes it."""
    h = hashlib.sha256()
    Affine(name="a", kind="Linear", shape=(weight.shape[0],), weight=weight).digest(h)
    return h.hexdigest()


def test_large_matrices_hash_by_value_not_storage():
    n = int(np.sqrt(SPARSE_HASH_ENTRIES)) + 8
    rng = np.random.default_rng(5)
    W = sp.csr_matrix((rng.standard_normal(50), (rng.integers(1, n, 50), rng.integers(1, n, 50))), shape=(n, n))
    padded = W.tolil()
    padded[0, 0] = 0.0  # an explicit zero: the same matrix
    assert _fingerprint(W) == _fingerprint(sp.csr_matrix(padded)) == _fingerprint(W.tocoo())
    changed = W.copy()
    changed.data[0] += 1e-12
    assert _fingerprint(changed) != _fingerprint(W)


def test_small_matrices_hash_as_before():
    small = np.random.default_rng(4).standard_normal((5, 4))
    assert _fingerprint(small) == _fingerprint(sp.csr_matrix(small)) == hashlib.sha256(small.tobytes()).hexdigest()


def _certify(path: Path, size: int, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "lipsdp", "certify", str(path), "--json", "--time-limit", "120",
           "--memory-limit", "2G", "--samples", "32", *extra]
    if path.suffix == ".pt":
        cmd += ["--trust-pickle", "--input-shape", f"1,{size},{size}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_grid_builder_files_load_and_certify(bench, tmp_path):
    """The untrained net of the grid's recipe at 12x12, certified in this process from both files."""
    import lipsdp

    info = bench.build("rand-cnn-4x2", tmp_path, size=12, epochs=1)
    assert bench.build("rand-cnn-4x2", tmp_path, size=12, epochs=1)["train_seconds"] == 0.0  # cached
    lower = bench.torch_lower_bound(info["paths"]["pt"], 12, samples=4)
    bounds = []
    for fmt in ("pt", "onnx"):
        cert = lipsdp.certify(str(info["paths"][fmt]), trust_pickle=True, input_shape=(1, 12, 12) if fmt == "pt"
                              else None, structure="state-space", lower_bound_samples=16, time_limit=120)
        assert cert.verified and cert.network["structure"] == "state-space"
        assert max(lower, cert.lower_bound) <= cert.bound <= cert.trivial_bound
        bounds.append(cert.bound)
    assert bounds[0] == pytest.approx(bounds[1], rel=1e-3)  # the same net through both formats


@pytest.mark.slow
def test_trained_grid_net_certifies_through_the_command_line(bench, tmp_path):
    info = bench.build("cnn-4x2", tmp_path, size=12, epochs=1)
    assert info["train_accuracy"] > 0.3
    lower = bench.torch_lower_bound(info["paths"]["pt"], 12, samples=4)
    for fmt in ("pt", "onnx"):
        cert = _certify(info["paths"][fmt], 12, "--structure", "state-space")
        assert cert["status"] == "verified" and cert["network"]["structure"] == "state-space"
        assert max(lower, cert["lower_bound"]) <= cert["bound"] <= cert["trivial_bound"]


@pytest.mark.parametrize("case", [(1, 4, 12, 10, (1, 1, 1, 1)), (2, 3, 7, 6, (1, 0, 2, 1)), (3, 2, 5, 5, (0, 0, 0, 0)),
                                  (1, 2, 6, 6, (4, 0, 0, 3))])
def test_proven_conv_norm_is_above_the_exact_norm(case):
    """The torus bound (docs/math.md §7.5) against the dense SVD of the unrolled matrix."""
    ci, co, H, W, pad = case
    weight = np.random.default_rng(6).standard_normal((co, ci, 3, 3))
    S, _ = conv_matrix((ci, H, W), weight, (1, 1), pad[:2], pad[2:], (1, 1), 1)
    exact = np.linalg.norm(S.toarray(), 2)
    proven = convops.proven_conv_norm(weight, (ci, H, W), pad)
    assert exact <= proven <= 1.2 * exact
    assert convops.proven_conv_norm(np.zeros_like(weight), (ci, H, W), pad) == 0.0


def test_proven_chain_bound_and_the_cap_on_the_structured_bound():
    """A structured bound above the trivial one gives way to the proven product of norms, also where the
    layers are too large for a proven norm of their matrices (24x24: sides of 2304)."""
    from lipsdp.bounds import PROVEN_NORM_SIZE
    from lipsdp.certificate import VERIFIED, Certificate
    from lipsdp.convnet import proven_wide_norm
    from lipsdp.io import network_from_module
    from lipsdp.structured import at_most_trivial

    net = network_from_module(_spectral_cnn(channels=4, convs=2, size=24, seed=1), input_shape=(1, 24, 24))
    chain = conv_chain(net)
    estimate, proven = chain_trivial_bound(chain), chain_proven_trivial_bound(chain)
    assert estimate <= proven <= 1.05 * estimate
    assert 2 * 4 * 24 * 24 > PROVEN_NORM_SIZE  # the unrolled matrices are too large for that proof
    tail = chain.tail
    assert np.linalg.norm(tail, 2) <= proven_wide_norm(tail) <= np.linalg.norm(tail, 2) * (1 + 1e-9)
    loose = Certificate(2.0 * proven, VERIFIED, trivial_bound=estimate)
    capped = at_most_trivial(loose, net, None, chain)
    assert capped.verified and capped.bound == proven
    omap = np.array([[1.0, -1.0] + [0.0] * 8])
    capped = at_most_trivial(Certificate(10 * proven, VERIFIED, trivial_bound=estimate), net, omap, chain)
    assert capped.bound == chain_proven_trivial_bound(chain, omap) <= proven * 1.5


def test_chain_jacobians_equal_the_unrolled_product():
    """The torch convolutions of ``_chain_jacobians`` (asymmetric padding, biases, two tanh layers) give
    ``tail diag(phi') S_2 diag(phi') S_1`` with the unrolled matrices of :func:`conv_matrix`."""
    from lipsdp.convnet import ConvChain, ConvLayer, _chain_jacobians
    from lipsdp.network import Activation

    rng = np.random.default_rng(7)
    shapes = [((2, 5, 6), (0, 1, 2, 0)), ((3, 6, 5), (1, 0, 1, 2))]  # (in_shape, (top, left, bottom, right))
    layers, mats, biases, act = [], [], [], Activation("t", "Tanh", (1,), function="tanh")
    for k, (in_shape, pad) in enumerate(shapes):
        weight = rng.standard_normal((3 if k == 0 else 2, in_shape[0], 2, 3))
        out = convops.output_shape(weight, in_shape, pad)
        bias = rng.standard_normal(int(np.prod(out)))
        layers.append(ConvLayer(f"c{k}", weight, pad, in_shape, out, (0.0, 1.0), "tanh", bias, act))
        mats.append(conv_matrix(in_shape, weight, (1, 1), pad[:2], pad[2:], (1, 1))[0].toarray())
        biases.append(bias)
    assert layers[0].out_shape == shapes[1][0]
    tail = rng.standard_normal((4, int(np.prod(layers[-1].out_shape))))
    x = rng.standard_normal((3, 60))
    J = _chain_jacobians(ConvChain(layers, tail, "fc"), tail, x)
    for s in range(len(x)):
        h, ref = x[s], np.eye(60)
        for S, bias in zip(mats, biases):
            pre = S @ h + bias
            ref, h = (1.0 - np.tanh(pre) ** 2)[:, None] * (S @ ref), np.tanh(pre)
        np.testing.assert_allclose(J[s], tail @ ref, rtol=1e-10, atol=1e-12)


def test_capped_lower_bound_is_the_full_runs_over_a_prefix():
    """The default sampled lower bound of a chain spends at most ``work`` flops: the same random inputs, cut
    to what fits (never below MIN_LOWER_BOUND_SAMPLES), so it equals the uncapped run over that many inputs."""
    from lipsdp.convnet import MIN_LOWER_BOUND_SAMPLES
    from lipsdp.io import network_from_module

    net = network_from_module(_spectral_cnn(channels=3, convs=3, size=11), input_shape=(1, 11, 11))
    chain = conv_chain(net)
    per_sample = 10 * sum(2.0 * layer.weight.size * layer.out_shape[1] * layer.out_shape[2] for layer in chain.layers)
    capped = chain_lower_bound(net, chain, samples=64, batch=8, work=20 * per_sample)
    assert capped == chain_lower_bound(net, chain, samples=20, batch=8, work=None)
    assert capped <= chain_lower_bound(net, chain, samples=64, batch=8, work=None)
    floor = chain_lower_bound(net, chain, samples=64, batch=8, work=1.0)
    assert floor == chain_lower_bound(net, chain, samples=MIN_LOWER_BOUND_SAMPLES, batch=8, work=None)
