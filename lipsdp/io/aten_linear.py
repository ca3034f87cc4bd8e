"""ATen handlers for the linear layers: matrix products, convolutions, pooling, reductions,
eval-mode batch normalisation, sums and constant scalings (each folded into an affine map)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lipsdp.io import fold_error, linmaps
from lipsdp.io.builder import Sym, Unsupported
from lipsdp.io.translator import is_sym, register_aten, require_floating, to_numpy


# -- linear layers -------------------------------------------------------------
def apply_last(t, x: Sym, W: np.ndarray, bias=None) -> Sym:
    """``x @ W.T + bias`` on the last axis of ``x``."""
    if not x.shape:
        raise Unsupported("applies a matrix to a tensor without feature axes")
    if W.shape[1] != x.shape[-1]:
        raise Unsupported(f"multiplies shape {x.shape} by a {W.shape[1]}-column matrix")
    M, shape = linmaps.along_axis(x.shape, len(x.shape) - 1, W)
    b = None if bias is None else np.tile(to_numpy(bias).ravel(), linmaps.size(x.shape[:-1]))
    return t.b.linear(x, M, b, shape, t.label)


@register_aten("linear")
def _linear(t, x, weight, bias=None):
    if not is_sym(x) or is_sym(weight) or is_sym(bias):
        raise Unsupported("has input-dependent weights")
    return apply_last(t, x, to_numpy(weight), bias)


@register_aten("matmul", "mm")
def matmul(t, a, b):
    if is_sym(a) and not is_sym(b):
        c = to_numpy(b)
        if c.ndim == 1:
            y = apply_last(t, a, c.reshape(1, -1))
            return t.b.linear(y, shape=y.shape[:-1])
        if c.ndim == 2:
            return apply_last(t, a, c.T)
        raise Unsupported(f"multiplies by a {c.ndim}-D constant")
    if is_sym(b) and not is_sym(a):
        c = to_numpy(a)
        if c.ndim == 2 and len(b.shape) >= 2:
            M, shape = linmaps.along_axis(b.shape, len(b.shape) - 2, c)
            return t.b.linear(b, M, None, shape, t.label)
        raise Unsupported("multiplies a constant by the batch axis")
    raise Unsupported("multiplies two tensors that both depend on the input")


@register_aten("addmm")
def _addmm(t, bias, a, b, beta=1, alpha=1):
    if not is_sym(a) or is_sym(b) or is_sym(bias):
        raise Unsupported("has input-dependent weights")
    y = t.b.scale(apply_last(t, a, to_numpy(b).T), alpha, t.label)
    return t.b.linear(y, bias=float(beta) * t.broadcast_const(bias, y), label=t.label)


def expand_tuple(v, n: int) -> list[int]:
    v = [int(v)] if isinstance(v, (int, float)) else [int(u) for u in v]
    return v * n if len(v) == 1 else v


def conv(t, x, weight, bias, stride, pad_begin, pad_end, dilation, groups) -> Sym:
    """A zero-padded convolution of ``x`` (``(C, *spatial)``), unrolled exactly into a sparse matrix."""
    if not is_sym(x) or is_sym(weight) or is_sym(bias):
        raise Unsupported("has input-dependent weights")
    w = to_numpy(weight)
    if len(x.shape) != w.ndim - 1:
        raise Unsupported(f"expects {w.ndim - 1}-D samples, got shape {x.shape}")
    try:
        M, shape = linmaps.conv_matrix(x.shape, w, stride, pad_begin, pad_end, dilation, int(groups))
    except ValueError as exc:
        raise Unsupported(str(exc)) from None
    b = None if bias is None else np.repeat(to_numpy(bias), linmaps.size(shape[1:]))
    return t.b.linear(x, M, b, shape, t.label)


def _conv(t, x, weight, bias, stride, padding, dilation, groups, transposed=False):
    if transposed:
        raise Unsupported("(transposed convolution)")
    nd = len(weight.shape) - 2
    stride, dilation = expand_tuple(stride, nd), expand_tuple(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            begin = end = [0] * nd
        else:  # "same", as torch: the extra padding goes to the end
            total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
            begin = [p // 2 for p in total]
            end = [p - q for p, q in zip(total, begin)]
    else:
        begin = end = expand_tuple(padding, nd)
    return conv(t, x, weight, bias, stride, begin, end, dilation, groups)


@register_aten("conv1d", "conv2d", "conv3d")
def _convnd(t, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(t, x, weight, bias, stride, padding, dilation, groups)


@register_aten("convolution", "_convolution")
def _convolution(t, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *rest):
    return _conv(t, x, weight, bias, stride, padding, dilation, groups, transposed)


def avg_pool(t, x, kernel, stride, pad_begin, pad_end, count_include_pad=True, divisor=None, dilation=None) -> Sym:
    """Average pooling of ``x`` (``(C, *spatial)``), unrolled exactly into a sparse matrix."""
    M, shape = linmaps.avg_pool_matrix(x.shape, kernel, stride, pad_begin, pad_end, bool(count_include_pad),
                                       None if divisor is None else int(divisor), dilation)
    return t.b.linear(x, M, None, shape, t.label)


def _avg_pool(t, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override=None):
    nd = len(x.shape) - 1
    kernel = expand_tuple(kernel_size, nd)
    stride = expand_tuple(stride, nd) if stride else kernel
    pad = expand_tuple(padding, nd)
    if ceil_mode:
        floor = linmaps.conv_output_shape(x.shape[1:], kernel, stride, pad, pad, [1] * nd)
        ceil = tuple(-(-(n + 2 * p - k) // s) + 1 for n, k, s, p in zip(x.shape[1:], kernel, stride, pad))
        if floor != ceil:
            raise Unsupported("with ceil_mode=True and a partial last window")
    return avg_pool(t, x, kernel, stride, pad, pad, count_include_pad, divisor_override)


@register_aten("avg_pool1d", "avg_pool2d", "avg_pool3d")
def _avg_pool_op(t, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
    return _avg_pool(t, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@register_aten("adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "adaptive_avg_pool3d")
def _adaptive_avg_pool(t, x, output_size):
    spatial = x.shape[1:]
    out = [n if o is None else int(o) for o, n in zip(expand_tuple(output_size, len(spatial))
                                                       if output_size is not None else spatial, spatial)]
    if any(n % o for n, o in zip(spatial, out)):
        raise Unsupported(f"pools {spatial} to {tuple(out)}, which does not divide evenly")
    kernel = [n // o for n, o in zip(spatial, out)]
    return _avg_pool(t, x, kernel, kernel, 0, False, True)


def reduce(t, x, dims, keepdim, mean: bool):
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise Unsupported("reduces over the batch axis")
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    axes = sorted({t.axis(x, d) for d in dims})
    y = x
    shape = list(x.shape)
    for a in axes:
        n = shape[a]
        row = np.full((1, n), 1.0 / n if mean else 1.0)
        M, new = linmaps.along_axis(tuple(shape), a, row)
        y = t.b.linear(y, M, None, new, t.label)
        shape = list(new)
    if not keepdim:
        shape = [n for a, n in enumerate(shape) if a not in axes]
    return t.b.linear(y, shape=tuple(shape))


@register_aten("mean")
def _mean(t, x, dim=None, keepdim=False, dtype=None):
    require_floating(dtype)
    return reduce(t, x, dim, keepdim, mean=True)


@register_aten("sum")
def _sum(t, x, dim=None, keepdim=False, dtype=None):
    require_floating(dtype)  # an integer dtype truncates the summands first
    return reduce(t, x, dim, keepdim, mean=False)


def batch_norm(t, x, weight, bias, mean, var, eps) -> Sym:
    """Eval-mode batch normalisation over axis 1 (channels), folded into a diagonal affine map."""
    if any(is_sym(v) for v in (weight, bias, mean, var)):
        raise Unsupported("has input-dependent statistics")
    if mean is None or var is None:
        raise Unsupported("uses batch statistics (no running mean/var)")
    if not x.shape:
        raise Unsupported("on a tensor without channel axis")
    scale = 1.0 / np.sqrt(to_numpy(var) + float(eps))
    if weight is not None:
        scale = scale * to_numpy(weight)
    shift = -to_numpy(mean) * scale
    if bias is not None:
        shift = shift + to_numpy(bias)
    return t.b.linear(x, sp.diags(linmaps.channel_scale(x.shape, scale), format="csr"),
                      linmaps.channel_scale(x.shape, shift), label=t.label,
                      err=sp.diags(linmaps.channel_scale(x.shape, fold_error.batch_norm_scale_error(scale)), format="csr"))


@register_aten("batch_norm")
def _batch_norm_op(t, x, weight, bias, running_mean, running_var, training, momentum, eps, cudnn=False):
    if training:
        raise Unsupported("in training mode (batch statistics)")
    return batch_norm(t, x, weight, bias, running_mean, running_var, eps)


@register_aten("_native_batch_norm_legit_no_training")
def _bn_no_training(t, x, weight, bias, running_mean, running_var, momentum, eps):
    return batch_norm(t, x, weight, bias, running_mean, running_var, eps), None, None


@register_aten("native_batch_norm", "_native_batch_norm_legit")
def _native_bn(t, x, weight, bias, running_mean, running_var, training, momentum, eps):
    if training:
        raise Unsupported("in training mode (batch statistics)")
    return batch_norm(t, x, weight, bias, running_mean, running_var, eps), None, None


# -- sums and products --------------------------------------------------------
def widen(t, x: Sym, value) -> Sym:
    """``x`` copied along the axes where the constant ``value`` is longer (``x[:, None, :] - w``: one copy of
    ``x`` per row of ``w``), so that ``x + value`` broadcasts ``value`` only; ``x`` itself where it needs none."""
    full = t.full_shape(x)
    try:
        shape = np.broadcast_shapes(np.shape(to_numpy(value)), full)
    except ValueError:
        return x  # broadcast_const refuses it with the shapes
    if shape == full or len(shape) != len(full) or shape[0] != full[0]:
        return x
    return t.b.select(x, np.broadcast_to(linmaps.grid(x.shape), shape[1:]), t.label)


def sum_terms(t, a, b, alpha=1.0):
    """``a + alpha * b`` with either side constant (the input-dependent side copied where the constant is wider)."""
    alpha = float(alpha)
    if is_sym(a) and is_sym(b):
        return t.b.add([a, t.b.scale(b, alpha, t.label)], t.label)
    if is_sym(a):
        a = widen(t, a, b)
        return t.b.linear(a, bias=alpha * t.broadcast_const(b, a), label=t.label)
    b = widen(t, b, a)
    return t.b.linear(t.b.scale(b, alpha, t.label), bias=t.broadcast_const(a, b), label=t.label)


@register_aten("add")
def _add(t, a, b, alpha=1):
    return sum_terms(t, a, b, alpha)


@register_aten("sub")
def _sub(t, a, b, alpha=1):
    return sum_terms(t, a, b, -float(alpha))


@register_aten("rsub")
def _rsub(t, a, b, alpha=1):
    return sum_terms(t, b, a, -float(alpha))


@register_aten("neg")
def _neg(t, x):
    return t.b.scale(x, -1.0, t.label)


def scale_by(t, x: Sym, c, rel_err: float = 0.0) -> Sym:
    """``x * c`` for a constant ``c`` broadcast against ``x``; ``rel_err``: ``c`` is a rounded reciprocal."""
    arr = to_numpy(c)
    if arr.size == 1 and arr.ndim <= len(x.shape) + 1:
        return t.b.scale(x, float(arr.ravel()[0]), t.label, rel_err=rel_err)
    diag = t.broadcast_const(arr, x)
    return t.b.linear(x, sp.diags(diag, format="csr"), label=t.label,
                      err=sp.diags(rel_err * np.abs(diag), format="csr") if rel_err else None)


def product(t, a, b):
    """``a * b``: a constant scaling, or ``x * sigmoid(x)`` (SiLU)."""
    if is_sym(a) and is_sym(b):
        for s, other in ((a, b), (b, a)):
            if s.act is not None and s.act[0] == "sigmoid" and s.act[2] is other:
                return t.act(other, "silu")
        raise Unsupported("multiplies two tensors that both depend on the input")
    return scale_by(t, a, b) if is_sym(a) else scale_by(t, b, a)


@register_aten("mul")
def _mul(t, a, b):
    return product(t, a, b)


@register_aten("div")
def _div(t, a, b, rounding_mode=None):
    if is_sym(b):
        raise Unsupported("divides by an input-dependent tensor")
    if rounding_mode is not None:
        raise Unsupported(f"rounds ({rounding_mode})")
    return scale_by(t, a, 1.0 / to_numpy(b), rel_err=fold_error.reciprocal_error(to_numpy(b)))
