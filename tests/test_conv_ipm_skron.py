"""The blocked :func:`lipsdp.conv_schur.skron` equals the batched formula it replaced, entry by entry,
and the dense ``tr(G^T E_i G X K^T E_j K Z)`` it stands for (docs/math.md §7.4.1)."""

import numpy as np
import pytest

from lipsdp.conv_schur import skron, triangle


def skron_batched(pairs, t1, t2):
    """The previous implementation: one ``r2 x r2`` product per row pair ``(a, b)``."""
    ia, ib, wa = t1
    ic, id_, wc = t2
    r2 = pairs[0][1].shape[1]
    left = np.concatenate([np.stack([c * A[ib], c * A[ia]], axis=2) for c, A, _ in pairs], axis=2)
    right = np.concatenate([np.stack([A2[ia], A2[ib]], axis=1) for _, _, A2 in pairs], axis=1)
    W = np.matmul(np.concatenate([left, right.transpose(0, 2, 1)], axis=2),
                  np.concatenate([right, left.transpose(0, 2, 1)], axis=1))
    h = W.reshape(len(ia), r2 * r2)[:, ic * r2 + id_]
    h *= wa[:, None]
    h *= wc[None, :]
    return h


def basis(r):
    ia, ib, _ = triangle(r)
    out = np.zeros((len(ia), r, r))
    out[np.arange(len(ia)), ia, ib] = 1.0
    out[np.arange(len(ia)), ib, ia] = 1.0
    return out


@pytest.mark.parametrize("r1, r2, K", [(1, 1, 1), (3, 5, 2), (5, 3, 4), (8, 8, 6), (16, 2, 3), (2, 16, 1), (33, 32, 3), (40, 40, 2)])
def test_skron_equals_batched_formula(r1, r2, K):
    rng = np.random.default_rng(r1 * 100 + r2 * 10 + K)
    pairs = [(rng.choice([-1.0, 1.0, 0.5]), rng.standard_normal((r1, r2)), rng.standard_normal((r1, r2)))
             for _ in range(K)]
    new, old = skron(pairs, triangle(r1), triangle(r2)), skron_batched(pairs, triangle(r1), triangle(r2))
    assert new.shape == old.shape == (r1 * (r1 + 1) // 2, r2 * (r2 + 1) // 2)
    np.testing.assert_allclose(new, old, rtol=1e-12, atol=1e-12 * np.abs(old).max())


def test_skron_is_the_congruence_schur_block():
    """``h_ij = sum_t,u s_t s_u tr(G_t^T E_i G_t X K_u^T E_j K_u Z)`` from matrices, on a small case."""
    rng = np.random.default_rng(0)
    n, r1, r2 = 7, 3, 4
    Gs = [(1.0, rng.standard_normal((r1, n))), (-1.0, rng.standard_normal((r1, n)))]
    Ks = [(1.0, rng.standard_normal((r2, n)))]
    X = (lambda A: A @ A.T)(rng.standard_normal((n, n)))
    Z = (lambda A: A @ A.T)(rng.standard_normal((n, n)))
    pairs = [(s * t, G @ X @ K.T, G @ Z @ K.T) for s, G in Gs for t, K in Ks]
    Ei, Ej = basis(r1), basis(r2)
    dense = np.array([[sum(s * t * np.trace(G.T @ E @ G @ X @ K.T @ F @ K @ Z) for s, G in Gs for t, K in Ks)
                       for F in Ej] for E in Ei])
    np.testing.assert_allclose(skron(pairs, triangle(r1), triangle(r2)), dense, rtol=1e-10,
                               atol=1e-10 * np.abs(dense).max())
