"""Shared fixtures: small networks with known answers, and the sandwich check."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Timed or not, solver runs share this machine: keep BLAS single-threaded.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

sys.path.insert(0, str(Path(__file__).parent))

ANCHORS = Path(__file__).resolve().parents[1].parent / "shared" / "anchors"
if not ANCHORS.exists():  # CI clones main with shared/ beside it; a developer checkout has ../shared too
    ANCHORS = Path(os.environ.get("LIPSDP_ANCHORS", "/work/shared/anchors"))
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def torch_jacobians(model, x, shape=None):
    """Autograd Jacobians of the real torch model, in float64, at the rows of ``x``: ``(batch, m, n0)``.

    ``shape``: the sample shape the model takes (``x`` rows are flat).  The model is left in float32.
    """
    import torch  # numpy and torch load after the thread settings above

    xt = torch.as_tensor(x, dtype=torch.float64)
    if shape is not None:
        xt = xt.reshape((len(xt),) + tuple(shape))
    m = model.double() if hasattr(model, "double") else model
    J = torch.func.vmap(torch.func.jacrev(lambda v: m(v.unsqueeze(0)).reshape(-1)))(xt)
    if hasattr(model, "float"):
        model.float()
    return J.detach().reshape(len(xt), J.shape[1], -1).numpy()


def torch_lower_bound(model, input_dim: int, samples: int = 256, seed: int = 0, scale: float = 1.0,
                      shape=None) -> float:
    """Largest spectral norm of the autograd Jacobian of the real torch model at random inputs
    (``shape``: the sample shape the model takes, as in :func:`torch_jacobians`)."""
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(samples, input_dim, generator=gen, dtype=torch.float64)
    return float(np.linalg.norm(torch_jacobians(model, x, shape), 2, axis=(1, 2)).max())


def autograd_lower_bound(model, shape, samples=64, seed=1) -> float:
    """Largest Jacobian spectral norm of the real torch model at random inputs of sample shape ``shape``
    (the model keeps its dtype; float64 inputs)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(samples):
        x = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
        J = torch.autograd.functional.jacobian(model, x).reshape(-1, x.numel())
        best = max(best, float(torch.linalg.matrix_norm(J, 2)))
    return best


def assert_sandwich(cert, lower: float, rel: float = 1e-7):
    """``lower <= bound <= trivial`` (the sanity chain of docs/math.md §1.5)."""
    assert cert.verified, cert.message
    assert lower <= cert.bound * (1 + rel), f"UNSOUND: sampled {lower} > certified {cert.bound}"
    assert cert.bound <= cert.trivial_bound * (1 + rel), f"bound {cert.bound} above trivial {cert.trivial_bound}"


@pytest.fixture(scope="session")
def anchors():
    if not ANCHORS.exists():
        pytest.skip(f"published anchors not found at {ANCHORS}")
    return ANCHORS
