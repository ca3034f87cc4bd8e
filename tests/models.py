"""Small torch models shared by the test suite, and a writer for every format lipsdp loads.

Everything here is deterministic (fixed seeds) and small enough for a test to
build in milliseconds.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "hardtanh": nn.Hardtanh,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


class Residual(nn.Module):
    """``x + block(x)`` (module level, so that a whole-module pickle can name it)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def mlp(sizes, activation: str = "relu", seed: int = 0) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) -> act -> ... -> Linear(sizes[-2], sizes[-1])`` with seeded weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if k < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).eval()


class ResidualMLP(nn.Module):
    """``y = W_out (x + W2 relu(W1 x + b1) + b2)``: one residual block and a read-out.

    Shape:
        - Input: ``(N, dim)``
        - Output: ``(N, n_out)``
    """

    def __init__(self, dim: int = 4, hidden: int = 8, n_out: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.out = nn.Linear(dim, n_out)

    def forward(self, x):
        return self.out(x + self.fc2(torch.relu(self.fc1(x))))


def orthogonal(n: int, rng) -> np.ndarray:
    """A random ``n x n`` orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def linear(w) -> nn.Linear:
    """``nn.Linear`` holding the weight matrix ``w`` (shape ``(out, in)``)."""
    w = np.asarray(w)
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w))
    return lin


def lipschitz_sequential(n: int, hidden: int, layer, rng, orthogonal_weights: bool = True) -> nn.Sequential:
    """``hidden`` activation modules ``layer()`` (lipsdp.nn's or deel-torchlip's GroupSort, FullSort,
    HouseHolder, ...) between ``hidden + 1`` linear maps of width ``n``: orthogonal weights (true
    constant 1) or Gaussian ones; a HouseHolder's angles are drawn at random.  float64, eval mode."""
    mods = []
    for k in range(hidden + 1):
        mods.append(linear(orthogonal(n, rng) if orthogonal_weights else rng.standard_normal((n, n)) / np.sqrt(n)))
        if k < hidden:
            act = layer()
            if type(act).__name__ == "HouseHolder":
                with torch.no_grad():
                    act.theta.copy_(torch.tensor(rng.uniform(0, 6, n // 2)))
            mods.append(act)
    return nn.Sequential(*mods).double().eval().requires_grad_(False)


def residual_mlp(dim: int = 4, hidden: int = 8, n_out: int = 3, seed: int = 0) -> ResidualMLP:
    """A seeded :class:`ResidualMLP` in eval mode."""
    torch.manual_seed(seed)
    return ResidualMLP(dim, hidden, n_out).eval()


def torch_forward(model, x: np.ndarray, input_shape=None) -> np.ndarray:
    """Run ``model`` on a float64 batch ``x`` of shape ``(batch, prod(input_shape))``; return flat float64 outputs."""
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if input_shape is not None:
        xt = xt.reshape((len(x),) + tuple(input_shape))
    with torch.no_grad():
        y = model(xt)
    return y.reshape(len(x), -1).double().numpy()


def save_all_formats(model: nn.Module, tmp_path, input_shape) -> dict[str, Path]:
    """Write ``model`` in every format lipsdp reads; return ``{format: path}``.

    Formats: ``"pickle"`` (``torch.save(model)``, ``.pt``), ``"torchscript"``
    (traced, ``.ts.pt``), ``"export"`` (``torch.export.save``, ``.pt2``),
    ``"onnx"`` (``.onnx``, legacy exporter), ``"checkpoint"`` (``{"model_state_dict":
    ..., "epoch": 3}``, ``.ckpt``) and ``"state_dict"`` (``.state.pt``).
    """
    tmp_path = Path(tmp_path)
    model = model.eval()
    example = torch.randn((2,) + tuple(input_shape), generator=torch.Generator().manual_seed(0))
    paths = {name: tmp_path / f"model{suffix}" for name, suffix in [
        ("pickle", ".pt"), ("torchscript", ".ts.pt"), ("export", ".pt2"), ("onnx", ".onnx"),
        ("checkpoint", ".ckpt"), ("state_dict", ".state.pt")]}
    torch.save(model, paths["pickle"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, (example,)), str(paths["torchscript"]))
        torch.export.save(torch.export.export(model, (example,)), str(paths["export"]))
        torch.onnx.export(model, (example,), str(paths["onnx"]), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3}, paths["checkpoint"])
    torch.save(model.state_dict(), paths["state_dict"])
    return paths
