"""Monotonicity (lipsdp.monotone, ``lipsdp monotone``): proofs, witnesses autograd confirms, unknowns, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from lipsdp.cli import main
from lipsdp.network import Network


def monotone_model(seed: int = 0) -> nn.Sequential:
    """Nondecreasing in inputs 0 and 1 (non-negative weights on them and after, tanh); free in input 2."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        model[0].weight[:, :2].abs_()
        model[0].weight[:, 2] = torch.linspace(-2, 2, 8, dtype=torch.float64)
        model[2].weight.abs_()
        model[4].weight.abs_()
    return model.eval()


def test_model_built_monotone_is_proved():
    model = monotone_model()
    result = lipsdp.monotone(model, inputs=[0, 1], outputs=[0, 1], center=np.zeros(3), radius=1.0, time_limit=20)
    assert result.status == "proved" and result.complete
    assert all(p["status"] == "proved" and p["min_lower_bound"] >= 0 for p in result.pairs)


def test_non_monotone_is_refuted_with_a_witness_autograd_confirms():
    model = monotone_model()
    lo, hi = -np.ones(3), np.ones(3)
    result = lipsdp.monotone(model, inputs=[0, 2], outputs=[1], lower=lo, upper=hi)
    assert result.status == "refuted"
    proved, refuted = result.pairs
    assert proved["status"] == "proved" and refuted["status"] == "refuted" and refuted["input"] == 2
    x = torch.tensor(refuted["witness"], dtype=torch.float64, requires_grad=True)
    model(x[None, :])[0, 1].backward()
    assert float(x.grad[2]) < 0 and np.all(lo <= x.detach().numpy()) and np.all(x.detach().numpy() <= hi)
    a = np.array(refuted["secant"]["x"])
    b = a.copy()
    b[2] += refuted["secant"]["h"]
    with torch.no_grad():
        fa, fb = (float(model(torch.tensor(v[None, :]))[0, 1]) for v in (a, b))
    assert fb < fa and lo[2] <= a[2] < b[2] <= hi[2]


def test_monotone_but_unprovable_at_a_kink_is_unknown():
    """relu(x) - relu(x)/2 is nondecreasing, but the chain rule's slope range at 0 is [-1/2, 1]."""
    net = Network.sequential([np.array([[1.0], [1.0]]), np.array([[1.0, -0.5]])])
    result = lipsdp.monotone(net, 0, 0, lower=[-1.0], upper=[1.0], max_boxes=40, samples=64)
    assert result.status == "unknown" and not result.complete and result.pairs[0]["status"] == "unknown"


def test_command_line(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(monotone_model(), path)
    np.save(tmp_path / "c.npy", np.zeros(3))
    np.save(tmp_path / "lo.npy", -np.ones(3))
    np.save(tmp_path / "hi.npy", np.ones(3))
    base = ["monotone", str(path), "--trust-pickle", "--outputs", "0"]
    assert main(base + ["--inputs", "0,1", "--center", str(tmp_path / "c.npy"), "--radius", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "proved"
    assert main(base + ["--inputs", "2", "--box", str(tmp_path / "lo.npy"), str(tmp_path / "hi.npy")]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "refuted" and len(out["pairs"][0]["witness"]) == 3
    for bad in (["--inputs", "7", "--center", str(tmp_path / "c.npy"), "--radius", "0.5"],  # no input 7
                ["--inputs", "0"],  # no region
                ["--inputs", "0", "--center", str(tmp_path / "c.npy"), "--radius", "0.5",
                 "--box", str(tmp_path / "lo.npy"), str(tmp_path / "hi.npy")],  # two regions
                ["--inputs", "0", "--center", str(tmp_path / "lo.npy"), "--radius", "-1"],
                ["--inputs", "0", "--center", str(tmp_path / "missing.npy"), "--radius", "1"]):
        with pytest.raises(SystemExit) if "-1" in bad else _returns(2):
            assert main(base + bad) == 2
        assert "error" in capsys.readouterr().err


class _returns:
    """Context that expects nothing special (the assert inside checks the exit code)."""

    def __init__(self, code):
        self.code = code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_region_and_indices_are_checked():
    with pytest.raises(lipsdp.LipSDPError, match="takes 3 inputs"):
        lipsdp.monotone(monotone_model(), 0, 0, center=np.zeros(4), radius=0.1)
    with pytest.raises(lipsdp.LipSDPError, match="whole numbers"):
        lipsdp.monotone(monotone_model(), [1.5], 0, center=np.zeros(3), radius=0.1)
    with pytest.raises(lipsdp.LipSDPError, match="one of the two"):
        lipsdp.monotone(monotone_model(), 0, 0, center=np.zeros(3), radius=0.1, lower=np.zeros(3), upper=np.ones(3))
