"""Zero-padded stride-1 2-D convolutions applied directly, never unrolled (the CNN path's bounds).

The loaders unroll a convolution into a sparse matrix (docs/math.md §7.1); at 32 channels on 28x28 that
matrix has about seven million entries and every product with it reads them all.  The same map applied
as a convolution (one matrix product with the ``(C_out, C_in kh kw)`` kernel per chunk of images, the
"im2col" layout) costs the same arithmetic without reading an index per entry.  :func:`conv` is
``y = S x`` and :func:`conv_transpose` is ``S^T g`` for the matrix ``S`` that
:func:`lipsdp.io.linmaps.conv_matrix` builds from the same kernel and padding, up to the order of
floating-point sums.

Arrays are *channel-major*: ``(C, N, H, W)`` for ``N`` images, so that each product is one BLAS call.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import LinearOperator, svds

from lipsdp import accel

#: Unrolled matrices up to this many entries get a dense SVD in :func:`conv_spectral_norm`.
DENSE_ENTRIES = 1_000_000
#: Entries of the im2col buffer one chunk of images may use (bounds the extra memory of a product).
CHUNK_ENTRIES = 8_000_000


def output_shape(weight: np.ndarray, in_shape: tuple, pad: tuple) -> tuple[int, int, int]:
    """``(C_out, H_out, W_out)`` of the convolution of ``weight`` with ``pad = (top, left, bottom, right)``."""
    co, _, kh, kw = weight.shape
    _, H, W = in_shape
    top, left, bottom, right = pad
    return co, H + top + bottom - kh + 1, W + left + right - kw + 1


def _chunks(n: int, per_image: int):
    step = max(1, CHUNK_ENTRIES // max(per_image, 1))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def conv(x: np.ndarray, weight: np.ndarray, pad: tuple) -> np.ndarray:
    """The cross-correlation (torch's ``conv2d``, stride 1) of the ``(C_in, N, H, W)`` images ``x``.

    Returns ``(C_out, N, H_out, W_out)``.
    """
    co, ci, kh, kw = weight.shape
    _, n, H, W = x.shape
    top, left, bottom, right = pad
    _, Ho, Wo = output_shape(weight, (ci, H, W), pad)
    kernel = weight.reshape(co, ci * kh * kw)
    y = np.empty((co, n, Ho, Wo))
    for part in _chunks(n, ci * kh * kw * Ho * Wo):
        m = part.stop - part.start
        xp = np.zeros((ci, m, H + top + bottom, W + left + right))
        xp[:, :, top:top + H, left:left + W] = x[:, part]
        cols = np.empty((ci, kh, kw, m, Ho, Wo))
        for a in range(kh):
            for b in range(kw):
                cols[:, a, b] = xp[:, :, a:a + Ho, b:b + Wo]
        y[:, part] = (kernel @ cols.reshape(ci * kh * kw, -1)).reshape(co, m, Ho, Wo)
    return y


def conv_transpose(g: np.ndarray, weight: np.ndarray, pad: tuple, in_hw: tuple[int, int]) -> np.ndarray:
    """``S^T g``: the ``(C_out, N, H_out, W_out)`` array ``g`` pulled back to ``(C_in, N, H, W)``.

    ``S^T`` is the convolution with the kernel flipped on both axes and its channels swapped, padded by
    ``k - 1 - pad`` on each side (``S^T g[c, p, q] = sum w[o, c, a, b] g[o, p + top - a, q + left - b]``);
    a padding larger than ``k - 1`` (no such ``S^T`` padding) scatters the products instead.
    """
    co, ci, kh, kw = weight.shape
    _, n, Ho, Wo = g.shape
    H, W = in_hw
    top, left, bottom, right = pad
    flipped_pad = (kh - 1 - top, kw - 1 - left, kh - 1 - bottom, kw - 1 - right)
    if min(flipped_pad) >= 0:
        return conv(g, np.ascontiguousarray(weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)), flipped_pad)
    kernel_t = weight.reshape(co, ci * kh * kw).T
    out = np.empty((ci, n, H, W))
    for part in _chunks(n, ci * kh * kw * Ho * Wo):
        m = part.stop - part.start
        cols = (kernel_t @ g[:, part].reshape(co, -1)).reshape(ci, kh, kw, m, Ho, Wo)
        xp = np.zeros((ci, m, H + top + bottom, W + left + right))
        for a in range(kh):
            for b in range(kw):
                xp[:, :, a:a + Ho, b:b + Wo] += cols[:, a, b]
        out[:, part] = xp[:, :, top:top + H, left:left + W]
    return out


def conv_spectral_norm(weight: np.ndarray, in_shape: tuple, pad: tuple) -> float:
    """What :func:`lipsdp.bounds.spectral_norm` returns for the unrolled matrix ``S`` of a zero-padded
    stride-1 convolution (``weight`` ``(C_out, C_in, kh, kw)``, ``in_shape`` ``(C, H, W)``, ``pad``
    ``(top, left, bottom, right)``), computed on the convolution itself, never forming ``S``.

    A small ``S`` (smaller side at most 1000, at most :data:`DENSE_ENTRIES` entries) is formed densely, by
    convolving the unit images, which reproduces its entries exactly, and gets the same dense SVD.  Any
    other gets ARPACK's Lanczos iteration on ``S^T S`` (products by :func:`conv` and
    :func:`conv_transpose`) to machine precision, raised by ``1 + 2e-8``: the sparse path's ``1 + 1e-8``
    and as much again, so that the value is never below the sparse path's (a Lanczos run or a dense SVD,
    which agree with this one to about ``1e-15``).
    """
    weight = np.asarray(weight, dtype=np.float64)
    ci, H, W = in_shape
    out = output_shape(weight, in_shape, pad)
    m, n = int(np.prod(out)), ci * H * W
    if min(m, n) <= 1000 and m * n <= DENSE_ENTRIES:
        eye = np.eye(n).reshape(n, ci, H, W).transpose(1, 0, 2, 3)
        dense = conv(eye, weight, pad).transpose(1, 0, 2, 3).reshape(n, m).T
        return accel.spectral_norm(dense)

    def matvec(v):
        return conv(np.reshape(v, (ci, 1, H, W)), weight, pad).ravel()

    def rmatvec(v):
        return conv_transpose(np.reshape(v, (out[0], 1, *out[1:])), weight, pad, (H, W)).ravel()

    op = LinearOperator((m, n), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(min(m, n))
    return float(svds(op, k=1, return_singular_vectors=False, v0=v0)[0]) * (1 + 2e-8)
