"""A network read as a chain of convolutions: what the structured (Roesser) path certifies.

The loaders unroll every convolution into a sparse :class:`~lipsdp.network.Affine` (docs/math.md §7.1).
:func:`conv_chain` reads a :class:`~lipsdp.network.Network` back as

    x -> [zero-padded conv -> slope-restricted activation] x L -> flatten -> linear

and recovers each kernel and its zero padding from the sparse matrix.  The recovered convolution is
accepted only if unrolling it again (:func:`lipsdp.io.linmaps.conv_matrix`, the loaders' own map) gives
*exactly* the node's matrix, so the structured LMI is about the very map the network computes, whatever
folding (batch norm, input scaling, an average pooling before the convolution) produced it.  Strided
convolutions are read in the polyphase domain (:mod:`lipsdp.polyphase`, docs/math.md §7.6): every layer
becomes a stride-1 convolution between phase images.  Anything else (max pooling, residual branches,
non-elementwise activations, a hidden linear layer after the flatten) raises
:class:`~lipsdp.errors.UnsupportedLayerError` with the reason; ``structure="auto"`` then unrolls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from lipsdp import convops, polyphase
from lipsdp.bounds import proven_spectral_norm, spectral_norm
from lipsdp.constraints import SlopeRestricted, get_constraint
from lipsdp.errors import LipSDPError, UnsupportedLayerError
from lipsdp.gains import activation_gain, up_product
from lipsdp.io.linmaps import conv_matrix
from lipsdp.network import Activation, Affine, Input, Network, Reshape, activation_function

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
    bias : ndarray or None
        The convolution's bias, flat over ``out_shape`` (what the sampled lower bound evaluates).
    activation_op : Activation or None
        The graph's activation node (its parameters), for the sampled lower bound.
    phases : tuple of int
        ``(fh, fw)``: the layer's output is the network's read in these phases (docs/math.md §7.6); its
        shapes, kernel, padding and bias are those of the phase images (``(1, 1)``: the network's own).
    """

    name: str
    weight: np.ndarray
    pad: tuple[int, int, int, int]
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    sector: tuple[float, float]
    activation: str
    bias: np.ndarray | None = None
    activation_op: Activation | None = None
    phases: tuple[int, int] = (1, 1)
    _norm: float | None = field(default=None, repr=False, compare=False)

    def norm(self) -> float:
        """The unrolled convolution's spectral norm estimate (:func:`lipsdp.convops.conv_spectral_norm`), computed
        once: the trivial bound and the structured solver's layer scales both use it."""
        if self._norm is None:
            self._norm = convops.conv_spectral_norm(self.weight, self.in_shape, self.pad)
        return self._norm


@dataclass
class ConvChain:
    """A conv chain and its linear read-out ``tail`` (``(q, C_L H_L W_L)``, dense); ``input_phases``: the
    polyphase factors the network's input is read in (docs/math.md §7.6; ``(1, 1)`` without strides)."""

    layers: list[ConvLayer]
    tail: np.ndarray
    tail_name: str
    input_phases: tuple[int, int] = (1, 1)


class NotAConvChain(UnsupportedLayerError):
    """The network is not what the structured path certifies; the message says why (one line)."""

    def __init__(self, reason: str):
        self.layers = []
        LipSDPError.__init__(self, f"the structured (state-space) path does not handle this network: {reason}")


def _refuse(reason: str):
    raise NotAConvChain(reason)


def recover_conv(S, in_shape: tuple, out_shape: tuple) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The stride-1 convolution whose unrolled matrix is exactly ``S``, or :class:`UnsupportedLayerError`.

    Returns ``(weight, (top, left, bottom, right))``.  The kernel is read from the rows of the output
    image's centre pixels (every tap inside the image there, on any image the kernel fits) and, should
    that not unroll to ``S``, from every entry; it is accepted only if it unrolls exactly to ``S``.
    """
    if len(in_shape) != 3 or len(out_shape) != 3:
        _refuse(f"a linear map {tuple(in_shape)} -> {tuple(out_shape)} is not a 2-D convolution")
    ci, H, W = in_shape
    co, Ho, Wo = out_shape
    S = _canonical(S)
    if S.shape != (co * Ho * Wo, ci * H * W):
        _refuse(f"a {S.shape[0]}x{S.shape[1]} matrix between the shapes {tuple(in_shape)} -> {tuple(out_shape)}")
    if S.nnz == 0:
        _refuse("a convolution with a zero kernel")
    centre = np.arange(co) * (Ho * Wo) + (Ho // 2) * Wo + Wo // 2
    for rows in (centre, None):
        try:
            weight, pad = _kernel_from_rows(S, in_shape, out_shape, rows)
            M, shape = conv_matrix(in_shape, weight, (1, 1), pad[:2], pad[2:], (1, 1), 1)
        except NotAConvChain:
            if rows is None:
                raise
            continue
        except ValueError as exc:
            if rows is None:
                _refuse(f"a linear map {tuple(in_shape)} -> {tuple(out_shape)}: {exc}")
            continue
        # Two canonical CSR matrices without stored zeros are equal exactly when their arrays are.
        M.eliminate_zeros()
        if tuple(shape) == tuple(out_shape) and _same_csr(M, S):
            return weight, pad
    _refuse(f"a linear map {tuple(in_shape)} -> {tuple(out_shape)} that is not a stride-1 zero-padded "
            f"convolution (strides whose phases do not tile the images, max pooling or mixed maps are unrolled)")


def _kernel_from_rows(S: sp.csr_matrix, in_shape: tuple, out_shape: tuple, rows) -> tuple[np.ndarray, tuple]:
    """The kernel and padding the entries of ``rows`` (all with None) imply: each entry's offset (input
    position - output position) is a tap; the offsets' extent gives the padding."""
    ci, H, W = in_shape
    co, Ho, Wo = out_shape
    if rows is None:
        out_rows, cols, data = np.repeat(np.arange(S.shape[0]), np.diff(S.indptr)), S.indices, S.data
    else:
        idx = np.concatenate([np.arange(S.indptr[r], S.indptr[r + 1]) for r in rows])
        out_rows, cols, data = np.repeat(rows, np.diff(S.indptr)[rows]), S.indices[idx], S.data[idx]
    if len(data) == 0:
        _refuse("no entries to read a kernel from")
    o, i, j = out_rows // (Ho * Wo), (out_rows // Wo) % Ho, out_rows % Wo
    c, dh, dw = cols // (H * W), (cols // W) % H - i, cols % W - j
    top, left = -int(dh.min()), -int(dw.min())
    kh, kw = int(dh.max()) + top + 1, int(dw.max()) + left + 1
    bottom, right = Ho - H + kh - 1 - top, Wo - W + kw - 1 - left
    if min(top, left, bottom, right) < 0 or max(kh, kw) > MAX_KERNEL:
        _refuse(f"a linear map {tuple(in_shape)} -> {tuple(out_shape)} that is not a stride-1 zero-padded "
                f"convolution with kernels up to {MAX_KERNEL}x{MAX_KERNEL}")
    weight = np.zeros((co, ci, kh, kw))
    weight[o, c, dh + top, dw + left] = data
    return weight, (top, left, bottom, right)


def _canonical(S) -> sp.csr_matrix:
    """``S`` as a CSR matrix with sorted indices, no duplicates and no stored zeros (``S`` itself when it
    is one, else a copy: the network's own matrix is left as it is)."""
    if sp.issparse(S) and S.format == "csr" and S.dtype == np.float64 and S.has_canonical_format \
            and np.count_nonzero(S.data) == S.nnz:
        return S
    S = sp.csr_matrix(S, dtype=np.float64, copy=True)
    S.sum_duplicates()
    S.eliminate_zeros()
    return S


def _same_csr(A: sp.csr_matrix, B: sp.csr_matrix) -> bool:
    return (A.shape == B.shape and np.array_equal(A.indptr, B.indptr) and np.array_equal(A.indices, B.indices)
            and np.array_equal(A.data, B.data))


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


def _recover_layer(S, in_shape: tuple, out_shape: tuple, f_out: tuple):
    """Kernel, padding, phase shapes and input phases of the convolution ``S`` whose output is read in the
    phases ``f_out``: a stride-1 convolution (input in the same phases) or, for an input ``s`` times the
    output on each axis, a stride-``s`` one (input in the phases ``s f_out``), recovered exactly from the
    permuted matrix (docs/math.md §7.6)."""
    stride = polyphase.stride_of(in_shape, out_shape)
    candidates = [f_out] + ([polyphase.times(stride, f_out)] if stride else [])
    error = None
    for f_in in candidates:
        if not (polyphase.divides(in_shape, f_in) and polyphase.divides(out_shape, f_out)):
            continue
        shapes = polyphase.phase_shape(in_shape, f_in), polyphase.phase_shape(out_shape, f_out)
        M = S if f_in == f_out == (1, 1) else polyphase.to_phases(_canonical(S), in_shape, out_shape, f_in, f_out)
        try:
            weight, pad = recover_conv(M, *shapes)
        except NotAConvChain as exc:
            error = error or exc
            continue
        return weight, pad, shapes, f_in
    if error is not None and not stride and f_out == (1, 1):
        raise error
    _refuse(f"a linear map {in_shape} -> {out_shape} that is neither a stride-1 convolution nor a strided one "
            f"whose input is exactly stride x its output on an image the later strides tile ({f_out} phases)")


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
    f_out = (1, 1)  # the phases the current layer's output is read in (docs/math.md §7.6)
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
        if "maxpool" in net.op(parent).kind.lower():  # the loaders' window gather -> groupsort -> selection
            _refuse(f"{net.op(parent).name} ({net.op(parent).kind}) is a max pooling: the state-space LMIs have "
                    "no constraint for it (docs/math.md §7.6); use --structure unrolled")
        if in_shape is None:
            _refuse(f"{conv.name} ({conv.kind}) reads a tensor without a (C, H, W) shape")
        weight, pad, shapes, f_in = _recover_layer(conv.weight, tuple(in_shape), tuple(conv.shape), f_out)
        bias = conv.bias if conv.bias is None or f_out == (1, 1) else \
            np.asarray(conv.bias, np.float64).reshape(-1)[polyphase.phase_order(conv.shape, f_out)]
        # the catalogue's activations take scalar parameters: the same function at every neuron commutes with
        # the phase permutation (docs/math.md §7.6)
        layers.append(ConvLayer(conv.name, weight, pad, *shapes, _sector(act), act.function, bias, act, f_out))
        node, f_out = parent, f_in
    if not layers:
        _refuse("there is no convolution")
    layers.reverse()
    for prev, layer in zip(layers, layers[1:]):  # the supplies are per channel: the channels must carry over
        if prev.out_shape != layer.in_shape:
            _refuse(f"{layer.name} reads the shape {layer.in_shape}, not {prev.out_shape} as written")
    if tail.shape[1] != int(np.prod(layers[-1].out_shape)):
        _refuse("the final linear layer does not read the last activation")
    return ConvChain(layers, tail, tail_op.name, f_out)


def with_output_map(chain: ConvChain, output_map) -> ConvChain:
    """``chain`` read out through ``output_map @ tail`` (what ``conv_chain(net, output_map)`` returns,
    without recovering the kernels again)."""
    tail = np.atleast_2d(np.asarray(output_map, dtype=np.float64)) @ chain.tail
    if tail.shape[0] > MAX_OUTPUTS:
        _refuse(f"the final linear layer has {tail.shape[0]} outputs (at most {MAX_OUTPUTS})")
    return ConvChain(chain.layers, tail, chain.tail_name, chain.input_phases)


# -- the bracketing bounds of docs/math.md §1.5 on a conv chain, without the unrolled matrices ----------
def chain_trivial_bound(chain: ConvChain) -> float:
    """:func:`lipsdp.bounds.trivial_bound` of the network ``chain`` was read from, each convolution's norm
    taken on its kernel (:func:`lipsdp.convops.conv_spectral_norm`) instead of its unrolled matrix.

    The recovered kernels unroll exactly to the network's matrices (:func:`recover_conv`), so the norms
    are of the same maps; products in the order :func:`lipsdp.bounds.node_lipschitz` takes them.
    """
    lip = 1.0
    for layer in chain.layers:
        lip = layer.norm() * lip
        lip = activation_gain(layer.activation_op, "l2") * lip
    return spectral_norm(chain.tail) * lip


def chain_proven_trivial_bound(chain: ConvChain, output_map=None) -> float | None:
    """The trivial bound of ``chain`` (then ``output_map``) proven in floating point (docs/math.md §7.5), or
    None: each convolution's norm bounded on the torus (:func:`lipsdp.convops.proven_conv_norm`), the
    read-out's through its ``q x q`` Gram matrix (:func:`proven_wide_norm`), products rounded up."""
    lip = 1.0 if output_map is None else proven_wide_norm(output_map)
    if lip is None:
        return None
    for layer in chain.layers:
        norm = convops.proven_conv_norm(layer.weight, layer.in_shape, layer.pad)
        if norm is None:
            return None
        lip = up_product(activation_gain(layer.activation_op, "l2"), up_product(norm, lip))
    tail = proven_wide_norm(chain.tail)
    return None if tail is None else up_product(tail, lip)


def proven_wide_norm(T) -> float | None:
    """A float proven ``>= ||T||_2`` for a matrix with few rows (or columns): by Weyl's inequality
    ``||T||^2 = lambda_max(T T^T) <= ||G||_2 + ||T T^T - G||_F`` for the float Gram ``G`` (symmetrised),
    whose error is at most ``gamma_n |T||T|^T`` entrywise plus the symmetrisation's ``u |G|`` (Higham §3.5);
    both doubled for their own rounding."""
    T = np.atleast_2d(np.asarray(T, dtype=np.float64))
    if T.shape[0] > T.shape[1]:
        T = T.T
    n = T.shape[1]
    if not np.all(np.isfinite(T)) or n * 2.0 ** -53 > 0.01:
        return None
    G = T @ T.T
    G = 0.5 * (G + G.T)
    g = n * 2.0 ** -53 / (1.0 - n * 2.0 ** -53)
    error = 2.0 * (g * float(np.linalg.norm(np.abs(T) @ np.abs(T).T)) + 2.0 ** -53 * float(np.linalg.norm(G)))
    s = proven_spectral_norm(G)
    if s is None:
        return None
    return float(np.nextafter(np.sqrt(np.nextafter(np.nextafter(s + error, np.inf), np.inf)), np.inf))


#: Flops of pulled-back convolutions the default sampled lower bound of a chain may spend (a few seconds).
LOWER_BOUND_WORK = 1.0e10
#: The fewest inputs the capped sampled lower bound tries.
MIN_LOWER_BOUND_SAMPLES = 16


def chain_lower_bound(network: Network, chain: ConvChain, samples: int = 256, seed: int = 0, scale: float = 1.0,
                      batch: int = 64, output_map=None, work: float | None = LOWER_BOUND_WORK) -> float:
    """:func:`lipsdp.bounds.sampled_lower_bound` (l2) of ``network``, read as ``chain``: the same random
    inputs, Jacobians in reverse mode with the convolutions applied as convolutions (:mod:`lipsdp.convops`).

    ``work``: at most this many flops of pulled-back convolutions (None: no cap); ``samples`` is lowered to
    what fits, but never below :data:`MIN_LOWER_BOUND_SAMPLES`.  The inputs are the first ones of the same
    random sequence, so the bound is the full run's over a prefix of its inputs: a lower bound all the same,
    reproducible, and computed in a few seconds on wide, deep chains instead of a quarter of the run.
    """
    rng = np.random.default_rng(seed)
    tail = chain.tail if output_map is None else np.atleast_2d(np.asarray(output_map, np.float64)) @ chain.tail
    if work is not None:
        per_sample = tail.shape[0] * sum(2.0 * layer.weight.size * layer.out_shape[1] * layer.out_shape[2]
                                         for layer in chain.layers)
        samples = min(samples, max(MIN_LOWER_BOUND_SAMPLES, int(work // max(per_sample, 1.0))))
    best, done = 0.0, 0
    while done < samples:
        k = min(batch, samples - done)
        x = scale * rng.standard_normal((k, network.input_dim))
        J = _chain_jacobians(chain, tail, x)
        value = np.linalg.norm(J[np.all(np.isfinite(J), axis=(1, 2))], 2, axis=(1, 2))
        best = max(best, float(value.max(initial=0.0)))
        done += k
    return best


def _chain_jacobians(chain: ConvChain, tail: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``tail @ d(last activation)/dx`` at the inputs ``x`` (``(b, n0)``), shape ``(b, q, n0)``.

    Channel-major arrays throughout (:mod:`lipsdp.convops`): values ``(C, b, H, W)``, the pulled-back rows
    ``(C, b, q, H, W)``.
    """
    b, q = len(x), tail.shape[0]
    h = x.reshape(b, *chain.layers[0].in_shape).transpose(1, 0, 2, 3)
    slopes = []
    for layer in chain.layers:
        pre = convops.conv(h, layer.weight, layer.pad)
        if layer.bias is not None:
            pre += np.asarray(layer.bias, np.float64).reshape(layer.out_shape)[:, None]
        flat = pre.transpose(1, 0, 2, 3).reshape(b, -1)  # the activations read (batch, C H W)
        phi = activation_function(layer.activation_op.function)
        slopes.append(phi.derivative(flat, layer.activation_op).reshape(b, *layer.out_shape).transpose(1, 0, 2, 3))
        h = phi.evaluate(flat, layer.activation_op).reshape(b, *layer.out_shape).transpose(1, 0, 2, 3)
    C, H, W = chain.layers[-1].out_shape
    G = np.broadcast_to(tail.reshape(q, C, H, W).transpose(1, 0, 2, 3)[:, None], (C, b, q, H, W))
    for layer, slope in zip(reversed(chain.layers), reversed(slopes)):
        G = G * slope[:, :, None]
        C, H, W = layer.out_shape
        back = convops.conv_transpose(G.reshape(C, b * q, H, W), layer.weight, layer.pad, layer.in_shape[1:])
        G = back.reshape(layer.in_shape[0], b, q, *layer.in_shape[1:])
    return G.transpose(1, 2, 0, 3, 4).reshape(b, q, -1)
