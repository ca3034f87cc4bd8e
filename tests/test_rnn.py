"""Elman RNNs (``nn.RNN``): loading, horizon-T bounds and the all-horizon bound (docs/math.md §13)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from lipsdp.cli import main
from lipsdp.errors import LipSDPError, ModelLoadError, UnsupportedLayerError, WellPosednessError
from lipsdp.horizon_sweep import certify_horizons
from lipsdp.io import load_network, network_from_module
from lipsdp.recurrent import certify_all_horizons, state_space
from tests.conftest import assert_sandwich

N_IN, HIDDEN = 2, 4


class RNNModel(nn.Module):
    """``nn.RNN`` and a ``Linear`` read-out of the last state (``read="last"``), of every state
    (``"all"``), of the final state ``h_n`` (``"h_n"``) or of ``relu`` of the last state (``"mlp"``).

    Every ``weight_hh`` is scaled to spectral norm ``scale``.
    """

    def __init__(self, layers=1, nonlinearity="tanh", bias=True, read="last", scale=0.6, seed=0,
                 batch_first=True, hidden=HIDDEN):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = nn.RNN(N_IN, hidden, num_layers=layers, nonlinearity=nonlinearity, bias=bias,
                          batch_first=batch_first)
        self.fc = nn.Linear(hidden, 2)
        self.read = read
        with torch.no_grad():
            for name, p in self.rnn.named_parameters():
                if name.startswith("weight_hh"):
                    p.mul_(scale / torch.linalg.matrix_norm(p, 2))
        self.eval()

    def forward(self, x):
        out, h = self.rnn(x)
        if self.read == "all":
            return self.fc(out)
        if self.read == "h_n":
            return self.fc(h[-1])
        if self.read == "mlp":
            return self.fc(torch.relu(out[:, -1]))
        return self.fc(out[:, -1])


def _torch_out(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).reshape(len(x), -1).double().numpy()


@pytest.mark.parametrize("layers,nonlinearity,bias,read", [
    (1, "tanh", True, "last"), (2, "relu", False, "all"), (2, "tanh", True, "last"), (1, "relu", True, "all")])
def test_unrolled_network_is_the_model(layers, nonlinearity, bias, read):
    model = RNNModel(layers, nonlinearity, bias, read)
    net = network_from_module(model, input_shape=(5, N_IN))
    x = np.random.default_rng(0).standard_normal((6, 5, N_IN))
    assert np.allclose(net.numpy_forward(x.reshape(6, -1)), _torch_out(model, x), atol=1e-5)
    record = net.meta["recurrent"][0]
    assert record["activation"] == nonlinearity and len(record["steps"]) == layers
    assert all(len(steps) == 5 for steps in record["steps"])


def test_every_torch_format_loads_at_its_horizon(tmp_path):
    model = RNNModel(layers=2)
    example = torch.randn(2, 4, N_IN)
    paths = {"pickle": tmp_path / "rnn.pt", "script": tmp_path / "rnn.ts.pt", "trace": tmp_path / "rnn.tr.pt",
             "export": tmp_path / "rnn.pt2"}
    torch.save(model, paths["pickle"])
    torch.jit.save(torch.jit.script(model), str(paths["script"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, (example,)), str(paths["trace"]))
        torch.export.save(torch.export.export(model, (example,)), str(paths["export"]))
    x = np.random.default_rng(1).standard_normal((3, 4, N_IN))
    for name, path in paths.items():
        net = load_network(path, input_shape=(4, N_IN), trust_pickle=True)
        assert np.allclose(net.numpy_forward(x.reshape(3, -1)), _torch_out(model, x), atol=1e-5), name
    with pytest.raises(ModelLoadError, match="exported for inputs of shape"):
        lipsdp.certify(paths["export"], horizon=6)
    program = torch.export.load(str(paths["export"]))
    cert = certify_all_horizons(program, lower_bound_samples=8)  # at the program's own horizon, 4
    assert cert.verified and cert.network["lower_bound_horizon"] == 4


def torch_lower_bound(model, T: int, samples: int = 32, seed: int = 0) -> float:
    """Largest spectral norm of the autograd Jacobian of the real model at random sequences of ``T`` steps."""
    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    m = model.double()
    for x in torch.randn(samples, 1, T, N_IN, generator=gen, dtype=torch.float64):
        J = torch.autograd.functional.jacobian(lambda v: m(v).reshape(-1), x).reshape(-1, T * N_IN)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    model.float()
    return best


def _horizon_bounds(model, horizons):
    """Verified bounds and their envelope at each horizon, each checked against the real model's autograd
    lower bound; the envelope must be non-decreasing and each bound within 1e-6 of it."""
    rows = certify_horizons(model, horizons, lower_bound_samples=0)
    for row in rows:
        assert_sandwich(row.certificate, torch_lower_bound(model, row.horizon), rel=1e-6)
        assert row.bound <= row.envelope <= row.bound * (1 + 1e-6)
    envelope = [row.envelope for row in rows]
    assert envelope == sorted(envelope)
    return envelope


@pytest.mark.parametrize("read", ["last", "all"])
def test_horizon_bounds_are_sound_monotone_and_below_the_all_horizon_bound(read):
    model = RNNModel(read=read)
    # docs/math.md §13.1: the SDP values are non-decreasing in T (up to the verification's inflation).
    bounds = _horizon_bounds(model, [1, 2, 3, 5, 8])
    cert = certify_all_horizons(model)
    assert cert.verified and cert.network["output"] == read and cert.network["stability"]["proved"]
    assert max(bounds) <= cert.bound * (1 + 1e-6), (bounds, cert.bound)
    lower = torch_lower_bound(model, 12)
    assert_sandwich(cert, lower, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("nonlinearity,layers", [("tanh", 1), ("relu", 2)])
def test_horizons_one_to_twenty(nonlinearity, layers):
    model = RNNModel(layers=layers, nonlinearity=nonlinearity, scale=0.8)
    bounds = _horizon_bounds(model, range(1, 21))
    cert = lipsdp.certify(model, horizon="all")
    assert max(bounds) <= cert.bound * (1 + 1e-6)


def test_all_horizons_refused_without_a_contraction():
    # ReLU with ||W_hh|| = 3 and positive weights: the state grows without bound, no finite gain exists.
    model = RNNModel(nonlinearity="relu", scale=3.0)
    with torch.no_grad():
        model.rnn.weight_hh_l0.abs_()
    with pytest.raises(WellPosednessError, match="no all-horizon bound.*W_hh"):
        lipsdp.certify(model, horizon="all")


@pytest.mark.parametrize("read,what", [("mlp", "follows the RNN")])  # h_n: tests/test_rnn_formats.py
def test_unsupported_read_outs(read, what):
    model = RNNModel(read=read)
    with pytest.raises(LipSDPError, match=what):
        lipsdp.certify(model, horizon="all")


def test_refusals():
    with pytest.raises(UnsupportedLayerError, match="bidirectional"):  # batch_first=False: test_rnn_formats.py
        network_from_module(nn.RNN(N_IN, 3, bidirectional=True, batch_first=True), input_shape=(3, N_IN))
    for model in (RNNModel(), torch.jit.script(RNNModel())):
        with pytest.raises(ModelLoadError, match="give the horizon"):
            lipsdp.certify(model)
    with pytest.raises(LipSDPError, match="no nn.RNN"):
        lipsdp.certify(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), horizon=3)
    with pytest.raises(LipSDPError, match="horizon must be"):
        lipsdp.certify(RNNModel(), horizon=0)
    for option in ({"norm": "linf"}, {"strict": True}, {"output_index": 0}, {"solver": "scs"}):
        with pytest.raises(LipSDPError, match="horizon='all' does not support"):
            lipsdp.certify(RNNModel(), horizon="all", **option)
    with pytest.raises(LipSDPError, match="does not start with the horizon"):
        lipsdp.certify(RNNModel(), horizon=3, input_shape=(4, N_IN))


def test_state_space_reads_the_model():
    model = RNNModel(layers=2, read="all")
    ss = state_space(network_from_module(model, input_shape=(3, N_IN)))
    assert ss.mode == "all" and ss.sizes == [HIDDEN, HIDDEN]
    assert np.allclose(ss.W[1], model.rnn.weight_hh_l1.detach().numpy())
    assert np.allclose(ss.C, model.fc.weight.detach().numpy())


def test_cli_horizon(tmp_path, capsys):
    path = tmp_path / "rnn.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(RNNModel(), (torch.randn(2, 6, N_IN),)), str(path))
    bounds = {}
    for horizon in ("6", "all"):
        assert main(["certify", str(path), "--horizon", horizon, "--json", "--samples", "16"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["verified"], out
        bounds[horizon] = out["bound"]
    assert bounds["6"] <= bounds["all"] * (1 + 1e-6)
    (tmp_path / "all.json").write_text(json.dumps(out))
    assert main(["verify", str(tmp_path / "all.json"), str(path)]) == 0  # re-checked (lipsdp.recurrent_check)
    assert "certificate holds" in capsys.readouterr().out
    assert main(["certify", str(path), "--horizon", "5"]) == 2
    assert "exported for inputs of shape (6, 2), not (5, 2)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["certify", str(path), "--horizon", "0"])
    assert "whole number >= 1 or 'all'" in capsys.readouterr().err
