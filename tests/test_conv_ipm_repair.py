"""The verification's supply repair (lipsdp.conv_lmi.repair_layer) adds the least proving ``eta`` within 2x.

Each layer's repaired input supply becomes the previous layer's output supply, whose block has only its own
margin to absorb the excess: with a 100x grid of ``eta`` a trained 32-channel x 2-convolution net of the
issue-19 grid failed on its first layer (the second layer's supply came out 2.7e-5 above the solver's, the
first block's margin was 8e-6); with the least ``eta`` within 2x it verifies (docs/math.md §7.4.1)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla

torch = pytest.importorskip("torch")

from lipsdp.conv_lmi import (_abs_matrix, _sym, _terms, layer_matrix, prove_negative_definite,  # noqa: E402
                             repair_layer, solve_chain, tail_gain)

from test_conv_ipm import chain_of, cnn  # noqa: E402


def least_supply(B, P1, P2, lam, X_out):
    ci = B.Eu.shape[0]
    M0 = layer_matrix(B, P1, P2, np.zeros((ci, ci)), X_out, lam)
    u = np.flatnonzero(B.Eu.sum(axis=0))
    rest = np.setdiff1d(np.arange(B.n), u)
    Lc = sla.cho_factor(-M0[np.ix_(rest, rest)])
    return _sym(M0[np.ix_(u, u)] + M0[np.ix_(u, rest)] @ sla.cho_solve(Lc, M0[np.ix_(rest, u)]))


def test_repair_adds_the_least_proving_eta_within_a_factor_two():
    chain, blocks = chain_of(cnn(3, 2, size=5, seed=1), 5)
    sol = solve_chain(chain, blocks)
    _, X_out = tail_gain(chain, sol["Y"])
    k = len(blocks) - 1
    B, P1, P2, lam = blocks[k], _sym(sol["P1"][k]), _sym(sol["P2"][k]), np.maximum(sol["lam"][k], 0.0)
    S = least_supply(B, P1, P2, lam, X_out)
    scale = float(np.abs(S).max())
    X_in = repair_layer(B, P1, P2, lam, X_out, scalar=False)
    assert X_in is not None
    used = float(np.mean(np.diag(X_in - S))) / scale
    fine = 1e-13 * 2.0 ** np.arange(40)

    def proves(eta):
        X = S + eta * scale * np.eye(len(S))
        return prove_negative_definite(layer_matrix(B, P1, P2, X, X_out, lam), _abs_matrix(B, P1, P2, X, X_out, lam),
                                       _terms(B))

    least = next(eta for eta in fine if proves(eta))
    assert used <= 2.0 * least * (1 + 1e-6), (used, least)
