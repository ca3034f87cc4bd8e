"""Max pooling -> a window gather, a GroupSort and a selection (docs/math.md §2.5).

Each output of a max pooling is the largest of its window's ``K = prod(kernel)`` taps.  The windows are
gathered by an exact selection into groups of ``K`` consecutive coordinates (overlapping windows repeat an
input), a ``groupsort`` activation sorts each group and a selection keeps its last entry
(:func:`lipsdp.io.aten_order.top_values`), so the translation computes exactly what torch and ONNX compute
and the SDP constrains it with GroupSort's quadratic constraints.  A tap in the padding (torch and ONNX pad
max pooling with ``-inf``, so it never wins) is replaced by another tap of the same window, which leaves the
maximum unchanged; a window with no tap inside the input is refused.  Importing :mod:`lipsdp.io.aten_ops`
registers the ATen handlers; the ONNX ``MaxPool`` handler calls :func:`max_pool`.
"""

from __future__ import annotations

import numpy as np

from lipsdp.io.aten_linear import expand_tuple
from lipsdp.io.aten_order import top_values
from lipsdp.io.builder import Sym, Unsupported
from lipsdp.io.translator import Poison, register_aten


def pool_output_shape(spatial, kernel, stride, pad_begin, pad_end, dilation, ceil_mode: bool) -> tuple[int, ...]:
    """Spatial output size of a max pooling, as torch computes it.

    ``floor`` (or ``ceil``) of ``(n + pads - d (k - 1) - 1) / s``, plus one; with ``ceil_mode`` a last window
    that would start in the end padding is dropped (torch's ``pooling_output_shape``).
    """
    out = []
    for n, k, s, pb, pe, d in zip(spatial, kernel, stride, pad_begin, pad_end, dilation):
        span = n + pb + pe - d * (k - 1) - 1
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= n + pb:
            o -= 1
        out.append(o)
    return tuple(out)


def window_index(shape, kernel, stride, pad_begin, out_shape, dilation) -> np.ndarray:
    """Flat input index of every tap, shaped ``(C, *out_shape, prod(kernel))``; taps in the padding are
    replaced by the window's first tap inside the input.

    Raises :class:`Unsupported` when a window lies entirely in the padding (its maximum would be ``-inf``).
    """
    channels, spatial = shape[0], tuple(shape[1:])
    nd = len(spatial)
    coords, valid = [], np.ones((1,) * (1 + 2 * nd), dtype=bool)
    for a, (n, k, s, pb, o, d) in enumerate(zip(spatial, kernel, stride, pad_begin, out_shape, dilation)):
        idx = np.arange(o)[:, None] * s - pb + np.arange(k)[None, :] * d            # (o, k)
        view = [1] * (1 + 2 * nd)
        view[1 + a], view[1 + nd + a] = o, k
        idx = idx.reshape(view)
        coords.append(idx)
        valid = valid & (idx >= 0) & (idx < n)
    full = (channels, *out_shape, *kernel)
    flat = np.broadcast_to(np.arange(channels).reshape((channels,) + (1,) * (2 * nd)), full).copy()
    for a, idx in enumerate(coords):
        flat = flat * spatial[a] + np.clip(np.broadcast_to(idx, full), 0, spatial[a] - 1)
    K = int(np.prod(kernel))
    flat = flat.reshape(channels, *out_shape, K)
    valid = np.broadcast_to(valid, full).reshape(channels, *out_shape, K)
    if not valid.any(axis=-1).all():
        raise Unsupported("with a window that lies entirely in the padding")
    first = np.take_along_axis(flat, valid.argmax(axis=-1)[..., None], axis=-1)
    return np.where(valid, flat, first)


def max_pool(t, x: Sym, kernel, stride, pad_begin, pad_end, dilation, ceil_mode: bool = False,
             onnx_ceil: bool = False) -> Sym:
    """Max pooling of ``x`` (``(C, *spatial)``) translated exactly (see the module docstring).

    ``onnx_ceil``: the node is ONNX's, whose specification keeps a last window that starts in the end padding
    where torch drops it; such a ``ceil_mode`` is refused rather than read one way.
    """
    kernel, stride = [int(k) for k in kernel], [int(s) for s in stride]
    dilation = [int(d) for d in dilation]
    pad_begin, pad_end = [int(p) for p in pad_begin], [int(p) for p in pad_end]
    if min(kernel + stride + dilation, default=1) < 1 or min(pad_begin + pad_end, default=0) < 0:
        raise Unsupported(f"with kernel {kernel}, stride {stride}, dilation {dilation}, padding "
                          f"{pad_begin}/{pad_end}")
    out = pool_output_shape(x.shape[1:], kernel, stride, pad_begin, pad_end, dilation, ceil_mode)
    if ceil_mode and onnx_ceil:
        spans = [n + b + e - d * (k - 1) - 1
                 for n, b, e, d, k in zip(x.shape[1:], pad_begin, pad_end, dilation, kernel)]
        if tuple(-(-w // s) + 1 for w, s in zip(spans, stride)) != out:
            raise Unsupported("with ceil_mode=1 and a last window in the padding (ONNX's formula and torch's differ)")
    if min(out, default=1) < 1:
        raise Unsupported(f"with an empty output ({out})")
    index = window_index(x.shape, kernel, stride, pad_begin, out, dilation)
    windows = t.b.select(x, index, t.label)
    if index.shape[-1] == 1:
        return t.b.linear(windows, shape=index.shape[:-1])
    return top_values(t, windows, [len(index.shape) - 1], 1, True, keepdim=False)


def _max_pool(t, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False) -> Sym:
    nd = len(x.shape) - 1
    kernel = expand_tuple(kernel_size, nd)
    stride = expand_tuple(stride, nd) if stride else kernel
    pad = expand_tuple(padding, nd)
    return max_pool(t, x, kernel, stride, pad, pad, expand_tuple(dilation, nd), bool(ceil_mode))


@register_aten("max_pool1d", "max_pool2d", "max_pool3d")
def _max_pool_op(t, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return _max_pool(t, x, kernel_size, stride, padding, dilation, ceil_mode)


@register_aten("max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool1d_with_indices")
def _max_pool_indices(t, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    return _max_pool(t, x, kernel_size, stride, padding, dilation, ceil_mode), Poison(t.entry("max pooling indices"))
