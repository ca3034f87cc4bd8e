"""A small digits classifier for the ``lipsdp robustness`` tests (test_robustness_cli, test_distributed).

scikit-learn's 8x8 digits, classes 0..4 (10 pairs of classes keep the pairwise SDPs few), pixels scaled
from 0..16 to [0, 1], a 64-16-5 ReLU net trained for a few dozen full-batch Adam steps.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn


@functools.lru_cache(maxsize=None)
def digits_classifier():
    """``(model, x_test, y_test, x_raw_test)``: the trained float32 model, test inputs in [0, 1], labels, raw pixels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(n_class=5, return_X_y=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
    xt, yt = torch.tensor(x[:600] / 16.0, dtype=torch.float32), torch.tensor(y[:600])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    return model, x[600:] / 16.0, y[600:].astype(np.int64), x[600:]


def save_model_and_data(folder):
    """Write ``model.pt`` (a pickled module: needs --trust-pickle) and ``test.npz`` to ``folder``; their paths."""
    model, x, y, _ = digits_classifier()
    model_path, data_path = folder / "model.pt", folder / "test.npz"
    torch.save(model, model_path)
    np.savez(data_path, x=x, y=y)
    return model_path, data_path
