"""The l2 LMI on the first layer's pre-activations (lipsdp.input_metric, docs/math.md §10.4).

Where the first activation's QC has ``p_i p_i^T`` terms (LeakyReLU, GELU, SiLU) and the first layer is
narrower than the input, the verified (and solved) LMI takes ``v = A x0`` as its input block with metric
``H``, ``A^T H A <= I`` proven: the first layer's terms shrink from ``m nnz(p)^2`` entries to ``O(m)``.
Checked: the contraction proof accepts ``(1 - eta) G^{-1}`` and rejects anything above ``G^{-1}``; the
certified bound equals the one of the LMI on the input rows (the old path) to 1e-6 and is sandwiched
between the torch autograd lower bound and the product of norms; a saved certificate re-checks through
``lipsdp verify``; the 784-wide nets that were refused or took > 16 GB certify in little memory.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import lipsdp
import lipsdp.input_metric as IM
import lipsdp.reductions as R
from lipsdp.input_metric import has_square_terms, preactivation_span, proven_contraction
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Network
from tests.conftest import assert_sandwich, torch_lower_bound


@pytest.fixture(autouse=True)
def small_nets_too(monkeypatch):
    """The path is taken from MIN_TERMS first-layer entries on; these small nets take it too."""
    monkeypatch.setattr(IM, "MIN_TERMS", 0)


def _weights(dims, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(dims, dims[1:])]


def test_contraction_proof_is_tight_and_one_sided():
    A = sp.csr_matrix(_weights([50, 20])[0])
    G = (A @ A.T).toarray()
    Ginv = np.linalg.inv(G)
    Ginv = np.triu(Ginv) + np.triu(Ginv, 1).T
    assert proven_contraction(A, Ginv * (1 - 1e-8))
    assert not proven_contraction(A, Ginv * (1 + 1e-7))  # A^T H A has eigenvalue 1 + 1e-7 > 1
    assert not proven_contraction(A, Ginv)  # eigenvalue 1 exactly: no strict margin, never proven
    bump = Ginv.copy()
    bump[0, 0] += 1e-6 * abs(Ginv[0, 0])  # one entry too big (not a multiple of G^-1) is caught as well
    assert not proven_contraction(A, bump * (1 - 1e-9))


def test_applies_only_where_it_pays_and_is_exact():
    leaky = Network.sequential(_weights([40, 12, 8, 3]), activation="leaky_relu", params={"negative_slope": 0.01})
    relu = Network.sequential(_weights([40, 12, 8, 3]), activation="relu")
    wide = Network.sequential(_weights([10, 12, 8, 3]), activation="gelu")  # m > n0: A A^T singular
    assert has_square_terms(lift(leaky)) and not has_square_terms(lift(relu))
    span = preactivation_span(lift(leaky))
    assert span is not None and span.lifting.input_dim == 12
    P1 = span.lifting.pre[0]
    assert P1.nnz == 12 and np.all(P1.data == 1.0) and span.lifting.exact  # unit rows: no rounding
    assert preactivation_span(lift(wide)) is None
    W = _weights([40, 12, 8, 3])
    W[0][5] = W[0][4]  # rank deficient: refused (the old path runs)
    assert preactivation_span(lift(Network.sequential(W, activation="gelu"))) is None
    q = R.Query.build(lift(leaky), "neuron", "l2", None)
    assert q.preactivation and q.given.n == 12 + 8 + 12
    assert R.Query.build(lift(relu), "neuron", "l2", None).preactivation is False
    # 12 rows on the 12 input rows (2 * 12 <= 40): 12^3 entries; 40 -> 30 reads all 40 inputs: 30 * 40^2.
    assert has_square_terms(lift(leaky), min_terms=12 ** 3) and not has_square_terms(lift(leaky), min_terms=12 ** 3 + 1)
    net30 = lift(Network.sequential(_weights([40, 30, 3]), activation="silu"))
    assert has_square_terms(net30, min_terms=30 * 40 ** 2) and not has_square_terms(net30, min_terms=30 * 40 ** 2 + 1)


def _torch_mlp(dims, act, seed=0):
    torch.manual_seed(seed)
    layers = []
    for k, (i, o) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(i, o))
        if k < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("act", [lambda: nn.LeakyReLU(0.01), nn.GELU, nn.SiLU])
def test_same_bound_as_the_input_rows_and_sandwiched(act, monkeypatch):
    model = _torch_mlp([60, 24, 20, 4], act)
    new = lipsdp.certify(model, lower_bound_samples=0)
    assert "preactivation" in R.Query.__dataclass_fields__
    with monkeypatch.context() as m:  # the old path: the LMI on the input rows (or in full)
        m.setattr(R, "preactivation_span", lambda lifting: None)
        old = lipsdp.certify(model, lower_bound_samples=0)
    assert new.verified and old.verified
    assert new.bound == pytest.approx(old.bound, rel=1e-6)
    assert_sandwich(new, torch_lower_bound(model, 60, samples=256))


def test_saved_certificate_rechecks_through_the_cli(tmp_path):
    model = _torch_mlp([50, 16, 16, 3], lambda: nn.LeakyReLU(0.05), seed=3).float()
    path, cert = tmp_path / "m.pt", tmp_path / "c.json"
    torch.save(model, path)
    run = [sys.executable, "-m", "lipsdp"]
    out = subprocess.run(run + ["certify", "--trust-pickle", "--json", "--samples", "64", "--save", str(cert),
                                str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["verified"] and got["lower_bound"] <= got["bound"] <= got["trivial_bound"]
    check = subprocess.run(run + ["verify", "--trust-pickle", str(cert), str(path)], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0 and "certificate holds" in check.stdout + check.stderr, check.stderr
    # A tampered bound (below what the point proves) must fail the re-check.
    data = json.loads(cert.read_text())
    data["bound"] = got["bound"] * 0.9
    cert.write_text(json.dumps(data))
    bad = subprocess.run(run + ["verify", "--trust-pickle", str(cert), str(path)], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0


def test_first_layer_terms_no_longer_cubic():
    net = Network.sequential(_weights([200, 64, 32, 3]), activation="gelu")
    lifting = lift(net)
    new = build_lmi(lifting, span=preactivation_span(lifting))
    old = build_lmi(lifting, span=lifting.span_input())
    first = lambda lmi: int(np.sum((lmi.var >= 1) & (lmi.var <= 64)))
    assert first(new) <= 4 * 64 < 64 * 64 * 64 <= first(old)


@pytest.mark.slow
@pytest.mark.parametrize("dims,act", [([784, 256, 256, 10], lambda: nn.LeakyReLU(0.01)), ([784, 512, 10], nn.GELU)])
def test_wide_mnist_mlps_certify_in_little_memory(dims, act, tmp_path):
    model = _torch_mlp(dims, act).float()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    out = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "lipsdp", "certify", "--trust-pickle",
                          "--json", "--samples", "64", str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["verified"] and got["lower_bound"] <= got["bound"] <= got["trivial_bound"]
    peak_kb = int(out.stderr.strip().splitlines()[-1])
    assert peak_kb < 3 * 2 ** 20  # 3 GiB (was > 16 GB, or refused)
