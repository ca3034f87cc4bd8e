r"""``lipsdp.compose`` (module :mod:`lipsdp.composition`): a model certified as a composition of blocks.

For ``f = f_k o ... o f_1`` with ``||f_i(x) - f_i(y)|| <= L_i ||x - y||`` (all in l2),
``L(f) <= L_1 L_2 ... L_k`` (submultiplicativity; docs/math.md §8.2).  Each block is certified on its own:

* a model lipsdp loads (module, file, :class:`~lipsdp.network.Network`) by the SDP and its verification
  (:func:`lipsdp.pipeline.certify`);
* a block with a ``lipsdp_bound(certify, **options)`` hook by that hook: the attention blocks and
  :class:`~lipsdp.nn.attention.Residual` of :mod:`lipsdp.nn.attention` (docs/math.md §11).

The product is rounded upwards, and the certificate lists every block's bound.  A composition is looser
than one SDP on the whole model but scales to models too large for one LMI, and it covers blocks the SDP
has no constraint for.  With torch modules, the sampled lower bound of the composed model (autograd) is
checked against the product: a violation raises, never passes silently.
"""

from __future__ import annotations

import copy
import math
import os
import time

import numpy as np

from lipsdp.certificate import SCHEMA_VERSION, UNVERIFIED, VERIFIED, Certificate
from lipsdp.errors import LipSDPError, NotVerifiedError, UnsupportedLayerError
from lipsdp.io.checkpoint import find_in_checkpoint
from lipsdp.io.safe_pickle import load_torch_file
from lipsdp.pipeline import certify, load_model
from lipsdp.split import compose_bounds
from lipsdp.verification import check_claims, recheck
from lipsdp.wellposed import attach_well_posedness, implicit_nodes

__all__ = ["check_composed", "compose", "sampled_module_lower_bound"]


def _blocks(model, split_at) -> list:
    """The blocks: ``model`` itself when a list, else an ``nn.Sequential`` cut before each index of ``split_at``."""
    if isinstance(model, (list, tuple)):
        if split_at is not None:
            raise LipSDPError("split_at cuts an nn.Sequential; a list of blocks is already cut")
        blocks = list(model)
    else:
        if split_at is None or not hasattr(model, "__getitem__"):
            raise LipSDPError("compose needs a list of blocks, or an nn.Sequential with split_at=[i, j, ...]")
        n = len(model)
        cuts = sorted(set(int(i) for i in split_at))
        if not cuts or cuts[0] <= 0 or cuts[-1] >= n:
            raise LipSDPError(f"split_at indices must lie in 1..{n - 1} (cuts between the {n} layers), got {split_at}")
        edges = [0, *cuts, n]
        blocks = [model[a:b] for a, b in zip(edges, edges[1:])]
    if not blocks:
        raise LipSDPError("compose needs at least one block")
    return blocks


def _record(cert: Certificate) -> dict:
    """The hook record (:mod:`lipsdp.nn.attention`) of an SDP certificate."""
    return {"bound": cert.bound, "trivial_bound": cert.trivial_bound, "verified": cert.verified,
            "method": cert.verification.get("method"), "message": cert.message, "network": cert.network}


def _certificate(record: dict) -> Certificate:
    """A block's certificate from its hook's record."""
    status = VERIFIED if record["verified"] and record["bound"] is not None else UNVERIFIED
    return Certificate(record["bound"] if status == VERIFIED else None, status, norm="l2", solver="closed-form",
                       solver_status="optimal", message=record["message"], trivial_bound=record["trivial_bound"],
                       verification={"method": record["method"], **({"heads": record["heads"]} if "heads" in record
                                                                    else {})},
                       network=record["network"])


def _solve(block, options: dict) -> Certificate:
    """An SDP block's certificate: :func:`lipsdp.certify` (:func:`check_composed` passes a re-check instead)."""
    return certify(block, lower_bound_samples=0, **options)


def _block_record(block, index: int, options: dict, hook_options: dict, sdp=_solve) -> dict:
    """One block's bound record: its own hook (attention, residual) or the SDP's certificate (``sdp``)."""
    def inner(b, **kw):
        kw.pop("index", None)
        return _block_record(b, index, options, {**hook_options, **kw}, sdp)

    if hasattr(block, "lipsdp_bound"):
        if index > 0 and hook_options.get("box") is not None and type(block).__name__.startswith("Dot"):
            raise UnsupportedLayerError([(type(block).__name__, index, "a local (box) bound applies to the first "
                                          "block only: the inputs of later blocks are not known to lie in the box")])
        return block.lipsdp_bound(inner, index=index, **hook_options)
    return _record(sdp(block, options))


def _certify_block(block, index: int, options: dict, hook_options: dict, sdp=_solve) -> Certificate:
    """One block's certificate: the SDP's own, or one built from the block's hook."""
    if hasattr(block, "lipsdp_bound"):
        return _certificate(_block_record(block, index, options, hook_options, sdp))
    return sdp(block, options)


def _recording(store: list):
    """:func:`_solve` that also keeps each SDP certificate it makes, in call order, for ``lipsdp verify``."""
    def sdp(block, options):
        cert = _solve(block, options)
        store.append(cert.to_dict())
        return cert
    return sdp


def sampled_module_lower_bound(fn, shape, samples: int = 32, scales=(0.1, 1.0, 3.0), seed: int = 0,
                               box=None) -> float:
    """Largest spectral norm of the Jacobian of the torch function ``fn`` over random inputs of ``shape``
    (``N(0, scale^2)`` for each scale, or uniform in ``box = (lo, hi)``): a lower bound on its constant."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    size = int(np.prod(shape))
    for k in range(samples):
        if box is None:
            x = scales[k % len(scales)] * torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            lo, hi = (torch.tensor(np.broadcast_to(b, shape), dtype=torch.float64) for b in box)
            x = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(lambda z: fn(z.reshape((1, *shape))).reshape(-1), x.reshape(-1))
        best = max(best, float(torch.linalg.matrix_norm(J.reshape(-1, size), 2)))
    return best


def _lower_bound(blocks, shape, samples, box) -> float | None:
    """The composed modules' sampled lower bound (None when a block is not a torch module or no shape is known)."""
    if not samples or shape is None or not all(callable(b) and hasattr(b, "parameters") for b in blocks):
        return None
    import torch

    chain = torch.nn.Sequential(*[copy.deepcopy(b) for b in blocks]).double().eval()
    return sampled_module_lower_bound(chain, tuple(shape), samples=samples, box=box)


def _block_shapes(blocks, input_shape) -> list:
    """Each block's input shape (no batch axis), by one forward pass of the torch blocks on zeros; the given
    shape for the first block and None for the others where a block is not a torch module."""
    shapes = [None if input_shape is None else tuple(input_shape)] + [None] * (len(blocks) - 1)
    if input_shape is None or not all(callable(b) and hasattr(b, "parameters") for b in blocks):
        return shapes
    import torch

    x = torch.zeros((1, *input_shape), dtype=torch.float64)
    with torch.no_grad():
        for k, b in enumerate(blocks[:-1]):
            x = copy.deepcopy(b).double()(x)  # a copy: the caller's module keeps its dtype
            shapes[k + 1] = tuple(x.shape[1:])
    return shapes


def _input_shape(summary: dict):
    """The input shape a block's certificate records: ``(seq_len, dim)`` for attention, ``(input_dim,)`` for
    an SDP block, the inner block's for a residual; None when unknown."""
    if summary.get("seq_len") and summary.get("dim"):
        return summary["seq_len"], summary["dim"]
    if summary.get("input_dim"):
        return (summary["input_dim"],)
    return _input_shape(summary["inner"]) if isinstance(summary.get("inner"), dict) else None


def compose(model, *, split_at=None, input_shape=None, seq_len: int | None = None, box=None,
            lower_bound_samples: int = 32, **certify_options) -> Certificate:
    """Certify ``model`` as the product of its blocks' certified l2 bounds (docs/math.md §8.2).

    Parameters
    ----------
    model : list of blocks, or torch.nn.Sequential
        The blocks in the order they are applied (modules, model files, Networks, attention blocks);
        an ``nn.Sequential`` is cut at ``split_at``.
    split_at : list of int, optional
        Indices of the ``nn.Sequential`` where a new block starts.
    input_shape : tuple of int, optional
        The model's input shape without batch axis: each SDP block is loaded with the shape a forward pass of
        the torch blocks gives it (a block that starts with a convolution needs it), and the sampled lower
        bound draws inputs of this shape (default: the first block's input, e.g. ``(seq_len, dim)`` for
        attention).
    seq_len : int, optional
        Tokens per sequence, for attention blocks (their bound grows with it).
    box : (lo, hi), optional
        Input box of a dot-product attention first block (a local bound, valid inside the box only).
    lower_bound_samples : int
        Random inputs for the sampled lower bound of the composed torch model (0 to skip).
    **certify_options
        Passed to :func:`lipsdp.certify` for the blocks the SDP certifies (``solver``, ``formulation``...).

    Returns
    -------
    Certificate
        ``bound`` (the rounded-up product) only if every block verified; ``network["blocks"]`` lists each
        block's bound, status and method.
    """
    if certify_options.get("norm", "l2") != "l2":
        raise LipSDPError("compose multiplies l2 bounds only (the blocks' norms must chain)")
    t0 = time.perf_counter()
    blocks = _blocks(model, split_at)
    hook = {"seq_len": seq_len, "box": box}
    shapes = _block_shapes(blocks, input_shape)  # so a block that starts with a convolution loads
    stored = [[] for _ in blocks]  # each block's SDP certificates, for lipsdp verify (composition_check)
    parts = [_certify_block(b, k, {**certify_options, **({"input_shape": shape} if shape else {})}, hook,
                            _recording(stored[k])) for k, (b, shape) in enumerate(zip(blocks, shapes))]
    records = [{"index": k, "block": type(b).__name__, "bound": c.bound, "status": c.status, "solver": c.solver,
                "trivial_bound": c.trivial_bound, "method": c.verification.get("method"), "message": c.message,
                "input_shape": None if shape is None else list(shape), "certificates": stored[k]}
               for k, (b, c, shape) in enumerate(zip(blocks, parts, shapes))]
    trivials = [c.trivial_bound for c in parts]
    trivial = compose_bounds(trivials) if None not in trivials else None
    network = {"blocks": records, "domain": "global" if box is None else {"box": [np.asarray(b).tolist() for b in box]},
               "split_at": None if split_at is None else sorted(set(int(i) for i in split_at)), "seq_len": seq_len}
    common = dict(norm="l2", formulation=certify_options.get("formulation", "neuron"), solver="compose",
                  trivial_bound=trivial, network=network)
    failed = next((c for c in parts if not c.verified), None)
    if failed is not None:
        k = parts.index(failed)
        return Certificate(None, failed.status or UNVERIFIED, message=f"block {k} was not verified: {failed.message}",
                           timings={"total": time.perf_counter() - t0}, **common)
    bound = compose_bounds([c.bound for c in parts])
    if input_shape is None:
        input_shape = _input_shape(parts[0].network)
    lower = _lower_bound(blocks, input_shape, lower_bound_samples, box)
    if lower is not None and lower > bound:
        raise LipSDPError(f"the composed bound {bound:.9g} lies below the sampled lower bound {lower:.9g}: "
                          "a block's certificate is not for the function torch computes (report this)")
    return Certificate(bound, VERIFIED, lower_bound=lower, solver_status="optimal",
                       message=f"verified: product of {len(parts)} certified blocks "
                               f"({' x '.join(f'{c.bound:.6g}' for c in parts)}); sound, looser than one SDP",
                       verification={"method": "composition", "blocks": len(parts)},
                       timings={"total": time.perf_counter() - t0}, **common)



# ---------------------------------------------------------------------------------------------------
# ``lipsdp verify`` of a composed certificate: every block proven again, the product recomputed.


def _rechecked(queue: list, index: int):
    """The ``sdp`` of :func:`_block_record` for a re-check: the block's next stored certificate, proven
    again on the block (:func:`lipsdp.verification.recheck`, as ``lipsdp verify`` does for a whole model)."""
    def sdp(block, options):
        if not queue:
            raise LipSDPError(f"the certificate stores no SDP certificate for block {index} (written before "
                              "composed certificates kept them, or edited): compose again")
        stored = Certificate.from_dict(queue.pop(0))
        check_claims(stored)
        network, _ = load_model(block, input_shape=options.get("input_shape"),
                                trust_pickle=options.get("trust_pickle", False))
        network.validate()
        try:
            margins = recheck(stored, network)
        except LipSDPError as exc:
            raise (NotVerifiedError if isinstance(exc, NotVerifiedError) else LipSDPError)(
                f"block {index}: {exc}") from None
        if margins is not None and implicit_nodes(network):
            attach_well_posedness(network, stored, stored.formulation, stored.norm)
            if not stored.network["well_posedness"].get("proved"):
                raise NotVerifiedError(f"block {index} does not verify: {stored.network['well_posedness']['message']}")
        return stored
    return sdp


def _composed_claims(cert) -> None:
    version = cert.schema_version
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= SCHEMA_VERSION:
        raise LipSDPError(f"the certificate's schema_version {version!r} is not one this lipsdp reads")
    if (cert.verification or {}).get("method") != "composition":
        raise LipSDPError("not a composed certificate (lipsdp.compose)")
    bound = cert.bound
    if not cert.verified or isinstance(bound, bool) or not isinstance(bound, (int, float)) \
            or not math.isfinite(bound) or bound < 0:
        raise LipSDPError(f"the certificate holds no verified finite bound ({bound!r}; edited or corrupt)")
    if not isinstance(cert.network.get("blocks"), list):
        raise LipSDPError("the certificate lists no blocks (edited or corrupt)")


def _module(model, trust_pickle: bool):
    """The torch module (or list of blocks) a composed certificate is about; a path holds a whole-module pickle."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    kind, content, _ = find_in_checkpoint(load_torch_file(os.fspath(model), trust_pickle=trust_pickle),
                                          os.fspath(model))
    if kind != "module":
        raise LipSDPError(f"{model}: a composed certificate is re-checked on the saved module itself "
                          "(torch.save(model)), not on a state dict")
    return content


def check_composed(cert, model, *, trust_pickle: bool = False) -> Certificate:
    """Re-check a composed certificate (:func:`compose`) against ``model``, without solving anything.

    ``model`` is what was composed: the ``nn.Sequential`` (cut again at the stored ``split_at``; a path to
    its whole-module pickle) or the list of blocks.  Every block is proven again: an SDP block's stored
    certificate by the rigorous re-check of ``lipsdp verify`` (:func:`lipsdp.verification.recheck`: its
    multipliers on the block's own LMI, the block's SHA-256 matched), a block with a hook (attention,
    residual) by its hook on the stored ``seq_len`` and box, with the SDP certificates it asks for re-checked
    in the same way.  Each block's stated bound must cover what is proven, and the certificate's bound the
    product of the proven bounds rounded up (docs/math.md §8.2).  Raises
    :class:`~lipsdp.errors.LipSDPError` otherwise; returns the certificate with ``verification.rechecked``.
    """
    if isinstance(cert, dict):
        cert = Certificate.from_dict(cert)
    _composed_claims(cert)
    t0 = time.perf_counter()
    summary, records = cert.network, cert.network["blocks"]
    model = _module(model, trust_pickle)
    blocks = _blocks(model, summary.get("split_at") if not isinstance(model, (list, tuple)) else None)
    if len(blocks) != len(records):
        raise LipSDPError(f"the certificate lists {len(records)} blocks; the model cuts into {len(blocks)}")
    domain = summary.get("domain")
    box = tuple(np.asarray(b, dtype=np.float64) for b in domain["box"]) if isinstance(domain, dict) else None
    hook = {"seq_len": summary.get("seq_len"), "box": box}
    proven = []
    for k, (block, record) in enumerate(zip(blocks, records)):
        queue = list(record.get("certificates") or [])
        shape = record.get("input_shape")
        options = {"trust_pickle": trust_pickle, **({"input_shape": tuple(shape)} if shape else {})}
        part = _certify_block(block, k, options, hook, _rechecked(queue, k))
        claim = record.get("bound")
        if not part.verified or isinstance(claim, bool) or not isinstance(claim, (int, float)) \
                or not part.bound <= claim:
            raise NotVerifiedError(f"the certificate does not verify: block {k}'s stated bound {claim!r} is below "
                              f"what is proven again ({part.bound!r}; edited?)")
        if queue:
            raise LipSDPError(f"block {k} stores more SDP certificates than it uses (edited or corrupt)")
        proven.append(part.bound)
    product = compose_bounds(proven)
    if not product <= cert.bound:
        raise NotVerifiedError(f"the certificate does not verify: its bound {cert.bound!r} is below the product of "
                          f"the blocks' proven bounds ({product!r}; edited?)")
    cert.verification = {**cert.verification, "rechecked": True, "recheck_margin": cert.bound - product,
                         "recheck_seconds": time.perf_counter() - t0}
    return cert
