"""Facts about where an LMI's terms sit, computed once for every LMI that shares its index arrays.

An LMI and its congruent copies (:meth:`~lipsdp.lmi.LMIProblem.preconditioned`), and the solved LMI
that :mod:`lipsdp.reuse` builds from the verified one, share the arrays ``rows``, ``cols`` and ``var``
of their terms; only the values differ.  Facts that depend on the indices alone (which layer each
term belongs to, the last block of each variable) are then the same for all of them.  On a deep wide
net each is a pass or a sort over tens of millions of terms that the layer-by-layer start, the layer
sweeps and the solver would otherwise each repeat (:class:`lipsdp.chain.BlockChain`).
"""

from __future__ import annotations

import weakref

_FACTS: dict = {}


def shared(lmi, name: str, starts, make):
    """``make()`` for ``lmi``, or the value already made for an LMI with the same index arrays.

    Parameters
    ----------
    lmi : LMIProblem
    name : str
        Which fact.
    starts : sequence of int
        The block offsets the fact is computed over (a view may treat the LMI as one block).
    make : callable
        Computes the fact from ``lmi``'s ``rows``, ``cols``, ``var``, blocks, ``n_var`` and ``n_in`` only.
    """
    arrays = (lmi.rows, lmi.cols, lmi.var)
    key = (name, *(id(a) for a in arrays), tuple(int(s) for s in starts),
           tuple(b.start for b in lmi.blocks), lmi.n_var, lmi.n_in)
    found = _FACTS.get(key)
    if found is not None and all(ref() is a for ref, a in zip(found[0], arrays)):
        return found[1]
    value = make()
    try:
        refs = tuple(weakref.ref(a) for a in arrays)
    except TypeError:  # not weak-referenceable (lists): no sharing
        return value
    _FACTS[key] = (refs, value)
    weakref.finalize(lmi.rows, _FACTS.pop, key, None)  # the facts go with the LMI's arrays
    return value
