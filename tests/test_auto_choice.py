"""``auto`` by preference (``lipsdp.solvers.choose``) picks exactly what the former hand-written rule picked.

The former rule (``get_backend``'s if-chain, ``_open_source_order``, ``CompletionIPM.preferred`` and the
cost estimates as they stood before each backend stated its own preference, with the completion method's
estimate through the dense inverses added since) is frozen below, verbatim in its decisions, and compared
with the new ``choose``/``get_backend``/``fallback`` on a spread of LMIs, with and without a licensed MOSEK.
"""

from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from lipsdp import Network
from lipsdp.bounds import node_lipschitz
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.pipeline import _scales
from lipsdp.scaling import chain_scales
from lipsdp.solvers import BACKENDS, MOSEK, LMIShape, choose, fallback, fitting, get_backend, usable
from lipsdp.solvers.chordal_ import ChordalIPM
from lipsdp.solvers.completion_ import CompletionIPM
from lipsdp.solvers.row_basis import fits
from lipsdp.solvers.ipm_ import LowRankIPM


# -- the former rule, frozen ------------------------------------------------------------------------
def _old_dense_cost(lmi):
    return 25.0 * float(lmi.n) ** 3 + float(lmi.n_var) ** 3 + 2e7


def _old_layout(lmi):
    if getattr(lmi, "factors", None) is None or not lmi.blocks or len(lmi.blocks) < 3:
        return None
    sizes = np.array([b.stop - b.start for b in lmi.blocks])
    which = lmi.block_of
    const = lmi.const.tocoo()
    kr, kc = which(const.row), which(const.col)
    last = lmi.chain_layers()
    if last is None or np.any(np.abs(kr - kc) > 1):
        return None
    clique_of_var = np.maximum(last, 1)
    R, iu, iw, _, fvar = lmi.factors
    Rc = sp.coo_matrix(R)
    rlo = np.full(R.shape[0], len(sizes), dtype=np.int64)
    rhi = np.zeros(R.shape[0], dtype=np.int64)
    np.minimum.at(rlo, Rc.row, which(Rc.col))
    np.maximum.at(rhi, Rc.row, which(Rc.col))
    k = clique_of_var[np.asarray(fvar)]
    for rows in (np.asarray(iu), np.asarray(iw)):
        used = rlo[rows] <= rhi[rows]
        if np.any(used & ((rlo[rows] < k - 1) | (rhi[rows] > k))):
            return None
    return sizes, clique_of_var


def _old_chordal_cost(lmi):
    layout = _old_layout(lmi)
    if layout is None:
        return None
    sizes, clique_of_var = layout
    counts = np.bincount(clique_of_var, minlength=len(sizes))
    chordal = 0.0
    for k in range(1, len(sizes)):
        g = float(counts[k] + (sizes[k] * (sizes[k] + 1) // 2 if k < len(sizes) - 1 else 0))
        t = g + sizes[k - 1] * (sizes[k - 1] + 1) / 2
        chordal += 3.0 * g ** 3 + 8.0 * t * t + 2e7
    return chordal, _old_dense_cost(lmi)


def _old_completion_cost(lmi):
    sizes = np.array([b.stop - b.start for b in lmi.blocks], dtype=np.float64) if lmi.blocks else \
        np.array([float(lmi.n)])
    r = float(lmi.factors[0].shape[0])
    band = float(np.sum(sizes ** 2) + 2.0 * np.sum(sizes[1:] * sizes[:-1]))
    span = float(np.max(sizes[:-1] + sizes[1:])) if len(sizes) > 1 else float(sizes[0])
    terms, m = float(len(lmi.factors[3])), float(lmi.n_var)
    return 2.0 * r * band * 9 + 3 * 2.0 * r * r * span + m ** 3 / 3 + 12.0 * terms ** 2


def _old_completion_inverse_cost(lmi):
    """The completion method's estimate where its iteration goes through the dense inverses."""
    sizes = np.array([b.stop - b.start for b in lmi.blocks], dtype=np.float64)
    n, w, m, t = float(lmi.n), float(np.mean(sizes)), float(lmi.n_var), float(len(lmi.factors[3]))
    npr = float(np.sum(sizes[1:]))
    return 1.7 * (33.0 * n * n * w + 6.0 * n * npr * w + 2.0 * npr * npr * w + m ** 3 / 3 + 40.0 * t * t)


def _old_completion_preferred(lmi, chordal_cost):
    if lmi.factors is None or lmi.start is None:
        return False
    inverses = fits(lmi)  # since the dense inverses (trained 784-32x64-10: completion, 784-16x64-10: chordal)
    cost = _old_completion_inverse_cost(lmi) if inverses else _old_completion_cost(lmi)
    return (cost <= 3.0e11 and cost <= 1.3 * _old_dense_cost(lmi)
            and (chordal_cost is None or (1.5 if inverses else 2.5) * cost <= chordal_cost))


def _old_open_source_order(n, free_multipliers=False):
    if free_multipliers:
        return ["sdpa", "clarabel", "scs", "cvxopt"]
    if n is not None and n > 600:
        return ["scs", "cvxopt", "sdpa", "clarabel"]
    return ["cvxopt", "sdpa", "scs", "clarabel"]


def _old_auto(n=None, free_multipliers=False, factored=False, single_input=False, lmi=None):
    if MOSEK.license_status()[0]:
        return "mosek"
    order = _old_open_source_order(n, free_multipliers)
    cost = _old_chordal_cost(lmi) if lmi is not None and factored and not free_multipliers else None
    if lmi is not None and factored and not free_multipliers and \
            _old_completion_preferred(lmi, None if cost is None else cost[0]):
        order = ["completion"] + order
    elif cost is not None and cost[0] < cost[1] and cost[0] <= 2.0e11:
        order = ["chordal"] + order
    elif factored and not free_multipliers and (n is None or n <= 3000):
        order = ["ipm"] + order
    elif single_input and not free_multipliers and n is not None and n > 3000:
        order = ["fo"] + order
    for choice in order:
        if BACKENDS[choice].is_installed():
            return choice
    raise AssertionError("nothing installed")


def _old_for(lmi):
    return _old_auto(n=lmi.n, free_multipliers=not bool(lmi.nonneg.all()), factored=lmi.factors is not None,
                     single_input=lmi.n_in == 1, lmi=lmi)


# -- a spread of LMIs -------------------------------------------------------------------------------
def _net(sizes, function="relu", params=None, seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    return Network.sequential(weights, activation=function, params=params or {})


def _prepared(sizes, function="relu", params=None, norm="l2", start=True, sweeps=0):
    """The LMI that certify hands a backend (input-reduced for l2, preconditioned), with or without its start."""
    net = _net(sizes, function, params)
    lifting = lift(net)
    lifting = lifting.reduce_input() if norm == "l2" else lifting
    omap = np.array([[1.0, -1.0] + [0.0] * (sizes[-1] - 2)]) if norm == "linf" else None
    lmi = build_lmi(lifting, output_map=omap, norm=norm)
    lips = node_lipschitz(net)
    scales, total, hint = _scales(lmi, np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]]),
                                  lips[net.output], sweeps=sweeps)
    return replace(lmi, start=hint if start else None).preconditioned(scales, total)[0]


CASES = {
    "shallow": lambda: _prepared((4, 8, 8, 2)),
    "shallow_no_start": lambda: _prepared((4, 8, 8, 2), start=False),
    "one_layer": lambda: _prepared((5, 7, 3)),
    "deep_narrow": lambda: _prepared((16,) + (32,) * 8 + (4,)),
    "deep_narrow_no_start": lambda: _prepared((16,) + (32,) * 8 + (4,), start=False),
    "very_deep": lambda: _prepared((8,) + (16,) * 40 + (4,)),
    "very_deep_no_start": lambda: _prepared((8,) + (16,) * 40 + (4,), start=False),
    "shallow_wide": lambda: _prepared((784, 256, 256, 10)),
    "wide_n_over_600": lambda: _prepared((20, 400, 400, 10), start=False),
    "wide_n_over_3000": lambda: _prepared((64,) + (800,) * 4 + (10,)),
    "groupsort": lambda: _prepared((4, 6, 6, 2), "groupsort", {"group_size": 2}),
    "linf": lambda: _prepared((4, 6, 6, 3), norm="linf"),
    "linf_deep": lambda: _prepared((4,) + (10,) * 6 + (3,), norm="linf"),
    "linear": lambda: build_lmi(lift(Network.sequential([np.arange(12.0).reshape(3, 4)]))),
    "unfactored": lambda: replace(_prepared((4, 8, 8, 2)), factors=None),
    "unfactored_n_over_600": lambda: replace(_prepared((20, 400, 400, 10), start=False), factors=None),
    "unfactored_n_over_3000": lambda: replace(_prepared((64,) + (800,) * 4 + (10,), start=False), factors=None),
}


@pytest.fixture(scope="module")
def lmis():
    return {name: make() for name, make in CASES.items()}


@pytest.fixture(params=[False, True], ids=["no_mosek", "mosek_licensed"])
def mosek(request, monkeypatch):
    if request.param:
        monkeypatch.setattr(MOSEK, "is_installed", classmethod(lambda cls: True))
        monkeypatch.setattr(MOSEK, "license_status", classmethod(lambda cls: (True, "licensed")))
    else:
        monkeypatch.setattr(MOSEK, "license_status", classmethod(lambda cls: (False, "not installed")))
    return request.param


@pytest.mark.parametrize("case", list(CASES))
def test_choose_auto_matches_the_former_rule(lmis, mosek, case):
    lmi = lmis[case]
    assert choose("auto", lmi).name == _old_for(lmi)
    # The compatibility wrapper, as the pipeline calls it.
    assert get_backend("auto", n=lmi.n, free_multipliers=not bool(lmi.nonneg.all()),
                       factored=lmi.factors is not None, single_input=lmi.n_in == 1, lmi=lmi).name == _old_for(lmi)


def test_the_spread_covers_every_choice(lmis, mosek):
    chosen = {choose("auto", lmi).name for lmi in lmis.values()}
    expected = {"mosek"} if mosek else {"completion", "chordal", "ipm", "fo", "cvxopt", "scs", "sdpa"}
    assert expected <= chosen | ({"sdpa"} - set(usable())), chosen


@pytest.mark.parametrize("n", [None, 10, 600, 601, 3000, 3001, 20_000])
@pytest.mark.parametrize("free", [False, True])
@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("single_input", [False, True])
def test_bare_facts_match_the_former_rule(mosek, n, free, factored, single_input):
    facts = dict(n=n, free_multipliers=free, factored=factored, single_input=single_input)
    assert get_backend("auto", **facts).name == _old_auto(**facts)


@pytest.mark.parametrize("case", list(CASES))
def test_fallback_matches_the_former_rule(lmis, mosek, case):
    lmi = lmis[case]
    former = _old_auto(n=lmi.n, free_multipliers=not bool(lmi.nonneg.all()))
    for name in ("ipm", "chordal", "completion", "fo"):
        assert fallback(lmi, BACKENDS[name]()).name == former
    for name in ("scs", "cvxopt", "clarabel"):
        assert fallback(lmi, BACKENDS[name]()) is None
    assert [n for n, cls in BACKENDS.items() if cls.specialised] == ["ipm", "chordal", "completion", "fo"]


def test_memory_estimates_and_fitting(lmis):
    """Each backend's own estimate; ``fitting`` lists the usable ones that apply and fit, smallest first."""
    lmi = lmis["linf"]
    dense, stored = 8 * lmi.n ** 2, 24 * len(lmi.vals)
    r, t = lmi.factors[0].shape[0], len(lmi.factors[3])
    assert BACKENDS["scs"].memory_estimate(lmi) == BACKENDS["fo"].memory_estimate(lmi) == 8 * dense + 4 * stored
    assert BACKENDS["cvxopt"].memory_estimate(lmi) == 12 * dense + 8 * lmi.n_var ** 2 + 4 * stored
    assert BACKENDS["ipm"].memory_estimate(lmi) == 16 * dense + 8 * (2 * r * r + 3 * t * t + 2 * lmi.n_var ** 2) \
        + 6 * stored
    m = lmi.n * (lmi.n + 1) // 2
    assert BACKENDS["clarabel"].memory_estimate(lmi) == 8 * m * m + 8 * dense + 4 * stored
    fits = fitting(lmi, 2**40)
    assert fits == sorted(fits) and "fo" not in [name for _, name in fits]  # fo is l2 only
    assert {name for _, name in fits} == {name for name in usable() if BACKENDS[name].applies(lmi)}
    smallest = fits[0][0]
    assert fitting(lmi, smallest) == [f for f in fits if f[0] <= smallest]


def test_shape_of_an_lmi(lmis):
    shape = LMIShape.of(lmis["groupsort"])
    assert shape.free_multipliers and shape.factored and shape.single_input and not shape.structured
    assert LMIShape.of(shape) is shape
    assert ChordalIPM.preference(lmis["groupsort"]) is None and CompletionIPM.preference(lmis["groupsort"]) is None
    assert LowRankIPM.preference(LMIShape(n=None, factored=True)) is not None


def test_registering_is_one_decorator(lmis):
    """A registered backend is listed, chosen by name, ranked by ``auto`` by its preference, and
    planned with by its own memory estimate."""
    from lipsdp.solvers import Backend, register

    saved = dict(BACKENDS)
    try:
        @register
        class Eager(Backend):
            name = "eager"
            install = "(test double)"
            listing = 50

            @classmethod
            def preference(cls, lmi):
                return 1e9

            @classmethod
            def memory_estimate(cls, lmi):
                return 1

        assert list(BACKENDS)[-2:] == ["fo", "eager"]  # by listing (fo: 8)
        lmi = lmis["shallow"]
        assert choose("eager", lmi).name == choose("auto", lmi).name == "eager"
        assert fitting(lmi, 1) == [(1, "eager")]
        assert fallback(lmi, Eager()) is None  # not specialised
    finally:
        BACKENDS.clear()
        BACKENDS.update(saved)
    assert "eager" not in BACKENDS


@pytest.mark.parametrize("n", [None, 100, 600, 601, 5000])
@pytest.mark.parametrize("free", [False, True])
def test_general_order_read_off_the_preferences(n, free):
    shape = LMIShape(n=n, free_multipliers=free)
    ranked = sorted(((cls.preference(shape), name) for name, cls in BACKENDS.items()
                     if not cls.specialised and cls.auto_rank is not None), key=lambda pair: -pair[0])
    assert [name for _, name in ranked] == _old_open_source_order(n, free)
