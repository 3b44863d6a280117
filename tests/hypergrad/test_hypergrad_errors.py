"""Bad input to the hypergradient methods: unused meta-parameters, non-finite inner losses,
and optimizer hyperparameters given to `Implicit`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import metagrad
from metagrad.hypergrad import Implicit, NonFiniteLossError, Unrolled
from metagrad.optim import SGD, Adam

DT = torch.float64
T = 6


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(20, 3, generator=g, dtype=DT)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    return X, y


def params() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3, dtype=DT), "b": torch.zeros((), dtype=DT)}


def mse(p, batch):
    X, y = batch
    return (X @ p["w"] + p["b"] - y).pow(2).mean()


def problem(optimizer, *, inner=None, batches=None, steps=T, **kw):
    X, y = data()
    return metagrad.InnerProblem(
        init=kw.pop("init", params()),
        optimizer=optimizer,
        inner_loss=inner or (lambda p, m, b: mse(p, b) + m.value("wd") * p["w"].pow(2).sum()),
        outer_loss=lambda p, m, b: mse(p, b),
        inner_batches=batches or (lambda t: (X, y)),
        outer_batch=data(1),
        steps=steps,
        **kw,
    )


def base_meta() -> metagrad.MetaParameters:
    meta = metagrad.MetaParameters()
    meta.add("wd", 0.1, constraint="positive", dtype=DT)
    return meta


METHODS = [
    pytest.param(Unrolled(), id="unrolled"),
    pytest.param(Implicit(solver="cg", iters=10), id="implicit"),
]


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2, dtype=DT))


@pytest.mark.parametrize("method", METHODS)
def test_unused_meta_parameters_get_zero_gradients_with_a_warning(method):
    meta = base_meta()
    meta.add("ghost", 0.5, constraint="unit", dtype=DT)
    meta.add("ghost_layers", 0.2, constraint="positive", scope="per_layer", params=params())
    meta.add("ghost_elements", 1.0, constraint=None, scope="per_element", params=params())
    meta.add_module("ghost_module", Unused())
    with pytest.warns(UserWarning, match="do not affect the outer loss through") as record:
        result = method(problem(lambda m, t: SGD(lr=0.1)), meta)
    message = str(record[0].message)
    for name in ("ghost", "ghost_layers", "ghost_elements.w", "ghost_module.scale"):
        assert f"'{name}'" in message
    assert "'wd'" not in message
    named = dict(meta.named_parameters())
    assert set(result.grads) == set(named)
    for name, g in result.grads.items():
        assert g is not None and g.shape == named[name].shape and torch.isfinite(g).all()
        if name != "wd":
            assert torch.equal(g, torch.zeros_like(g))
    assert result.grads["wd"].abs() > 0
    result.apply(meta)  # zero gradients are written, not skipped
    assert all(p.grad is not None for p in meta.parameters())


def test_implicit_ignores_a_meta_parameter_reaching_only_the_initial_params():
    meta = base_meta()
    meta.add("w0", torch.ones(3, dtype=DT), constraint=None, scope="per_element",
             params={"w": torch.zeros(3, dtype=DT)})  # fmt: skip
    init = lambda m: {"w": m.value("w0")["w"], "b": torch.zeros((), dtype=DT)}  # noqa: E731
    unrolled = Unrolled()(problem(lambda m, t: SGD(lr=0.1), init=init), meta)
    assert unrolled.grads["w0.w"].abs().sum() > 0  # the unrolled run does depend on it
    with pytest.warns(UserWarning, match="'w0.w'"):
        result = Implicit(iters=10)(problem(lambda m, t: SGD(lr=0.1), init=init), meta)
    assert torch.equal(result.grads["w0.w"], torch.zeros(3, dtype=DT))


def poisoned_batches(bad_step: int, value: float):
    X, y = data()
    bad = X.clone()
    bad[0, 0] = value

    def batch(t):
        return (bad, y) if t == bad_step else (X, y)

    return batch


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_inner_loss_names_the_step(method, value):
    p = problem(lambda m, t: SGD(lr=0.1), batches=poisoned_batches(3, value))
    with pytest.raises(NonFiniteLossError, match=f"at inner step 3 \\(of {T}\\)"):
        method(p, base_meta())


@pytest.mark.parametrize("method", METHODS)
def test_diverging_inner_run_names_the_step(method):
    # A learning rate far beyond 2 / L makes the quadratic loss overflow after a few steps.
    p = problem(lambda m, t: SGD(lr=1e30), steps=50)
    with pytest.raises(NonFiniteLossError, match=r"at inner step \d+ \(of 50\)"):
        method(p, base_meta())


def test_implicit_non_finite_loss_at_the_optimum_batch():
    X, y = data()
    bad = X.clone()
    bad[1, 2] = float("nan")
    p = problem(lambda m, t: SGD(lr=0.1), implicit_batch=(bad, y))
    with pytest.raises(NonFiniteLossError, match="final params"):
        Implicit(iters=10)(p, base_meta())


def _lr_meta():
    meta = base_meta()
    meta.add("lr", 0.1, constraint="positive", dtype=DT)
    return meta, lambda m, t: SGD(lr=m.value("lr"))


def _per_layer_lr():
    meta = base_meta()
    meta.add("lr", 0.1, constraint="positive", scope="per_layer", params=params())
    return meta, lambda m, t: SGD(lr=m.value("lr"))


def _momentum():
    meta = base_meta()
    meta.add("momentum", 0.5, constraint="unit", dtype=DT)
    return meta, lambda m, t: SGD(lr=0.1, momentum=m.value("momentum"))


def _schedule():
    meta = base_meta()
    meta.add("lr", 0.1, constraint="positive", steps=T, dtype=DT)
    return meta, lambda m, t: SGD(lr=m.value("lr", step=t))


def _late_schedule():
    # The meta-parameter reaches the optimizer only in the last step.
    meta = base_meta()
    meta.add("lr", 0.1, constraint="positive", dtype=DT)
    return meta, lambda m, t: SGD(lr=m.value("lr") if t == T - 1 else 0.1)


def _optimizer_weight_decay():
    meta = base_meta()
    meta.add("decay", 0.01, constraint="positive", dtype=DT)
    return meta, lambda m, t: SGD(lr=0.1, weight_decay=m.value("decay"))


def _adam_betas():
    meta = base_meta()
    meta.add("beta1", 0.9, constraint="unit", dtype=DT)
    return meta, lambda m, t: Adam(lr=0.01, betas=(m.value("beta1"), 0.999))


@pytest.mark.parametrize(
    "build, names, args",
    [
        pytest.param(_lr_meta, ["lr"], ["lr"], id="scalar-lr"),
        pytest.param(_per_layer_lr, ["lr"], ["lr"], id="per-layer-lr"),
        pytest.param(_momentum, ["momentum"], ["momentum"], id="momentum"),
        pytest.param(_schedule, ["lr"], ["lr"], id="per-step-lr"),
        pytest.param(_late_schedule, ["lr"], ["lr"], id="lr-in-last-step-only"),
        pytest.param(_optimizer_weight_decay, ["decay"], ["weight_decay"], id="optimizer-wd"),
        pytest.param(_adam_betas, ["beta1"], ["betas"], id="adam-betas"),
    ],
)
def test_implicit_refuses_optimizer_hyperparameters(build, names, args):
    meta, optimizer = build()
    with pytest.raises(ValueError, match="inner-optimizer hyperparameters") as info:
        Implicit(iters=10)(problem(optimizer), meta)
    message = str(info.value)
    for name in names:
        assert f"'{name}'" in message
    for arg in args:
        assert arg in message
    assert "'wd'" not in message  # the inner-loss meta-parameter is fine


def test_implicit_accepts_plain_and_fixed_tensor_optimizer_hyperparameters():
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)  # requires grad, but is not meta
    result = Implicit(iters=10)(problem(lambda m, t: SGD(lr=lr, momentum=0.5)), base_meta())
    assert torch.isfinite(result.grads["wd"]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(solver="lu"), "solver", id="bad-solver"),
        pytest.param(dict(iters=0), "iters", id="zero-iters"),
        pytest.param(dict(iters=3.0), "iters", id="float-iters"),
        pytest.param(dict(damping=-1.0), "damping", id="negative-damping"),
        pytest.param(dict(step_size=0.0), "step_size", id="zero-step"),
        pytest.param(dict(tol=-1e-3), "tol", id="negative-tol"),
    ],
)
def test_implicit_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Implicit(**kwargs)


def test_implicit_outer_loss_must_be_scalar():
    p = problem(lambda m, t: SGD(lr=0.1))
    p.outer_loss = lambda prm, m, b: (b[0] @ prm["w"] - b[1]).pow(2)  # not reduced
    with pytest.raises(ValueError, match="outer_loss"):
        Implicit(iters=10)(p, base_meta())
