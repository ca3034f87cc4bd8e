"""A network read as a chain of convolutions: what the structured (Roesser) path certifies.

The loaders unroll every convolution into a sparse :class:`~lipsdp.network.Affine` (docs/math.md §7.1).
:func:`conv_chain` reads a :class:`~lipsdp.network.Network` back as

    x -> [stride-1 conv -> slope-restricted activation] x L -> flatten -> linear

and recovers each kernel and its zero padding from the sparse matrix.  The recovered convolution is
accepted only if unrolling it again (:func:`lipsdp.io.linmaps.conv_matrix`, the loaders' own map) gives
*exactly* the node's matrix, so the structured LMI is about the very map the network computes, whatever
folding (batch norm, input scaling) produced it.  Anything else (strides, pooling, residual branches,
non-elementwise activations, a hidden linear layer after the flatten) raises
:class:`~lipsdp.errors.UnsupportedLayerError` with the reason; ``structure="auto"`` then unrolls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from lipsdp.constraints import SlopeRestricted, get_constraint
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.io.linmaps import conv_matrix
from lipsdp.network import Activation, Affine, Input, Network, Reshape

#: Kernels larger than this (taps per axis) are not realised: the Roesser state grows with the kernel.
MAX_KERNEL = 15
#: Rows of the final linear map handled through its Gram matrices (docs/math.md §7.4).
MAX_OUTPUTS = 128


@dataclass
class ConvLayer:
    """One ``conv -> activation`` stage of a :class:`ConvChain`.

    Attributes
    ----------
    name : str
    weight : ndarray
        ``(C_out, C_in, kh, kw)``, torch's cross-correlation layout.
    pad : tuple of int
        ``(top, left, bottom, right)`` zero padding.
    in_shape, out_shape : tuple of int
        ``(C, H, W)``.
    sector : tuple of float
        The activation's slope sector ``(alpha, beta)`` (over all its neurons).
    activation : str
    """

    name: str
    weight: np.ndarray
    pad: tuple[int, int, int, int]
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    sector: tuple[float, float]
    activation: str


@dataclass
class ConvChain:
    """A conv chain and its linear read-out ``tail`` (``(q, C_L H_L W_L)``, dense)."""

    layers: list[ConvLayer]
    tail: np.ndarray
    tail_name: str


class NotAConvChain(UnsupportedLayerError):
    """The network is not what the structured path certifies; the message says why (one line)."""

    def __init__(self, reason: str):
        self.layers = []
        LipSDPError.__init__(self, f"the structured (state-space) path does not handle this network: {reason}")


def _refuse(reason: str):
    raise NotAConvChain(reason)


def recover_conv(S, in_shape: tuple, out_shape: tuple) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The stride-1 convolution whose unrolled matrix is exactly ``S``, or :class:`UnsupportedLayerError`.

    Returns ``(weight, (top, left, bottom, right))``.
    """
    if len(in_shape) != 3 or len(out_shape) != 3:
        _refuse(f"a linear map {tuple(in_shape)} -> {tuple(out_shape)} is not a 2-D convolution")
    ci, H, W = in_shape
    co, Ho, Wo = out_shape
    S = sp.csr_matrix(S)
    S.eliminate_zeros()
    coo = S.tocoo()
    if coo.nnz == 0:
        _refuse("a convolution with a zero kernel")
    o, i, j = np.unravel_index(coo.row, out_shape)
    c, p, q = np.unravel_index(coo.col, in_shape)
    dh, dw = p - i, q - j
    top, left = -int(dh.min()), -int(dw.min())
    kh, kw = int(dh.max()) + top + 1, int(dw.max()) + left + 1
    bottom, right = Ho - H + kh - 1 - top, Wo - W + kw - 1 - left
    if min(top, left, bottom, right) < 0 or max(kh, kw) > MAX_KERNEL:
        _refuse(f"a linear map {tuple(in_shape)} -> {tuple(out_shape)} that is not a stride-1 zero-padded "
                f"convolution with kernels up to {MAX_KERNEL}x{MAX_KERNEL}")
    weight = np.zeros((co, ci, kh, kw))
    weight[o, c, dh + top, dw + left] = coo.data
    try:
        M, shape = conv_matrix(in_shape, weight, (1, 1), (top, left), (bottom, right), (1, 1), 1)
    except ValueError as exc:
        _refuse(f"a linear map {tuple(in_shape)} -> {tuple(out_shape)}: {exc}")
    diff = (M - S).tocsr()
    diff.eliminate_zeros()
    if tuple(shape) != tuple(out_shape) or diff.nnz:
        _refuse(f"a linear map {tuple(in_shape)} -> {tuple(out_shape)} that is not a stride-1 zero-padded "
                f"convolution (strides, pooling or mixed maps are unrolled)")
    return weight, (top, left, bottom, right)


def _skip_reshapes(net: Network, node: int) -> tuple[int, tuple | None]:
    """The first non-Reshape node at or above ``node``, and the nearest 3-D shape on the way."""
    shape3 = None
    while isinstance(net.op(node), Reshape):
        shape3 = shape3 or (net.op(node).shape if len(net.op(node).shape) == 3 else None)
        node = _single_parent(net, node)
    if shape3 is None and len(net.op(node).shape) == 3:
        shape3 = net.op(node).shape
    return node, shape3


def _single_parent(net: Network, node: int) -> int:
    parents = net.parents(node)
    if len(parents) != 1:
        _refuse(f"{net.op(node).name} ({net.op(node).kind}) has {len(parents)} inputs (not a chain)")
    if net.graph.out_degree(parents[0]) != 1:
        op = net.op(parents[0])
        _refuse(f"{op.name} ({op.kind}) feeds several layers (not a chain)")
    return parents[0]


def _sector(op: Activation) -> tuple[float, float]:
    qc = get_constraint(op.function)
    if not isinstance(qc, SlopeRestricted):
        _refuse(f"{op.name} ({op.kind}) is not an elementwise slope-restricted activation")
    lo, hi = qc.sector(op)
    return float(np.min(lo)), float(np.max(hi))


def _exact_weight(op: Affine) -> None:
    """Refuse a weight the loader composed in floating point (docs/math.md §10.3): the structured LMIs read
    the kernels as exact and do not carry that rounding; the unrolled LMI does."""
    if op.weight_err is not None:
        _refuse(f"{op.name} ({op.kind}) was composed in floating point at load (a folded linear chain, e.g. a "
                "BatchNorm): the state-space path does not carry its rounding; use --structure unrolled")


def conv_chain(net: Network, output_map=None) -> ConvChain:
    """Read ``net`` as a :class:`ConvChain` (``output_map @ f`` with ``output_map`` given)."""
    node, _ = _skip_reshapes(net, net.output)
    tail_op = net.op(node)
    if not isinstance(tail_op, Affine):
        _refuse("the output is not a linear layer after the last activation")
    _exact_weight(tail_op)
    tail = tail_op.weight.toarray() if sp.issparse(tail_op.weight) else np.asarray(tail_op.weight, np.float64)
    if output_map is not None:
        tail = np.asarray(output_map, dtype=np.float64) @ tail
    if tail.shape[0] > MAX_OUTPUTS:
        _refuse(f"the final linear layer has {tail.shape[0]} outputs (at most {MAX_OUTPUTS})")
    layers: list[ConvLayer] = []
    node, _ = _skip_reshapes(net, _single_parent(net, node))
    while not isinstance(net.op(node), Input):
        act = net.op(node)
        if not isinstance(act, Activation) or act.implicit:
            _refuse(f"{act.name} ({act.kind}) where a convolution's activation was expected")
        conv_node, _ = _skip_reshapes(net, _single_parent(net, node))
        conv = net.op(conv_node)
        if not isinstance(conv, Affine):
            _refuse(f"{conv.name} ({conv.kind}) where a convolution was expected")
        _exact_weight(conv)
        parent, in_shape = _skip_reshapes(net, _single_parent(net, conv_node))
        if in_shape is None:
            _refuse(f"{conv.name} ({conv.kind}) reads a tensor without a (C, H, W) shape")
        weight, pad = recover_conv(conv.weight, in_shape, conv.shape)
        layers.append(ConvLayer(conv.name, weight, pad, tuple(in_shape), tuple(conv.shape), _sector(act),
                                act.function))
        node = parent
    if not layers:
        _refuse("there is no convolution")
    layers.reverse()
    for prev, layer in zip(layers, layers[1:]):  # the supplies are per channel: the channels must carry over
        if prev.out_shape != layer.in_shape:
            _refuse(f"{layer.name} reads the shape {layer.in_shape}, not {prev.out_shape} as written")
    if tail.shape[1] != int(np.prod(layers[-1].out_shape)):
        _refuse("the final linear layer does not read the last activation")
    return ConvChain(layers, tail, tail_op.name)
