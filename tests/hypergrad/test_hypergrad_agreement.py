"""The exact estimators agree with each other on a small MLP; the biased ones differ.

Inner loop: a 3-5-2 tanh MLP trained for T = 7 steps by SGD with momentum or by Adam, float64.
Meta-parameters in every scope: scalar, per layer, per element, per step, a learned
initialization, and a module (a learned weighting of the inner loss, also read by the outer
loss). `Unrolled` is the reference; `Checkpointed` with segments that divide T and
that do not, of 1 and of at least T, `ForwardMode` and `MixedMode` (both ways of forming its
Hessian-vector products) must match it to 1e-8. `MixedMode` must also match it for every other
optimizer and option: SGD with Nesterov momentum and weight decay, Adam with AMSGrad, AdamW,
centered RMSprop with momentum, and Adagrad with a learned initial accumulator (optimizer state
built from a meta-parameter).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from _tanh_net import DT, SIZES, data, initial_params, mse

import metagrad
from metagrad.hypergrad import (
    Checkpointed,
    FirstOrder,
    ForwardMode,
    MixedMode,
    Truncated,
    Unrolled,
)
from metagrad.optim import SGD, Adagrad, Adam, AdamW, RMSprop

T = 7


# name -> (learning rate, second meta-parameter and its constraint, optimizer from (lr, second),
# optimizer from lr alone (when the scope learns only the learning rate))
SPECS = {
    "sgd": (
        0.2,
        ("momentum", "unit"),
        lambda lr, x: SGD(lr=lr, momentum=x),
        lambda lr: SGD(lr=lr, momentum=0.5),
    ),
    "adam": (
        0.05,
        ("beta1", "unit"),
        lambda lr, x: Adam(lr=lr, betas=(x, 0.99)),
        lambda lr: Adam(lr=lr),
    ),
    "sgd_nesterov_wd": (
        0.2,
        ("momentum", "unit"),
        lambda lr, x: SGD(lr=lr, momentum=x, nesterov=True, weight_decay=0.01),
        lambda lr: SGD(lr=lr, momentum=0.5, nesterov=True, weight_decay=0.01),
    ),
    "adam_amsgrad": (
        0.05,
        ("beta1", "unit"),
        lambda lr, x: Adam(lr=lr, betas=(x, 0.99), amsgrad=True),
        lambda lr: Adam(lr=lr, amsgrad=True),
    ),
    "adamw": (
        0.05,
        ("weight_decay", "positive"),
        lambda lr, x: AdamW(lr=lr, betas=(0.8, 0.99), weight_decay=x),
        lambda lr: AdamW(lr=lr, betas=(0.8, 0.99), weight_decay=0.05),
    ),
    "rmsprop_centered": (
        0.01,
        ("momentum", "unit"),
        lambda lr, x: RMSprop(lr=lr, alpha=0.9, momentum=x, centered=True),
        lambda lr: RMSprop(lr=lr, alpha=0.9, momentum=0.5, centered=True),
    ),
    "adagrad": (
        0.1,
        ("initial_accumulator_value", "positive"),
        lambda lr, x: Adagrad(lr=lr, lr_decay=0.01, initial_accumulator_value=x),
        lambda lr: Adagrad(lr=lr, lr_decay=0.01),
    ),
}


def build(optimizer: str, scope: str):
    """Meta-parameters of `scope` for `optimizer` (a key of SPECS)."""
    p0 = initial_params()
    meta = metagrad.MetaParameters()
    lr, (second, constraint), with_second, lr_only = SPECS[optimizer]
    start = 0.05 if constraint == "positive" else 0.7  # the second meta-parameter's value
    step_arg = False
    init = p0
    if scope == "scalar":
        meta.add("lr", lr, dtype=DT)
        meta.add(second, start, constraint=constraint, dtype=DT)
    elif scope == "per_layer":
        meta.add(
            "lr", {n: lr * (1 + 0.1 * i) for i, n in enumerate(p0)}, scope="per_layer", params=p0
        )
        meta.add(second, start, constraint=constraint, scope="per_layer", params=p0)
    elif scope == "per_element":
        g = torch.Generator().manual_seed(2)
        values = {
            n: lr * torch.exp(0.2 * torch.randn(p.shape, generator=g, dtype=DT))
            for n, p in p0.items()
        }
        meta.add("lr", values, scope="per_element", params=p0)
    elif scope == "per_step":
        rates = torch.tensor([lr * (1 + 0.3 * (t % 3)) for t in range(T)], dtype=DT)
        meta.add("lr", rates, steps=T, dtype=DT)
        value = 0.6 if constraint == "unit" else 0.04
        meta.add(second, value, constraint=constraint, steps=T, dtype=DT)
        step_arg = True
    elif scope == "module":
        # A learned per-example weighting of the inner loss; the outer loss also reads it
        # directly (a penalty on its weights), so both paths are exercised.
        meta.add("lr", lr, dtype=DT)
        torch.manual_seed(3)
        meta.add_module("weighting", torch.nn.Linear(SIZES[-1], 1).to(DT))
    elif scope == "learned_init":
        meta.add("lr", lr, dtype=DT)
        meta.add("init", p0, constraint=None, scope="per_element", params=p0)
        init = lambda m: m.value("init")  # noqa: E731
    else:
        raise ValueError(scope)

    def make_optimizer(m, t):
        step = {"step": t} if step_arg else {}
        rate = m.value("lr", **step)
        if second not in m.entry_names():
            return lr_only(rate)
        return with_second(rate, m.value(second, **step))

    def inner_loss(p, m, b):
        if scope != "module":
            return mse(p, b)
        x, y = b
        errors = (torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y).pow(2).mean(1)
        weights = torch.nn.functional.softplus(m.value("weighting")(y)).squeeze(1)
        return (weights * errors).mean()

    def outer_loss(p, m, b):
        if scope != "module":
            return mse(p, b)
        return mse(p, b) + 0.1 * m.value("weighting").weight.pow(2).sum()

    batches, outer = data(T)
    problem = metagrad.InnerProblem(
        init=init,
        optimizer=make_optimizer,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        inner_batches=batches,
        outer_batch=outer,
        steps=T,
    )
    return problem, meta


@functools.cache
def reference(optimizer: str, scope: str):
    problem, meta = build(optimizer, scope)
    return Unrolled()(problem, meta)


OPTIMIZERS = ["sgd", "adam"]
MORE_OPTIMIZERS = ["sgd_nesterov_wd", "adam_amsgrad", "adamw", "rmsprop_centered", "adagrad"]
SCOPES = ["scalar", "per_layer", "per_element", "per_step", "learned_init", "module"]
EXACT = [
    pytest.param(Checkpointed(), id="checkpointed-default"),  # round(sqrt(7)) = 3
    pytest.param(Checkpointed(1), id="checkpointed-1"),
    pytest.param(Checkpointed(2), id="checkpointed-2"),
    pytest.param(Checkpointed(4), id="checkpointed-4"),
    pytest.param(Checkpointed(T), id="checkpointed-T"),
    pytest.param(Checkpointed(T + 3), id="checkpointed-over-T"),
    pytest.param(ForwardMode(max_directions=64), id="forward-mode"),
    pytest.param(MixedMode(), id="mixed-mode-default"),  # reverse over reverse, segment 3
    pytest.param(MixedMode(1, hvp="forward"), id="mixed-mode-1-forward"),
    pytest.param(MixedMode(4, hvp="forward"), id="mixed-mode-4-forward"),
    pytest.param(MixedMode(T + 3), id="mixed-mode-over-T"),
]
MIXED = [
    pytest.param(MixedMode(2, hvp="forward"), id="mixed-mode-2-forward"),
    pytest.param(MixedMode(3), id="mixed-mode-3"),
]


def assert_agree(result, ref, tol):
    assert ref.grads.keys() == result.grads.keys()
    for name, expected in ref.grads.items():
        got = result.grads[name]
        scale = expected.abs().max()
        assert scale > 0, f"reference gradient of {name} is zero: the check would be vacuous"
        assert (got - expected).abs().max() <= tol * scale, name


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_exact_methods_agree_with_unrolled(optimizer, scope, method):
    problem, meta = build(optimizer, scope)
    ref = reference(optimizer, scope)
    result = method(problem, meta)
    assert_agree(result, ref, 1e-8)
    assert result.outer_loss == pytest.approx(float(ref.outer_loss), rel=1e-12)
    for name, p in ref.params.items():
        torch.testing.assert_close(result.params[name], p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", MIXED)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("optimizer", MORE_OPTIMIZERS)
def test_mixed_mode_agrees_with_unrolled_for_every_optimizer(optimizer, scope, method):
    problem, meta = build(optimizer, scope)
    ref = reference(optimizer, scope)
    result = method(problem, meta)
    assert_agree(result, ref, 1e-8)
    assert result.outer_loss == pytest.approx(float(ref.outer_loss), rel=1e-12)
    for name, p in ref.params.items():
        torch.testing.assert_close(result.params[name], p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_truncated_with_k_equal_to_T_is_unrolled(optimizer, scope):
    problem, meta = build(optimizer, scope)
    result, ref = Truncated(T)(problem, meta), reference(optimizer, scope)
    for name, g in ref.grads.items():
        assert torch.equal(result.grads[name], g), name


BIASED = [pytest.param(Truncated(2), id="truncated-2"), pytest.param(FirstOrder(), id="fo")]


@pytest.mark.parametrize("method", BIASED)
@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_biased_methods_are_finite_and_differ(optimizer, scope, method):
    problem, meta = build(optimizer, scope)
    ref = reference(optimizer, scope)
    with warnings.catch_warnings():
        # Truncated drops the learned init's influence (it acts before the last k steps):
        # its gradient is zero with the usual warning, which this test does not look at.
        warnings.simplefilter("ignore", UserWarning)
        result = method(problem, meta)
    assert result.is_finite()
    gap = max(
        float((result.grads[n] - g).abs().max() / g.abs().max()) for n, g in ref.grads.items()
    )
    assert gap > 1e-4
    assert result.outer_loss == pytest.approx(float(ref.outer_loss), rel=1e-12)


@pytest.mark.parametrize("method", [Checkpointed(2), MixedMode(2)], ids=["checkpointed", "mixed"])
def test_segmented_methods_report_their_segment_and_return_detached_params(method):
    problem, meta = build("sgd", "scalar")
    result = method(problem, meta)
    assert all(p.grad_fn is None and not p.requires_grad for p in result.params.values())
    assert result.metrics["hypergrad/segment"] == 2
