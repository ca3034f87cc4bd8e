"""``lipsdp verify`` on the kinds of certificate beyond the global SDP one, and the folding error.

Local certificates (``--center/--radius``) store their center, the model's SHA-256 and, beside the
local multipliers, the global certificate's; ``lipsdp verify`` localizes the model again on the stored
region and proves every stated bound again (the local SDP's, the global one, the Clarke-Jacobian one).
Every edit that makes a claim stronger than what is proven fails with one line: a lowered bound, a
changed multiplier, an enlarged region, another center.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from decimal import Decimal, getcontext
from fractions import Fraction

import numpy as np
import pytest
import torch

import lipsdp
from lipsdp.certificate import Certificate
from lipsdp.checking import check_certificate
from lipsdp.composition import check_composed
from lipsdp.errors import LipSDPError
from models import mlp

CENTER = np.full(5, 0.3)


@pytest.fixture(scope="module")
def model():
    return mlp([5, 12, 12, 3], seed=4)


@pytest.fixture(scope="module")
def local_certs(model):
    """Saved local certificates: an l2 one won by the local SDP, an l_inf one won by the Clarke-Jacobian bound."""
    out = {}
    for norm, radius in (("l2", 0.1), ("linf", 0.05)):
        cert = lipsdp.certify(model, center=CENTER, radius=radius, norm=norm, lower_bound_samples=64)
        assert cert.verified and cert.region["sdp_from"] == "local", cert.message
        out[norm] = json.loads(cert.to_json())
    assert out["l2"]["verification"]["method"] == "float-cholesky"
    assert out["linf"]["verification"]["method"] == "clarke-jacobian"
    return out


def _check(d, model):
    return check_certificate(Certificate.from_dict(copy.deepcopy(d)), model)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_local_certificates_recheck(model, local_certs, norm):
    d = local_certs[norm]
    cert = _check(d, model)
    assert cert.verification["rechecked"] and cert.bound == d["bound"]
    # the sandwich: sampled in the region <= local bound <= global bound <= trivial bound
    assert d["lower_bound"] <= d["bound"] <= d["global_bound"] <= d["trivial_bound"] * (1 + 1e-9)
    assert d["schema_version"] == 2 and len(d["region"]["center"]) == 5


def _lower_bound(d):
    d["bound"] *= 0.99


def _lower_global(d):
    d["global_bound"] *= 0.99


def _lower_local(d):
    d["region"]["local_bound"] *= 0.99


def _enlarge(d):
    d["region"]["radius"] *= 10


def _move(d):
    d["region"]["center"][0] += 0.5


def _multiplier(d):
    vectors = d["multipliers"] if isinstance(d["multipliers"][0], list) else [d["multipliers"]]
    vectors[0][0] *= 0.9  # rho (or lambda_in[0]) lowered: M is no longer negative definite


EDITS = {"bound": (_lower_bound, "below"), "global_bound": (_lower_global, "below what its multipliers"),
         "local_bound": (_lower_local, "below what its multipliers"),
         "radius": (_enlarge, "other sectors"), "center": (_move, "center_sha256"),
         "multiplier": (_multiplier, "not provably negative definite")}


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_edited_local_certificates_fail(model, local_certs, norm, edit):
    d = copy.deepcopy(local_certs[norm])
    change, reason = EDITS[edit]
    change(d)
    with pytest.raises(LipSDPError, match=reason):
        _check(d, model)


def test_local_certificate_of_another_model_fails(local_certs):
    with pytest.raises(LipSDPError, match="does not match"):
        _check(local_certs["l2"], mlp([5, 12, 12, 3], seed=5))


def _torch_lower_bound(model, center=None, radius=None, samples=64, dim=5):
    """Largest Jacobian spectral norm of the torch model itself (autograd, float64) at random inputs."""
    gen = torch.Generator().manual_seed(0)
    net = copy.deepcopy(model).double()
    best = 0.0
    for _ in range(samples):
        x = torch.randn(dim, generator=gen, dtype=torch.float64)
        if center is not None:
            x = torch.as_tensor(center) + radius * x / x.norm() * torch.rand(1, generator=gen, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(net, x)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


def test_sandwich_on_the_torch_model(model, local_certs):
    d = local_certs["l2"]
    assert _torch_lower_bound(model, CENTER, 0.1) <= d["bound"]
    assert _torch_lower_bound(model) <= d["global_bound"] <= d["trivial_bound"] * (1 + 1e-9)


# -- the rounding of linear chains folded at load (docs/math.md §10.3) ----------------------------------
A = 1 + 2.0 ** -30


def _cancelling_chain(extra: float | None = None):
    """Linear(k -> 3) then Linear(3 -> 1) in float64 whose exact product on input 0 is
    ``a^2 - (1 + 2^-29) = 2^-60`` while the float product is 0; ``extra`` adds a second input with that
    weight and a ReLU after the chain (the SDP path)."""
    k = 1 if extra is None else 2
    lin1 = torch.nn.Linear(k, 3, bias=False).double()
    lin2 = torch.nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        lin1.weight.zero_()
        lin1.weight[0, 0], lin1.weight[1, 0] = A, 1.0
        if extra is not None:
            lin1.weight[2, 1] = 1.0
        lin2.weight[:] = torch.tensor([[A, -(1 + 2.0 ** -29), extra or 0.0]], dtype=torch.float64)
    layers = [lin1, lin2] if extra is None else [lin1, lin2, torch.nn.ReLU(), torch.nn.Linear(1, 1, bias=False).double()]
    if extra is not None:
        with torch.no_grad():
            layers[-1].weight.fill_(1.0)
    return torch.nn.Sequential(*layers)


def _exact_constant(extra: float | None = None) -> float:
    """``||W*||`` in rationals (the ReLU's slope is 1 where the pre-activation is positive), rounded down."""
    w0 = Fraction(A) * Fraction(A) - Fraction(1 + 2.0 ** -29)
    assert w0 == Fraction(1, 2 ** 60)
    sq = w0 ** 2 + Fraction(extra or 0.0) ** 2
    return float(Fraction(math.isqrt(int(sq * 2 ** 300)), 2 ** 150))  # a lower bound on sqrt(sq)


def test_folded_chain_rounding_to_zero_is_not_a_constant_network():
    """Regression: the float product of the chain is exactly 0, so lipsdp used to certify ``L = 0`` (a
    "constant" network) for a map whose exact constant is ``2^-60``."""
    from lipsdp.pipeline import load_model

    model = _cancelling_chain()
    net, _ = load_model(model, input_shape=(1,))
    affine = [net.op(n) for n in net.graph.nodes][1]
    assert affine.weight[0, 0] == 0.0 and affine.weight_err[0, 0] >= 2.0 ** -60
    cert = lipsdp.certify(model, input_shape=(1,), lower_bound_samples=0)
    assert cert.verified and cert.bound >= _exact_constant() > 0


def test_folded_chain_error_is_in_the_sdp_proof():
    """Regression: with a second input of weight 1e-30 and a ReLU, the SDP's proof used to accept a bound
    of about 1e-30, below the exact constant (about 8.7e-19).  With the folding error in the lifting the
    rigorous test needs ``rho`` far above the solver's, beyond the inflations tried: no bound below the
    exact constant is proven."""
    model = _cancelling_chain(extra=1e-30)
    cert = lipsdp.certify(model, lower_bound_samples=0)
    exact = _exact_constant(1e-30)
    assert not cert.verified or cert.bound >= exact, (cert.bound, exact)
    assert _torch_lower_bound(model, samples=8, dim=2) <= exact


def test_folded_chain_error_in_local_bounds():
    """Regression: the Clarke-Jacobian bound and the pre-activation bounds (interval, CROWN) read the folded
    weight; they used to prove about 1e-30 on the box for a constant of about 8.7e-19."""
    from lipsdp.jacobian import local_lipschitz_jacobian
    from lipsdp.pipeline import load_model
    from lipsdp.preact import preactivation_bounds

    model = _cancelling_chain(extra=1e-30)
    net, _ = load_model(model)
    exact = _exact_constant(1e-30)
    for norm in ("l2", "linf"):
        assert local_lipschitz_jacobian(net, -np.ones(2), np.ones(2), norm=norm)[0] >= exact
    for method in ("interval", "crown"):
        lo, hi = preactivation_bounds(net, -np.ones(2), np.ones(2), method)[1]
        assert lo[0] <= -2.0 ** -60 and hi[0] >= 2.0 ** -60  # W* x for x = -e_0, e_0
    cert = lipsdp.certify(model, center=np.zeros(2), radius=1.0, lower_bound_samples=0)
    assert not cert.verified or cert.bound >= exact, (cert.bound, exact)


def test_batch_norm_folding_error_covers_the_exact_product():
    """Linear -> BatchNorm -> Linear folds into one weight; its carried bound covers the exact product
    (the BatchNorm scale ``gamma / sqrt(var + eps)`` in 80-digit decimal arithmetic)."""
    from lipsdp.pipeline import load_model

    getcontext().prec = 80
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(6).eval()
    with torch.no_grad():
        bn.running_var[:] = torch.rand(6) + 0.1
        bn.running_mean[:] = torch.randn(6)
        bn.weight[:] = torch.randn(6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), bn, torch.nn.Linear(6, 3), torch.nn.ReLU(),
                                torch.nn.Linear(3, 2)).eval()
    net, _ = load_model(model, input_shape=(4,))
    affine = [net.op(n) for n in net.graph.nodes][1]
    err = affine.weight_err.toarray() if hasattr(affine.weight_err, "toarray") else affine.weight_err
    W1, W2 = (model[i].weight.detach().double().numpy() for i in (0, 2))
    s = [Decimal(float(bn.weight[i].detach())) / (Decimal(float(bn.running_var[i])) + Decimal(bn.eps)).sqrt()
         for i in range(6)]
    for i in range(3):
        for j in range(4):
            exact = sum(Decimal(float(W2[i, k])) * s[k] * Decimal(float(W1[k, j])) for k in range(6))
            assert abs(float(exact - Decimal(float(affine.weight[i, j])))) <= err[i, j]
    cert = lipsdp.certify(model, lower_bound_samples=32)
    assert cert.verified and cert.lower_bound <= cert.bound <= cert.trivial_bound
    with pytest.raises(LipSDPError, match="--strict: .*composed in floating point"):
        lipsdp.certify(model, lower_bound_samples=0, strict=True)


# -- composed certificates (lipsdp.compose) -----------------------------------------------------------
def _seq(sizes, seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).double()


@pytest.fixture(scope="module")
def composed():
    net = _seq([6, 10, 10, 3], seed=1)
    cert = lipsdp.compose(net, split_at=[2], lower_bound_samples=8)
    assert cert.verified
    return net, json.loads(cert.to_json())


def _block_multipliers(d):
    return d["network"]["blocks"][1]["certificates"][0]["multipliers"]


COMPOSED_EDITS = {
    "bound": (lambda d: d.update(bound=d["bound"] * 0.999), "below the product"),
    "block_bound": (lambda d: d["network"]["blocks"][0].update(bound=d["network"]["blocks"][0]["bound"] * 0.999),
                    "block 0's stated bound"),
    "multiplier": (lambda d: _block_multipliers(d).__setitem__(0, _block_multipliers(d)[0] * 0.9),
                   "block 1: the certificate does not verify"),
    "dropped": (lambda d: d["network"]["blocks"][1].update(certificates=[]), "stores no SDP certificate"),
    "split": (lambda d: d["network"].update(split_at=[1]), "does not verify|does not match"),
}


def test_composed_certificate_rechecks_and_edits_fail(composed, tmp_path):
    net, d = composed
    cert = check_composed(copy.deepcopy(d), net)
    assert cert.verification["rechecked"] and cert.bound == d["bound"]
    assert cert.lower_bound <= cert.bound <= cert.trivial_bound * (1 + 1e-9)
    for name, (edit, reason) in COMPOSED_EDITS.items():
        e = copy.deepcopy(d)
        edit(e)
        with pytest.raises(LipSDPError, match=reason):
            check_composed(e, net)
    with pytest.raises(LipSDPError, match="does not match"):
        check_composed(copy.deepcopy(d), _seq([6, 10, 10, 3], seed=2))


def test_composed_attention_certificate_rechecks():
    """Residual L2 attention and a residual MLP: the hooks' bounds recomputed, the MLP's SDP re-checked;
    a dot-product attention block over a box: an enlarged box fails."""
    from lipsdp.nn.attention import DotMultiheadSelfAttention, L2MultiheadSelfAttention, Residual

    torch.manual_seed(4)
    stack = [Residual(L2MultiheadSelfAttention(4, heads=2)).double(), Residual(_seq([4, 8, 4], seed=5))]
    d = json.loads(lipsdp.compose(stack, seq_len=3, lower_bound_samples=0).to_json())
    assert check_composed(copy.deepcopy(d), stack).verification["rechecked"]
    d["network"]["seq_len"] = 30  # the attention bound grows with the sequence length
    with pytest.raises(LipSDPError, match="block 0's stated bound"):
        check_composed(d, stack)
    local = [Residual(DotMultiheadSelfAttention(4, heads=2)).double(), Residual(_seq([4, 8, 4], seed=8))]
    box = (-0.5 * np.ones((3, 4)), 0.5 * np.ones((3, 4)))
    d = json.loads(lipsdp.compose(local, box=box, lower_bound_samples=0).to_json())
    assert check_composed(copy.deepcopy(d), local).verification["rechecked"]
    d["network"]["domain"]["box"] = [(-5 * np.ones((3, 4))).tolist(), (5 * np.ones((3, 4))).tolist()]
    with pytest.raises(LipSDPError, match="block 0's stated bound"):
        check_composed(d, local)


@pytest.mark.slow  # two command-line runs, each importing torch (about 40 s on the shared machine)
def test_cli_verifies_a_composed_certificate(composed, tmp_path):
    net, d = composed
    torch.save(net, tmp_path / "net.pt")
    (tmp_path / "cert.json").write_text(json.dumps(d))
    run = lambda *a: subprocess.run([sys.executable, "-m", "lipsdp", "verify", *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    proc = run(tmp_path / "cert.json", tmp_path / "net.pt")
    assert proc.returncode == 0 and "certificate holds" in proc.stdout, proc.stderr
    d = copy.deepcopy(d)
    d["bound"] *= 0.999
    (tmp_path / "edited.json").write_text(json.dumps(d))
    proc = run(tmp_path / "edited.json", tmp_path / "net.pt")
    assert proc.returncode == 1 and "below the product" in proc.stderr


# -- all-horizon RNN certificates (--horizon all) ------------------------------------------------------
class _Elman(torch.nn.Module):
    """``nn.RNN`` (tanh, ``||W_hh|| = 0.6``) and a Linear read-out of the last state."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = torch.nn.RNN(2, 4, batch_first=True)
        self.fc = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(0.6 / torch.linalg.matrix_norm(self.rnn.weight_hh_l0, 2))
        self.eval()

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


@pytest.fixture(scope="module")
def rnn_cert():
    from lipsdp.recurrent import certify_all_horizons

    model = _Elman()
    cert = certify_all_horizons(model, lower_bound_samples=16)
    assert cert.verified and cert.formulation == "dissipation"
    return model, json.loads(cert.to_json())


def _lower_rho(d):
    d["rho"] *= 0.9
    d["bound"] = math.sqrt(d["rho"]) * (1 + 1e-9)  # a consistent, lower claim: the LMI must refuse it


RNN_EDITS = {"bound": (lambda d: d.update(bound=d["bound"] * 0.999), "below what its multipliers prove"),
             "rho": (_lower_rho, "dissipation LMI is not provably negative definite"),
             "multiplier": (lambda d: d["multipliers"].__setitem__(0, d["multipliers"][0] * 1.5),
                            "not provably|storage condition"),
             "dropped": (lambda d: d["multipliers"].pop(), "do not fit")}


def test_all_horizon_certificate_rechecks_and_edits_fail(rnn_cert):
    model, d = rnn_cert
    cert = _check(d, model)
    assert cert.verification["rechecked"] and cert.verification["recheck_margin"] > 0
    assert d["lower_bound"] <= d["bound"] <= d["trivial_bound"]
    for name, (edit, reason) in RNN_EDITS.items():
        e = copy.deepcopy(d)
        edit(e)
        with pytest.raises(LipSDPError, match=reason):
            _check(e, model)
    with pytest.raises(LipSDPError, match="does not match"):
        _check(d, _Elman(seed=1))


# -- state-space CNN certificates (--structure state-space) --------------------------------------------
def _cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.LeakyReLU(0.01),
                               torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.LeakyReLU(0.01), torch.nn.Flatten(),
                               torch.nn.Linear(2 * 4 * 4, 3)).double().eval()


@pytest.fixture(scope="module")
def cnn_cert():
    """The structured LMIs' own certificate (:func:`lipsdp.structured.certify_structured`): on nets this small
    ``certify`` reports the proven trivial bound instead (the state-space LMIs are looser), re-checked below."""
    from lipsdp.convnet import conv_chain
    from lipsdp.pipeline import load_model
    from lipsdp.structured import certify_structured

    model = _cnn()
    net, _ = load_model(model, input_shape=(1, 4, 4))
    cert = certify_structured(net, conv_chain(net), lower_bound_samples=32)
    assert cert.verified and cert.formulation == "state-space" and cert.verification["point"]
    return model, json.loads(cert.to_json())


def test_state_space_certificate_at_the_trivial_bound_rechecks():
    model = _cnn()
    d = json.loads(lipsdp.certify(model, input_shape=(1, 4, 4), structure="state-space",
                                  lower_bound_samples=0).to_json())
    assert d["formulation"] == "state-space" and d["verification"]["method"] == "trivial"
    assert check_certificate(Certificate.from_dict(copy.deepcopy(d)), model, input_shape=(1, 4, 4)).verified
    d["bound"] *= 0.999
    with pytest.raises(LipSDPError, match="below the proven trivial bound"):
        check_certificate(Certificate.from_dict(d), model, input_shape=(1, 4, 4))


def _supply(d):
    d["multipliers"][1][0][0] *= 0.5  # X_1 lowered: layer 1's block (or layer 0's) is no longer proven


def _first_supply(d):
    for row in d["multipliers"][0]:
        for j in range(len(row)):
            row[j] *= 0.9
    d["bound"] = d["bound"] * 0.95  # rho lowered with a matching claim: the first block must refuse it


def _cnn_lower_bound(model, samples=16):
    gen = torch.Generator().manual_seed(1)
    best = 0.0
    for _ in range(samples):
        x = torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(model, x).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


CNN_EDITS = {"bound": (lambda d: d.update(bound=d["bound"] * 0.999), "below what its multipliers prove"),
             "supply": (_supply, "not proven"), "rho": (_first_supply, "not proven"),
             "tail_gain": (lambda d: d["verification"].update(tail_gain=d["verification"]["tail_gain"] * 0.5),
                           "Gram bound"),
             "storage": (lambda d: d["verification"]["point"]["P1"][0][0].__setitem__(0, 1e3), "not proven"),
             "point": (lambda d: d["verification"].pop("point"), "holds no solver point")}


def test_state_space_certificate_rechecks_and_edits_fail(cnn_cert):
    model, d = cnn_cert
    cert = check_certificate(Certificate.from_dict(copy.deepcopy(d)), model, input_shape=(1, 4, 4))
    assert cert.verification["rechecked"] and cert.bound == d["bound"]
    assert _cnn_lower_bound(model) <= d["bound"] and d["lower_bound"] <= d["bound"]
    for name, (edit, reason) in CNN_EDITS.items():
        e = copy.deepcopy(d)
        edit(e)
        with pytest.raises(LipSDPError, match=reason):
            check_certificate(Certificate.from_dict(e), model, input_shape=(1, 4, 4))
    with pytest.raises(LipSDPError, match="does not match"):
        check_certificate(Certificate.from_dict(copy.deepcopy(d)), _cnn(seed=1), input_shape=(1, 4, 4))


def test_state_space_path_refuses_a_folded_batch_norm():
    """A BatchNorm folded into a convolution carries a rounding bound the state-space LMIs do not model:
    ``--structure state-space`` refuses it with the reason, ``auto`` unrolls (which carries it)."""
    from lipsdp.errors import UnsupportedLayerError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 2)).eval()
    with pytest.raises(UnsupportedLayerError, match="composed in floating point"):
        lipsdp.certify(model, input_shape=(1, 4, 4), structure="state-space", lower_bound_samples=0)
    cert = lipsdp.certify(model, input_shape=(1, 4, 4), structure="auto", lower_bound_samples=16)
    assert cert.verified and cert.lower_bound <= cert.bound <= cert.trivial_bound


@pytest.mark.parametrize("divisor", [3.0, [3.0, 7.0]])
def test_division_by_a_constant_carries_the_reciprocals_rounding(divisor):
    """``linear(x) / d`` loads as ``W * fl(1 / d)``: the carried bound covers ``W / d`` exactly (rationals)."""
    from lipsdp.pipeline import load_model

    class Div(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(3, 2).double()
            self.register_buffer("d", torch.tensor(divisor, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x) / self.d

    model = Div()
    net, _ = load_model(model, input_shape=(3,))
    affine = [net.op(n) for n in net.graph.nodes][1]
    err = affine.weight_err.toarray() if hasattr(affine.weight_err, "toarray") else affine.weight_err
    W, d = model.lin.weight.detach().numpy(), np.broadcast_to(np.asarray(divisor), (2,))
    for i in range(2):
        for j in range(3):
            exact = Fraction(float(W[i, j])) / Fraction(float(d[i]))
            assert abs(exact - Fraction(float(affine.weight[i, j]))) <= Fraction(float(err[i, j]))
