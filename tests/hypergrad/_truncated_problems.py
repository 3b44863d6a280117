"""Small float64 inner problems shared by the online truncated-training tests."""

from __future__ import annotations

import torch

import metagrad
from metagrad.optim import SGD, Adam

DT = torch.float64


def quadratic(steps: int, *, dim: int = 3, seed: int = 0):
    """A linear dynamical system whose losses are quadratic in the meta-parameter `theta`.

    Inner loss 0.5 (w - theta - b_t)' H (w - theta - b_t), SGD with momentum 0.5 (plain
    numbers), outer loss 0.5 |w - c|^2. Every iterate is affine in theta, so every outer loss
    is quadratic in the values theta takes in each truncation: Gaussian smoothing leaves its
    gradient unchanged, and PES is unbiased for the exact gradient.

    Returns:
        (problem factory `make(steps)`, meta) with `theta` per element (free, stored as is).
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=DT)
    h = a @ a.T / dim + 0.5 * torch.eye(dim, dtype=DT)
    shifts = torch.randn(steps, dim, generator=g, dtype=DT) * 0.3
    target = torch.randn(dim, generator=g, dtype=DT)

    def inner(p, m, b):
        r = p["w"] - m.value("theta")["w"] - b
        return 0.5 * (r @ h @ r)

    def make(horizon: int = steps) -> metagrad.InnerProblem:
        return metagrad.InnerProblem(
            init={"w": torch.zeros(dim, dtype=DT)},
            optimizer=lambda m, t: SGD(lr=0.3, momentum=0.5),
            inner_loss=inner,
            outer_loss=lambda p, m, b: 0.5 * (p["w"] - target).pow(2).sum(),
            inner_batches=shifts,
            outer_batch=None,
            steps=horizon,
        )

    meta = metagrad.MetaParameters()
    zeros = {"w": torch.zeros(dim, dtype=DT)}
    meta.add("theta", 0.0, constraint=None, scope="per_element", params=zeros)
    return make, meta


def mlp(steps: int, *, optimizer: str = "adam", learned_init: bool = True, seed: int = 0):
    """A 3-5-2 tanh MLP regression with learned optimizer hyperparameters (and init).

    Meta-parameters: per-layer learning rates, a momentum-like value (SGD's momentum or
    Adam's beta1), and, with `learned_init`, the initial weights of the first layer.

    Returns:
        (problem, meta).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randn(12, 2, generator=g, dtype=DT)
    p0 = {
        "w1": torch.randn(3, 5, generator=g, dtype=DT) * 0.6,
        "b1": torch.zeros(5, dtype=DT),
        "w2": torch.randn(5, 2, generator=g, dtype=DT) * 0.6,
    }
    # drawn last, so that a shorter horizon gives a prefix of the same problem
    batches = [x + 0.1 * torch.randn(x.shape, generator=g, dtype=DT) for _ in range(steps)]

    def loss(p, inputs):
        return (torch.tanh(inputs @ p["w1"] + p["b1"]) @ p["w2"] - y).pow(2).mean()

    meta = metagrad.MetaParameters()
    lr = 0.2 if optimizer == "sgd" else 0.05
    meta.add("lr", lr, scope="per_layer", params=p0)
    meta.add("mom", 0.6, constraint="unit", dtype=DT)
    if learned_init:
        first = {"w1": p0["w1"]}
        meta.add("init", first, constraint=None, scope="per_element", params=first)

    def build(m, t):
        if optimizer == "sgd":
            return SGD(lr=m.value("lr"), momentum=m.value("mom"))
        return Adam(lr=m.value("lr"), betas=(m.value("mom"), 0.99))

    def init(m):
        return {**p0, **m.value("init")} if learned_init else p0

    problem = metagrad.InnerProblem(
        init=init,
        optimizer=build,
        inner_loss=lambda p, m, b: loss(p, b),
        outer_loss=lambda p, m, b: loss(p, x),
        inner_batches=batches,
        outer_batch=None,
        steps=steps,
    )
    return problem, meta
