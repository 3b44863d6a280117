"""`Reversible`: exact reversal of fixed-point SGD with momentum, and its hypergradients.

* The trajectory walked backwards equals the forward one bit for bit (integer weights,
  velocities and information buffer compared exactly at every step), including across
  spills of the buffer.
* The hypergradient equals `Unrolled`'s on an inner problem whose optimizer applies the same
  rounded fixed-point updates (values from `FixedPointSGD`, derivatives those of SGD: a
  straight-through reference), for every supported scope and hyperparameter, in float64 to
  1e-8; it agrees with finite differences of the exact fixed-point forward pass; and with
  `Unrolled` on the plain float problem up to the rounding of the trajectory.
* The information buffer holds about log2(1 / momentum) bits per parameter and step.
* Everything it cannot reverse is refused with a ValueError saying why.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _tanh_net import DT, SIZES, data, initial_params, mse

import metagrad
from metagrad.hypergrad import NonFiniteLossError, Reversible, Unrolled
from metagrad.hypergrad.reversible import FixedPointSGD
from metagrad.optim import SGD, Adam
from metagrad.optim._hyper import resolve
from metagrad.optim.sgd import SGDState

T = 12
R, K = 52, 24  # Reversible's defaults


def build(scope: str, steps: int = T):
    """An inner problem of SGD with momentum whose meta-parameters have scope `scope`."""
    p0 = initial_params()
    meta = metagrad.MetaParameters()
    init = p0
    fixed: dict = {"momentum": 0.75, "weight_decay": 0.0}  # values not learned
    if scope == "scalar":
        meta.add("lr", 0.2, dtype=DT)
        meta.add("momentum", 0.7, constraint="unit", dtype=DT)
    elif scope == "per_layer":
        meta.add(
            "lr", {n: 0.2 * (1 + 0.1 * i) for i, n in enumerate(p0)}, scope="per_layer", params=p0
        )
        meta.add("momentum", 0.8, constraint="unit", scope="per_layer", params=p0)
    elif scope == "per_element":
        g = torch.Generator().manual_seed(2)
        lrs = {
            n: 0.2 * torch.exp(0.2 * torch.randn(p.shape, generator=g, dtype=DT))
            for n, p in p0.items()
        }
        mus = {n: 0.5 + 0.4 * torch.rand(p.shape, generator=g, dtype=DT) for n, p in p0.items()}
        meta.add("lr", lrs, scope="per_element", params=p0)
        meta.add("momentum", mus, constraint="unit", scope="per_element", params=p0)
    elif scope == "per_step":
        rates = torch.tensor([0.2 * (1 + 0.3 * (t % 3)) for t in range(steps)], dtype=DT)
        meta.add("lr", rates, steps=steps, dtype=DT)
        meta.add("momentum", 0.6, constraint="unit", steps=steps, dtype=DT)
    elif scope == "weight_decay":
        meta.add("lr", 0.2, dtype=DT)
        meta.add("weight_decay", 0.05, scope="per_layer", params=p0)
    elif scope == "learned_init":
        meta.add("lr", 0.2, dtype=DT)
        meta.add("init", p0, constraint=None, scope="per_element", params=p0)
        init = lambda m: m.value("init")  # noqa: E731
    elif scope == "derived":  # values computed from the meta-parameters afresh at every step
        meta.add("lr", 0.2, dtype=DT)
        meta.add("momentum", 0.7, constraint="unit", dtype=DT)
    elif scope == "module":
        meta.add("lr", 0.2, dtype=DT)
        torch.manual_seed(3)
        meta.add_module("weighting", torch.nn.Linear(SIZES[-1], 1).to(DT))
    else:
        raise ValueError(scope)
    schedule = scope == "per_step"

    def optimizer(m, t):
        values = {}
        for name in ("lr", "momentum", "weight_decay"):
            if name in m.entry_names():
                values[name] = m.value(name, step=t) if schedule else m.value(name)
            else:
                values[name] = fixed[name]
        if scope == "derived":
            values["lr"] = values["lr"] * (1 + 0.1 * (t % 3))
            values["momentum"] = values["momentum"] * (1 - 0.05 * (t % 2))
        return SGD(**values)

    def inner_loss(p, m, b):
        if scope != "module":
            return mse(p, b)
        x, y = b
        errors = (torch.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"] - y).pow(2).mean(1)
        weights = torch.nn.functional.softplus(m.value("weighting")(y)).squeeze(1)
        return (weights * errors).mean()

    def outer_loss(p, m, b):
        extra = 0.1 * m.value("weighting").weight.pow(2).sum() if scope == "module" else 0.0
        return mse(p, b) + extra

    batches, outer = data(steps)
    problem = metagrad.InnerProblem(
        init=init,
        optimizer=optimizer,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        inner_batches=batches,
        outer_batch=outer,
        steps=steps,
    )
    return problem, meta


class StraightThroughSGD:
    """SGD whose values are `FixedPointSGD`'s rounded ones and whose derivatives are SGD's.

    Each rounded quantity is `x + (rounded - x).detach()`: the value of the fixed-point run,
    the derivative of the real-number recursion at it. The momentum acts as `n / 2^k`. This is
    what `Reversible` differentiates, written as an ordinary optimizer for `Unrolled`.
    """

    def __init__(self, sgd: SGD) -> None:
        self.sgd = sgd

    def init(self, params):
        return (SGDState(0, {}), FixedPointSGD(params, R, K))

    def step(self, params, grads, state):
        sgd_state, engine = state
        hypers = engine.hypers(self.sgd)
        flat = engine.flat({n: p.detach() for n, p in params.items()})
        if isinstance(hypers.momentum, torch.Tensor):
            applied = engine.unflat(hypers.momentum)
        else:
            applied = dict.fromkeys(params, hypers.momentum)
        engine.step(hypers, flat, engine.flat({n: g.detach() for n, g in grads.items()}), 0)
        values, velocities = engine.params(), engine.velocities()
        new_params, buffers = {}, {}
        for n, p in params.items():
            lr = resolve(self.sgd.lr, "lr", n, p)
            mu = resolve(self.sgd.momentum, "momentum", n, p)
            mu = mu + (applied[n] - mu).detach() if isinstance(mu, torch.Tensor) else applied[n]
            g = grads[n] + resolve(self.sgd.weight_decay, "weight_decay", n, p) * p
            b = g if sgd_state.step == 0 else mu * sgd_state.momentum_buffer[n] + g
            b = b + (velocities[n] - b).detach()
            w = p - lr * b
            new_params[n] = w + (values[n] - w).detach()
            buffers[n] = b
        return new_params, (SGDState(sgd_state.step + 1, buffers), engine)


def straight_through(problem):
    """The same problem with `StraightThroughSGD` and the initial params on the radix."""
    init = problem.init

    def rounded(m):
        params = init(m) if callable(init) else init
        return {
            n: p + (torch.round(p.detach() * 2.0**R) * 2.0**-R - p).detach()
            for n, p in params.items()
        }

    return dataclasses.replace(
        problem,
        init=rounded,
        optimizer=lambda m, t: StraightThroughSGD(problem.optimizer(m, t)),
    )


def max_rel_err(result, ref) -> float:
    errors = []
    for name, expected in ref.grads.items():
        scale = expected.abs().max()
        assert scale > 0, f"reference gradient of {name} is zero: the check would be vacuous"
        errors.append(float((result.grads[name] - expected).abs().max() / scale))
    return max(errors)


SCOPES = [
    "scalar",
    "per_layer",
    "per_element",
    "per_step",
    "derived",
    "weight_decay",
    "learned_init",
    "module",
]


@pytest.mark.parametrize("scope", SCOPES)
def test_hypergradient_equals_unrolled_on_the_same_fixed_point_forward(scope):
    problem, meta = build(scope)
    reference = Unrolled()(straight_through(problem), meta)
    result = Reversible(R, K)(problem, meta)
    for name, p in reference.params.items():  # the same forward, bit for bit
        assert torch.equal(result.params[name], p), name
    assert max_rel_err(result, reference) < 1e-8


@pytest.mark.parametrize("scope", ["scalar", "per_layer", "weight_decay", "learned_init"])
def test_hypergradient_is_close_to_unrolled_on_the_float_problem(scope):
    # The momenta here are multiples of 2^-24 (0.75), so the fixed-point run differs from the
    # float one only by roundings of 2^-52 and the exact multiplication's error of up to
    # 0.75 * 2^-28 per step.
    problem, meta = build(scope)
    if scope in ("scalar", "per_layer"):
        with torch.no_grad():  # momenta on the 2^-24 grid: 0.75
            meta.momentum.fill_(math.log(3.0))
    assert max_rel_err(Reversible()(problem, meta), Unrolled()(problem, meta)) < 1e-7


def test_learning_rate_gradient_matches_finite_differences_of_the_fixed_point_run():
    # A fine radix (2^-52) and a coarse momentum grid (2^-8) make the fixed-point run's
    # rounding (at most momentum * 2^(8 - 52) per multiplication) far smaller than the change
    # a step of 1e-5 in the (log) learning rate causes.
    method = Reversible(radix_bits=52, momentum_bits=8)
    problem, meta = build("scalar")
    result = method(problem, meta)
    h = 1e-5
    losses = []
    for sign in (1, -1):
        with torch.no_grad():
            meta.lr.add_(sign * h)
        losses.append(float(method(problem, meta).outer_loss))
        with torch.no_grad():
            meta.lr.sub_(sign * h)
    fd = (losses[0] - losses[1]) / (2 * h)
    assert fd == pytest.approx(float(result.grads["lr"]), rel=1e-6)


def run_forward(engine, problem, meta, steps):
    """The fixed-point run; returns (weights, velocity, buffer) after every step."""
    states = [(engine.weights.clone(), engine.velocity.clone(), engine.buffer.value.clone())]
    for t in range(steps):
        hypers = engine.hypers(problem.optimizer(meta, t))
        flat = engine.float_weights()
        params = {n: p.requires_grad_() for n, p in engine.unflat(flat).items()}
        loss = problem.inner_loss(params, meta, problem.batch(t))
        grads = metagrad.inner_grads(loss, params, create_graph=False)
        engine.step(hypers, flat, engine.flat(grads), t)
        states.append((engine.weights, engine.velocity, engine.buffer.value))
    return states


@pytest.mark.parametrize("use_numpy", [True, False], ids=["numpy", "torch"])
@pytest.mark.parametrize("momentum", [0.9, 0.01], ids=["momentum-0.9", "momentum-0.01-spills"])
def test_reversed_trajectory_equals_the_forward_one_bit_for_bit(momentum, use_numpy):
    problem, meta = build("per_layer", steps=20)
    problem = dataclasses.replace(problem, optimizer=lambda m, t: SGD(lr=0.1, momentum=momentum))
    engine = FixedPointSGD(initial_params(), R, K, use_numpy=use_numpy)
    states = run_forward(engine, problem, meta, 20)
    if momentum < 0.5:  # 6.6 bits per element and step: the buffer must have spilled
        assert len(engine.buffer.spills) >= 2
    for t in reversed(range(20)):
        hypers = engine.hypers(problem.optimizer(meta, t))
        engine.reverse_weights(hypers)
        flat = engine.float_weights()
        params = {n: p.requires_grad_() for n, p in engine.unflat(flat).items()}
        loss = problem.inner_loss(params, meta, problem.batch(t))
        grads = metagrad.inner_grads(loss, params, create_graph=True)  # as the sweep does
        engine.reverse_velocity(hypers, flat, engine.flat(grads), t)
        weights, velocity, buffer = states[t]
        assert torch.equal(engine.weights, weights), t
        assert torch.equal(engine.velocity, velocity), t
        assert torch.equal(engine.buffer.value, buffer), t
    assert engine.buffer.is_empty()


def test_memory_scaling_reported_to_resource_estimates():
    # One step's graph and the fixed-point state, whatever the horizon (the application's
    # memory guard multiplies a step's graph by this).
    assert Reversible().live_steps(10) == Reversible().live_steps(100_000) == 2


def test_numpy_and_torch_kernels_compute_the_same_bits():
    problem, meta = build("per_element", steps=20)
    runs = []
    for use_numpy in (True, False):
        engine = FixedPointSGD(initial_params(), R, K, use_numpy=use_numpy)
        runs.append(run_forward(engine, problem, meta, 20))
    for a, b in zip(*runs, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_information_buffer_holds_about_log2_of_one_over_momentum_bits():
    steps = 200
    problem, _ = build("scalar", steps=1)
    meta = metagrad.MetaParameters().add("lr", 0.02, dtype=DT)
    batch = problem.batch(0)
    problem = dataclasses.replace(
        problem,
        inner_batches=lambda t: batch,
        steps=steps,
        optimizer=lambda m, t: SGD(lr=m.value("lr"), momentum=0.5),
    )
    result = Reversible()(problem, meta)
    metrics = result.metrics
    # 0.5 = 2^15 / 2^16 exactly: 1 bit per element and step is lost, and stored.
    assert metrics["reversible/lost_bits_per_param_step"] == pytest.approx(1.0)
    assert metrics["reversible/bits_per_param_step"] == pytest.approx(1.0, abs=0.05)
    # 200 bits per element are 6 spills of 32 bits plus the int64 buffer: 32 bytes, against
    # 2 float64 tensors per step for the stored trajectory (3200 bytes).
    numel = sum(p.numel() for p in initial_params().values())
    assert metrics["reversible/buffer_bytes"] <= 40 * numel
    assert metrics["reversible/trajectory_bytes"] == 2 * steps * numel * 8


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m, t: Adam(lr=0.1), "SGD with momentum only.*Adam.*MixedMode"),
        (lambda m, t: SGD(lr=0.1, momentum=0.9, nesterov=True), "Nesterov"),
        (lambda m, t: SGD(lr=0.1, momentum=0.9, dampening=0.1), "dampening"),
        (lambda m, t: SGD(lr=0.1), "without momentum cannot be reversed"),
        (lambda m, t: SGD(lr=0.1, momentum=torch.tensor(1e-9)), "rounds to 0"),
        (lambda m, t: SGD(lr=1e6, momentum=0.9), "fixed-point range"),
    ],
    ids=["adam", "nesterov", "dampening", "no-momentum", "tiny-momentum", "overflow"],
)
def test_what_cannot_be_reversed_is_refused(make, message):
    problem, meta = build("scalar")
    problem = dataclasses.replace(problem, optimizer=make)
    with pytest.raises(ValueError, match=message):
        Reversible()(problem, meta)


def test_non_finite_inner_loss_names_the_step():
    problem, meta = build("scalar")
    inner, batches = problem.inner_loss, data(T)[0]
    problem = dataclasses.replace(
        problem,
        inner_batches=list(range(T)),
        inner_loss=lambda p, m, t: inner(p, m, batches[t]) * (math.nan if t == 3 else 1.0),
    )
    with pytest.raises(NonFiniteLossError, match=rf"at inner step 3 \(of {T}\)"):
        Reversible()(problem, meta)


def test_a_loss_that_is_not_deterministic_is_detected():
    problem, meta = build("scalar")
    inner = problem.inner_loss

    def noisy(p, m, b):
        return inner(p, m, b) + 1e-3 * (p["b2"] * torch.randn(2, dtype=DT)).sum()

    problem = dataclasses.replace(problem, inner_loss=noisy)
    with pytest.raises(RuntimeError, match="did not recover the initial weights"):
        Reversible()(problem, meta)
