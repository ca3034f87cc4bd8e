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
from lipsdp.floatproof import UNIT_ROUNDOFF, gamma

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


# -- a proven norm: the convolution on the torus (docs/math.md §7.5) ---------------------------------------
#: Error of one computed cosine or sine of an angle ``2 pi r / N`` (the angle's three roundings, at most
#: ``3 u 2 pi``, and the library's own error), in units of ``u``: generous.
_TRIG_ERROR = 64


def torus(in_shape: tuple, out_hw: tuple, pad: tuple) -> tuple[int, int]:
    """``(M1, M2)``: a torus on which the zero-padded convolution is a compression of the circular one."""
    _, H, W = in_shape
    top, left, bottom, right = pad
    return max(H + max(top, bottom), out_hw[0]), max(W + max(left, right), out_hw[1])


def proven_conv_norm(weight: np.ndarray, in_shape: tuple, pad: tuple, tries: int = 30) -> float | None:
    """A float proven ``>= ||S||_2`` for the unrolled zero-padded convolution ``S`` (docs/math.md §7.5).

    ``S = P_out C P_in`` with ``C`` the circular convolution on the :func:`torus`, so ``||S|| <= ||C|| =
    max_w ||K(w)||``, the largest singular value of the kernel's transfer matrix over the torus's
    ``M1 M2`` frequencies.  The transfer matrices are computed tap by tap from exact integer phases; every
    one of them is proven below ``s`` at once (batched shifted Cholesky of ``[[s I, R], [R^T, s I]]``, ``R``
    the real form of ``K(w)``, the test of :func:`lipsdp.bounds.proven_spectral_norm`), and the
    computation's error, bounded in the Frobenius norm, is added.  None when no proof goes through.
    """
    weight = np.asarray(weight, dtype=np.float64)
    co, ci, kh, kw = weight.shape
    if not np.all(np.isfinite(weight)):
        return None
    if not np.any(weight):
        return 0.0
    _, Ho, Wo = output_shape(weight, in_shape, pad)
    M1, M2 = torus(in_shape, (Ho, Wo), pad)
    N = M1 * M2
    a, b = np.arange(kh), np.arange(kw)
    f1, f2 = np.arange(M1), np.arange(M2)
    r = (a[:, None, None, None] * f1[None, None, :, None] * M2
         + b[None, :, None, None] * f2[None, None, None, :] * M1) % N  # exact phases, (kh, kw, M1, M2)
    theta = (2.0 * np.pi) * r / N
    # K(-w) is the conjugate of K(w): the same singular values, and its real form is R's conjugate by the
    # exact sign flip diag(I, -I), so a proof for one is a proof for the other; half the torus suffices.
    flat = np.arange(N)
    keep = flat <= ((-(flat // M2)) % M1) * M2 + (-flat) % M2
    re = np.einsum("ocab,abxy->xyoc", weight, np.cos(theta)).reshape(N, co, ci)[keep]
    im = np.einsum("ocab,abxy->xyoc", weight, -np.sin(theta)).reshape(N, co, ci)[keep]
    N = int(keep.sum())
    R = np.concatenate([np.concatenate([re, -im], axis=2), np.concatenate([im, re], axis=2)], axis=1)
    m, n = 2 * co, 2 * ci
    size = m + n
    g = gamma(size + 1)
    sigma = float(np.sqrt(max(np.linalg.eigvalsh(R.transpose(0, 2, 1) @ R)[:, -1].max(), 0.0)))  # a guess only
    margin = 8.0 * (size + 1) ** 2 * UNIT_ROUNDOFF
    for _ in range(tries):
        s = float(np.nextafter(sigma * (1.0 + margin), np.inf))
        c = 4.0 * g * size * s + np.finfo(float).tiny
        H = np.zeros((N, size, size))
        H[:, :m, m:], H[:, m:, :m] = R, R.transpose(0, 2, 1)
        H[:, np.arange(size), np.arange(size)] = s - c
        try:
            L = np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            margin *= 2.0
            continue
        if np.all(c > 2.0 * (g * np.sum(L * L, axis=(1, 2)) + UNIT_ROUNDOFF * (s + c))):
            taps = np.abs(weight).sum(axis=(2, 3))  # |K_oc| summed over taps: bounds every entry's error
            error = (2.0 * np.sqrt(2.0) * (_TRIG_ERROR * UNIT_ROUNDOFF + 2.0 * gamma(kh * kw + 1))
                     * float(np.linalg.norm(taps)))
            return float(np.nextafter(np.nextafter(s + error, np.inf), np.inf))
        margin *= 2.0
    return None
