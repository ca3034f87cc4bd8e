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
need to be of the right order.  This module measures the gains by finite differences of the network
along a few orthonormal input directions at a few random points (a lower estimate: LipSDP's optimum
covers every activation pattern, which random inputs may not reach) and caps each composed bound at
:data:`HEADROOM` times the measured gain.  Where the composed bounds are within that factor of the
measured gains nothing changes.
"""

from __future__ import annotations

import numpy as np

from lipsdp.reductions import preconditioning_scales

#: A scale is at most this factor times the measured gain (an upper estimate of LipSDP's optimum, which
#: can lie well above the sampled gain: a depth-20 LDL^T stack certifies at 85 times its sampled gain).
HEADROOM = 2.0 ** 4
#: Random base points, and input directions at each (at most the input dimension).
SAMPLES, DIRECTIONS = 2, 16
#: Finite-difference step, relative to the input's scale (the network is piecewise smooth; a step that
#: crosses a kink still gives a secant, which is as good a scale).
STEP = 1e-5


def sampled_gains(network, nodes, samples: int = SAMPLES, directions: int = DIRECTIONS, seed: int = 0,
                  output_map=None) -> dict[int, float]:
    """``{node: largest ||J_node U||_2 over the samples}`` with ``U`` orthonormal input directions.

    A lower estimate of each node's Lipschitz constant from the input (exact on the directions
    taken when ``directions`` >= the input dimension and no kink is crossed).  The output node is
    included, read through ``output_map`` when given.  Non-finite values (an implicit layer without
    an equilibrium at a sample) are left out; a node with no finite value gets 0.
    """
    rng = np.random.default_rng(seed)
    n0 = network.input_dim
    k = min(n0, directions)
    x = rng.standard_normal((samples, n0))
    U = np.linalg.qr(rng.standard_normal((n0, k)))[0] if k < n0 else np.eye(n0)
    moved = x[:, None, :] + STEP * U.T[None, :, :]
    values = network.node_values(np.concatenate([x, moved.reshape(-1, n0)]))
    gains = {}
    for node in set(nodes) | {network.output}:
        v = np.asarray(values[node], dtype=np.float64).reshape(samples * (k + 1), -1)
        if node == network.output and output_map is not None:
            v = v @ np.atleast_2d(output_map).T
        diff = (v[samples:].reshape(samples, k, -1) - v[:samples, None, :]) / STEP  # (samples, k, size): (J U)^T
        norms = [np.linalg.norm(d, 2) for d in diff if np.all(np.isfinite(d))]
        gains[node] = float(max(norms)) if norms else 0.0
    return gains


def gain_scales(network, lifting, output_map=None, base=preconditioning_scales):
    """A ``scales`` callable for :class:`~lipsdp.reductions.Precondition`: ``base``'s scales, except that
    where ``base`` falls back to the composed norm bounds (no start point: not a chain) of an l2 LMI, each
    bound is capped at :data:`HEADROOM` times the measured gain of its block (the larger of the
    activation's input and output: a ReLU block that is off at every sample keeps its input's gain) and
    the total at that of the output.  Any other ``base`` (a test's or an experiment's substitute for
    the default) is returned as it is."""
    if base is not preconditioning_scales:
        return base

    def scales(lmi, block_scale, trivial, **kwargs):
        block_scale, total, start = base(lmi, block_scale, trivial, **kwargs)
        if start is not None or lmi.n_in != 1 or not np.isfinite(total) or total <= 0:
            return block_scale, total, start
        nodes = [b.node for b in lifting.blocks[1:]]
        inputs = [network.parents(n)[0] if network.parents(n) else n for n in nodes]
        gains = sampled_gains(network, nodes + inputs, output_map=output_map)
        measured = np.array([1.0] + [max(gains[n], gains[p]) for n, p in zip(nodes, inputs)])
        capped = np.where(measured > 0, np.minimum(block_scale, HEADROOM * measured), block_scale)
        capped[0] = block_scale[0]
        out = gains[network.output]
        return capped, float(min(total, HEADROOM * out)) if out > 0 else total, None

    return scales


__all__ = ["HEADROOM", "gain_scales", "sampled_gains"]
