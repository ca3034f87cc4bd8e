"""2-D state-space (Roesser) realisation of a stride-1 convolution (docs/math.md §7.4).

A convolution ``y = K * u`` on the plane, written causally,
``y[i, j] = sum_{a < kh, b < kw} Kc[a, b] u[i - a, j - b]`` with ``Kc`` a ``(C_out, C_in, kh, kw)``
kernel, is the Roesser system

    x_h[i+1, j] = A11 x_h[i, j] + A12 x_v[i, j] + B1 u[i, j]
    x_v[i, j+1] =                 A22 x_v[i, j] + B2 u[i, j]
    y[i, j]     = C1 x_h[i, j]  + C2 x_v[i, j]  + D u[i, j]

with the vertical state ``x_v = (u[i, j-1], ..., u[i, j-kw+1])`` (``C_in (kw - 1)`` entries) and the
horizontal state holding the partial sums of the rows still to come (``C_out (kh - 1)`` entries).  Both
state matrices are nilpotent, so a finitely supported input gives finitely supported states: the
storage sums of docs/math.md §7.4 telescope exactly, whatever the sign of the storage matrices.

Torch's ``conv2d`` is a cross-correlation: ``Kc[a, b] = K[kh-1-a, kw-1-b]`` (:func:`causal_kernel`), and
the causal output at ``(i, j)`` is torch's output with full padding ``(kh-1, kw-1)``; a padding ``p``
reads the window starting at ``kh - 1 - p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Roesser:
    """The matrices of a Roesser system (``A21 = 0``: the vertical state never reads the horizontal one).

    Attributes
    ----------
    A11, A12, A22, B1, B2, C1, C2, D : ndarray
        As in the module docstring; ``n1 = A11.shape[0]``, ``n2 = A22.shape[0]``.
    """

    A11: np.ndarray
    A12: np.ndarray
    A22: np.ndarray
    B1: np.ndarray
    B2: np.ndarray
    C1: np.ndarray
    C2: np.ndarray
    D: np.ndarray

    @property
    def n1(self) -> int:
        return self.A11.shape[0]

    @property
    def n2(self) -> int:
        return self.A22.shape[0]

    @property
    def inputs(self) -> int:
        return self.D.shape[1]

    @property
    def outputs(self) -> int:
        return self.D.shape[0]

    def state_map(self) -> np.ndarray:
        """``F = [[A11, A12, B1], [0, A22, B2]]``: the next states from ``(x_h, x_v, u)``."""
        top = np.hstack([self.A11, self.A12, self.B1])
        bottom = np.hstack([np.zeros((self.n2, self.n1)), self.A22, self.B2])
        return np.vstack([top, bottom])

    def output_map(self) -> np.ndarray:
        """``V = [C1, C2, D]``: the output from ``(x_h, x_v, u)``."""
        return np.hstack([self.C1, self.C2, self.D])


def causal_kernel(weight: np.ndarray) -> np.ndarray:
    """The causal kernel ``Kc`` of torch's cross-correlation kernel ``weight`` (both flipped axes)."""
    return np.ascontiguousarray(np.asarray(weight, dtype=np.float64)[:, :, ::-1, ::-1])


def _shift(blocks: int, size: int, down: bool) -> np.ndarray:
    """Block shift on ``blocks`` blocks of ``size``: down (block m <- m - 1) or up (block m <- m + 1)."""
    return np.kron(np.eye(blocks, k=-1 if down else 1), np.eye(size))


def realise(Kc: np.ndarray) -> Roesser:
    """The Roesser realisation of the causal kernel ``Kc`` (shape ``(C_out, C_in, kh, kw)``)."""
    Kc = np.asarray(Kc, dtype=np.float64)
    co, ci, kh, kw = Kc.shape
    n1, n2 = co * (kh - 1), ci * (kw - 1)
    # r_a = Kc[a, 0] u + [Kc[a, 1] ... Kc[a, kw-1]] x_v: row a of the kernel applied along j
    row_state = [np.hstack([Kc[:, :, a, b] for b in range(1, kw)]) if kw > 1 else np.zeros((co, 0))
                 for a in range(kh)]
    A12 = np.vstack(row_state[1:]) if kh > 1 else np.zeros((0, n2))
    B1 = np.vstack([Kc[:, :, a, 0] for a in range(1, kh)]) if kh > 1 else np.zeros((0, ci))
    B2 = np.vstack([np.eye(ci)] + [np.zeros((ci, ci))] * (kw - 2)) if kw > 1 else np.zeros((0, ci))
    C1 = np.hstack([np.eye(co), np.zeros((co, n1 - co))]) if kh > 1 else np.zeros((co, 0))
    return Roesser(A11=_shift(kh - 1, co, down=False), A12=A12, A22=_shift(kw - 1, ci, down=True),
                   B1=B1, B2=B2, C1=C1, C2=row_state[0], D=Kc[:, :, 0, 0].copy())


def simulate(sys: Roesser, u: np.ndarray) -> np.ndarray:
    """Run ``sys`` on ``u`` (shape ``(C_in, H, W)``) from zero states on the quarter-plane.

    Returns ``y`` of shape ``(C_out, H, W)``; for checks (a Python loop over positions).
    """
    ci, H, W = u.shape
    y = np.zeros((sys.outputs, H, W))
    xh = np.zeros((W, sys.n1))  # x_h[i, j] for the current row i, every column j
    for i in range(H):
        xv = np.zeros(sys.n2)
        nxt = np.zeros_like(xh)
        for j in range(W):
            y[:, i, j] = sys.C1 @ xh[j] + sys.C2 @ xv + sys.D @ u[:, i, j]
            nxt[j] = sys.A11 @ xh[j] + sys.A12 @ xv + sys.B1 @ u[:, i, j]
            xv = sys.A22 @ xv + sys.B2 @ u[:, i, j]
        xh = nxt
    return y
