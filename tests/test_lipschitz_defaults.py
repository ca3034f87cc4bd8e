"""Lipschitz-by-construction stacks certify at their constant with default settings (issue 21).

Deep residual stacks (SLL, LDL^T) used to need ``--solver ipm --tol 1e-12``: their composed norm bounds,
which preconditioned the LMI, overestimate the optimum by ``2^37`` at depth 20, so the interior-point
method stopped on its absolute gap floor and the default run verified 2.45 for a 1-Lipschitz stack.
The preconditioning now caps those bounds at a multiple of sampled gains (``lipsdp.sampled_scales``,
docs/math.md §5.3).  Also the convolutional SLL layer ``lipsdp.nn.SLLConv2d`` (docs/math.md §5.4).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipsdp  # noqa: E402
import lipsdp.nn as lnn  # noqa: E402
from lipsdp import pipeline  # noqa: E402
from lipsdp.cli import main  # noqa: E402
from lipsdp.io import network_from_module  # noqa: E402
from lipsdp.lifting import lift  # noqa: E402
from lipsdp.lmi import build_lmi  # noqa: E402
from lipsdp.reductions import composed_norm_scales, preconditioning_scales  # noqa: E402
from lipsdp.sampled_scales import gain_scales, sampled_gains  # noqa: E402
from lipsdp.solve import far_from_dual  # noqa: E402
from lipsdp.solvers.base import SolveResult  # noqa: E402
from lipsdp.testing import check_translation  # noqa: E402

from conftest import assert_sandwich, torch_lower_bound  # noqa: E402
from test_lipschitz_layers import WIDTH, sampled, stack  # noqa: E402


def conv_stack(depth: int, channels: int = 2, scale: float = 1.0, seed: int = 0) -> nn.Sequential:
    """``depth`` SLLConv2d layers (the first scaled by ``scale``), parameters moved off the initialisation."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[lnn.SLLConv2d(channels, channels + 1, scale=scale if i == 0 else 1.0)
                            for i in range(depth)]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_depth20_sll_stack_certifies_with_the_default_command(tmp_path, capsys):
    """``lipsdp certify model.pt --json`` with default solver settings: 1 + 1e-6 at depth 20 (verified 2.45 before)."""
    model = stack("sll", 20)
    path = tmp_path / "sll20.pt"
    torch.save(model, path)
    saved = tmp_path / "cert.json"
    assert main(["certify", str(path), "--input-shape", str(WIDTH), "--trust-pickle", "--json", "--samples", "16",
                 "--save", str(saved)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["status"] == "verified" and d["solver"] == "ipm"
    assert sampled(model) <= d["bound"] * (1 + 1e-7) and d["lower_bound"] <= d["bound"] <= d["trivial_bound"]
    assert d["bound"] <= 1 + 1e-6, d["bound"]
    # `lipsdp verify` proves the saved multipliers again (its congruences do not include the sampled scales).
    assert main(["verify", str(saved), str(path), "--input-shape", str(WIDTH), "--trust-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sll", "ldlt", "aol", "cayley"])
@pytest.mark.parametrize("depth", [2, 5, 10, 20])
def test_stacks_certify_with_defaults(family, depth):
    """The acceptance grid of issue 21 with default settings: depth 2-20, scales 1 and 2.5."""
    for scale in (1.0, 2.5):
        model = stack(family, depth, scale=scale)
        cert = lipsdp.certify(model, input_shape=(WIDTH,), lower_bound_samples=0)
        assert_sandwich(cert, sampled(model))
        assert cert.bound <= scale * (1 + 1e-6), (family, depth, scale, cert.bound)


def test_sampled_gains_of_a_linear_net_are_its_norms():
    """With as many directions as inputs, the finite differences of a linear map give its spectral norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).double().eval()
    net = network_from_module(model, input_shape=(4,))
    product = (model[1].weight @ model[0].weight).detach().numpy()
    assert sampled_gains(net, [])[net.output] == pytest.approx(np.linalg.norm(product, 2), rel=1e-6)


def test_gain_scales_keep_chain_scales_and_substitutes():
    """A chain keeps its layer-by-layer scales; a substituted scales function is used as it is; a deep
    residual stack's composed scales are capped (and only lowered)."""
    torch.manual_seed(0)
    chain = network_from_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), input_shape=(4,))
    lifting = lift(chain)
    lmi = build_lmi(lifting)
    block_scale = np.ones(len(lifting.blocks))
    ours = gain_scales(chain, lifting)(lmi, block_scale, 3.0)
    theirs = preconditioning_scales(lmi, block_scale, 3.0)
    assert np.array_equal(ours[0], theirs[0]) and ours[1] == theirs[1] and np.array_equal(ours[2], theirs[2])
    assert gain_scales(chain, lifting, base=composed_norm_scales) is composed_norm_scales

    net = network_from_module(stack("sll", 20), input_shape=(WIDTH,))
    lifting = lift(net)
    lips = pipeline.node_lipschitz(net)
    composed = np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]])
    scales, total, start = gain_scales(net, lifting)(build_lmi(lifting), composed, lips[net.output])
    assert start is None and np.all(scales <= composed) and total <= 4 * 1.01
    assert lips[net.output] > 2.0 ** 30    # what the solver used to see


def test_sll_conv_is_lipschitz_by_construction():
    """Autograd Jacobians of random SLLConv2d layers (float64, 5x5 images) never exceed ``scale``."""
    model = copy.deepcopy(conv_stack(1, scale=2.5, seed=1)).double()
    x = torch.randn(40, 2, 5, 5, dtype=torch.float64)
    jac = torch.func.vmap(torch.func.jacrev(lambda z: model(z[None])[0].reshape(-1)))(x).reshape(40, 50, 50)
    assert torch.linalg.matrix_norm(jac, ord=2).max() <= 2.5 * (1 + 1e-12)


def test_sll_conv_adjoint_and_gershgorin():
    """The layer's second convolution is the adjoint of its first (zero padding), and T >= K K^T."""
    layer = conv_stack(1, channels=2).double()[0]
    n = 2 * 6 * 6
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 2, 6, 6)
    K = torch.nn.functional.conv2d(basis, layer.kernel, padding=1).reshape(n, -1).T       # (3*36, 72)
    adjoint = torch.flip(layer.kernel, dims=(2, 3)).transpose(0, 1)
    out = torch.eye(3 * 36, dtype=torch.float64).reshape(-1, 3, 6, 6)
    Kt = torch.nn.functional.conv2d(out, adjoint, padding=1).reshape(3 * 36, -1).T     # (72, 3*36)
    assert torch.allclose(Kt, K.T, atol=1e-14)
    t = 2.0 / lnn.sll.sll_scaling(lnn.sll_conv.conv_gram_abs(layer.kernel), layer.q)   # T (+ eps)
    T = torch.diag(t.repeat_interleave(36))
    assert torch.linalg.eigvalsh(T - K @ K.T).min() >= -1e-10


def test_sll_conv_loads_from_every_format():
    """pickle, TorchScript (trace, script), torch.export and ONNX: the float64 function, to rounding."""
    report = check_translation(conv_stack(2), torch.randn(2, 2, 5, 5), rtol=1e-11, samples=4, neurons=1)
    assert {"pickle", "trace", "script", "export", "onnx"} <= set(report.errors), report
    assert max(report.errors.values()) <= 1e-11


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sll_conv_stack_certifies_at_its_constant(scale):
    """Two layers on 6x6 images, unrolled: sampled lower bound <= bound <= scale (1 + 1e-6)."""
    model = conv_stack(2, scale=scale)
    cert = lipsdp.certify(model, input_shape=(2, 6, 6), lower_bound_samples=0)
    assert_sandwich(cert, torch_lower_bound(copy.deepcopy(model), 72, samples=32, shape=(2, 6, 6)))
    assert cert.bound <= scale * (1 + 1e-6), cert.bound


@pytest.mark.slow
@pytest.mark.parametrize("depth", [2, 3, 4])
def test_sll_conv_stacks_on_8x8_images(depth):
    model = conv_stack(depth)
    cert = lipsdp.certify(model, input_shape=(2, 8, 8), lower_bound_samples=0)
    assert_sandwich(cert, torch_lower_bound(copy.deepcopy(model), 128, samples=32, shape=(2, 8, 8)))
    assert cert.bound <= 1 + 1e-6, cert.bound


def test_far_from_dual_flags_only_unconverged_optimal_answers():
    """The gap test of the re-solve: the dual value of the old depth-20 answer lay ~1000x below its objective."""
    x = np.zeros(2)
    assert far_from_dual(SolveResult("optimal", x, 1.61e-22, 0.0, extras={"dual_objective": 1.64e-25}))
    assert not far_from_dual(SolveResult("optimal", x, 1.0, 0.0, extras={"dual_objective": 1.0 - 1e-7}))
    assert not far_from_dual(SolveResult("optimal", x, 1.0, 0.0, extras={"dual_objective": float("nan")}))
    assert not far_from_dual(SolveResult("optimal_inaccurate", x, 1.0, 0.0, extras={"dual_objective": 0.5}))
    assert not far_from_dual(SolveResult("optimal", x, 1.0, 0.0))


@pytest.mark.slow
def test_badly_scaled_answer_is_solved_again(monkeypatch):
    """With the composed norm bounds as scales (the old preconditioning) the default tolerance stops on the
    interior-point gap floor (verified 2.45); the solve stage sees the dual far below the objective and
    re-solves at 1e-14."""
    monkeypatch.setattr(pipeline, "_scales", lambda lmi, block_scale, trivial, **kw: (block_scale, trivial, None))
    model = stack("sll", 20)
    cert = lipsdp.certify(model, input_shape=(WIDTH,), lower_bound_samples=0)
    assert_sandwich(cert, sampled(model))
    assert cert.bound <= 1 + 1e-6, cert.bound
