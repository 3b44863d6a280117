"""Hypergradients stay finite and exact where some gradient coordinates are exactly zero.

A ReLU network with a dead hidden unit (its incoming weights, bias and outgoing weights get a
gradient of exactly 0 at every step) and a parameter the loss does not use drive the second
moment of Adam, AdamW, RMSprop and Adagrad to exactly 0 on those coordinates. The derivative of
`torch.sqrt` is infinite there; `metagrad.optim.safe_sqrt` gives 0, which is the true derivative
because those coordinates are constant near the current hyperparameters. The tests check that
the hypergradients are finite, that they match central finite differences, and that plain
`torch.sqrt` in the same place gives NaN, so the setup does exercise the problem.
"""

from __future__ import annotations

import pytest
import torch

import metagrad
import metagrad.optim as mo
from metagrad.optim import adagrad, adam, rmsprop, safe_sqrt

DTYPE = torch.float64
STEPS = 5

# (id, optimizer, fixed kwargs, differentiated scalar hyperparameters with their values)
CONFIGS = [
    ("adam", "Adam", {}, dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-3)),
    ("adam-amsgrad", "Adam", dict(amsgrad=True), dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-3)),
    ("adamw", "AdamW", {}, dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-3, weight_decay=0.1)),
    (
        "adamw-amsgrad",
        "AdamW",
        dict(amsgrad=True),
        dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-3, weight_decay=0.1),
    ),
    ("rmsprop", "RMSprop", {}, dict(lr=0.01, alpha=0.9, eps=1e-3)),
    ("rmsprop-centered", "RMSprop", dict(centered=True), dict(lr=0.01, alpha=0.9, eps=1e-3)),
    (
        "rmsprop-centered-momentum",
        "RMSprop",
        dict(centered=True),
        dict(lr=0.01, alpha=0.9, eps=1e-3, momentum=0.5),
    ),
    ("adagrad", "Adagrad", {}, dict(lr=0.1, lr_decay=0.05, eps=1e-3)),
]
IDS = [c[0] for c in CONFIGS]
PARAMS = [c[1:] for c in CONFIGS]
DEAD = {"w1": (0, slice(None)), "b1": (0,), "w2": (slice(None), 0), "unused": (slice(None),)}


def make_problem():
    g = torch.Generator().manual_seed(3)
    params = {
        "w1": torch.randn(4, 3, generator=g, dtype=DTYPE),
        "b1": torch.randn(4, generator=g, dtype=DTYPE) * 0.1,
        "w2": torch.randn(2, 4, generator=g, dtype=DTYPE),
        "b2": torch.zeros(2, dtype=DTYPE),
        "unused": torch.randn(3, generator=g, dtype=DTYPE),  # not part of the loss
    }
    params["b1"][0] = -100.0  # hidden unit 0 is dead for every input below
    batches = [
        (torch.rand(8, 3, generator=g, dtype=DTYPE), torch.randn(8, 2, generator=g, dtype=DTYPE))
        for _ in range(STEPS + 1)
    ]
    return params, batches


def loss_fn(params, x, y):
    h = torch.relu(x @ params["w1"].T + params["b1"])
    return ((h @ params["w2"].T + params["b2"] - y) ** 2).mean()


def build(name: str, flags: dict, hypers: dict):
    kwargs = dict(hypers)
    if "beta1" in kwargs:
        kwargs["betas"] = (kwargs.pop("beta1"), kwargs.pop("beta2"))
    return getattr(mo, name)(**kwargs, **flags)


def outer_loss(name, flags, hyper_names, params0, batches, *tensors):
    """Validation loss after a 5-step unroll, as a function of hyperparameters and init."""
    hypers = dict(zip(hyper_names, tensors[: len(hyper_names)], strict=True))
    params = dict(zip(params0, tensors[len(hyper_names) :], strict=True))
    opt = build(name, flags, hypers)
    state = opt.init(params)
    for x, y in batches[:STEPS]:
        grads = metagrad.inner_grads(loss_fn(params, x, y), params, create_graph=True)
        params, state = opt.step(params, grads, state)
    return loss_fn(params, *batches[STEPS])


def inputs_for(hypers: dict, params0: dict) -> tuple[torch.Tensor, ...]:
    hs = [torch.tensor(v, dtype=DTYPE, requires_grad=True) for v in hypers.values()]
    ps = [p.clone().requires_grad_() for p in params0.values()]
    return tuple(hs + ps)


def test_setup_has_exact_zero_gradients() -> None:
    params0, batches = make_problem()
    params = {n: p.clone().requires_grad_() for n, p in params0.items()}
    grads = metagrad.inner_grads(loss_fn(params, *batches[0]), params)
    for name, index in DEAD.items():
        assert torch.all(grads[name][index] == 0), name
    assert grads["w1"].abs().sum() > 0 and grads["w2"].abs().sum() > 0


@pytest.mark.parametrize("name, flags, hypers", PARAMS, ids=IDS)
def test_hypergradients_are_finite(name, flags, hypers) -> None:
    params0, batches = make_problem()
    inputs = inputs_for(hypers, params0)
    loss = outer_loss(name, flags, list(hypers), params0, batches, *inputs)
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    for g in grads:
        assert torch.isfinite(g).all()
    hyper_grads = grads[: len(hypers)]
    assert all(g != 0 for g in hyper_grads)
    init_grads = dict(zip(params0, grads[len(hypers) :], strict=True))
    for pname, index in DEAD.items():
        # The dead coordinates do not affect the loss: their meta-gradient is exactly 0.
        assert torch.all(init_grads[pname][index] == 0), pname


@pytest.mark.parametrize("name, flags, hypers", PARAMS, ids=IDS)
def test_hypergradients_match_finite_differences(name, flags, hypers) -> None:
    params0, batches = make_problem()

    def f(*tensors):
        return outer_loss(name, flags, list(hypers), params0, batches, *tensors)

    assert torch.autograd.gradcheck(f, inputs_for(hypers, params0), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name, flags, hypers", PARAMS, ids=IDS)
def test_plain_sqrt_gives_nan(name, flags, hypers, monkeypatch) -> None:
    """Control: with `torch.sqrt` in place of `safe_sqrt`, the same hypergradient is NaN."""
    for module in (adam, rmsprop, adagrad):
        monkeypatch.setattr(module, "safe_sqrt", torch.sqrt)
    params0, batches = make_problem()
    inputs = inputs_for(hypers, params0)
    loss = outer_loss(name, flags, list(hypers), params0, batches, *inputs)
    assert torch.isfinite(loss)  # the values are the same; only the derivative breaks
    lr_grad = torch.autograd.grad(loss, inputs[0])[0]
    assert torch.isnan(lr_grad)


def test_safe_sqrt_values_equal_torch_sqrt() -> None:
    x = torch.tensor([0.0, 5e-324, 1e-300, 1e-12, 0.25, 2.0, 1e10, float("inf")], dtype=DTYPE)
    assert torch.equal(safe_sqrt(x), torch.sqrt(x))
    x32 = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 10
    x32[::7] = 0
    x32[1] = 1e-45  # smallest float32 subnormal
    assert torch.equal(safe_sqrt(x32), torch.sqrt(x32))
    assert torch.isnan(safe_sqrt(torch.tensor(float("nan"))))


def test_safe_sqrt_of_negative_rounding_noise_is_zero() -> None:
    """A variance estimate s - a*a can round to a tiny negative number; it gives 0, not NaN."""
    x = torch.tensor([-1e-17, -1.0], dtype=DTYPE, requires_grad=True)
    y = safe_sqrt(x)
    assert torch.equal(y, torch.zeros(2, dtype=DTYPE))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.zeros(2, dtype=DTYPE))


def test_safe_sqrt_derivatives() -> None:
    x = torch.tensor([0.0, 0.25, 4.0], dtype=DTYPE, requires_grad=True)
    (d1,) = torch.autograd.grad(safe_sqrt(x).sum(), x, create_graph=True)
    assert torch.allclose(d1, torch.tensor([0.0, 1.0, 0.25], dtype=DTYPE))
    (d2,) = torch.autograd.grad(d1.sum(), x)
    assert torch.allclose(d2, torch.tensor([0.0, -2.0, -1 / 32], dtype=DTYPE))
    # forward mode and torch.func transforms give the same derivative
    assert torch.func.grad(safe_sqrt)(torch.tensor(0.0, dtype=DTYPE)) == 0
    _, tangent = torch.func.jvp(safe_sqrt, (x.detach(),), (torch.ones_like(x),))
    assert torch.allclose(tangent, torch.tensor([0.0, 1.0, 0.25], dtype=DTYPE))
    batched = torch.func.vmap(torch.func.grad(safe_sqrt))(x.detach())
    assert torch.allclose(batched, torch.tensor([0.0, 1.0, 0.25], dtype=DTYPE))
