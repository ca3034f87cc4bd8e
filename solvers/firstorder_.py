"""First-order descent on the exact ``rho(T)`` (MATH.md sections 1.4 and 8.4), in torch.

For fixed multipliers the best ``rho`` is an eigenvalue problem:

.. math::

    \\rho(T) = \\lambda_{\\max}\\big(P - Q R^{-1} Q^T\\big)
    \\quad\\text{when}\\quad R \\prec 0 ,

with ``M(0, T) = [[P, Q], [Q^T, R]]`` (input block first).  *Every* ``T`` with
``R < 0`` certifies ``sqrt(rho(T))``, so this backend needs no interior-point
machinery: it runs Adam on ``log T`` (keeping ``T > 0``), backs off when a step
leaves the region ``R < 0``, and returns the best iterate.  Its answer is never
trusted either: :mod:`lipsdp.verify` re-derives and proves it.  Each iteration
costs one Cholesky factorisation of the hidden block and one symmetric
eigenvalue problem of the (input-reduced) input block; it runs on CUDA when
torch sees a GPU, on the CPU otherwise.

l2 only (``rho`` as the single input variable); use SCS for l_inf.
"""

from __future__ import annotations

import time

import numpy as np

from lipsdp.solvers.base import Backend, SolveResult


class FirstOrder(Backend):
    name = "fo"
    modules = ("torch",)
    install = "pip install torch"
    family = "first_order"
    default_tol = 1e-6
    max_iters = 3000

    def solve(self, lmi, *, time_limit=None, tol=None, verbose=False):
        import torch

        t0 = time.perf_counter()
        if lmi.n_in != 1:
            return SolveResult("solver_error", None, None, 0.0, message="the fo backend certifies l2 bounds only")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dt = torch.float64
        n, n0 = lmi.n, lmi.input_dim
        B = lmi.basis().tocoo()
        idx = torch.tensor(np.vstack([B.row, B.col]), dtype=torch.int64)
        basis = torch.sparse_coo_tensor(idx, torch.tensor(B.data, dtype=dt), B.shape, device=device,
                                        check_invariants=False).coalesce()
        const = torch.tensor(lmi.const.toarray(), dtype=dt, device=device)
        free = torch.tensor(~lmi.nonneg[1:], device=device)

        def rho_of(y):
            x = torch.cat([torch.zeros(1, dtype=dt, device=device), y])
            M = const + torch.sparse.mm(basis, x[:, None]).reshape(n, n).T  # basis is column-major vec
            P, Q, R = M[:n0, :n0], M[:n0, n0:], M[n0:, n0:]
            if R.shape[0] == 0:
                return torch.linalg.eigvalsh(P)[-1]
            Lc, info = torch.linalg.cholesky_ex(-R)
            if int(info) != 0:
                return None
            Z = torch.linalg.solve_triangular(Lc, Q.T, upper=False)
            return torch.linalg.eigvalsh(P + Z.T @ Z)[-1]

        def unpack(theta):
            # sign-constrained multipliers as exp(theta) > 0; free ones as they are
            return torch.where(free, theta, torch.exp(theta))

        # Start: all multipliers equal (the preconditioned LMI makes 1 the natural scale).
        start, best_rho = None, np.inf
        for kappa in 2.0 ** np.arange(-4, 21):
            theta = torch.full((lmi.n_var - 1,), float(np.log(kappa)), dtype=dt, device=device)
            theta = torch.where(free, torch.zeros_like(theta), theta)
            r = rho_of(unpack(theta))
            if r is not None and float(r) < best_rho:
                start, best_rho = theta, float(r)
            elif start is not None:
                break
        if start is None:
            return SolveResult("infeasible", None, None, time.perf_counter() - t0,
                               message="no uniform multiplier made the hidden block negative definite")
        theta = start.clone().requires_grad_(True)
        best_theta = start.clone()
        lr = 0.05
        opt = torch.optim.Adam([theta], lr=lr)
        history, it, status = [best_rho], 0, "optimal_inaccurate"
        tol = tol or self.default_tol
        for it in range(1, self.max_iters + 1):
            if time_limit and time.perf_counter() - t0 > time_limit:
                status = "time_limit"
                break
            opt.zero_grad()
            r = rho_of(unpack(theta))
            if r is None:  # stepped out of R < 0: go back to the best point with a smaller step
                with torch.no_grad():
                    theta.copy_(best_theta)
                lr *= 0.5
                for group in opt.param_groups:
                    group["lr"] = lr
                if lr < 1e-6:
                    break
                continue
            value = float(r.detach())
            if value < best_rho:
                best_rho, best_theta = value, theta.detach().clone()
            history.append(best_rho)
            if len(history) > 200 and history[-200] - best_rho <= tol * abs(best_rho):
                status = "optimal_inaccurate"
                break
            r.backward()
            opt.step()
            if it % 100 == 0:
                lr *= 0.7
                for group in opt.param_groups:
                    group["lr"] = lr
                if verbose:
                    print(f"fo: iteration {it}: rho {best_rho:.8g}")
        y = unpack(best_theta).detach().cpu().numpy()
        x = np.concatenate([[best_rho], y])
        return SolveResult(status, x, best_rho, time.perf_counter() - t0, it, f"{status} after {it} iterations",
                           extras={"device": device, "history": history[::10]})
