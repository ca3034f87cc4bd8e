"""Where the dense preprocessing runs: torch on CUDA when present, numpy otherwise.

The preprocessing of large weight matrices (spectral norms for the trivial
bound and the preconditioning scales, the eigendecomposition behind the exact
input-space reduction of :meth:`lipsdp.lifting.Lifting.reduce_input`) is
O(n^3) dense linear algebra, which a GPU does far faster than the CPU for n
in the thousands (docs/performance.md).  None of it is trusted for
soundness: every bound is verified on the full LMI in float64 on the CPU.

The device is chosen per call:

- ``LIPSDP_DEVICE=cuda``: torch on CUDA (error if unavailable);
- ``LIPSDP_DEVICE=torch``: torch on the CPU (for tests of this path);
- ``LIPSDP_DEVICE=numpy``: numpy only;
- unset / ``auto``: CUDA for matrices of at least :data:`MIN_SIZE` rows when
  torch is *already imported* (loading a torch model does that) and sees a GPU,
  else numpy.  ``import lipsdp`` never imports torch just to look for a GPU.
"""

from __future__ import annotations

import os
import sys

import numpy as np

#: Smallest dimension worth a transfer to the GPU.
MIN_SIZE = 1024


def device_for(n: int) -> str:
    """``"cuda"``, ``"torch"`` (torch on the CPU) or ``"numpy"`` for an ``n x n``-sized problem."""
    choice = os.environ.get("LIPSDP_DEVICE", "auto").lower()
    if choice in ("numpy", "cuda", "torch"):
        return choice
    if n >= MIN_SIZE and "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                return "cuda"
        except Exception:  # a broken CUDA setup is not the user's Lipschitz problem
            return "numpy"
    return "numpy"


def as_tensor(A, device: str):
    """A float64 torch tensor of ``A`` on ``device`` (``"cuda"``, or the CPU for ``"torch"``)."""
    import torch

    return torch.as_tensor(np.ascontiguousarray(A, dtype=np.float64),
                           device="cuda" if device == "cuda" else "cpu")


def eigh(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric matrix, as float64 numpy arrays."""
    A = np.asarray(A, dtype=np.float64)
    dev = device_for(A.shape[0])
    if dev == "numpy":
        return np.linalg.eigh(A)
    import torch

    w, V = torch.linalg.eigh(as_tensor(A, dev))
    return w.cpu().numpy(), V.cpu().numpy()


def spectral_norm(W: np.ndarray) -> float:
    """``||W||_2`` (largest singular value) of a dense matrix."""
    W = np.asarray(W, dtype=np.float64)
    if W.size == 0:
        return 0.0
    dev = device_for(min(W.shape))
    if dev == "numpy":
        return float(np.linalg.norm(W, 2))
    import torch

    return float(torch.linalg.matrix_norm(as_tensor(W, dev), ord=2).cpu())
