"""Preconditioning scales from sampled gains, where the composed norm bounds are far too large.

The congruence of :class:`~lipsdp.reductions.Precondition` divides ``rho`` by ``total**2`` and
scales block ``k`` by ``block_scale[k]`` (:meth:`~lipsdp.lmi.LMIProblem.preconditioned`).  On chain
LMIs both come from a layer-by-layer feasible point; on every other graph from the composed norm
bounds, which for residual stacks grow like ``prod_k (1 + ||W_k^T|| ||W_k||)`` while the network, and
LipSDP's optimum, stay near 1 (an SLL or LDL^T stack is 1-Lipschitz).  With a depth-20 SLL stack the
bound is ``2^37`` too large, so the solved ``rho`` is ``2^-74`` in the solver's units and the early
layers' multipliers as small: the interior-point method stops on its absolute gap floor far from the
optimum and the verified bound is poor (docs/math.md §5.3).

Any positive scales give an exact congruence (powers of two), so the scales need no proof; they only
need to be of the right order.  This module measures each block's gain on the linear networks of
LipSDP's relaxation (each neuron's slope one end of its sector, at random: :func:`sampled_gains`), a
lower estimate of the scale the optimum has, and caps each composed bound at :data:`HEADROOM` times
it.  Where the composed bounds are within that factor of the measured gains nothing changes.
"""

from __future__ import annotations

import numpy as np

from lipsdp.bounds import node_jacobian
from lipsdp.constraints import SlopeRestricted, get_constraint
from lipsdp.network import Activation
from lipsdp.reductions import preconditioning_scales

#: A scale is at most this factor times the measured gain: LipSDP's optimum lies above the measured gain,
#: at most a few times for residual stacks of Lipschitz layers (a depth-20 LDL^T stack: 22 times).
HEADROOM = 4.0
#: Random slope patterns (and inputs), and input directions (at most the input dimension).
SAMPLES, DIRECTIONS = 4, 16


def sampled_gains(network, nodes, samples: int = SAMPLES, directions: int = DIRECTIONS, seed: int = 0,
                  output_map=None) -> dict[int, float]:
    """``{node: largest ||J_node U||_2 over the samples}``, ``U`` orthonormal input directions, ``J`` the
    Jacobian of the network with random slopes.

    Every slope-restricted activation takes, neuron by neuron, one end of its sector ``[alpha, beta]``
    at random, ``beta`` with probability 0, ..., 1 over the samples (the linear networks LipSDP's
    relaxation contains, so their norms bound its optimum from below); other nodes (GroupSort, implicit
    layers, ...) their Jacobian at random inputs.  Unlike gains at random inputs these neither vanish
    where ReLUs are off nor where tanh saturates.  The output node is included, read through
    ``output_map`` when given; non-finite samples are left out, and a node with none left gets 0.
    """
    rng = np.random.default_rng(seed)
    n0 = network.input_dim
    k = min(n0, directions)
    U = np.linalg.qr(rng.standard_normal((n0, k)))[0] if k < n0 else np.eye(n0)
    share = np.linspace(0.0, 1.0, samples)  # of the neurons at beta: every one at alpha, ..., every one at beta
    values, jacs = {}, {}
    for n in network.graph.nodes:
        op, parents = network.op(n), network.parents(n)
        if n == network.input:
            values[n] = rng.standard_normal((samples, n0))
            jacs[n] = np.broadcast_to(U, (samples, n0, k))
            continue
        ins, js = [values[p] for p in parents], [jacs[p] for p in parents]
        values[n], jacs[n] = node_jacobian(op, ins, js, [network.op(p).shape for p in parents])
        constraint = get_constraint(op.function) if isinstance(op, Activation) and not op.implicit else None
        if isinstance(constraint, SlopeRestricted):
            size = values[n].shape[1]
            lo, hi = (np.broadcast_to(np.asarray(e, dtype=np.float64), (size,)) for e in constraint.sector(op))
            slopes = np.where(rng.random((samples, size)) < share[:, None], hi, lo)
            jacs[n] = slopes[:, :, None] * js[0]
    gains = {}
    for node in set(nodes) | {network.output}:
        J = np.asarray(jacs[node])
        if node == network.output and output_map is not None:
            J = np.einsum("km,bmn->bkn", np.atleast_2d(output_map), J)
        norms = [np.linalg.norm(j, 2) for j in J if np.all(np.isfinite(j))]
        gains[node] = float(max(norms)) if norms else 0.0
    return gains


def gain_scales(network, lifting, output_map=None, base=preconditioning_scales):
    """A ``scales`` callable for :class:`~lipsdp.reductions.Precondition`: ``base``'s scales, except that
    where ``base`` falls back to the composed norm bounds (no start point: not a chain) of an l2 LMI, each
    bound is capped at :data:`HEADROOM` times the measured gain of its block (the larger of the
    activation's input and output) and the total at that of the output.  Any other ``base`` (a test's or an experiment's substitute for
    the default) is returned as it is."""
    if base is not preconditioning_scales:
        return base

    def scales(lmi, block_scale, trivial, **kwargs):
        block_scale, total, start = base(lmi, block_scale, trivial, **kwargs)
        if start is not None or lmi.n_in != 1 or not np.isfinite(total) or total <= 0:
            return block_scale, total, start
        nodes = [b.node for b in lifting.blocks[1:]]
        inputs = [network.parents(n)[0] if network.parents(n) else n for n in nodes]
        try:
            gains = sampled_gains(network, nodes + inputs, output_map=output_map)
        except (TypeError, ValueError, ArithmeticError, np.linalg.LinAlgError):
            return block_scale, total, start  # a node without a Jacobian rule: the scales are only a heuristic
        measured = np.array([1.0] + [max(gains[n], gains[p]) for n, p in zip(nodes, inputs)])
        capped = np.where(measured > 0, np.minimum(block_scale, HEADROOM * measured), block_scale)
        capped[0] = block_scale[0]
        out = gains[network.output]
        return capped, float(min(total, HEADROOM * out)) if out > 0 else total, None

    return scales


__all__ = ["HEADROOM", "gain_scales", "sampled_gains"]
