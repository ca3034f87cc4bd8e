"""The space-to-depth (polyphase) permutation: strided convolutions as stride-1 ones (docs/math.md §7.6).

``P_f`` reorders an image ``(C, H, W)`` into ``(C fh fw, H / fh, W / fw)``: the phase ``(a, b)`` of channel
``c`` (the pixels ``(fh r + a, fw t + b)``) becomes the channel ``(c, a, b)`` at pixel ``(r, t)``.  It is a
permutation of coordinates, so it is orthogonal and commutes with any activation applied elementwise with
the same function everywhere.  A convolution of stride ``s`` read with its input in phases ``s f`` and its
output in phases ``f`` is shift-invariant by one pixel, a stride-1 convolution with ``s^2 f^2``-times more
input channels and ``f^2``-times more output channels; :func:`lipsdp.convnet.conv_chain` recovers its kernel
from the permuted matrix, exactly as for any stride-1 convolution.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: Strides tried per axis (an image ``s`` times the next one's size, ``s`` up to this).
MAX_STRIDE = 8


def divides(shape: tuple, factor: tuple) -> bool:
    """Whether the phases ``factor = (fh, fw)`` tile the image ``shape = (C, H, W)`` exactly."""
    return len(shape) == 3 and shape[1] % factor[0] == 0 and shape[2] % factor[1] == 0


def phase_shape(shape: tuple, factor: tuple) -> tuple[int, int, int]:
    """``(C fh fw, H / fh, W / fw)``: the shape of ``P_f`` applied to an image of ``shape``."""
    C, H, W = shape
    fh, fw = factor
    return C * fh * fw, H // fh, W // fw


def phase_order(shape: tuple, factor: tuple) -> np.ndarray:
    """The permutation ``perm`` with ``(P_f x)[k] = x[perm[k]]`` for a flat channel-major image ``x``."""
    C, H, W = shape
    fh, fw = factor
    if not divides(shape, factor):
        raise ValueError(f"the phases {tuple(factor)} do not tile the image {tuple(shape)}")
    idx = np.arange(C * H * W).reshape(C, H // fh, fh, W // fw, fw)  # x[c, fh r + a, fw t + b]
    return idx.transpose(0, 2, 4, 1, 3).reshape(-1)                  # -> channel (c, a, b), pixel (r, t)


def to_phases(S, in_shape: tuple, out_shape: tuple, f_in: tuple, f_out: tuple) -> sp.csr_matrix:
    """``P_out S P_in^T``: the map ``S`` (flat ``in_shape`` -> flat ``out_shape``) between the phase images."""
    S = sp.csr_matrix(S)
    return S[phase_order(out_shape, f_out)][:, phase_order(in_shape, f_in)].tocsr()


def stride_of(in_shape: tuple, out_shape: tuple) -> tuple[int, int] | None:
    """The stride ``(sh, sw)`` a map between these images has if its input is exactly ``s`` times its output
    on each axis (what the polyphase rewrite needs), with at least one ``s > 1``; else None."""
    if len(in_shape) != 3 or len(out_shape) != 3:
        return None
    s = tuple(i // o if o and i % o == 0 and i // o <= MAX_STRIDE else 0 for i, o in zip(in_shape[1:], out_shape[1:]))
    return s if min(s) >= 1 and max(s) > 1 else None


def times(a: tuple, b: tuple) -> tuple[int, int]:
    return a[0] * b[0], a[1] * b[1]
