"""Train a small MLP on scikit-learn's digits and save it the way most users do: ``torch.save(model)``.

The model is ``nn.Sequential(Linear(64, 32), ReLU, Linear(32, 32), ReLU, Linear(32, 10))``
on 8x8 images flattened to 64 values scaled to [0, 1] (pixel / 16).  Training is
full-batch Adam with a fixed seed (a few seconds on a CPU), so the saved file
is reproducible.  Run from the repository root::

    python examples/make_example.py

and certify the result with ``lipsdp.load_network("examples/digits_mlp.pt")``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

OUT = Path(__file__).resolve().parent / "digits_mlp.pt"


def main(epochs: int = 300, seed: int = 0) -> float:
    """Train, save to ``examples/digits_mlp.pt`` and return the held-out accuracy."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # a tiny model: extra threads only add synchronisation overhead
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1500], order[1500:]

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(model(x[train]), y[train])
        loss.backward()
        optimizer.step()

    model.eval()
    with torch.no_grad():
        accuracy = float((model(x[test]).argmax(dim=1) == y[test]).float().mean())
    torch.save(model, OUT)
    return accuracy


if __name__ == "__main__":
    acc = main()
    print(f"saved {OUT.name} ({OUT.stat().st_size} bytes); held-out accuracy {acc:.3f}")
