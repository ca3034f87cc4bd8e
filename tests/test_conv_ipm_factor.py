"""The block Cholesky of the conv chain's Schur complement (lipsdp.conv_factor) and its use by lipsdp.conv_ipm."""

from __future__ import annotations

import numpy as np
import pytest

from lipsdp import conv_factor


def chain_system(seed=0, sizes=(30, 40, 35), tail=6, cond=1e3):
    """A random SPD block-tridiagonal ``H`` (unit diagonal, condition about ``cond``) as ``(D, C, tails)``, and
    its dense form.  Group ``g`` couples to the last ``tail`` variables of group ``g - 1``."""
    rng = np.random.default_rng(seed)
    m = sum(sizes)
    offsets = np.cumsum((0,) + sizes)
    mask = np.zeros((m, m), dtype=bool)
    for g, n in enumerate(sizes):
        mask[offsets[g]:offsets[g + 1], offsets[g]:offsets[g + 1]] = True
        if g:
            rows, cols = slice(offsets[g], offsets[g + 1]), slice(offsets[g] - tail, offsets[g])
            mask[rows, cols] = mask[cols, rows] = True
    # a sparse-pattern SPD matrix: B B^T restricted to the pattern is not SPD in general, so build it as
    # a sum of SPD pieces that each live inside the pattern (one per block and one per coupling)
    H = np.zeros((m, m))
    for g, n in enumerate(sizes):
        lo = offsets[g] - (tail if g else 0)
        k = offsets[g + 1] - lo
        Q, _ = np.linalg.qr(rng.standard_normal((k, k)))
        H[lo:offsets[g + 1], lo:offsets[g + 1]] += (Q * np.logspace(0, -np.log10(cond), k)) @ Q.T
    assert np.all(H[~mask] == 0)
    d = np.sqrt(np.diag(H))
    H /= np.outer(d, d)
    tails = [None] + [slice(n - tail, n) for n in sizes[:-1]]
    D = [np.tril(H[offsets[g]:offsets[g + 1], offsets[g]:offsets[g + 1]]).copy() for g in range(len(sizes))]
    C = [None] + [H[offsets[g]:offsets[g + 1], offsets[g - 1]:offsets[g]][:, tails[g]].copy()
                  for g in range(1, len(sizes))]
    return D, C, tails, H, offsets


def split(v, offsets):
    return [v[offsets[g]:offsets[g + 1]] for g in range(len(offsets) - 1)]


def test_double_factor_and_product_are_the_dense_ones():
    D, C, tails, H, offsets = chain_system()
    rng = np.random.default_rng(1)
    x = rng.standard_normal(len(H))
    assert np.allclose(np.concatenate(conv_factor.multiply(D, C, tails, split(x, offsets))), H @ x, rtol=0, atol=1e-12)
    b = rng.standard_normal(len(H))
    low = conv_factor.factor([d.copy() for d in D], C, tails, (0.0,))
    got = np.concatenate(conv_factor.substitute(*low, tails, split(b, offsets)))
    ref = np.linalg.solve(H, b)
    assert np.abs(got - ref).max() <= 1e-10 * np.abs(ref).max()


@pytest.mark.parametrize("cond", [1e2, 1e5])
def test_single_factor_refined_to_the_double_residual(cond):
    D, C, tails, H, offsets = chain_system(seed=2, cond=cond)
    b = np.random.default_rng(3).standard_normal(len(H))
    before = [d.copy() for d in D]
    low = conv_factor.single_factor(D, C, tails, [np.zeros(d.shape, np.float32) for d in D])
    assert low is not None and low[0][0].dtype == np.float32
    xs, ok, steps = conv_factor.refine(D, C, tails, low, split(b, offsets))
    x = np.concatenate(xs)
    assert ok and 1 <= steps <= conv_factor.STEPS  # the single solve alone is not enough, a few steps are
    assert np.linalg.norm(b - H @ x) <= conv_factor.RESIDUAL * (np.linalg.norm(b) + np.linalg.norm(x))
    ref = np.linalg.solve(H, b)
    assert np.abs(x - ref).max() <= 1e-9 * cond * np.abs(ref).max()
    assert all(np.array_equal(d, e) for d, e in zip(D, before))  # left as it was: the double factor may need it


def test_refinement_gives_up_on_an_ill_conditioned_system():
    D, C, tails, H, offsets = chain_system(seed=4, cond=1e13)
    low = conv_factor.single_factor(D, C, tails, [np.zeros(d.shape, np.float32) for d in D])
    if low is None:  # the single factor broke down: the caller factors in double precision
        return
    b = np.random.default_rng(5).standard_normal(len(H))
    _, ok, steps = conv_factor.refine(D, C, tails, low, split(b, offsets), steps=2)
    assert not ok and steps == 2


def test_a_failing_block_is_redone_alone_with_more_regularisation():
    """The last block is indefinite by ``1e-12``: ``1e-14`` fails on it, ``1e-11`` factors it; the blocks before
    keep ``1e-14`` (with the spare copy), and the factor is that of ``H + diag(regs)``."""
    D, C, tails, H, offsets = chain_system(seed=6)
    g = len(D) - 1
    n = len(D[g])
    # shift the last block so that the Schur complement of H at it has smallest eigenvalue -1e-12
    first = np.tril(D[0]) + np.tril(D[0], -1).T
    L0 = conv_factor.factor([d.copy() for d in D], C, tails, (0.0,))
    Lg = L0[0][g]
    least = np.linalg.eigvalsh(Lg @ Lg.T)[0]
    D[g][np.diag_indices(n)] -= least + 1e-12
    H[offsets[g]:, offsets[g]:][np.diag_indices(n)] -= least + 1e-12
    with pytest.raises(np.linalg.LinAlgError):
        conv_factor.factor([d.copy() for d in D], C, tails, (1e-14,))
    regs = (1e-14, 1e-11, 1e-8)
    Lf, E = conv_factor.factor([d.copy() for d in D], C, tails, regs, spare=np.empty(max(d.size for d in D)))
    shift = np.full(len(H), 1e-14)
    shift[offsets[g]:] = 1e-11
    b = np.random.default_rng(7).standard_normal(len(H))
    x = np.concatenate(conv_factor.substitute(Lf, E, tails, split(b, offsets)))
    A = H + np.diag(shift)  # nearly singular: the backward error is what a Cholesky solve keeps small
    assert np.linalg.norm(A @ x - b) <= 1e-13 * (np.linalg.norm(b) + np.linalg.norm(A, 2) * np.linalg.norm(x))
    assert np.abs(Lf[0] @ Lf[0].T - first - 1e-14 * np.eye(len(first))).max() <= 1e-13


def test_single_precision_iterations_reach_the_double_bound(monkeypatch):
    """The whole solve with single-precision factors first (forced on a small chain) verifies the bound of the
    double-precision solve to 1e-6 relative, in no more iterations than it plus two."""
    pytest.importorskip("torch")
    from lipsdp import conv_ipm
    from lipsdp.conv_lmi import solve_chain, verify_chain
    from test_conv_ipm import chain_of, cnn

    chain, blocks = chain_of(cnn(4, 3, size=6, seed=3), 6)
    runs = {}
    for name, start in (("double", 10 ** 9), ("single", 0)):
        monkeypatch.setattr(conv_ipm, "SINGLE_FROM", start)
        sol = solve_chain(chain, blocks, "conv-ipm")
        res = verify_chain(chain, blocks, sol)
        assert res.verified, name
        runs[name] = (res.bound, sol["iterations"], sol["single_factors"])
    (double, n_double, s_double), (single, n_single, s_single) = runs["double"], runs["single"]
    assert s_double == 0 and s_single >= 3
    assert abs(single - double) <= 1e-6 * double
    assert n_single <= n_double + 2


def test_earlier_points_come_back_in_the_solution_format():
    """``solve`` returns the last iterates near the optimum before the final one (newest first), each in the
    format :func:`lipsdp.conv_lmi.verify_chain` reads and proven or refused by it like the final one."""
    pytest.importorskip("torch")
    from lipsdp.conv_lmi import solve_chain, verify_chain
    from test_conv_ipm import chain_of, cnn

    chain, blocks = chain_of(cnn(3, 2, size=5, seed=1), 5)
    sol = solve_chain(chain, blocks, "conv-ipm")
    final = verify_chain(chain, blocks, sol)
    assert final.verified and 1 <= len(sol["earlier"]) <= 8
    for point in sol["earlier"]:
        assert set(point) == {"P1", "P2", "lam", "x", "Y", "rho"}
        assert point["rho"] != sol["rho"]
        res = verify_chain(chain, blocks, point)
        if res.verified:  # a less converged point proves about the same bound or a looser one
            assert res.bound >= final.bound * (1 - 1e-3)
