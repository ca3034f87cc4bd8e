"""The completion method's margin stop (:meth:`lipsdp.solvers.completion_._Completion.margin`, docs/math.md §8.12).

Near the optimum of a deep, badly conditioned chain ``S(y) = -M(y)`` comes within rounding of singular
before the gap closes, and the verification then has to raise ``rho`` by more than the later iterates
gain (784-64x64-10: iterates 29-31 verified 5e-6 to 5e-5 above their objectives, iterate 28 5e-7).

- the margin ``1 / (tr(S^{-1}) max S_ii)`` is a lower estimate of ``lambda_min(S) / max S_ii``, within ``n``;
- a solve stopped there (forced here by a huge ``margin_roundings``) says so, and its point still verifies,
  inside the sandwich and within the stopping gap of the full solve's bound;
- small well-conditioned nets never reach the floor: they stop on the gap, as before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lipsdp
from lipsdp.chain import BlockChain
from lipsdp.solvers.completion_ import CompletionIPM, PatternChain, _Completion

from test_completion import _dense, _solved_lmi


def _model(seed=0, width=12, depth=8):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(20, width), torch.nn.LeakyReLU(0.02)]
    for _ in range(depth - 1):
        layers += [torch.nn.Linear(width, width), torch.nn.LeakyReLU(0.02)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 3)).double()


def test_the_margin_is_a_lower_estimate_of_the_smallest_eigenvalue():
    lmi = _solved_lmi((5, 7, 7, 7, 6, 3), function="leaky_relu", params={"alpha": 0.1})
    chain = PatternChain(BlockChain(lmi))
    state = _Completion(lmi, chain, CompletionIPM.default_tol, None, 0.0, False, CompletionIPM.max_iters,
                        CompletionIPM.step_fraction)
    y, _ = state.start()
    margins = []
    for f in (1.0, 1.5, 4.0):  # S(f y) = S(y) - (f - 1) M_var(y): three points inside
        flat = chain.assemble(y * f)
        S = _dense(chain, flat)
        exact = np.linalg.eigvalsh(S)[0] / np.max(np.diag(S))
        margins.append(state.margin(flat, chain.selected_inverse(chain.factor(flat))))
        assert exact / len(S) * (1 - 1e-9) <= margins[-1] <= exact * (1 + 1e-9)


def test_a_solve_stopped_at_the_margin_still_verifies(monkeypatch):
    model = _model()
    messages = []
    real = CompletionIPM.solve

    def spy(self, lmi, **kwargs):
        result = real(self, lmi, **kwargs)
        messages.append(result.message)
        return result

    monkeypatch.setattr(CompletionIPM, "solve", spy)
    full = lipsdp.certify(model, solver="completion", input_shape=(20,), lower_bound_samples=0)
    assert full.verified and full.solver_status == "optimal"  # small nets stop on the gap
    assert "converged" in messages[-1]
    monkeypatch.setattr(_Completion, "margin_roundings", 1e300)  # every margin is under the floor
    early = lipsdp.certify(model, solver="completion", input_shape=(20,), lower_bound_samples=0)
    assert early.verified, early.message
    assert "roundings of singular" in messages[-1] and early.solver_iterations < full.solver_iterations
    # Stopped at a relative gap under margin_gap (1e-4 on rho): the bound within it of the full solve's.
    assert full.bound * (1 - 1e-9) <= early.bound <= full.bound * (1 + _Completion.margin_gap)
    x = torch.randn(60, 20, dtype=torch.float64)
    lower = max(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(model, xi), ord=2).item() for xi in x)
    upper = np.prod([torch.linalg.matrix_norm(m.weight.detach(), ord=2).item() for m in model
                     if isinstance(m, torch.nn.Linear)])
    assert lower <= early.bound <= upper
