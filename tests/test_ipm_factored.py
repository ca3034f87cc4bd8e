"""``--solver ipm`` on the factor rows alone (docs/math.md §8.10).

Before: the dense interior point evaluated ``sum_j y_j F_j`` and ``<F_j, G>`` through the COO basis, two
more sparse copies of every stored entry.  A 784-512-512-10 LeakyReLU net stores 135 million entries: its
solve was refused after two minutes and 15 GB ("needs about 18.3 GiB"), exit 2.  Now both maps come from the
factor rows ``R`` wherever those weigh less than the entries.  Checked here: each map equals the basis's; the
slab products equal ``R``'s; the two paths reach the same optimum; the path is taken where it pays, and its
bound is verified and in the sandwich.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import lipsdp
import lipsdp.solvers.ipm_ as ipm_
from lipsdp.interior import DenseLMI
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.solvers.ipm_ import BasisLMI, FactoredLMI, LowRankIPM, RowSlabs, factored_maps

from conftest import assert_sandwich, torch_lower_bound
from test_ipm import FAMILIES, _random_net


def _lmi(function, params, sizes=(5, 6, 6, 6, 4), reduce=True):
    lifting = lift(_random_net(function, params, seed=3, sizes=sizes))
    return build_lmi(lifting.reduce_input() if reduce else lifting)


@pytest.mark.parametrize("function,params", FAMILIES, ids=[f"{f}-{p}" for f, p in FAMILIES])
def test_maps_equal_the_basis(function, params):
    """The factor rows' maps (and both slab Schur complements) against the basis's."""
    lmi = _lmi(function, params)
    if lmi.factors is None:
        pytest.skip("no factored form for this family")
    basis, rows = DenseLMI(lmi), FactoredLMI(lmi)
    rng = np.random.default_rng(0)
    y = rng.standard_normal(lmi.n_var)
    G = rng.standard_normal((lmi.n, lmi.n))
    G += G.T
    want = basis.linear(y)[0]
    got = rows.linear(y)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())
    np.testing.assert_array_equal(got, got.T)  # the basis gives both triangles one value: so must this
    want = basis.adjoint([G])
    np.testing.assert_allclose(rows.adjoint([G]), want, rtol=0, atol=1e-12 * np.abs(want).max())
    A, B = rng.standard_normal((2, lmi.n, lmi.n + 2))
    X, Z = A @ A.T, B @ B.T
    want = basis.schur(X, Z)
    np.testing.assert_allclose(rows.schur(X, Z), want, rtol=0, atol=1e-11 * np.abs(want).max())
    np.testing.assert_allclose(BasisLMI(lmi).schur(X, Z), want, rtol=0, atol=1e-11 * np.abs(want).max())


@pytest.mark.parametrize("rows,fill", [(3, 0.0), (3, 2.0), (256, 0.1), (1, 0.5)],
                         ids=["dense slabs", "sparse slabs", "default", "row by row"])
def test_slab_products_are_the_products_of_r(monkeypatch, rows, fill):
    monkeypatch.setattr(RowSlabs, "ROWS", rows)
    monkeypatch.setattr(RowSlabs, "FILL", fill)
    rng = np.random.default_rng(1)
    R = sp.random(40, 23, density=0.2, random_state=2, format="lil")
    R[6:9] = 0.0  # empty rows and, with 3 rows a slab, an empty slab
    R = R.tocsr()
    R.eliminate_zeros()
    slabs = RowSlabs(R)
    X, Y = rng.standard_normal((23, 5)), rng.standard_normal((40, 4))
    np.testing.assert_allclose(slabs.times(X), R @ X, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(slabs.t_times(Y), R.T @ Y, rtol=1e-13, atol=1e-13)


def test_factored_and_basis_paths_reach_the_same_optimum(monkeypatch):
    lmi = _lmi("leaky_relu", {"negative_slope": 0.01}, sizes=(6, 24, 24, 24, 3))
    assert factored_maps(lmi)  # LeakyReLU's p_i p_i^T entries outweigh the rows
    runs = {}
    for path in (True, False):
        monkeypatch.setattr(ipm_, "factored_maps", lambda _lmi, path=path: path)
        res = LowRankIPM().solve(lmi)
        assert res.status in ("optimal", "optimal_inaccurate"), res.message
        runs[path] = res
    assert abs(runs[True].objective - runs[False].objective) <= 1e-6 * abs(runs[False].objective)
    assert abs(runs[True].iterations - runs[False].iterations) <= 2


def test_wide_leaky_relu_net_certifies_on_the_rows(monkeypatch):
    """A 60-96-96-5 LeakyReLU torch model through ``lipsdp.certify``: the factored path is taken (the entries
    are ~96^3, the rows ~96^2), the bound is verified and between the sampled Jacobians and the trivial bound."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(60, 96), torch.nn.LeakyReLU(0.01), torch.nn.Linear(96, 96),
                                torch.nn.LeakyReLU(0.01), torch.nn.Linear(96, 5)).double()
    taken = []
    original = ipm_.factored_maps
    monkeypatch.setattr(ipm_, "factored_maps", lambda lmi: taken.append(original(lmi)) or taken[-1])
    cert = lipsdp.certify(model, solver="ipm", input_shape=(60,), lower_bound_samples=0)
    assert taken and all(taken)
    assert_sandwich(cert, torch_lower_bound(model, 60))
    assert cert.bound < 0.9 * cert.trivial_bound  # the SDP, not a fallback to the product of norms
