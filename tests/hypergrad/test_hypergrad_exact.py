"""Hypergradients against closed forms and hand computations, and the estimators' errors.

The quadratic inner problem `f(w) = 1/2 (w - w*)^T A (w - w*)` trained by gradient descent has
`w_T - w* = prod_t (I - eta_t A) (w_0 - w*)`, so for the outer loss `L = 1/2 |w_T - c|^2`

    dL/d eta_s = -(w_T - c)^T A prod_{t != s} (I - eta_t A) (w_0 - w*)

and with one learning rate for every step, `dL/d eta = -T (w_T - c)^T A (I - eta A)^(T-1) e_0`.
The learning rate is stored as its log, so the meta-gradient is `eta * dL/d eta`.
"""

from __future__ import annotations

import math

import pytest
import torch

import metagrad
from metagrad.hypergrad import (
    Checkpointed,
    FirstOrder,
    ForwardMode,
    MixedMode,
    NonFiniteLossError,
    Reversible,
    Truncated,
    Unrolled,
)
from metagrad.optim import SGD, Adam

DT = torch.float64
DIM = 5
T = 25
LR = 0.1


def quadratic(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=DT))
    eigenvalues = torch.linspace(0.5, 3.0, DIM, dtype=DT)
    return {
        "A": Q @ torch.diag(eigenvalues) @ Q.T,
        "w_star": torch.randn(DIM, generator=g, dtype=DT),
        "w0": torch.randn(DIM, generator=g, dtype=DT),
        "c": torch.randn(DIM, generator=g, dtype=DT),
    }


def quadratic_problem(q, optimizer, steps=T, init=None, inner_loss=None):
    def f(p, m, b):
        e = p["w"] - q["w_star"]
        return 0.5 * e @ q["A"] @ e

    return metagrad.InnerProblem(
        init=init if init is not None else {"w": q["w0"]},
        optimizer=optimizer,
        inner_loss=inner_loss or f,
        outer_loss=lambda p, m, b: 0.5 * (p["w"] - q["c"]).pow(2).sum(),
        inner_batches=list(range(steps)),
        outer_batch=None,
        steps=steps,
    )


def gd_closed_form(q, rates: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final params and dL/d eta_s for every step s, from the product formula."""
    eye = torch.eye(DIM, dtype=DT)
    factors = [eye - r * q["A"] for r in rates]
    e0 = q["w0"] - q["w_star"]
    product = torch.linalg.multi_dot(factors[::-1] + [eye])
    w_T = product @ e0 + q["w_star"]
    residual = w_T - q["c"]
    grads = []
    for s in range(len(rates)):
        others = [f for t, f in enumerate(factors) if t != s]
        rest = torch.linalg.multi_dot(others + [eye, eye]) if others else eye
        grads.append(-residual @ q["A"] @ rest @ e0)
    return w_T, torch.stack(grads)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


EXACT = [
    pytest.param(Unrolled(), id="unrolled"),
    pytest.param(Checkpointed(), id="checkpointed-default"),
    pytest.param(Checkpointed(4), id="checkpointed-4"),
    pytest.param(Checkpointed(1), id="checkpointed-1"),
    pytest.param(Checkpointed(T + 5), id="checkpointed-over-T"),
    pytest.param(ForwardMode(), id="forward-mode"),
    pytest.param(MixedMode(), id="mixed-mode-default"),
    pytest.param(MixedMode(4, hvp="forward"), id="mixed-mode-4-forward"),
    pytest.param(MixedMode(T + 5), id="mixed-mode-over-T"),
]


@pytest.mark.parametrize("method", EXACT)
def test_constant_learning_rate_matches_closed_form(method):
    q = quadratic()
    meta = metagrad.MetaParameters().add("lr", LR, dtype=DT)
    problem = quadratic_problem(q, lambda m, t: SGD(lr=m.value("lr")))
    result = method(problem, meta)

    eye = torch.eye(DIM, dtype=DT)
    e0 = q["w0"] - q["w_star"]
    w_T = torch.linalg.matrix_power(eye - LR * q["A"], T) @ e0 + q["w_star"]
    dw = -T * q["A"] @ torch.linalg.matrix_power(eye - LR * q["A"], T - 1) @ e0
    expected = LR * (w_T - q["c"]) @ dw  # d/d log(eta)
    assert rel_err(result.grads["lr"], expected) < 1e-10
    assert rel_err(result.params["w"], w_T) < 1e-12
    assert result.outer_loss == pytest.approx(float(0.5 * (w_T - q["c"]).pow(2).sum()), rel=1e-12)


@pytest.mark.parametrize("method", EXACT)
def test_learning_rate_schedule_matches_closed_form(method):
    q = quadratic(1)
    rates = [LR * (1 + 0.5 * math.sin(t)) for t in range(T)]
    meta = metagrad.MetaParameters().add("lr", torch.tensor(rates, dtype=DT), steps=T, dtype=DT)
    problem = quadratic_problem(q, lambda m, t: SGD(lr=m.value("lr", step=t)))
    result = method(problem, meta)

    w_T, grads = gd_closed_form(q, rates)
    expected = torch.tensor(rates, dtype=DT) * grads
    assert rel_err(result.grads["lr"], expected) < 1e-10
    assert rel_err(result.params["w"], w_T) < 1e-12


@pytest.mark.parametrize("k", [1, 5, 24])
def test_truncated_matches_closed_form_of_the_last_k_steps(k):
    # Only the last k steps are differentiated: e_{T-k} is a constant.
    q = quadratic()
    meta = metagrad.MetaParameters().add("lr", LR, dtype=DT)
    problem = quadratic_problem(q, lambda m, t: SGD(lr=m.value("lr")))
    result = Truncated(k)(problem, meta)

    eye = torch.eye(DIM, dtype=DT)
    M = eye - LR * q["A"]
    e0 = q["w0"] - q["w_star"]
    e_cut = torch.linalg.matrix_power(M, T - k) @ e0
    w_T = torch.linalg.matrix_power(M, k) @ e_cut + q["w_star"]
    expected = LR * (w_T - q["c"]) @ (-k * q["A"] @ torch.linalg.matrix_power(M, k - 1) @ e_cut)
    assert rel_err(result.grads["lr"], expected) < 1e-10


@pytest.mark.parametrize("k", [T, T + 10], ids=["k=T", "k>T"])
def test_truncated_with_k_at_least_T_is_unrolled_exactly(k):
    q = quadratic()
    meta = (
        metagrad.MetaParameters()
        .add("lr", LR, dtype=DT)
        .add("momentum", 0.5, constraint="unit", dtype=DT)
    )
    opt = lambda m, t: SGD(lr=m.value("lr"), momentum=m.value("momentum"))  # noqa: E731
    problem = quadratic_problem(q, opt)
    ref = Unrolled()(problem, meta)
    result = Truncated(k)(problem, meta)
    for name in ref.grads:
        assert torch.equal(result.grads[name], ref.grads[name])


def test_first_order_matches_hand_computation():
    # With the inner gradients g_t held constant, SGD with momentum
    #   b_t = mu b_{t-1} + g_t (b_0 = g_0),   w_{t+1} = w_t - eta b_t
    # gives dw_T/d eta = -sum_t b_t, dw_T/d mu = -eta sum_t db_t/d mu with
    # db_t/d mu = b_{t-1} + mu db_{t-1}/d mu, and dw_T/dw_0 = I.
    q = quadratic(2)
    steps, eta, mu = 8, 0.2, 0.6
    meta = metagrad.MetaParameters()
    meta.add("lr", eta, dtype=DT)
    meta.add("momentum", mu, constraint="unit", dtype=DT)
    meta.add("init", {"w": q["w0"]}, constraint=None, scope="per_element", params={"w": q["w0"]})
    problem = quadratic_problem(
        q,
        lambda m, t: SGD(lr=m.value("lr"), momentum=m.value("momentum")),
        steps=steps,
        init=lambda m: m.value("init"),
    )
    result = FirstOrder()(problem, meta)

    w, b, db = q["w0"].clone(), None, torch.zeros(DIM, dtype=DT)
    sum_b, sum_db = torch.zeros(DIM, dtype=DT), torch.zeros(DIM, dtype=DT)
    for t in range(steps):
        g = q["A"] @ (w - q["w_star"])
        if t == 0:
            b = g
        else:
            db = b + mu * db
            b = mu * b + g
        sum_b, sum_db = sum_b + b, sum_db + db
        w = w - eta * b
    residual = w - q["c"]
    assert rel_err(result.params["w"], w) < 1e-13
    assert rel_err(result.grads["lr"], eta * residual @ -sum_b) < 1e-12
    expected_mu = mu * (1 - mu) * residual @ (-eta * sum_db)  # d/d logit(mu)
    assert rel_err(result.grads["momentum"], expected_mu) < 1e-12
    assert rel_err(result.grads["init.w"], residual) < 1e-12


def test_first_order_differs_from_exact_on_curved_problems():
    q = quadratic()
    meta = metagrad.MetaParameters().add("lr", LR, dtype=DT)
    problem = quadratic_problem(q, lambda m, t: SGD(lr=m.value("lr")))
    first, exact = FirstOrder()(problem, meta), Unrolled()(problem, meta)
    assert torch.isfinite(first.grads["lr"]).all()
    assert rel_err(first.grads["lr"], exact.grads["lr"]) > 1e-3


ALL = [
    pytest.param(Unrolled(), id="unrolled"),
    pytest.param(Truncated(3), id="truncated"),
    pytest.param(FirstOrder(), id="first-order"),
    pytest.param(Checkpointed(2), id="checkpointed"),
    pytest.param(ForwardMode(), id="forward-mode"),
    pytest.param(MixedMode(2), id="mixed-mode"),
    pytest.param(MixedMode(2, hvp="forward"), id="mixed-mode-forward"),
]


@pytest.mark.parametrize("bad", [1, 4], ids=["early-step", "late-step"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("method", ALL)
def test_non_finite_inner_loss_names_the_step(method, value, bad):
    q = quadratic()
    meta = metagrad.MetaParameters().add("lr", LR, dtype=DT)

    def f(p, m, step):
        e = p["w"] - q["w_star"]
        return 0.5 * e @ q["A"] @ e * (value if step == bad else 1.0)

    problem = quadratic_problem(q, lambda m, t: SGD(lr=m.value("lr")), steps=6, inner_loss=f)
    with pytest.raises(NonFiniteLossError, match=rf"at inner step {bad} \(of 6\)"):
        method(problem, meta)


@pytest.mark.parametrize("method", ALL)
def test_unused_meta_parameter_gets_zero_gradient_and_a_warning(method):
    q = quadratic()
    meta = metagrad.MetaParameters().add("lr", LR, dtype=DT).add("unused", 0.3, dtype=DT)
    problem = quadratic_problem(q, lambda m, t: SGD(lr=m.value("lr")), steps=6)
    with pytest.warns(UserWarning, match="unused"):
        result = method(problem, meta)
    assert torch.equal(result.grads["unused"], torch.zeros((), dtype=DT))
    assert result.grads["lr"] != 0


@pytest.mark.parametrize("hvp", ["reverse", "forward"])
def test_mixed_mode_with_values_computed_afresh_at_every_step(hvp):
    # The optimizer's learning rate and momentum are new tensors at every step (not cached
    # meta values), and Adam's first moment depends on a learned value: the sweep must collect
    # each step's value gradients before they are pushed into the meta-parameters.
    q = quadratic()
    meta = (
        metagrad.MetaParameters()
        .add("lr", 0.05, dtype=DT)
        .add("beta1", 0.8, constraint="unit", dtype=DT)
    )

    def optimizer(m, t):
        return Adam(lr=m.value("lr") * (1 + 0.1 * t), betas=(m.value("beta1") ** (1 + t % 2), 0.99))

    problem = quadratic_problem(q, optimizer, steps=10)
    ref, result = Unrolled()(problem, meta), MixedMode(3, hvp=hvp)(problem, meta)
    for name in ref.grads:
        assert rel_err(result.grads[name], ref.grads[name]) < 1e-10


def test_forward_mode_refuses_too_many_directions():
    q = quadratic()
    meta = metagrad.MetaParameters().add("lr", LR, steps=T, dtype=DT)
    problem = quadratic_problem(q, lambda m, t: SGD(lr=m.value("lr", step=t)))
    with pytest.raises(ValueError, match=r"have 25 scalars.*max_directions=10.*Unrolled"):
        ForwardMode(max_directions=10)(problem, meta)


def test_forward_mode_with_adam_matches_unrolled_on_quadratic():
    q = quadratic()
    meta = (
        metagrad.MetaParameters()
        .add("lr", 0.05, dtype=DT)
        .add("beta1", 0.8, constraint="unit", dtype=DT)
    )
    opt = lambda m, t: Adam(lr=m.value("lr"), betas=(m.value("beta1"), 0.99))  # noqa: E731
    problem = quadratic_problem(q, opt, steps=10)
    ref, result = Unrolled()(problem, meta), ForwardMode()(problem, meta)
    for name in ref.grads:
        assert rel_err(result.grads[name], ref.grads[name]) < 1e-10


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Truncated(0), "Invalid k"),
        (lambda: Truncated(2.5), "Invalid k"),
        (lambda: Checkpointed(0), "Invalid segment"),
        (lambda: Checkpointed(True), "Invalid segment"),
        (lambda: ForwardMode(0), "Invalid max_directions"),
        (lambda: ForwardMode(max_directions="8"), "Invalid max_directions"),
        (lambda: MixedMode(0), "Invalid segment"),
        (lambda: MixedMode(hvp="jvp"), "Invalid hvp"),
        (lambda: Reversible(radix_bits=4), "Invalid radix_bits"),
        (lambda: Reversible(radix_bits=60), "Invalid radix_bits"),
        (lambda: Reversible(momentum_bits=0), "Invalid momentum_bits"),
        (lambda: Reversible(momentum_bits=30), "Invalid momentum_bits"),
    ],
    ids=[
        "truncated-0",
        "truncated-float",
        "segment-0",
        "segment-bool",
        "fm-0",
        "fm-str",
        "mixed-segment-0",
        "mixed-hvp",
        "radix-small",
        "radix-large",
        "momentum-bits-0",
        "momentum-bits-large",
    ],
)
def test_invalid_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("method", [Checkpointed, MixedMode])
def test_default_segment_is_about_sqrt_T(method):
    assert method().segment_for(100) == 10
    assert method().segment_for(1000) == 32
    assert method().segment_for(1) == 1
    assert method(50).segment_for(7) == 7


def test_mixed_mode_memory_scaling_counts_boundaries_saved_steps_and_one_graph():
    assert MixedMode().live_steps(100) == 10 + 10 + 1
    assert MixedMode(4).live_steps(10) == 4 + 3 + 1


def test_reuse_values_caches_per_block_and_grad_mode():
    p = {"w": torch.zeros(3, dtype=DT), "b": torch.zeros((), dtype=DT)}
    meta = metagrad.MetaParameters().add("lr", LR, scope="per_layer", params=p, dtype=DT)
    meta.add("sched", 0.5, constraint="unit", steps=4, dtype=DT)
    assert meta.value("lr")["w"] is not meta.value("lr")["w"]
    with meta.reuse_values():
        first = meta.value("lr")
        assert meta.value("lr")["w"] is first["w"]
        assert meta.value("lr") is not first  # a fresh dict each time: callers may edit it
        assert meta.value("sched", step=1) is meta.value("sched", step=1)
        assert meta.value("sched", step=1) is not meta.value("sched", step=2)
        with torch.no_grad():
            untracked = meta.value("lr")["w"]
        assert untracked is not first["w"] and not untracked.requires_grad
        with meta.reuse_values():  # a nested block starts empty and restores the outer one
            assert meta.value("lr")["w"] is not first["w"]
        assert meta.value("lr")["w"] is first["w"]
    assert meta.value("lr")["w"] is not first["w"]


def test_inner_loop_reads_meta_values_once_per_run():
    q = quadratic()
    meta = metagrad.MetaParameters().add("lr", LR, dtype=DT)
    reads = []

    def optimizer(m, t):
        reads.append(m.value("lr"))
        return SGD(lr=reads[-1])

    Unrolled()(quadratic_problem(q, optimizer, steps=5), meta)
    # reads[0] builds the initial optimizer state; then one shared value for the 5 steps
    assert len(reads) == 6 and all(r is reads[1] for r in reads[1:])
