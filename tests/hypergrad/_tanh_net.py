"""A small float64 tanh network and its data, shared by the estimator agreement tests."""

from __future__ import annotations

import torch

DT = torch.float64
SIZES = (3, 5, 2)


def data(steps: int):
    """`steps` noisy inner batches of one regression set, and an outer batch."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, SIZES[0], generator=g, dtype=DT)
    Y = torch.randn(16, SIZES[-1], generator=g, dtype=DT)
    batches = [(X + 0.1 * torch.randn(X.shape, generator=g, dtype=DT), Y) for _ in range(steps)]
    outer = (torch.randn(10, SIZES[0], generator=g, dtype=DT), torch.randn(10, 2, generator=g))
    return batches, (outer[0], outer[1].to(DT))


def initial_params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "w1": torch.randn(SIZES[0], SIZES[1], generator=g, dtype=DT) * 0.6,
        "b1": torch.randn(SIZES[1], generator=g, dtype=DT) * 0.1,
        "w2": torch.randn(SIZES[1], SIZES[2], generator=g, dtype=DT) * 0.6,
        "b2": torch.zeros(SIZES[2], dtype=DT),
    }


def mse(p, batch):
    x, y = batch
    return (torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y).pow(2).mean()
