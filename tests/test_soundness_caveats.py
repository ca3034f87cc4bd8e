"""Issue 18 item 2: a bound for a function slightly other than the model's says so (``Certificate.caveats``).

torch's Softplus returns ``x`` itself where ``beta x > threshold``: with the default ``threshold = 20`` the
function jumps by ``log(1 + e^-20) = 2.06e-9``.  lipsdp accepts such jumps below 1e-6 and certifies the smooth
softplus; the certificate states it, with the per-neuron jump and how it adds to the Lipschitz inequality.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import lipsdp  # noqa: E402
from lipsdp import activations  # noqa: E402
from lipsdp.activations.softplus import jump  # noqa: E402
from lipsdp.certificate import Certificate  # noqa: E402
from lipsdp.io import load_network, network_from_module  # noqa: E402


def _softplus_net(beta=1.0, threshold=20.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Softplus(beta, threshold), nn.Linear(5, 4), nn.Softplus(beta, threshold),
                         nn.Linear(4, 2)).double().eval()


@pytest.mark.parametrize("fmt", ["pickle", "export"])
def test_softplus_caveat_states_the_jump(fmt, tmp_path):
    model = _softplus_net()
    path = tmp_path / ("m.pt2" if fmt == "export" else "m.pt")
    if fmt == "export":
        torch.export.save(torch.export.export(model, (torch.randn(2, 3, dtype=torch.float64),)), path)
    else:
        torch.save(model, path)
    lines = activations.caveats(load_network(path))
    assert len(lines) == 1, lines
    assert lines[0].startswith("Softplus(beta=1, threshold=20), 9 neurons: torch switches to the identity at x > 20 "
                               "with a jump of 2.1e-09 per neuron"), lines[0]
    assert "|f(x) - f(y)| <= L |x - y| + 2 J" in lines[0]


def test_negative_beta_caveat_names_the_side():
    line = activations.caveats(network_from_module(_softplus_net(beta=-2.0, threshold=25.0)))[0]
    assert "x < -12.5" in line and f"{jump(-2.0, 25.0):.2g}" in line


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.Tanh(), nn.LeakyReLU(-0.5), nn.ELU(2.0), nn.Hardtanh(-0.2, 3.0)])
def test_no_caveat_for_continuous_activations(layer):
    net = network_from_module(nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2)))
    assert activations.caveats(net) == []


def test_the_stated_inequality_holds_for_torch():
    """``|f_torch - f_smooth| <= sum over layers of jump * sqrt(neurons) * (gain after it)``, at inputs that push
    every pre-activation across the threshold; hence ``|f(x) - f(y)| <= L |x - y| + 2 J`` for torch's f."""
    torch.manual_seed(3)
    first, second = nn.Linear(3, 6).double(), nn.Linear(6, 2).double()
    with torch.no_grad():
        first.bias.fill_(20.0)    # pre-activations around the switch at 20
    x = torch.randn(4000, 3, dtype=torch.float64) * 1e-1
    with torch.no_grad():
        pre = first(x)
        f_torch = second(nn.functional.softplus(pre, 1.0, 20.0))
        f_smooth = second(torch.logaddexp(torch.zeros_like(pre), pre))
    assert (pre > 20).any() and (pre < 20).any()
    J = jump(1.0, 20.0) * np.sqrt(6) * float(torch.linalg.matrix_norm(second.weight.detach(), 2))
    assert float((f_torch - f_smooth).norm(dim=1).max()) <= J


def test_certificate_carries_caveats_in_json_and_table(tmp_path):
    cert = Certificate(1.5, "verified", trivial_bound=2.0, caveats=["Softplus(beta=1, threshold=20): ..."])
    d = json.loads(cert.to_json())
    assert d["caveats"] == ["Softplus(beta=1, threshold=20): ..."]
    cert.save(tmp_path / "c.json")
    assert Certificate.load(tmp_path / "c.json").caveats == cert.caveats
    assert ("caveat", "Softplus(beta=1, threshold=20): ...") in cert.summary_rows()
    assert "caveat" in str(cert)
    assert Certificate.from_dict({"bound": 1.0, "status": "verified"}).caveats == []   # files written before
    assert not any(k == "caveat" for k, _ in Certificate(1.0, "verified").summary_rows())


def test_certify_and_cli_state_the_softplus_caveat(tmp_path):
    from lipsdp.cli import main

    model = _softplus_net()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    cert = lipsdp.certify(model, lower_bound_samples=0)
    assert cert.verified and len(cert.caveats) == 1 and "2.1e-09" in cert.caveats[0]
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["certify", str(path), "--json", "--samples", "0"]) == 0
    assert "2.1e-09" in json.loads(out.getvalue())["caveats"][0]
    relu = lipsdp.certify(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), lower_bound_samples=0)
    assert relu.caveats == []


def test_onnx_softplus_is_the_smooth_function_and_has_no_caveat(tmp_path):
    """ONNX's Softplus is ``log(1 + e^x)`` with no switch: read exactly (threshold 1000, where float64's
    ``log(1 + e^x)`` is ``x``), so no jump and no caveat; a torch file of the same model keeps its caveat."""
    pytest.importorskip("onnx")
    import warnings

    model = _softplus_net().float()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3),), str(path), dynamo=False, input_names=["x"])
    net = load_network(path)
    assert all(net.op(n).params["threshold"] == 1000.0 for n in net.activations())
    assert activations.caveats(net) == []
    x = np.array([[30.0, -2.0, 1.0], [0.5, 25.0, -40.0]])
    assert np.allclose(net.numpy_forward(x), model.double()(torch.from_numpy(x)).detach().numpy(), rtol=1e-6)
    cert = lipsdp.certify(path, lower_bound_samples=0)
    assert cert.verified and cert.caveats == []
