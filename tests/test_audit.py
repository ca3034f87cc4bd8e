"""Soundness audit through real files (issue 18, acceptance item 2): random torch models, saved, loaded, certified.

hypothesis draws models that people build: MLPs and 1-D / 2-D CNNs whose activations come from the whole
catalogue (``lipsdp.activations``) with random parameters -- LeakyReLU / PReLU slopes negative, zero and
above one, ELU alpha of either sign, Softplus beta and threshold (the ones torch switches with a jump are
refused), Hardtanh / clamp bounds, ReLU6, GELU both ways -- plus activations lipsdp does not model
(CELU, SELU, Mish, per-channel PReLU, ...), and attribute variations: convolution stride, padding,
padding mode, dilation, groups and bias; average pooling kernel, stride, padding, ``ceil_mode``,
``count_include_pad``, ``divisor_override``; adaptive pooling; max pooling; batch norm in eval mode with
random statistics; residual additions; weight scales over two decades.  Each model is written in one format
lipsdp reads (whole-module pickle, TorchScript trace or script, ``torch.export``, ONNX, and a state_dict for
plain MLPs), loaded with :func:`lipsdp.io.load_network` and certified.  Then either

- the file is refused with :class:`~lipsdp.errors.UnsupportedLayerError` (one clean line), or
- the loaded graph computes what torch computes, and the sandwich holds: the sampled lower bound of the real
  torch model (autograd Jacobians in float64, and difference quotients of close pairs, which see jumps)
  <= the certified bound <= the trivial bound; a run that verifies nothing returns no bound.

The default run draws ``LIPSDP_AUDIT_EXAMPLES`` models (default 100); ``-m slow`` draws 2,000 (derandomized,
so the same models every run).  ``LIPSDP_AUDIT_REPORT=path.json`` writes the tallies (models tried,
refused, certified, the smallest ratio bound / lower bound, time).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import warnings
from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
from hypothesis import HealthCheck, Phase, event, given, settings, strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import lipsdp  # noqa: E402
from lipsdp.budget import LimitReached  # noqa: E402
from lipsdp.errors import UnsupportedLayerError  # noqa: E402
from lipsdp.io import load_network  # noqa: E402
from models import Residual  # noqa: E402

EXAMPLES = int(os.environ.get("LIPSDP_AUDIT_EXAMPLES", "100"))
TIME_LIMIT = float(os.environ.get("LIPSDP_AUDIT_TIME_LIMIT", "3"))     # seconds per certification
SLOW_EXAMPLES = int(os.environ.get("LIPSDP_AUDIT_SLOW_EXAMPLES", "2000"))
# No shrinking: one audit step costs up to a second, and the failing model's draw is printed as it is.
AUDIT = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
             phases=(Phase.explicit, Phase.generate))


# -- module-level layers (the whole-module pickle names them) --------------------------
class Clamp(nn.Module):
    """``torch.clamp(x, low, high)``, one bound possibly absent."""

    def __init__(self, low: float | None, high: float | None):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x):
        return torch.clamp(x, self.low, self.high)


class Abs(nn.Module):
    def forward(self, x):
        return torch.abs(x)


def _prelu_channels(n: int) -> nn.PReLU:
    prelu = nn.PReLU(n)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(-0.5, 0.5, n))
    return prelu


# -- activations with random parameters -----------------------------------------------
SLOPES = [-2.0, -1.0, -0.3, 0.0, 0.01, 0.2, 1.0, 1.5, 3.0]


@st.composite
def activations(draw):
    """A factory ``act(channels)`` of one activation module (the same kind and parameters at every use)."""
    modelled = ["relu", "relu6", "leaky_relu", "prelu", "elu", "softplus", "hardtanh", "clamp", "sigmoid", "tanh",
                "silu", "gelu", "hardswish", "identity", "abs"]
    # One model in ten uses what lipsdp does not model (it must be refused, never read as something else).
    unmodelled = ["prelu-channels", "celu", "selu", "mish", "softsign", "logsigmoid"]
    kind = draw(st.sampled_from(unmodelled if draw(st.integers(0, 9)) == 0 else modelled))
    event(f"activation {kind}")
    if kind == "leaky_relu":
        slope = draw(st.sampled_from(SLOPES))
        return lambda n: nn.LeakyReLU(slope)
    if kind == "prelu":
        slope = draw(st.sampled_from(SLOPES))
        return lambda n: nn.PReLU(init=slope)
    if kind == "prelu-channels":    # one slope per channel: not one elementwise function, refused
        return _prelu_channels
    if kind in ("elu", "celu"):
        alpha = draw(st.sampled_from([-1.5, -0.5, 0.3, 1.0, 2.5]))
        if kind == "celu" and alpha > 0:
            return lambda n: nn.CELU(alpha)
        return lambda n: nn.ELU(alpha)
    if kind == "softplus":
        beta = draw(st.sampled_from([-2.0, -1.0, 0.5, 1.0, 3.0]))
        threshold = draw(st.sampled_from([1.0, 5.0, 20.0, 30.0, 40.0]))
        return lambda n: nn.Softplus(beta, threshold)
    if kind == "hardtanh":
        low = draw(st.sampled_from([-3.0, -1.0, -0.2, 0.0, 0.5]))
        high = low + draw(st.sampled_from([0.1, 0.5, 2.0, 6.0]))
        return lambda n: nn.Hardtanh(low, high)
    if kind == "clamp":
        low = draw(st.sampled_from([None, -1.0, -0.1, 0.3]))
        high = draw(st.sampled_from([None, 0.0, 0.5, 2.0])) if low is not None else draw(st.sampled_from([0.0, 1.0]))
        if low is not None and high is not None and high <= low:
            high = low + 0.5
        return lambda n: Clamp(low, high)
    if kind == "gelu":
        approximate = draw(st.sampled_from(["none", "tanh"]))
        return lambda n: nn.GELU(approximate=approximate)
    fixed = {"relu": nn.ReLU, "relu6": nn.ReLU6, "selu": nn.SELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
             "silu": nn.SiLU, "hardswish": nn.Hardswish, "abs": Abs, "identity": nn.Identity, "mish": nn.Mish,
             "softsign": nn.Softsign, "logsigmoid": nn.LogSigmoid}
    return lambda n: fixed[kind]()


def _bn(n: int, two_d: bool, rng) -> nn.Module:
    bn = (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(n, affine=bool(rng.integers(0, 4)))
    with torch.no_grad():
        bn.running_mean.copy_(torch.as_tensor(rng.uniform(-1, 1, n)))
        bn.running_var.copy_(torch.as_tensor(rng.uniform(0.05, 3.0, n)))
        if bn.affine:
            bn.weight.copy_(torch.as_tensor(rng.uniform(-2, 2, n)))
            bn.bias.copy_(torch.as_tensor(rng.uniform(-1, 1, n)))
    return bn


# -- models ---------------------------------------------------------------------------
def _out_shape(layers, shape) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(nn.Sequential(*layers).eval()(torch.zeros(1, *shape)).shape[1:])


def _fits(layers, shape) -> bool:
    try:
        return min(_out_shape(layers, shape)) > 0
    except RuntimeError:
        return False


@st.composite
def conv_head(draw, act, rng):
    """Convolutions (+ batch norm, pooling, residual blocks) and a Flatten; ``(layers, input shape)``."""
    nd = draw(st.sampled_from([1, 2]))
    c_in = draw(st.integers(1, 3))
    spatial = tuple(draw(st.integers(3, 6 if nd == 1 else 5)) for _ in range(nd))
    shape, layers = (c_in, *spatial), []
    Conv = nn.Conv1d if nd == 1 else nn.Conv2d
    channels = c_in
    for _ in range(draw(st.integers(1, 2))):
        groups = draw(st.sampled_from([1, 1, channels]))
        c_out = groups * draw(st.integers(1, 2))
        k, stride, dil = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        pad = draw(st.integers(0, k))
        mode = draw(st.sampled_from(["zeros"] * 9 + ["reflect", "replicate", "circular"]))
        current = _out_shape(layers, shape)[1:] if layers else spatial
        if min(current) + 2 * pad - dil * (k - 1) - 1 < 0 or (mode == "reflect" and pad >= min(current)):
            k, dil, pad, mode = 1, 1, 0, "zeros"
        event(f"conv{nd}d padding_mode {mode}")
        layers.append(Conv(channels, c_out, k, stride=stride, padding=pad, dilation=dil, groups=groups,
                           bias=draw(st.booleans()), padding_mode=mode))
        if not _fits(layers, shape):
            layers[-1] = Conv(channels, c_out, 1, groups=groups)
        if draw(st.integers(0, 3)) == 0:
            layers.append(_bn(c_out, nd == 2, rng) if nd == 2 else _bn(c_out, False, rng))
        layers.append(act(c_out))
        channels = c_out
        if draw(st.integers(0, 3)) == 0:  # a residual block keeping the shape
            layers.append(Residual(nn.Sequential(Conv(channels, channels, 3, padding=1), act(channels))))
        pool = draw(st.sampled_from(["none", "none", "avg", "avg", "adaptive", "max"]))
        current = _out_shape(layers, shape)[1:]
        if pool == "avg":
            pk = draw(st.integers(1, min(3, min(current))))
            ps = draw(st.sampled_from([None, 1, 2]))
            pp = draw(st.integers(0, pk // 2))
            ceil, include = draw(st.booleans()), draw(st.booleans())
            divisor = draw(st.sampled_from([None, None, 3]))
            Avg = nn.AvgPool1d if nd == 1 else nn.AvgPool2d
            extra = {} if nd == 1 else {"divisor_override": divisor}
            layers.append(Avg(pk, stride=ps, padding=pp, ceil_mode=ceil, count_include_pad=include, **extra))
            event(f"avgpool ceil_mode={ceil} count_include_pad={include}")
        elif pool == "adaptive":
            layers.append((nn.AdaptiveAvgPool1d if nd == 1 else nn.AdaptiveAvgPool2d)(
                draw(st.integers(1, min(current)))))
        elif pool == "max":
            layers.append((nn.MaxPool1d if nd == 1 else nn.MaxPool2d)(2, stride=1))
        if not _fits(layers, shape):    # a window larger than what is left: no pooling here
            layers.pop()
    layers.append(nn.Flatten())
    return layers, shape


@st.composite
def models(draw):
    """``(model, input shape, activation factory name)``: a float32 model in eval mode."""
    seed = draw(st.integers(0, 2 ** 31 - 1))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    width_hint = draw(st.integers(2, 6))
    act = draw(activations())
    if draw(st.integers(0, 2)) == 0:
        layers, shape = draw(conv_head(act, rng))
        event("model cnn")
    else:
        layers, shape = [], (draw(st.integers(1, 6)),)
        event("model mlp")
    width = int(np.prod(_out_shape(layers, shape))) if layers else shape[0]
    for _ in range(draw(st.integers(1 if layers else 1, 3))):
        out = width_hint if draw(st.booleans()) else draw(st.integers(1, 6))
        layers.append(nn.Linear(width, out, bias=draw(st.booleans())))
        if draw(st.integers(0, 4)) == 0:
            layers.append(_bn(out, False, rng))
        layers.append(act(out))
        if draw(st.integers(0, 4)) == 0:
            layers.append(Residual(nn.Sequential(nn.Linear(out, out), act(out))))
        width = out
    layers.append(nn.Linear(width, draw(st.integers(1, 4))))
    model = nn.Sequential(*layers).eval()
    scale = 10.0 ** draw(st.sampled_from([-1.0, 0.0, 0.0, 0.5, 1.0]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                m.weight.mul_(scale)
    return model, shape


# -- one audit step ---------------------------------------------------------------------
FORMATS = ("pickle", "trace", "script", "export", "onnx", "state_dict")


def _plain_mlp(model) -> tuple[str, dict] | None:
    """``(activation, params)`` when ``model`` is Linear / one stock activation alternating (a state_dict's
    reading), else None."""
    from lipsdp.activations import catalogue, torch_modules

    mods = list(model)
    linear, acts = mods[0::2], mods[1::2]
    if not all(type(m) is nn.Linear for m in linear) or len(linear) != len(acts) + 1 or not acts:
        return None
    record = torch_modules().get(type(acts[0]).__name__)
    if record is None or any(type(a) is not type(acts[0]) for a in acts):
        return None
    if any(True for a in acts for _ in a.parameters()):  # PReLU's slope is in the state_dict: not a plain MLP
        return None
    entry = next(e for e in catalogue().values() if record in e.torch_modules)
    try:
        return entry.name, entry.module_params(acts[0])
    except ValueError:
        return None


def _onnx_reference(path: str, x: np.ndarray) -> np.ndarray:
    """What an ONNX file computes, by onnx's reference evaluator (float32, as the file stores it)."""
    from onnx.reference import ReferenceEvaluator

    session = ReferenceEvaluator(path)
    return np.asarray(session.run(None, {session.input_names[0]: x.astype(np.float32)})[0], dtype=np.float64)


def save(model, shape, fmt: str, folder) -> str:
    """Write ``model`` in ``fmt``; torch's own errors propagate."""
    example = torch.randn((2,) + tuple(shape), generator=torch.Generator().manual_seed(0))
    path = os.path.join(folder, f"m_{fmt}" + {"onnx": ".onnx", "export": ".pt2"}.get(fmt, ".pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "pickle":
            torch.save(model, path)
        elif fmt == "state_dict":
            torch.save(model.state_dict(), path)
        elif fmt == "trace":
            torch.jit.save(torch.jit.trace(model, (example,)), path)
        elif fmt == "script":
            torch.jit.save(torch.jit.script(model), path)
        elif fmt == "export":
            torch.export.save(torch.export.export(model, (example,)), path)
        else:
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
    return path


def sampled_lower(model, shape, rng, points: int = 48) -> float:
    """Largest ``||J(x)||_2`` of the float64 torch model over random ``x`` at three scales, and largest
    difference quotient over close pairs (a jump shows there, not in a Jacobian)."""
    m = _double(model)
    n = int(np.prod(shape))
    x = np.concatenate([s * rng.standard_normal((points // 3, n)) for s in (0.3, 1.0, 5.0)])
    xt = torch.as_tensor(x).reshape(-1, *shape).requires_grad_(True)
    out = m(xt).reshape(len(x), -1)
    # Samples are independent (eval mode), so row k of every Jacobian is the gradient of sum_i f_k(x_i).
    rows = [torch.autograd.grad(out[:, k].sum(), xt, retain_graph=True)[0].reshape(len(x), n)
            for k in range(out.shape[1])]
    J = torch.stack(rows, 1).numpy()
    lower = float(np.linalg.norm(J, 2, axis=(1, 2)).max())
    xt = xt.detach()
    d = 1e-4 * rng.standard_normal(x.shape)
    with torch.no_grad():
        fx = m(xt).reshape(len(x), -1).numpy()
        fy = m(torch.as_tensor(x + d).reshape(-1, *shape)).reshape(len(x), -1).numpy()
    # Less the rounding of f(x) - f(y) (a few ulps of |f|), which divided by |x - y| would pass for slope.
    rounding = 16 * np.finfo(np.float64).eps * (np.linalg.norm(fx, axis=1) + np.linalg.norm(fy, axis=1))
    quotients = (np.linalg.norm(fx - fy, axis=1) - rounding) / np.linalg.norm(d, axis=1)
    return max(lower, float(quotients.max()))


def _double(model):
    import copy

    return copy.deepcopy(model).double().requires_grad_(False)


def _reason(exc: UnsupportedLayerError) -> str:
    """The first refused layer's kind, without its numbers (a tally key)."""
    kind = str(exc.layers[0][2]) if exc.layers else str(exc)
    return re.sub(r"[-+]?\d[\d.e+-]*", "#", kind)[:70]


def audit_one(model, shape, fmt: str, folder, stats: Counter, ratios: list) -> str:
    """Save, load, certify one model; return the outcome and assert soundness."""
    plain = _plain_mlp(model) if fmt == "state_dict" else None
    if fmt == "state_dict" and plain is None:
        fmt = "pickle"
    try:
        path = save(model, shape, fmt, folder)
    except Exception:     # torch cannot write this model in this format: the pickle can
        fmt = "pickle"
        path = save(model, shape, fmt, folder)
    stats[f"format {fmt}"] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if plain is not None:
                net = load_network(path, activation=plain[0], activation_params=plain[1])
            else:
                net = load_network(path, input_shape=shape, trust_pickle=fmt == "pickle")
    except UnsupportedLayerError as exc:
        assert str(exc).count("\n") == 0 and str(exc).startswith("unsupported layer"), str(exc)
        stats["refused: " + _reason(exc)] += 1
        return "refused"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, int(np.prod(shape))))
    with torch.no_grad():
        want = _double(model)(torch.as_tensor(x).reshape(-1, *shape)).reshape(len(x), -1).numpy()
    got = net.numpy_forward(x)
    scale = max(1.0, float(np.abs(want).max()))
    if fmt == "onnx" and not np.abs(got - want).max() <= 1e-4 * scale:
        # torch's ONNX exporter drops some attributes (AvgPool's divisor_override): the file is then not
        # torch's function, and lipsdp certifies the file. Its meaning is the ONNX reference evaluator's.
        file_says = _onnx_reference(path, x.reshape(-1, *shape)).reshape(len(x), -1)
        assert np.abs(got - file_says).max() <= 1e-4 * scale, "onnx: the loaded graph differs from the file"
        assert not np.abs(file_says - want).max() <= 1e-4 * scale, "onnx: the loaded graph differs from torch"
        return "onnx: the exported file is not torch's function (read as the file says)"
    assert np.abs(got - want).max() <= 1e-4 * scale, f"{fmt}: the loaded graph differs from torch"
    start = time.perf_counter()
    # A time limit: on some ill-conditioned nets ``auto``'s fallback (SCS, 200,000 iterations) runs for minutes.
    try:
        cert = lipsdp.certify(net, lower_bound_samples=0, time_limit=TIME_LIMIT)
    except LimitReached:  # a solve that overran its share on a busy machine: no bound claimed, nothing to check
        return "time limit reached"
    if time.perf_counter() - start > 0.5 * TIME_LIMIT:
        stats["slow certify (over half the time limit)"] += 1
        slow = stats.setdefault("slow models", [])
        if len(slow) < 5:
            slow.append(" ".join(f"{fmt}: {model}".split())[:600])
    if not cert.verified:
        assert cert.bound is None
        return "unverified"
    lower = sampled_lower(model, shape, rng)
    assert lower <= cert.bound * (1 + 1e-6) + 1e-9, f"UNSOUND ({fmt}): sampled {lower} > certified {cert.bound}"
    trivial = cert.trivial_bound
    assert cert.bound <= trivial * (1 + 1e-3) + 1e-5 * (1 + trivial), f"bound {cert.bound} above trivial {trivial}"
    if lower > 1e-9:
        ratios.append(cert.bound / lower)
        if cert.bound < lower and os.environ.get("LIPSDP_AUDIT_KEEP"):   # within tolerance, kept to look at
            torch.save(model, os.path.join(os.environ["LIPSDP_AUDIT_KEEP"], f"below-{len(ratios)}-{fmt}.pt"))
        if cert.bound / lower <= min(ratios):
            stats["tightest"] = {"ratio": cert.bound / lower, "format": fmt, "bound": cert.bound, "lower": lower,
                                 "solver": cert.solver, "method": cert.verification.get("method"),
                                 "model": " ".join(str(model).split())[:600]}
    return "certified"


@pytest.fixture(scope="module")
def tally():
    stats, ratios, start = Counter(), [], time.perf_counter()
    yield stats, ratios
    summary = {"models": sum(v for k, v in stats.items() if k in ("refused", "certified", "unverified")),
               **{k: v for k, v in sorted(stats.items(), key=lambda kv: kv[0])},
               "min_ratio_bound_over_lower": min(ratios, default=math.nan),
               "median_ratio_bound_over_lower": float(np.median(ratios)) if ratios else math.nan,
               "seconds": round(time.perf_counter() - start, 1)}
    print("\naudit:", json.dumps(summary))
    if os.environ.get("LIPSDP_AUDIT_REPORT"):
        with open(os.environ["LIPSDP_AUDIT_REPORT"], "w") as fh:
            json.dump(summary, fh, indent=1)


def _run(case, fmt, tally):
    model, shape = case
    stats, ratios = tally
    with tempfile.TemporaryDirectory() as folder:
        outcome = audit_one(model, shape, fmt, folder, stats, ratios)
    stats[outcome] += 1
    event(outcome)


@settings(max_examples=EXAMPLES, **AUDIT)
@given(models(), st.sampled_from(FORMATS))
def test_audit_sandwich_through_files(tally, case, fmt):
    _run(case, fmt, tally)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **AUDIT)
@given(models(), st.sampled_from(FORMATS))
def test_audit_sandwich_through_files_2000(tally, case, fmt):
    _run(case, fmt, tally)
