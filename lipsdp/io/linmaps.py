"""Matrices of the linear layers a loader meets, on row-major flattened tensors.

Every function here returns the matrix ``M`` with ``flat(y) = M @ flat(x)`` for
one linear operation on a single sample (no batch axis): selections and
permutations (reshape, transpose, slice, pad, expand), a matrix applied along
one axis (``Linear`` on the last axis), per-channel scaling (folded
``BatchNorm``) and the exact unrolling of convolutions and average pooling into
sparse matrices.  All are built with vectorised index arithmetic, never with a
loop over neurons.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.sparse as sp


def size(shape: Sequence[int]) -> int:
    """Number of elements of a tensor of shape ``shape`` (1 for a scalar)."""
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def selection(index: np.ndarray, n_in: int) -> sp.csr_matrix:
    """Matrix of ``y = x[index]`` (each row picks one coordinate; ``-1`` gives a zero row).

    Parameters
    ----------
    index : ndarray of int
        Flat index of the input coordinate copied to each output coordinate, or
        ``-1`` for an output that is zero (padding).
    n_in : int
        Size of the flattened input.
    """
    index = np.asarray(index, dtype=np.int64).ravel()
    rows = np.flatnonzero(index >= 0)
    data = np.ones(len(rows))
    return sp.csr_matrix((data, (rows, index[rows])), shape=(len(index), n_in))


def grid(shape: Sequence[int]) -> np.ndarray:
    """``arange(size).reshape(shape)``: the flat index of every coordinate."""
    return np.arange(size(shape), dtype=np.int64).reshape(tuple(shape))


def along_axis(shape: Sequence[int], axis: int, matrix) -> tuple:
    """Apply ``matrix`` (``m x shape[axis]``) along ``axis`` of a tensor of shape ``shape``.

    .. math:: M = I_{\\text{pre}} \\otimes A \\otimes I_{\\text{post}}

    Returns
    -------
    M : ndarray or scipy.sparse matrix
        Dense when the map is ``A`` itself (``axis`` is the only non-trivial axis).
    out_shape : tuple of int
        ``shape`` with ``shape[axis]`` replaced by ``m``.
    """
    shape = tuple(shape)
    pre, post = size(shape[:axis]), size(shape[axis + 1:])
    out_shape = shape[:axis] + (matrix.shape[0],) + shape[axis + 1:]
    if pre == 1 and post == 1:
        return matrix, out_shape
    block = sp.csr_matrix(matrix)
    if post > 1:
        block = sp.kron(block, sp.identity(post, format="csr"), format="csr")
    if pre > 1:
        block = sp.kron(sp.identity(pre, format="csr"), block, format="csr")
    return block, out_shape


def channel_scale(shape: Sequence[int], scale: np.ndarray) -> np.ndarray:
    """Diagonal of the map scaling channel ``c`` (axis 0 of ``shape``) by ``scale[c]``."""
    return np.repeat(np.asarray(scale, dtype=np.float64), size(shape[1:]))


def conv_output_shape(spatial, kernel, stride, pad_begin, pad_end, dilation) -> tuple[int, ...]:
    """Spatial output size of a convolution or pooling window."""
    return tuple((n + pb + pe - d * (k - 1) - 1) // s + 1
                 for n, k, s, pb, pe, d in zip(spatial, kernel, stride, pad_begin, pad_end, dilation))


def conv_matrix(in_shape: Sequence[int], weight: np.ndarray, stride: Sequence[int],
                pad_begin: Sequence[int], pad_end: Sequence[int], dilation: Sequence[int],
                groups: int = 1) -> tuple[sp.csr_matrix, tuple[int, ...]]:
    """Unroll a zero-padded convolution (cross-correlation, as in torch and ONNX) into a sparse matrix.

    .. math::
        y[o, p] = \\sum_{c, k} w[o, c, k]\\; x[g(o) C_g + c,\\; p s - \\text{pad} + k d]

    Parameters
    ----------
    in_shape : tuple of int
        ``(C_in, *spatial)`` of one sample.
    weight : ndarray
        ``(C_out, C_in / groups, *kernel)``.
    stride, pad_begin, pad_end, dilation : sequences of int
        One entry per spatial axis.
    groups : int
        Channel groups (``C_in`` for a depthwise convolution).

    Returns
    -------
    M : scipy.sparse.csr_matrix
        ``(C_out * prod(out_spatial), C_in * prod(spatial))``; exact, with
        ``C_out * prod(out_spatial) * C_in/groups * prod(kernel)`` stored entries at most.
    out_shape : tuple of int
        ``(C_out, *out_spatial)``.
    """
    weight = np.asarray(weight, dtype=np.float64)
    c_out, c_group = weight.shape[:2]
    kernel = weight.shape[2:]
    spatial = tuple(in_shape[1:])
    nd = len(spatial)
    out_spatial = conv_output_shape(spatial, kernel, stride, pad_begin, pad_end, dilation)
    if min(out_spatial, default=1) <= 0:
        raise ValueError(f"the window {tuple(kernel)} does not fit the input {tuple(in_shape)}")
    per_group = c_out // groups
    # axes: (c_out, *out_spatial, c_group, *kernel), broadcast against each other
    n_axes = 2 + 2 * nd

    def axis_range(n, position):
        shape = [1] * n_axes
        shape[position] = n
        return np.arange(n, dtype=np.int64).reshape(shape)

    co = axis_range(c_out, 0)
    ci = axis_range(c_group, 1 + nd) + (co // per_group) * c_group
    valid = np.ones((1,) * n_axes, dtype=bool)
    in_pos = []
    for d in range(nd):
        o = axis_range(out_spatial[d], 1 + d)
        k = axis_range(kernel[d], 2 + nd + d)
        pos = o * stride[d] - pad_begin[d] + k * dilation[d]
        valid = valid & (pos >= 0) & (pos < spatial[d])
        in_pos.append(pos)
    # Entries in the order (c_out, *out_spatial, c_group, *kernel): rows ascending and, within a row,
    # columns ascending (input channel, then positions, which grow with the tap); distinct taps read
    # distinct inputs, so there are no duplicates and the CSR arrays are written directly (no COO sort).
    full = np.broadcast_shapes(*(a.shape for a in [co, ci, valid, *in_pos]))
    keep = np.broadcast_to(valid, full)
    in_strides = [size(in_shape[1 + d:]) for d in range(nd + 1)]
    col = ci * in_strides[0]
    for d in range(nd):
        col = col + in_pos[d] * in_strides[1 + d]
    cols = np.broadcast_to(col, full)[keep]
    k_index = [axis_range(kernel[d], 2 + nd + d) for d in range(nd)]
    values = weight[(co, axis_range(c_group, 1 + nd), *k_index)]
    values = np.broadcast_to(values, full)[keep]
    n_rows = c_out * size(out_spatial)
    counts = np.count_nonzero(keep.reshape(n_rows, -1), axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    m = sp.csr_matrix((values, cols, indptr), shape=(n_rows, size(in_shape)))
    m.sum_duplicates()
    return m, (c_out, *out_spatial)


def avg_pool_matrix(in_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                    pad_begin: Sequence[int], pad_end: Sequence[int],
                    count_include_pad: bool = True, divisor: int | None = None,
                    dilation: Sequence[int] | None = None) -> tuple:
    """Unroll an average pooling window (per channel) into a sparse matrix.

    With ``count_include_pad=False`` each output divides by the number of input
    positions its window really covers, as torch and ONNX do.  A ``dilation``
    (ONNX ``AveragePool`` from opset 19) spaces the window's taps as in a
    convolution: the average of ``prod(kernel)`` taps, still one linear map.
    """
    channels = in_shape[0]
    ones = np.ones((channels, 1, *kernel))
    dilation = [1] * len(kernel) if dilation is None else [int(d) for d in dilation]
    m, out_shape = conv_matrix(in_shape, ones, stride, pad_begin, pad_end, dilation, groups=channels)
    if divisor is not None:
        m = m * (1.0 / divisor)
    elif count_include_pad:
        m = m * (1.0 / size(kernel))
    else:
        counts = np.asarray(m.sum(axis=1)).ravel()
        m = sp.diags(1.0 / counts) @ m
    return sp.csr_matrix(m), out_shape


def finalize(weight):
    """Return ``weight`` as the network stores it: dense float64, or CSR when large and sparse.

    Dense when it has at most one million entries or at least 10% non-zeros.
    """
    if sp.issparse(weight):
        rows, cols = weight.shape
        if rows * cols <= 1_000_000 or weight.nnz >= 0.1 * rows * cols:
            return np.asarray(weight.toarray(), dtype=np.float64)
        return sp.csr_matrix(weight, dtype=np.float64)
    return np.ascontiguousarray(weight, dtype=np.float64)
