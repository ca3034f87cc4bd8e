"""Conformance checks, like scikit-learn's ``check_estimator``.

- :func:`check_constraint`: a third-party quadratic constraint holds on sampled pairs of its activation;
- :func:`check_translation`: a torch model saved in every format lipsdp reads loads as a graph that computes
  what torch computes, on random inputs and on inputs placed at every activation's breakpoints.

>>> from lipsdp.constraints import get_constraint
>>> from lipsdp.network import Activation
>>> check_constraint(get_constraint("relu"), Activation("a", "ReLU", (4,), function="relu"))
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from lipsdp import io
from lipsdp.activations import catalogue
from lipsdp.errors import UnsupportedLayerError


def _unit_rows(n: int, offset: int, total: int) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(n), (np.arange(n), offset + np.arange(n))), shape=(n, total))


def constraint_values(qc, op, v1: np.ndarray, v2: np.ndarray, formulation: str = "neuron") -> np.ndarray:
    """``z^T F_j z`` for every multiplier ``j``, with ``z = [v1 - v2; phi(v1) - phi(v2)]``.

    ``v1, v2`` have shape ``(batch, op.size)``; the result ``(batch, n_mult)``.
    """
    n = op.size
    terms = qc.terms(op, _unit_rows(n, 0, 2 * n), _unit_rows(n, n, 2 * n), formulation)
    dz = np.hstack([v1 - v2, qc.evaluate(v1, op) - qc.evaluate(v2, op)])
    return np.stack([np.bincount(terms.mult, weights=terms.vals * d[terms.rows] * d[terms.cols],
                                 minlength=terms.n_mult) for d in dz])


def check_constraint(qc, op, samples: int = 2000, seed: int = 0, scale: float = 3.0, rtol: float = 1e-9,
                     formulation: str = "neuron") -> None:
    """Raise ``AssertionError`` unless ``qc`` holds on sampled true (input, output) pairs of ``op``.

    Checks, for random pairs ``v1, v2`` (Gaussian, near-equal, equal-in-some-coordinates):

    - each sign-constrained multiplier's form ``z^T F_j z >= 0``;
    - each free multiplier's form ``z^T F_j z == 0`` (both signs are allowed, so it must vanish);
    - every ``F_j`` is symmetric and the terms have consistent shapes.
    """
    rng = np.random.default_rng(seed)
    n = op.size
    terms = qc.terms(op, _unit_rows(n, 0, 2 * n), _unit_rows(n, n, 2 * n), formulation)
    for name in ("rows", "cols", "vals", "mult"):
        arr = getattr(terms, name)
        if arr.shape != terms.rows.shape:
            raise AssertionError(f"{qc!r}: terms.{name} has shape {arr.shape}, expected {terms.rows.shape}")
    if terms.mult.size and (terms.mult.min() < 0 or terms.mult.max() >= terms.n_mult):
        raise AssertionError(f"{qc!r}: multiplier index out of range")
    if len(terms.nonneg) != terms.n_mult:
        raise AssertionError(f"{qc!r}: nonneg has {len(terms.nonneg)} entries for {terms.n_mult} multipliers")
    F = sp.csr_matrix((terms.vals, (terms.rows, terms.mult * 2 * n + terms.cols)),
                      shape=(2 * n, 2 * n * terms.n_mult)).toarray().reshape(2 * n, terms.n_mult, 2 * n)
    if not np.allclose(F, F.transpose(2, 1, 0), atol=1e-12):
        raise AssertionError(f"{qc!r}: a multiplier matrix F_j is not symmetric")
    v1 = scale * rng.standard_normal((samples, n))
    v2 = np.concatenate([
        scale * rng.standard_normal((samples // 2, n)),
        v1[samples // 2:] + 1e-3 * rng.standard_normal((samples - samples // 2, n)),
    ])
    # Ties and shared coordinates are where sorting-type activations are most fragile.
    mask = rng.random((samples, n)) < 0.2
    v2 = np.where(mask, v1, v2)
    vals = constraint_values(qc, op, v1, v2, formulation)
    size = (np.abs(v1 - v2).sum(axis=1, keepdims=True) ** 2 + 1.0)
    tol = rtol * size * (1 + np.abs(terms.vals).max(initial=0))
    bad_nonneg = (vals < -tol) & terms.nonneg[None, :]
    bad_free = (np.abs(vals) > tol) & ~terms.nonneg[None, :]
    if bad_nonneg.any():
        i, j = np.argwhere(bad_nonneg)[0]
        raise AssertionError(f"{qc!r} violated for {op.function}: multiplier {terms.labels[j]} gives "
                             f"{vals[i, j]:.3e} < 0 at v1={v1[i][:4]}, v2={v2[i][:4]}")
    if bad_free.any():
        i, j = np.argwhere(bad_free)[0]
        raise AssertionError(f"{qc!r} violated for {op.function}: free multiplier {terms.labels[j]} gives "
                             f"{vals[i, j]:.3e} != 0")


#: The formats :func:`check_translation` writes, in the order it tries them.
TRANSLATION_FORMATS = ("pickle", "trace", "script", "export", "onnx")
#: Packages whose modules a whole-module pickle may name without ``trust_pickle`` (the safe-pickle allow-list).
_SAFE_PACKAGES = ("torch", "lipsdp", "deel")


@dataclass
class TranslationReport:
    """What :func:`check_translation` found.

    Attributes
    ----------
    errors : dict
        Format -> worst error of the loaded graph against torch, relative to the output scale.
    oracle_errors : dict
        Format -> worst error against a second oracle (onnx's reference evaluator for ONNX).
    refused : dict
        Format -> the one-line ``UnsupportedLayerError`` of a format that refused the model.
    unsaved : dict
        Format -> why torch could not write the model in it (``torch.jit.script`` of a traced-only model...).
    unfaithful : dict
        Format -> the error of the file torch wrote against torch itself, where the second oracle shows that
        the file computes something else (torch's ONNX exporter drops Softplus's ``threshold``); the graph
        is then checked against that oracle only.
    probes : int
        Number of inputs placed at activation breakpoints.
    """

    errors: dict = field(default_factory=dict)
    oracle_errors: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    unsaved: dict = field(default_factory=dict)
    unfaithful: dict = field(default_factory=dict)
    probes: int = 0

    @property
    def checked(self) -> tuple[str, ...]:
        """The formats whose loaded graph was compared with torch."""
        return tuple(self.errors)


def _needs_trust(model) -> bool:
    return any(type(m).__module__.split(".")[0] not in _SAFE_PACKAGES for m in model.modules())


def _save(model, example, fmt: str, folder: str) -> str:
    """Write ``model`` in format ``fmt`` under ``folder``; torch's own errors propagate."""
    import torch

    path = os.path.join(folder, f"model_{fmt}" + {"onnx": ".onnx", "export": ".pt2"}.get(fmt, ".pt"))
    if fmt == "pickle":
        torch.save(model, path)
    elif fmt == "trace":
        torch.jit.save(torch.jit.trace(model, example), path)
    elif fmt == "script":
        torch.jit.save(torch.jit.script(model), path)
    elif fmt == "export":
        torch.export.save(torch.export.export(model, (example,)), path)
    elif fmt == "onnx":
        # The legacy exporter (as tests/test_io.py): dynamic batch, so both oracles take any number of rows.
        torch.onnx.export(model, (example,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(TRANSLATION_FORMATS)}")
    return path


def _jacobian(net, node: int, x0: np.ndarray, step: float = 1e-4) -> np.ndarray:
    """Central-difference Jacobian of node ``node``'s value at the flat input ``x0``, ``(size, input_dim)``."""
    d = x0.size
    xs = np.vstack([x0 + step * np.eye(d), x0 - step * np.eye(d)])
    v = net.node_values(xs)[node]
    return (v[:d] - v[d:]).T / (2 * step)


def breakpoint_probes(net, base: np.ndarray, neurons: int = 3, seed: int = 0,
                      offsets=(0.0, 1e-9, -1e-9, 1e-6, -1e-6, 1e-3, -1e-3)) -> tuple[np.ndarray, list[str]]:
    """Inputs that put chosen neurons' pre-activations at, and just around, their activation's breakpoints.

    For each catalogue activation of ``net`` and each of its breakpoints ``b``, up to ``neurons`` neurons are
    moved from the flat input ``base`` along the least-squares direction of their pre-activation (a few Newton
    steps with a finite-difference Jacobian), so that the pre-activation is ``b + offset``.

    Returns
    -------
    xs : ndarray, shape (n, input_dim)
    tags : list of str
        For each row, the node, neuron and target it was placed at.
    """
    rng = np.random.default_rng(seed)
    entries = catalogue()
    rows, tags = [], []
    for node in net.activations():
        op = net.op(node)
        if op.function not in entries or not net.parents(node):
            continue    # GroupSort / Householder: no scalar breakpoints; random inputs cover them
        parent = net.parents(node)[0]
        entry, params = entries[op.function], {**entries[op.function].defaults, **op.params}
        points = entry.breakpoints(params)
        if not points:
            continue
        # At a jump (torch's Softplus threshold) an input within rounding of it may fall on either side in
        # either evaluation: such ties are no mismatch, so only offsets far above rounding are probed.
        near = [off for off in offsets if not entry.discontinuity(params) or abs(off) >= 1e-6]
        jac = _jacobian(net, parent, base)
        for i in rng.permutation(jac.shape[0])[:neurons]:
            g = jac[i]
            if not np.any(g):
                continue    # a neuron the input does not move (a dead channel): nothing to place
            for b in points:
                for off in near:
                    x = base.copy()
                    for _ in range(4):     # pre-activations are piecewise smooth: a few Newton steps
                        z = net.node_values(x[None])[parent][0, i]
                        x = x + (b + off - z) * g / (g @ g)
                    rows.append(x)
                    tags.append(f"node {node} ({op.kind} {op.function}) neuron {i} at breakpoint {b:g}{off:+g}")
    if not rows:
        return np.zeros((0, base.size)), []
    return np.array(rows), tags


def _inputs(example: np.ndarray, samples: int, rng) -> tuple[np.ndarray, list[str]]:
    base = example.reshape(example.shape[0], -1)
    rows, tags = [base], [f"example row {k}" for k in range(base.shape[0])]
    for scale in (1e-3, 0.1, 1.0, 10.0):
        centre = base[rng.integers(base.shape[0], size=samples)]
        rows.append(centre + scale * rng.standard_normal(centre.shape))
        tags += [f"random, scale {scale:g}"] * samples
    return np.vstack(rows), tags


def _torch_forward(model, model64, xs: np.ndarray, shape) -> tuple[np.ndarray, bool]:
    """Torch's outputs in float64, or in float32 (second value False) for a model that fixes its own dtype."""
    import torch

    with torch.no_grad():
        try:
            out, exact = model64(torch.from_numpy(xs.reshape(-1, *shape))), True
        except RuntimeError:    # a cast to float32 inside forward (``x.long().float()``) mixes dtypes
            out, exact = model(torch.from_numpy(xs.reshape(-1, *shape)).float()), False
    return out.detach().reshape(xs.shape[0], -1).double().numpy(), exact


def _onnx_oracle(path: str, xs: np.ndarray, shape) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    out = ReferenceEvaluator(path).run(None, {"x": xs.reshape(-1, *shape).astype(np.float32)})[0]
    return np.asarray(out, dtype=np.float64).reshape(xs.shape[0], -1)


def _worst(fmt: str, oracle: str, got: np.ndarray, want: np.ndarray, xs, tags, rtol: float) -> float:
    if got.shape != want.shape:
        raise AssertionError(f"{fmt}: the loaded graph gives outputs of shape {got.shape[1:]}, {oracle} "
                             f"{want.shape[1:]}")
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = np.abs(got - want).max(axis=1) / scale
    k = int(np.nanargmax(np.where(np.isnan(err), np.inf, err))) if err.size else 0
    if err.size and not err[k] <= rtol:
        raise AssertionError(f"{fmt}: the loaded graph differs from {oracle} by {err[k]:.3e} (relative to the "
                             f"output scale {scale:.3g}; rtol {rtol:g}) at the input {tags[k]}: "
                             f"x[:6]={np.array2string(xs[k][:6], precision=17)}, graph {got[k][:4]}, "
                             f"{oracle} {want[k][:4]}")
    return float(err.max(initial=0.0))


def check_translation(model, example_input, *, formats=TRANSLATION_FORMATS, samples: int = 32, rtol: float = 1e-7,
                      oracle_rtol: float = 1e-4, neurons: int = 3, seed: int = 0, allow_refusal: bool = False,
                      folder=None) -> TranslationReport:
    """Raise ``AssertionError`` unless every format lipsdp reads loads ``model`` as a graph computing what torch does.

    The model is saved in each of ``formats`` (whole-module pickle, ``torch.jit.trace``, ``torch.jit.script``,
    ``torch.export``, ONNX) that torch can write for it, loaded with :func:`lipsdp.io.load_network`, and the
    graph's ``numpy_forward`` (float64) is compared with a float64 copy of the model on: the rows of
    ``example_input``; random inputs around them at scales 1e-3 to 10; and inputs that put pre-activations at
    and just around every catalogue activation's breakpoints (:func:`breakpoint_probes`).  ONNX files are
    also run through ``onnx.reference.ReferenceEvaluator`` (float32, so to ``oracle_rtol``) when onnx is
    installed.

    Parameters
    ----------
    model : torch.nn.Module
        In eval mode; its classes must be importable (module level) for the pickle format.  A model in
        training mode whose output depends on the mode (dropout, batch norm, a ``forward`` reading
        ``self.training``) is refused by every format, the whole-module pickle included: with
        ``allow_refusal=True`` the report lists the refusals.
    example_input : torch.Tensor
        A batch ``(batch, *input_shape)``; the per-sample shape is what the loaders are told.
    formats : iterable of str
        A subset of :data:`TRANSLATION_FORMATS`.
    samples : int
        Random inputs per scale.
    rtol : float
        Largest error allowed, relative to ``max(1, max |torch output|)``.
    allow_refusal : bool
        Accept a model that every format refuses (``UnsupportedLayerError``); otherwise that is an error.

    Returns
    -------
    TranslationReport

    Raises
    ------
    AssertionError
        Naming the format, the oracle, the input (the node and breakpoint for a probe) and the error.
    """
    import torch

    rng = np.random.default_rng(seed)
    shape = tuple(example_input.shape[1:])
    model64 = copy.deepcopy(model).double()   # its own mode: a training-mode model must not pass as eval
    example = example_input.detach().to(torch.float64).numpy()
    report = TranslationReport()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for fmt in formats:
            try:
                path = _save(model, example_input, fmt, tmp)
            except ValueError:
                raise
            except Exception as exc:    # torch cannot write this model in this format: nothing to check
                report.unsaved[fmt] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
                continue
            try:
                net = io.load_network(path, input_shape=shape, trust_pickle=fmt == "pickle" and _needs_trust(model))
            except UnsupportedLayerError as exc:
                report.refused[fmt] = str(exc)
                continue
            except Exception as exc:
                raise AssertionError(f"{fmt}: lipsdp could not load the file torch wrote: {exc}") from exc
            xs, tags = _inputs(example, samples, rng)
            probes, probe_tags = breakpoint_probes(net, xs[0], neurons=neurons, seed=seed)
            report.probes += len(probes)
            xs, tags = np.vstack([xs, probes]), tags + probe_tags
            want, exact = _torch_forward(model, model64, xs, shape)
            got = net.numpy_forward(xs)
            if fmt == "onnx" and _has_onnx():
                oracle = _onnx_oracle(path, xs, shape)
                report.oracle_errors[fmt] = _worst(fmt, "onnx's reference evaluator", got, oracle, xs, tags,
                                                   oracle_rtol)
                # The file itself differs from torch as much as the graph does: the exporter changed the
                # function (the graph matches the file, checked just above), lipsdp can only read the file.
                drift, error = _drift(oracle, want), _drift(got, want)
                if error > rtol and drift >= 0.5 * error:
                    report.unfaithful[fmt] = drift
                    continue
            report.errors[fmt] = _worst(fmt, "torch" if exact else "torch (float32)", got, want, xs, tags,
                                        rtol if exact else max(rtol, oracle_rtol))
    if not report.errors and not report.unfaithful and not allow_refusal:
        raise AssertionError(f"no format accepts the model: refused {report.refused}, unsaved {report.unsaved}")
    return report


def _drift(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max(initial=0.0) / max(1.0, float(np.abs(b).max(initial=0.0))))


def _has_onnx() -> bool:
    try:
        import onnx.reference  # noqa: F401
    except ImportError:
        return False
    return True
