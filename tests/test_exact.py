"""The exact (rational) test of docs/math.md §10, step 4, as referee of the floating-point one.

``lipsdp.exact`` rebuilds ``-M(x)`` from the weights, sectors and multipliers in
integers and decides definiteness without rounding.  These tests check that
(1) every point ``lipsdp.verify`` certifies is exactly negative definite
(the float test never accepts what the exact one rejects, on the plain
and on the preconditioned LMI), (2) ``rho`` just
below the repaired value is rejected, and (3) raw first-order solver points,
which are slightly infeasible, are rejected.
"""

from __future__ import annotations

import inspect
import math
import time
from fractions import Fraction

import numpy as np
import pytest

import lipsdp
from lipsdp.exact import (_decide_by_certificates, bareiss_positive_definite, exact_certificate_check,
                          exact_matrix, exact_negative_definite)
from lipsdp.lifting import lift
from lipsdp.lmi import build_lmi
from lipsdp.network import Activation, Affine, Input, Network
from lipsdp.solvers import get_backend
from lipsdp.verify import best_rho, rigorous_negative_definite, verify

NETS = [  # (sizes, activation): sectors [0,1], [0.1,1] (alpha*beta != 0), [-1,1], [0,1/4], SiLU's, ELU's
    ((3, 5, 2), "relu"),
    ((4, 6, 6, 2), "tanh"),
    ((4, 8, 3), "leaky_relu"),
    ((3, 6, 6, 2), "abs"),
    ((5, 7, 3), "sigmoid"),
    ((4, 6, 2), "silu"),
    ((3, 5, 5, 5, 2), "elu"),
]


def net_of(sizes, activation="relu", seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((b, a)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])]
    params = {"negative_slope": 0.1} if activation == "leaky_relu" else None
    return Network.sequential(weights, activation=activation, params=params)


def solved(net, formulation="neuron", solver="cvxopt", **lmi_kwargs):
    lifting = lift(net)
    lmi = build_lmi(lifting, formulation, **lmi_kwargs)
    res = get_backend(solver).solve(lmi)
    assert res.x is not None, res.message
    return lifting, lmi, res


def verified_point(net, formulation="neuron", solver="cvxopt"):
    """Solve and verify as the pipeline does: on the power-of-two preconditioned LMI.

    Returns ``(lifting, lmi, pre, v, x)``: ``lmi`` the plain LMI, ``pre`` its
    preconditioned copy with ``x_lmi = v * x_pre`` (exact), ``x`` the verified
    point in ``lmi``'s variables (``verify(pre, raw, scale=v).x``).
    """
    from lipsdp.bounds import node_lipschitz

    lifting = lift(net)
    lmi = build_lmi(lifting, formulation)
    lips = node_lipschitz(net)
    pre, v = lmi.preconditioned(np.array([1.0] + [lips[b.node] for b in lifting.blocks[1:]]), lips[net.output])
    res = get_backend(solver).solve(pre)
    ver = verify(pre, res.x, scale=v)
    assert ver.verified, ver.message
    return lifting, lmi, pre, v, ver.x


def float_test(lmi, pre, v, x):
    """The pipeline's float test of ``x`` (``lmi``'s variables), on the plain and the preconditioned LMI."""
    return rigorous_negative_definite(lmi, x)[0], rigorous_negative_definite(pre, x / v)[0]


def with_rho(rho, y):
    return np.concatenate([[rho], y])


def both(lmi, x, lifting, **kw):
    """The exact decision by both methods; they must agree."""
    a = exact_negative_definite(lmi, x, lifting, method="auto", **kw)
    b = exact_negative_definite(lmi, x, lifting, method="bareiss", **kw)
    assert a == b, f"certificate path says {a}, Bareiss says {b}"
    return a


# -- verified points ----------------------------------------------------------
@pytest.mark.parametrize("sizes,activation", NETS)
@pytest.mark.parametrize("formulation", ["neuron", "layer"])
def test_verified_points_are_exactly_negative_definite(sizes, activation, formulation):
    lifting, lmi, pre, v, x = verified_point(net_of(sizes, activation), formulation)
    assert lmi.n <= 30
    assert float_test(lmi, pre, v, x)[1]  # verified where it was verified ...
    assert both(lmi, x, lifting)  # ... and exactly true


@pytest.mark.parametrize("sizes,activation", NETS[:4])
def test_rho_below_the_repaired_value_is_rejected(sizes, activation):
    lifting, lmi, pre, v, x = verified_point(net_of(sizes, activation, seed=1))
    y = x[1:]
    rho = best_rho(lmi, y)
    for factor in (1 - 1e-4, 1 - 1e-6, 1 - 1e-9):
        x = with_rho(rho * factor, y)
        assert not any(float_test(lmi, pre, v, x))
        assert not both(lmi, x, lifting), f"rho * {factor} accepted"
    # ... and just above it is accepted (the exact test is sharper than the float one)
    assert both(lmi, with_rho(rho * (1 + 1e-9), y), lifting)


@pytest.mark.parametrize("seed", range(len(NETS)))
def test_float_test_never_accepts_what_the_exact_test_rejects(seed):
    """Scan rho across the boundary and perturb the multipliers: float-accepted => exactly true."""
    sizes, activation = NETS[seed % len(NETS)]
    lifting, lmi, pre, v, x = verified_point(net_of(sizes, activation, seed=seed))
    rng = np.random.default_rng(seed)
    y0 = x[1:]
    accepted = rejected = float_accepted = 0
    for trial in range(6):
        y = y0 * (1 + (0.0 if trial == 0 else 10.0 ** -rng.integers(2, 9)) * rng.standard_normal(y0.shape))
        y = np.maximum(y, 0)
        rho = best_rho(lmi, y)
        if rho is None:
            continue
        for d in (-1e-3, -1e-8, -1e-12, 0.0, 1e-12, 1e-10, 1e-8, 1e-6):
            x = with_rho(rho * (1 + d), y)
            ok_float = any(float_test(lmi, pre, v, x))
            ok_exact = both(lmi, x, lifting)
            assert ok_exact or not ok_float, f"UNSOUND float test: accepted rho(1{d:+g}) that is not definite"
            accepted += ok_exact
            rejected += not ok_exact
            float_accepted += ok_float
    assert accepted and rejected and float_accepted  # the scan straddled the boundary


# -- raw solver points ----------------------------------------------------------
def test_raw_scs_points_are_rejected_when_infeasible():
    """docs/math.md §10: SCS points have lambda_max(M) ~ +1e-5; they are not certificates."""
    infeasible = 0
    for seed in range(4):
        lifting, lmi, raw = solved(net_of((6, 12, 12, 3), "relu", seed=seed), solver="scs")
        M = lmi.matrix(raw.x)
        top = np.linalg.eigvalsh(M)[-1]
        if top > 1e-9 * np.abs(M).max():  # clearly infeasible, far above rounding
            infeasible += 1
            assert not both(lmi, raw.x, lifting, check_signs=False)
        # the repaired point is a certificate
        v = verify(lmi, raw.x)
        assert v.verified and both(lmi, v.x, lifting)
    assert infeasible >= 1, "no raw SCS point was infeasible: the test did not test anything"


def test_raw_interior_point_agrees_with_the_eigenvalue_sign():
    """Interior-point points sit on the boundary; where the sign is clear, the exact test follows it."""
    checked = 0
    for seed in range(3):
        lifting, lmi, raw = solved(net_of((4, 8, 8, 2), "tanh", seed=seed), solver="clarabel")
        M = lmi.matrix(raw.x)
        top = np.linalg.eigvalsh(M)[-1]
        exact = both(lmi, raw.x, lifting, check_signs=False)
        if abs(top) > 1e-11 * np.abs(M).max():
            assert exact == (top < 0), (top, exact)
            checked += 1
    assert checked


# -- other LMIs: rounded liftings, output maps, l_inf -------------------------
def bn_net(seed=5):
    """Linear -> diagonal (BatchNorm) -> ReLU -> Linear: the lifted rows are rounded products."""
    rng = np.random.default_rng(seed)
    net = Network()
    x = net.add(Input("x", "Input", (3,)))
    a = net.add(Affine("l0", "Linear", (4,), weight=rng.standard_normal((4, 3))), [x])
    b = net.add(Affine("bn", "BatchNorm1d", (4,), weight=np.diag(rng.random(4) + 0.1)), [a])
    h = net.add(Activation("r", "ReLU", (4,), function="relu"), [b])
    net.add(Affine("l1", "Linear", (2,), weight=rng.standard_normal((2, 4))), [h])
    return net


def test_rounded_lifting_is_recomputed_exactly():
    lifting, lmi, res = solved(bn_net())
    assert not lifting.exact
    v = verify(lmi, res.x)
    assert v.verified and both(lmi, v.x, lifting)
    y = v.x[1:]
    assert not both(lmi, with_rho(best_rho(lmi, y) * (1 - 1e-8), y), lifting)


def test_rational_walk_is_the_float_walk_in_other_arithmetic():
    """exact.py lifts with lifting's own walk: on rounded rows the rational rows lie within the float rows'
    error bounds, and they are exactly the float rows where those are exact."""
    from lipsdp.exact import RationalRows
    from lipsdp.lifting import traverse

    lifting = lift(bn_net())
    pre, out = traverse(lifting.network, RationalRows(), lifting.blocks)

    def dense(rows):
        A = np.full((len(rows), lifting.n), Fraction(0), dtype=object)
        for i, r in enumerate(rows):
            for j, v in r.items():
                A[i, j] = v
        return A

    for P, E, R in zip(lifting.pre + [lifting.output], lifting.pre_err + [lifting.output_err], pre + [out]):
        exact_float_rows = np.vectorize(Fraction, otypes=[object])(P.toarray())
        diff = np.abs((dense(R) - exact_float_rows).astype(float))
        assert np.all(diff <= E.toarray())
        assert np.all((E.toarray() > 0) | (diff == 0))
    assert not lifting.exact


def test_residual_network():
    rng = np.random.default_rng(2)
    from lipsdp.network import Add
    net = Network()
    x = net.add(Input("x", "Input", (3,)))
    a = net.add(Affine("fc1", "Linear", (5,), weight=rng.standard_normal((5, 3))), [x])
    h = net.add(Activation("r", "ReLU", (5,), function="relu"), [a])
    b = net.add(Affine("fc2", "Linear", (3,), weight=rng.standard_normal((3, 5))), [h])
    s = net.add(Add("add", "Add", (3,)), [x, b])
    net.add(Affine("out", "Linear", (2,), weight=rng.standard_normal((2, 3))), [s])
    lifting, lmi, res = solved(net)
    v = verify(lmi, res.x)
    assert v.verified and both(lmi, v.x, lifting)
    assert not both(lmi, with_rho(v.rho * (1 - 1e-6), v.x[1:]), lifting)


def test_output_map_must_be_passed_along():
    net = net_of((4, 6, 3), "relu", seed=3)
    cmap = np.array([[1.0, -1.0, 0.0]])
    lifting, lmi, res = solved(net, output_map=cmap)
    v = verify(lmi, res.x)
    assert v.verified
    assert both(lmi, v.x, lifting, output_map=cmap)
    with pytest.raises(ValueError, match="does not match"):
        exact_negative_definite(lmi, v.x, lifting)  # C^T C of the full output is not this LMI's


def test_linf_lmi():
    if "norm" not in inspect.signature(build_lmi).parameters:
        pytest.skip("build_lmi has no l_inf form in this checkout")
    net = net_of((3, 5, 2), "relu", seed=4)
    lifting, lmi, res = solved(net, output_map=np.array([[1.0, 0.0]]), norm="linf")
    v = verify(lmi, res.x)
    assert v.verified
    assert both(lmi, v.x, lifting, output_map=np.array([[1.0, 0.0]]))
    x = v.x.copy()
    x[: lmi.n_in] *= 1 - 1e-3
    assert not both(lmi, x, lifting, output_map=np.array([[1.0, 0.0]]))


# -- refusals -------------------------------------------------------------------
def test_wrong_lmi_or_point_is_refused():
    lifting, lmi, res = solved(net_of((3, 5, 2)))
    x = verify(lmi, res.x).x
    pre, _ = lmi.preconditioned(np.array([1.0, 3.0]), 7.0)
    with pytest.raises(ValueError, match="does not match"):
        exact_negative_definite(pre, x, lifting)
    layer = build_lmi(lifting, "layer")
    with pytest.raises(ValueError):
        exact_matrix(layer, np.ones(layer.n_var + 1), lifting)
    with pytest.raises(ValueError):
        exact_negative_definite(lmi, x[:-1], lifting)
    with pytest.raises(ValueError, match="unknown method"):
        exact_negative_definite(lmi, x, lifting, method="eig")
    other = lift(net_of((3, 6, 2)))
    with pytest.raises(ValueError):
        exact_negative_definite(lmi, x, other)


def test_nonfinite_and_negative_multipliers():
    lifting, lmi, res = solved(net_of((3, 5, 2)))
    x = verify(lmi, res.x).x
    for bad in (np.nan, np.inf):
        z = x.copy()
        z[2] = bad
        assert not exact_negative_definite(lmi, z, lifting)
    z = x.copy()
    z[1] = -z[1]  # the S-procedure needs t >= 0: never a certificate, whatever M says
    assert not exact_negative_definite(lmi, z, lifting)
    both(lmi, z, lifting, check_signs=False)  # the matrix question alone: the two methods agree


def test_non_slope_activations_are_not_implemented():
    rng = np.random.default_rng(0)
    net = Network()
    x = net.add(Input("x", "Input", (3,)))
    a = net.add(Affine("l0", "Linear", (4,), weight=rng.standard_normal((4, 3))), [x])
    h = net.add(Activation("gs", "GroupSort", (4,), function="groupsort", params={"group_size": 2}), [a])
    net.add(Affine("l1", "Linear", (2,), weight=rng.standard_normal((2, 4))), [h])
    lifting = lift(net)
    lmi = build_lmi(lifting)
    with pytest.raises(NotImplementedError, match="slope-restricted"):
        exact_negative_definite(lmi, np.ones(lmi.n_var), lifting)


# -- certificates -----------------------------------------------------------------
def test_exact_certificate_check():
    net = net_of((4, 7, 7, 2), "tanh", seed=6)
    cert = lipsdp.certify(net, solver="cvxopt", lower_bound_samples=0)
    assert cert.verified
    assert exact_certificate_check(cert, net)
    assert exact_certificate_check(cert.to_dict(), net)

    edited = cert.to_dict()
    edited["multipliers"][0] *= 0.99  # smaller rho with the same T: no longer a certificate
    edited["bound"] *= 0.995
    assert not exact_certificate_check(edited, net)

    edited = cert.to_dict()
    edited["bound"] = math.sqrt(cert.multipliers[0]) * (1 - 1e-9)  # bound^2 < rho
    assert not exact_certificate_check(edited, net)

    assert not exact_certificate_check(cert, net_of((4, 7, 7, 2), "tanh", seed=7))  # another network
    assert not exact_certificate_check({**cert.to_dict(), "bound": None}, net)
    assert not exact_certificate_check({**cert.to_dict(), "multipliers": cert.multipliers[:-1]}, net)


# -- the integer core -------------------------------------------------------------
def test_bareiss_on_small_integer_matrices():
    assert bareiss_positive_definite([[2, 1], [1, 2]])
    assert not bareiss_positive_definite([[1, 2], [2, 1]])
    assert not bareiss_positive_definite([[1, 1], [1, 1]])  # singular: a zero minor
    assert not bareiss_positive_definite([[0, 0], [0, 0]])
    assert not bareiss_positive_definite([[1, 0, 0], [0, 1, 0], [0, 0, -1]])
    assert bareiss_positive_definite([[7]])
    # Hilbert matrix times lcm: positive definite, condition number ~1e13 at n = 9
    n = 9
    L = math.lcm(*range(1, 2 * n))
    H = [[L // (i + j + 1) for j in range(n)] for i in range(n)]
    assert bareiss_positive_definite([r[:] for r in H])
    assert _decide_by_certificates([r[:] for r in H]) in (True, None)
    # the last LDL^T pivot, by plain rational elimination (independent of Bareiss)
    F = [[Fraction(v) for v in r] for r in H]
    for k in range(n - 1):
        for i in range(k + 1, n):
            f = F[i][k] / F[k][k]
            F[i] = [a - f * b for a, b in zip(F[i], F[k])]
    pivot = F[n - 1][n - 1]
    assert pivot > 0
    for delta, pd in ((math.floor(pivot) + 1, False), (math.ceil(pivot), False), (math.ceil(pivot) - 1, True)):
        Hd = [r[:] for r in H]
        Hd[n - 1][n - 1] -= delta
        assert bareiss_positive_definite(Hd) == pd, delta
        assert _decide_by_certificates([r[:] for r in H[:-1]] + [H[-1][:-1] + [H[-1][-1] - delta]]) in (pd, None)


def test_bareiss_and_certificates_agree_with_eigenvalues():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(1, 7))
        B = rng.integers(-3, 4, size=(n, n))
        A = B + B.T + int(rng.integers(-2, 8)) * np.eye(n, dtype=np.int64)
        lam = np.linalg.eigvalsh(A.astype(float))[0]
        rows = A.astype(object).tolist()
        got = bareiss_positive_definite([r[:] for r in rows])
        cert = _decide_by_certificates([r[:] for r in rows])
        assert cert is None or cert == got
        if abs(lam) > 1e-9:
            assert got == (lam > 0), (A, lam)
            checked += 1
    assert checked > 200


def test_timing_at_n48():
    """Bareiss at n = 48 takes on the order of a second in pure Python; the certificate path is far cheaper."""
    lifting, lmi, res = solved(net_of((16, 16, 16, 4), "leaky_relu"))
    assert lmi.n == 48
    x = verify(lmi, res.x).x
    t0 = time.perf_counter()
    assert exact_negative_definite(lmi, x, lifting, method="auto")
    t_auto = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert exact_negative_definite(lmi, x, lifting, method="bareiss")
    t_bareiss = time.perf_counter() - t0
    assert t_auto < 2.0 and t_bareiss < 20.0, (t_auto, t_bareiss)
