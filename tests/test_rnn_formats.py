"""Recurrent models in every layout and format: ``batch_first=False``, ONNX's ``RNN`` operator (docs/math.md §13)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lipsdp
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.io import load_network, network_from_module
from tests.conftest import assert_sandwich
from tests.test_rnn import N_IN, RNNModel

T = 3

onnx = pytest.importorskip("onnx")


class TimeFirst(nn.Module):
    """The twin of an ``RNNModel`` with ``batch_first=batch_first`` (same weights, same read-out)."""

    def __init__(self, src: RNNModel, batch_first: bool = False):
        super().__init__()
        r = src.rnn
        self.rnn = nn.RNN(N_IN, r.hidden_size, num_layers=r.num_layers, nonlinearity=r.nonlinearity,
                          batch_first=batch_first)
        self.rnn.load_state_dict(r.state_dict())
        self.fc, self.read, self.batch_first = src.fc, src.read, batch_first
        self.eval()

    def forward(self, x):
        out, _ = self.rnn(x)
        if self.read == "all":
            return self.fc(out)
        return self.fc(out[:, -1] if self.batch_first else out[-1])


def _samples(model, x: np.ndarray) -> np.ndarray:
    """The model's output for each sequence of ``x`` (``(batch, T, n)``), one row per sample."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    time_first = isinstance(model, TimeFirst) and not model.batch_first
    with torch.no_grad():
        y = model(xt.transpose(0, 1) if time_first else xt)
    if time_first and y.dim() == 3:
        y = y.transpose(0, 1)
    return y.reshape(len(x), -1).double().numpy()


def torch_lower_bound(model, samples: int = 16) -> float:
    """Largest spectral norm of the autograd Jacobian of the real model (its own layout) at random sequences."""
    gen = torch.Generator().manual_seed(1)
    time_first = isinstance(model, TimeFirst) and not model.batch_first
    m, best = model.double(), 0.0
    for x in torch.randn(samples, T, N_IN, generator=gen, dtype=torch.float64):
        shaped = x[:, None] if time_first else x[None]
        J = torch.autograd.functional.jacobian(lambda v: m(v).reshape(-1), shaped).reshape(-1, T * N_IN)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    model.float()
    return best


def _onnx(model, path, batch_first: bool) -> str:
    example = torch.randn(1, T, N_IN) if batch_first else torch.randn(T, 1, N_IN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False)
    return str(path)


def _formats(tf: TimeFirst, src: RNNModel, tmp_path) -> dict:
    """The time-first twin in every format lipsdp reads, and the batch-first model as ONNX."""
    torch.save(tf, tmp_path / "tf.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(tf, (torch.randn(T, 2, N_IN),))
        program = torch.export.export(tf, (torch.randn(T, 2, N_IN),))
    return {"module": tf, "pickle": tmp_path / "tf.pt", "script": torch.jit.script(tf), "trace": traced,
            "export": program, "onnx": _onnx(tf, tmp_path / "tf.onnx", False),
            "onnx batch_first": _onnx(TimeFirst(src, batch_first=True), tmp_path / "bf.onnx", True)}


@pytest.mark.parametrize("layers,read,nonlinearity", [(2, "last", "tanh"), (1, "all", "relu")])
def test_time_first_and_onnx_translate_exactly_with_the_same_bound(tmp_path, layers, read, nonlinearity):
    src = RNNModel(layers=layers, read=read, nonlinearity=nonlinearity)
    tf = TimeFirst(src)
    ref = lipsdp.certify(src, horizon=T, lower_bound_samples=0)
    assert_sandwich(ref, torch_lower_bound(tf), rel=1e-6)
    x = np.random.default_rng(0).standard_normal((4, T, N_IN))
    for name, model in _formats(tf, src, tmp_path).items():
        net = load_network(model, input_shape=(T, N_IN), trust_pickle=True) if isinstance(model, (str, type(tmp_path))) else \
            network_from_module(model, input_shape=(T, N_IN))
        assert net.op(net.input).shape == (T, N_IN), name
        assert np.allclose(net.numpy_forward(x.reshape(4, -1)), _samples(tf, x), atol=1e-5), name
        cert = lipsdp.certify(model, horizon=T, lower_bound_samples=0, trust_pickle=True)
        assert cert.bound == pytest.approx(ref.bound, rel=1e-9), name


def test_all_horizons_agree_across_layouts_and_onnx(tmp_path):
    src = RNNModel(layers=2, read="last")
    tf = TimeFirst(src)
    ref = lipsdp.certify(src, horizon="all", lower_bound_samples=0)
    assert ref.network["stability"]["proved"]
    assert_sandwich(ref, torch_lower_bound(tf), rel=1e-6)
    for model in (tf, _onnx(tf, tmp_path / "tf.onnx", False),
                  _onnx(TimeFirst(src, batch_first=True), tmp_path / "bf.onnx", True)):
        cert = lipsdp.certify(model, horizon="all", lower_bound_samples=0)
        assert cert.bound == pytest.approx(ref.bound, rel=1e-9)
        assert cert.network["layers"] == ref.network["layers"]


def _edited(path, tmp_path, **attrs) -> str:
    """``path`` with the attributes of its (first) RNN node replaced by ``attrs``."""
    model = onnx.load(path)
    node = next(n for n in model.graph.node if n.op_type == "RNN")
    for name, value in attrs.items():
        for a in [a for a in node.attribute if a.name == name]:
            node.attribute.remove(a)
        node.attribute.append(onnx.helper.make_attribute(name, value))
    out = tmp_path / f"edited_{'_'.join(attrs)}.onnx"
    onnx.save(model, str(out))
    return str(out)


class Bidirectional(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.fc = nn.RNN(N_IN, 3, bidirectional=True), nn.Linear(6, 1)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][-1])


def test_onnx_rnn_refusals(tmp_path):
    path = _onnx(TimeFirst(RNNModel()), tmp_path / "tf.onnx", False)
    for attrs, what in [({"direction": "reverse"}, "direction='reverse'"), ({"clip": 2.0}, "attribute clip"),
                        ({"activations": ["Sigmoid"]}, "activations="),
                        ({"activation_alpha": [0.5]}, "attribute activation_alpha")]:
        with pytest.raises(UnsupportedLayerError, match=f"RNN with {what}"):
            load_network(_edited(path, tmp_path, **attrs))
    with pytest.raises(UnsupportedLayerError, match="direction='bidirectional'"):
        load_network(_onnx(Bidirectional().eval(), tmp_path / "bi.onnx", False))


class Cumsum(nn.Module):
    def forward(self, rnn_out):
        return rnn_out[0].cumsum(0)


class SumOverBatch(nn.Module):
    """Reads ``(T, batch, n)`` and mixes samples: no per-sample function, refused."""

    def __init__(self, reduce_axis: int):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(N_IN, 3)
        self.axis = reduce_axis

    def forward(self, x):
        return self.rnn(x)[0].sum(self.axis)


def test_time_first_refusals():
    # out.sum(1) sums over the batch: another sample's sequence would enter the bound.
    with pytest.raises(UnsupportedLayerError, match="sum reduces over the batch axis"):
        network_from_module(SumOverBatch(1), input_shape=(T, N_IN))
    with pytest.raises(UnsupportedLayerError, match="batch axis is not the first"):  # no handler: refused
        network_from_module(nn.Sequential(nn.RNN(N_IN, 3), Cumsum()), input_shape=(T, N_IN))
    # A batch_first=False RNN given a batch-first tensor: it would run along the batch.
    model = Stacked().eval()
    with pytest.raises(UnsupportedLayerError, match="batch_first=False on a tensor whose batch axis is not"):
        network_from_module(model, input_shape=(T, N_IN))


class Stacked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.RNN(N_IN, 3, batch_first=True), nn.RNN(3, 3, batch_first=False)

    def forward(self, x):
        return self.second(self.first(x)[0])[0][-1]


# -- ICLRNN (lipsdp.nn.ICLRNN): input convex, Lipschitz by construction, a Python loop over time --------------
def _iclrnn(layers=1, read="last", gamma=0.6, seed=0):
    from lipsdp.nn import ICLRNN

    torch.manual_seed(seed)
    return ICLRNN(N_IN, 4, 2, num_layers=layers, gamma=gamma, read=read).eval()


def test_iclrnn_is_input_convex_and_lipschitz_by_construction():
    model = _iclrnn(layers=2, read="all")
    with torch.no_grad():
        for layer, (u, w, _) in enumerate(model.weights()):
            assert torch.linalg.matrix_norm(u.double(), 2) <= 1 + 1e-6
            assert torch.linalg.matrix_norm(w.double(), 2) <= model.gamma * (1 + 1e-6)
            assert bool((w >= 0).all()) and (layer == 0 or bool((u >= 0).all()))
        assert bool((model.readout_weight() >= 0).all())
        a, b = torch.randn(2, 64, 5, N_IN)
        assert bool((model((a + b) / 2) <= (model(a) + model(b)) / 2 + 1e-5).all())  # midpoint convexity
    assert model.lipschitz_constant() == pytest.approx(1 / 0.4 ** 2)


def _lower(model, T_: int, samples: int = 16) -> float:
    gen = torch.Generator().manual_seed(2)
    m, best = model.double(), 0.0
    for x in torch.randn(samples, 1, T_, N_IN, generator=gen, dtype=torch.float64):
        J = torch.autograd.functional.jacobian(lambda v: m(v).reshape(-1), x).reshape(-1, T_ * N_IN)
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    model.float()
    return best


def test_iclrnn_certified_in_every_format(tmp_path):
    model, T4 = _iclrnn(layers=2), 4
    example = torch.randn(2, T4, N_IN)
    torch.save(model, tmp_path / "icl.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, (example,)), str(tmp_path / "icl.ts"))
        torch.export.save(torch.export.export(model, (example,)), str(tmp_path / "icl.pt2"))
    x = np.random.default_rng(3).standard_normal((3, T4, N_IN))
    with torch.no_grad():
        expected = model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    lower, bounds = _lower(model, T4), []
    for name in ("icl.pt", "icl.ts", "icl.pt2"):
        net = load_network(tmp_path / name, input_shape=(T4, N_IN), trust_pickle=True)
        assert np.allclose(net.numpy_forward(x.reshape(3, -1)), expected, atol=1e-5), name
        cert = lipsdp.certify(tmp_path / name, horizon=T4, trust_pickle=True, lower_bound_samples=0)
        assert_sandwich(cert, lower, rel=1e-6)
        assert cert.bound <= model.lipschitz_constant()
        bounds.append(cert.bound)
    assert bounds == pytest.approx([bounds[0]] * 3, rel=1e-9)


@pytest.mark.parametrize("layers,read", [(1, "last"), pytest.param(2, "all", marks=pytest.mark.slow)])
def test_iclrnn_horizons_and_every_horizon(layers, read):
    from lipsdp.horizon_sweep import certify_horizons

    model = _iclrnn(layers=layers, read=read)
    rows = certify_horizons(model, [1, 2, 3, 5], lower_bound_samples=0)
    envelope = [row.envelope for row in rows]
    assert envelope == sorted(envelope)
    for row in rows:
        assert_sandwich(row.certificate, _lower(model, row.horizon), rel=1e-6)
    every = lipsdp.certify(model, horizon="all", lower_bound_samples=0)
    assert every.verified and every.network["stability"]["proved"] and every.network["output"] == read
    assert max(envelope) <= every.bound * (1 + 1e-6)
    assert every.bound <= every.trivial_bound <= model.lipschitz_constant() * (1 + 1e-6)


class LoopRNN(nn.Module):
    """A Python-loop Elman RNN; ``variant`` breaks the recurrence: ``"skip"`` (the output reads the input),
    ``"drift"`` (the recurrent matrix changes with the step)."""

    def __init__(self, variant: str):
        super().__init__()
        torch.manual_seed(0)
        self.u, self.w, self.c = nn.Linear(N_IN, 3), nn.Linear(3, 3, bias=False), nn.Linear(3, 1)
        self.variant = variant

    def forward(self, x):
        h = torch.tanh(self.u(x[:, 0]))
        for t in range(1, x.shape[1]):
            w = self.w(h) * (1.0 + t if self.variant == "drift" else 1.0)
            h = torch.tanh(self.u(x[:, t]) + w)
        return self.c(h) + (x[:, -1, :1] if self.variant == "skip" else 0.0)


@pytest.mark.parametrize("variant,why", [("skip", "output reads more than the top layer"),
                                         ("drift", "is not the cell of the other steps")])
def test_unrolled_loops_that_are_not_one_cell_are_refused(variant, why):
    net = network_from_module(LoopRNN(variant).eval(), input_shape=(4, N_IN))
    with pytest.raises(LipSDPError, match=why):
        lipsdp.certify(net, horizon="all")


def _dynamo_onnx(model, path, example) -> str:
    import contextlib
    import io

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=True)
    return str(path)


def test_dynamo_onnx_unrolled_rnn(tmp_path):
    """torch.onnx.export's default (dynamo) exporter unrolls nn.RNN into MatMul / Slice / Concat on time-first
    tensors: translated exactly, certified over the horizon and, with the cell read back, for all."""
    src = RNNModel(layers=2, read="last")
    path = _dynamo_onnx(TimeFirst(src, batch_first=True), tmp_path / "rnn.onnx", torch.randn(1, T, N_IN))
    x = np.random.default_rng(4).standard_normal((3, T, N_IN))
    net = load_network(path)
    assert np.allclose(net.numpy_forward(x.reshape(3, -1)), _samples(src, x), atol=1e-5)
    for horizon in (T, "all"):
        ref = lipsdp.certify(src, horizon=horizon, lower_bound_samples=0)
        cert = lipsdp.certify(path, horizon=horizon, lower_bound_samples=0)
        assert cert.bound == pytest.approx(ref.bound, rel=1e-6), horizon  # the same weights, other roundings
        assert_sandwich(cert, torch_lower_bound(TimeFirst(src, batch_first=True)), rel=1e-6)
    # A time-first model unrolled by dynamo does not say which axis is the batch: refused, not guessed.
    path = _dynamo_onnx(TimeFirst(src), tmp_path / "tf.onnx", torch.randn(T, 1, N_IN))
    with pytest.raises(UnsupportedLayerError, match="Slice acts on the batch axis"):
        load_network(path)


@pytest.mark.slow
def test_dynamo_onnx_iclrnn(tmp_path):
    icl = _iclrnn(layers=2, read="all")
    path = _dynamo_onnx(icl, tmp_path / "icl.onnx", torch.randn(1, T, N_IN))
    cert = lipsdp.certify(path, horizon="all", lower_bound_samples=0)
    assert_sandwich(cert, _lower(icl, T), rel=1e-6)
    assert cert.bound <= icl.lipschitz_constant()


class Pooled(nn.Module):
    """Time-first reductions: the mean over time, a sum over time kept as an axis, a sum over features."""

    def __init__(self, kind: int):
        super().__init__()
        torch.manual_seed(0)
        self.rnn, self.fc, self.kind = nn.RNN(N_IN, 3), nn.Linear(3, 1), kind

    def forward(self, x):
        out = self.rnn(x)[0]
        if self.kind == 0:
            return self.fc(out.mean(0))
        if self.kind == 1:
            return self.fc(out.sum(dim=[0], keepdim=True))[0]
        return self.fc(out).sum(2).transpose(0, 1)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_time_first_reductions_translate_exactly(kind):
    model = Pooled(kind).eval()
    net = network_from_module(model, input_shape=(4, N_IN))
    x = np.random.default_rng(5).standard_normal((3, 4, N_IN))
    with torch.no_grad():
        y = model(torch.as_tensor(x, dtype=torch.float32).transpose(0, 1)).reshape(3, -1).double().numpy()
    assert np.allclose(net.numpy_forward(x.reshape(3, -1)), y, atol=1e-5)


def test_final_state_h_n_is_the_last_state_in_every_layout_and_onnx(tmp_path):
    """``fc(h_n[-1])`` is ``fc(out[:, -1])``: the same bounds, over a horizon and for every horizon."""
    src = RNNModel(layers=2)

    class FinalState2(nn.Module):
        def __init__(self, batch_first):
            super().__init__()
            self.rnn, self.fc = TimeFirst(src, batch_first).rnn, src.fc

        def forward(self, x):
            return self.fc(self.rnn(x)[1][-1])

    refs = {h: lipsdp.certify(src, horizon=h, lower_bound_samples=0).bound for h in (T, "all")}
    for batch_first in (True, False):
        model = FinalState2(batch_first).eval()
        for m in (model, _onnx(model, tmp_path / f"h{batch_first}.onnx", batch_first)):
            for h, ref in refs.items():
                assert lipsdp.certify(m, horizon=h, lower_bound_samples=0).bound == pytest.approx(ref, rel=1e-9)
