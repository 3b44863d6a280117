"""Hyperoptimizer stacks (`metagrad.online.Hyperoptimizer`, Chandra et al. 2022)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from metagrad.online import SGDHD, AdamHD, HyperAdam, Hyperoptimizer, HyperSGD

DTYPE = torch.float64


def make_model(seed: int = 0, dtype: torch.dtype = DTYPE) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def make_batches(n: int, seed: int = 100, dtype: torch.dtype = DTYPE):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 3, generator=g, dtype=dtype), torch.randn(8, 2, generator=g, dtype=dtype))
        for _ in range(n)
    ]


def loss_of(model, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def train(model, opt, batches) -> None:
    for batch in batches:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a, b) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b, strict=True))


# --- with every hyper-learning-rate 0 a stack is its level 0 ----------------------------------

SGD_OPTIONS = [
    dict(),
    dict(momentum=0.9),  # momentum learned (as a logit) by the level above
    dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.8, nesterov=True),
]
SGD_IDS = ["plain", "momentum", "dampening-weight_decay", "nesterov"]


ZERO_CASES = [(options, "sgd") for options in SGD_OPTIONS] + [
    (dict(momentum=0.9), "sgd-sgd"),
    (dict(momentum=0.9, dampening=0.3, weight_decay=0.01), "adam-sgd"),
]
ZERO_IDS = [f"{i}-sgd" for i in SGD_IDS] + ["momentum-sgd-sgd", "dampening-weight_decay-adam-sgd"]


@pytest.mark.parametrize("options, above", ZERO_CASES, ids=ZERO_IDS)
def test_zero_hyper_lrs_is_torch_sgd(options, above) -> None:
    uppers = {
        "sgd": [HyperSGD(lr=0.0)],
        "sgd-sgd": [HyperSGD(lr=0.0), HyperSGD(lr=0.0)],
        "adam-sgd": [HyperAdam(lr=0.0), HyperSGD(lr=0.0)],
    }[above]
    model, twin = make_model(1), make_model(1)
    opt = Hyperoptimizer(model.parameters(), levels=[HyperSGD(lr=0.05, **options), *uppers])
    ref = torch.optim.SGD(twin.parameters(), lr=0.05, foreach=False, **options)
    batches = make_batches(50)
    train(model, opt, batches)
    train(twin, ref, batches)
    assert max_diff(model.parameters(), twin.parameters()) < 1e-10
    assert opt.param_groups[0]["lr"] == 0.05
    if "momentum" in options:
        assert opt.param_groups[0]["momentum"] == pytest.approx(options["momentum"], abs=1e-15)
    # the hypergradients were there, only their step sizes were 0
    assert opt.hypergradients()[0]["lr"] != 0


@pytest.mark.parametrize(
    "weight_decay, height", [(0.0, 2), (0.01, 3)], ids=["plain-height-2", "weight_decay-height-3"]
)
def test_zero_hyper_lrs_is_torch_adam(weight_decay, height) -> None:
    model, twin = make_model(2), make_model(2)
    uppers = [HyperSGD(lr=0.0), HyperAdam(lr=0.0)][: height - 1]
    base = HyperAdam(lr=0.01, betas=(0.8, 0.99), weight_decay=weight_decay)
    opt = Hyperoptimizer(model.parameters(), levels=[base, *uppers])
    ref = torch.optim.Adam(
        twin.parameters(), lr=0.01, betas=(0.8, 0.99), weight_decay=weight_decay, foreach=False
    )
    batches = make_batches(50)
    train(model, opt, batches)
    train(twin, ref, batches)
    assert max_diff(model.parameters(), twin.parameters()) < 1e-10
    assert opt.param_groups[0]["betas"] == pytest.approx((0.8, 0.99), abs=1e-15)


@pytest.mark.parametrize(
    "level, reference",
    [
        (HyperSGD(lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, 0.05, 0.9, foreach=False)),
        (HyperAdam(lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01, foreach=False)),
    ],
    ids=["sgd", "adam"],
)
def test_height_one_is_its_optimizer(level, reference) -> None:
    model, twin = make_model(3), make_model(3)
    opt = Hyperoptimizer(model.parameters(), levels=[level])
    ref = reference(twin.parameters())
    batches = make_batches(20)
    train(model, opt, batches)
    train(twin, ref, batches)
    assert max_diff(model.parameters(), twin.parameters()) < 1e-14
    assert opt.hypergradients() == []


# --- one level over the learning rate is SGD-HD / Adam-HD -------------------------------------


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=SGD_IDS)
def test_sgd_over_sgd_lr_is_sgdhd(options) -> None:
    """The same rule: h_t = (g_t + wd theta_{t-1}) . u_{t-1}, alpha_t = alpha_{t-1} - beta h_t."""
    model, twin = make_model(4), make_model(4)
    base = HyperSGD(lr=0.05, learn=["lr"], **options)
    opt = Hyperoptimizer(model.parameters(), levels=[base, HyperSGD(lr=0.02)])
    ref = SGDHD(twin.parameters(), lr=0.05, hypergrad_lr=0.02, **options)
    for batch in make_batches(30):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            loss_of(m, batch).backward()
            o.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12)
    assert max_diff(model.parameters(), twin.parameters()) < 1e-12
    assert abs(opt.param_groups[0]["lr"] - 0.05) > 1e-3  # the learning rate did move


@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["plain", "weight_decay"])
def test_adam_over_sgd_lr_is_adamhd(weight_decay) -> None:
    model, twin = make_model(5), make_model(5)
    base = HyperAdam(lr=0.01, learn=["lr"], weight_decay=weight_decay)
    opt = Hyperoptimizer(model.parameters(), levels=[base, HyperSGD(lr=1e-3)])
    ref = AdamHD(twin.parameters(), lr=0.01, hypergrad_lr=1e-3, weight_decay=weight_decay)
    for batch in make_batches(30):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            loss_of(m, batch).backward()
            o.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12)
    assert max_diff(model.parameters(), twin.parameters()) < 1e-12
    assert abs(opt.param_groups[0]["lr"] - 0.01) > 1e-4


def test_three_sgd_levels_match_the_closed_form() -> None:
    """SGD / SGD / SGD: h0_t = -g_t . g_{t-1}, h1_t = -h0_t h0_{t-1} (exact for one step)."""
    model = make_model(6)
    alpha, kappa, lam = 0.05, 0.01, 1e-3
    opt = Hyperoptimizer(
        model.parameters(), levels=[HyperSGD(lr=alpha), HyperSGD(lr=kappa), HyperSGD(lr=lam)]
    )
    theta = params_of(model)
    g_prev, h0_prev = None, None
    for t, batch in enumerate(make_batches(15), start=1):
        opt.zero_grad()
        loss_of(model, batch).backward()
        g = [p.grad.clone() for p in model.parameters()]
        h0 = (
            None
            if g_prev is None
            else -sum(float((a * b).sum()) for a, b in zip(g, g_prev, strict=True))
        )
        h1 = None if h0 is None or h0_prev is None else -h0 * h0_prev
        if h1 is not None:
            kappa -= lam * h1
        if h0 is not None:
            alpha -= kappa * h0
        theta = [th - alpha * gi for th, gi in zip(theta, g, strict=True)]
        opt.step()
        hg = opt.hypergradients()
        if h0 is not None:
            assert hg[0]["lr"] == pytest.approx(h0, rel=1e-12), f"step {t}"
        if h1 is not None:
            assert hg[1]["lr"] == pytest.approx(h1, rel=1e-12), f"step {t}"
        else:
            assert hg[1] == {}  # level 1's first hypergradient comes at step 3
        assert opt.param_groups[0]["lr"] == pytest.approx(alpha, rel=1e-12)
        assert opt.param_groups[0]["hyper"][0]["lr"] == pytest.approx(kappa, rel=1e-12)
        assert max_diff(model.parameters(), theta) < 1e-12
        g_prev, h0_prev = g, h0
    assert kappa != 0.01 and abs(alpha - 0.05) > 1e-3


# --- hypergradients against finite differences -----------------------------------------------


def fd_stack(weight_decay: float = 0.0):
    return [
        HyperAdam(lr=0.02, betas=(0.8, 0.95), weight_decay=weight_decay),  # learns lr, betas
        HyperSGD(lr=1e-3, momentum=0.6),  # learns lr, momentum (Adam's lr, betas below)
        HyperAdam(lr=1e-3),  # top: fixed
    ]


def fresh(state, weight_decay: float = 0.0, seed: int = 7):
    model = make_model(seed)
    opt = Hyperoptimizer(model.parameters(), levels=fd_stack(weight_decay))
    model.load_state_dict(state[0])
    opt.load_state_dict(state[1])
    return model, opt


def snapshot(model, opt):
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


LEARNED = [(0, "lr"), (0, "beta1"), (0, "beta2"), (1, "lr"), (1, "momentum")]


def perturbed_step(state, level: int, name: str, delta: float, batch, weight_decay: float):
    """Resume from `state`, add `delta` to a learned value in param_groups, take one step.

    Returns the resumed model after the step and the stored value (lr itself, or the logit of
    a momentum or beta) that the written value stands for.
    """
    model, opt = fresh(state, weight_decay)
    stack = opt.levels[level]
    target = opt.param_groups[0] if level == 0 else opt.param_groups[0]["hyper"][level - 1]
    value = stack.get(target, name) + delta
    stack.put(target, name, value)
    train(model, opt, [batch])
    stored = value if name == "lr" else math.log(value / (1 - value))
    return model, stored


@pytest.mark.parametrize("steps_before", [1, 5], ids=["after-1-step", "after-5-steps"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["plain", "weight_decay"])
def test_every_hypergradient_matches_finite_differences(steps_before, weight_decay) -> None:
    """d L_{s+2} / d (value used at step s+1), with the value written into param_groups.

    The value of level k used at step s+1 is the written one plus level k+1's update, which
    does not depend on it; so perturbing the written value perturbs the value used, and the
    loss at the next step (with the L2 penalty of level 0's weight decay) responds with the
    hypergradient that the stack uses at step s+2.
    """
    s = steps_before
    batches = make_batches(s + 2, seed=11)
    model = make_model(7)
    opt = Hyperoptimizer(model.parameters(), levels=fd_stack(weight_decay))
    train(model, opt, batches[:s])
    state = snapshot(model, opt)
    train(model, opt, batches[s:])
    used = opt.hypergradients()

    def objective(model) -> float:
        with torch.no_grad():
            penalty = sum(float((p * p).sum()) for p in model.parameters())
            return float(loss_of(model, batches[s + 1])) + 0.5 * weight_decay * penalty

    for level, name in LEARNED:
        eps = 1e-6
        up, x_up = perturbed_step(state, level, name, eps, batches[s], weight_decay)
        down, x_down = perturbed_step(state, level, name, -eps, batches[s], weight_decay)
        fd = (objective(up) - objective(down)) / (x_up - x_down)
        if name not in used[level]:
            # Momentum's first step sets the buffer to the gradient, without momentum: its
            # first hypergradient comes one step later, and the loss does not depend on it.
            assert (s, level, name) == (1, 1, "momentum")
            assert abs(fd) < 1e-9
            continue
        assert used[level][name] == pytest.approx(fd, rel=1e-6, abs=1e-10), (level, name)
        assert abs(fd) > 1e-6, (level, name)  # a real dependence, not 0 == 0


def test_first_hypergradients_of_each_level_match_finite_differences() -> None:
    """From the constructor: level k's first hypergradient (at step k + 2) is d L_{k+2} / d
    (its starting value), since the levels above it have not moved it before."""
    batches = make_batches(4, seed=12)
    values = dict(alpha=0.05, kappa=0.01, lam=1e-3)

    def losses(**change) -> tuple[list[float], list[dict[str, float]]]:
        v = values | change
        model = make_model(8)
        levels = [
            HyperSGD(lr=v["alpha"]),
            HyperSGD(lr=v["kappa"]),
            HyperSGD(lr=v["lam"]),
            HyperSGD(lr=1e-4),
        ]
        opt = Hyperoptimizer(model.parameters(), levels=levels)
        out, hgs = [], []
        for batch in batches:
            opt.zero_grad()
            loss = loss_of(model, batch)
            out.append(float(loss.detach()))
            loss.backward()
            opt.step()
            hgs.append(opt.hypergradients())
        return out, hgs

    _, hgs = losses()
    for level, key in enumerate(["alpha", "kappa", "lam"]):
        eps = 1e-6  # absolute: the loss moves by about hg * eps, far above its rounding
        up, _ = losses(**{key: values[key] + eps})
        down, _ = losses(**{key: values[key] - eps})
        step = level + 2  # 1-based step of the first hypergradient of this level
        fd = (up[step - 1] - down[step - 1]) / (2 * eps)
        assert hgs[step - 1][level]["lr"] == pytest.approx(fd, rel=1e-6), key
        assert hgs[step - 2][level] == {}  # none the step before


# --- checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("at", [0, 1, 4], ids=["before-any-step", "after-1", "after-4"])
@pytest.mark.parametrize("height", [1, 2, 3])
def test_state_dict_round_trip_continues_identically(at, height) -> None:
    levels = [HyperAdam(lr=0.02), HyperSGD(lr=1e-3, momentum=0.5), HyperAdam(lr=1e-3)]
    batches = make_batches(10, seed=13)
    model = make_model(9)
    opt = Hyperoptimizer(model.parameters(), levels=levels[:height])
    train(model, opt, batches[:at])
    model_state, opt_state = snapshot(model, opt)

    clone = make_model(99)
    other = [HyperAdam(lr=0.5, betas=(0.5, 0.5)), HyperSGD(lr=1.0, momentum=0.1), HyperAdam()]
    restored = Hyperoptimizer(clone.parameters(), levels=other[:height])
    clone.load_state_dict(model_state)
    restored.load_state_dict(opt_state)
    assert restored.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    train(model, opt, batches[at:])
    train(clone, restored, batches[at:])
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)
    assert restored.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert restored.param_groups[0]["hyper"] == opt.param_groups[0]["hyper"]
    assert restored.hypergradients() == opt.hypergradients()
    if height > 1:
        assert opt.param_groups[0]["lr"] != 0.02


def test_resume_after_parameters_went_without_gradients() -> None:
    def train_partly(model, opt, batches, offset):
        for i, (x, y) in enumerate(batches, start=offset):
            opt.zero_grad()
            hidden = model[1](model[0](x))
            out = hidden[:, :2] if i % 3 == 2 else model[2](hidden)
            F.mse_loss(out, y).backward()
            opt.step()

    levels = [HyperAdam(lr=0.02), HyperSGD(lr=1e-3)]
    batches = make_batches(10, seed=14)
    model = make_model(18)
    opt = Hyperoptimizer(model.parameters(), levels=levels)
    train_partly(model, opt, batches[:4], 0)
    model_state, opt_state = snapshot(model, opt)
    clone = make_model(0)
    restored = Hyperoptimizer(clone.parameters(), levels=levels)
    clone.load_state_dict(model_state)
    restored.load_state_dict(opt_state)
    train_partly(model, opt, batches[4:], 4)
    train_partly(clone, restored, batches[4:], 4)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)
    assert restored.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 0.02


def test_load_state_dict_checks_the_levels() -> None:
    model = make_model()
    opt = Hyperoptimizer(model.parameters(), levels=[HyperSGD(lr=0.1), HyperSGD(lr=0.01)])
    state = opt.state_dict()
    other = Hyperoptimizer(model.parameters(), levels=[HyperAdam(lr=0.1), HyperSGD(lr=0.01)])
    with pytest.raises(ValueError, match="saved for levels"):
        other.load_state_dict(state)
    plain = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="no 'stack' entry"):
        opt.load_state_dict(plain)


# --- param groups, written values, memory -----------------------------------------------------


def test_param_groups_run_independent_stacks() -> None:
    """One optimizer with two groups == two optimizers, one per group, on the same loss."""
    levels = [HyperAdam(lr=0.02), HyperSGD(lr=1e-3)]
    model, twin = make_model(10), make_model(10)
    first, rest = list(model[0].parameters()), list(model[2].parameters())
    opt = Hyperoptimizer(
        [{"params": first}, {"params": rest, "lr": 0.05, "hyper": [{"lr": 1e-4}]}], levels
    )
    a = Hyperoptimizer(twin[0].parameters(), levels)
    b = Hyperoptimizer(twin[2].parameters(), [HyperAdam(lr=0.05), HyperSGD(lr=1e-4)])
    for batch in make_batches(12):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        a.zero_grad()
        b.zero_grad()
        loss_of(twin, batch).backward()
        a.step()
        b.step()
    assert max_diff(model.parameters(), twin.parameters()) < 1e-13
    assert opt.param_groups[0]["lr"] == pytest.approx(a.param_groups[0]["lr"], rel=1e-13)
    assert opt.param_groups[1]["lr"] == pytest.approx(b.param_groups[0]["lr"], rel=1e-13)
    assert opt.param_groups[1]["hyper"][0]["lr"] == pytest.approx(
        b.param_groups[0]["hyper"][0]["lr"], rel=1e-13
    )
    assert opt.param_groups[0]["lr"] != opt.param_groups[1]["lr"]


def test_written_learning_rate_takes_effect_at_the_next_step() -> None:
    model = make_model(11)
    opt = Hyperoptimizer(model.parameters(), levels=[HyperSGD(lr=0.05), HyperSGD(lr=0.0)])
    batches = make_batches(4)
    train(model, opt, batches[:2])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    before = params_of(model)
    opt.zero_grad()
    loss_of(model, batches[2]).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.step()
    scheduler.step()
    expected = [b - 0.025 * gi for b, gi in zip(before, g, strict=True)]
    assert max_diff(model.parameters(), expected) < 1e-15


def count_graph_nodes(opt: Hyperoptimizer) -> int:
    seen, todo = set(), [out.grad_fn for _, out in opt._stacks[0].outputs]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def test_graph_spans_one_step_only() -> None:
    model = make_model(12)
    levels = [HyperAdam(lr=0.01), HyperSGD(lr=1e-4, momentum=0.5), HyperAdam(lr=1e-4)]
    opt = Hyperoptimizer(model.parameters(), levels=levels)
    batches = make_batches(30)
    train(model, opt, batches[:6])
    early = count_graph_nodes(opt)
    train(model, opt, batches[6:])
    assert early > 20  # the graph of one step through three levels is there
    assert count_graph_nodes(opt) == early


# --- interface --------------------------------------------------------------------------------


def test_mappings_are_levels() -> None:
    model, twin = make_model(13), make_model(13)
    opt = Hyperoptimizer(
        model.parameters(),
        levels=[
            {"optimizer": "adam", "lr": 0.01, "betas": [0.9, 0.99]},
            {"optimizer": "sgd", "lr": 1e-3},
        ],
    )
    ref = Hyperoptimizer(twin.parameters(), levels=[HyperAdam(0.01, (0.9, 0.99)), HyperSGD(1e-3)])
    batches = make_batches(5)
    train(model, opt, batches)
    train(twin, ref, batches)
    assert max_diff(model.parameters(), twin.parameters()) == 0
    assert opt.height == 2


def test_closure_returns_the_loss() -> None:
    model = make_model(14)
    opt = Hyperoptimizer(model.parameters(), levels=[HyperSGD(lr=0.1), HyperSGD(lr=1e-3)])
    batch = make_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor)


def test_float32_parameters_keep_float64_hyperparameters() -> None:
    model = make_model(15, torch.float32)
    twin = make_model(15, torch.float32)
    opt = Hyperoptimizer(model.parameters(), levels=[HyperAdam(lr=0.01), HyperSGD(lr=0.0)])
    ref = torch.optim.Adam(twin.parameters(), lr=0.01, foreach=False)
    batches = make_batches(20, dtype=torch.float32)
    train(model, opt, batches)
    train(twin, ref, batches)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert max_diff(model.parameters(), twin.parameters()) < 1e-6
    assert opt._stacks[0].stored[0]["lr"].dtype == torch.float64


@pytest.mark.parametrize(
    "level, reference",
    [
        (HyperAdam(lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01, foreach=False)),
        (
            HyperSGD(lr=0.05, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
        ),
    ],
    ids=["adam", "sgd-momentum"],
)
def test_parameters_without_gradients_are_skipped_as_in_torch_optim(level, reference) -> None:
    """A parameter without a gradient keeps its value and state; Adam counts its own steps.

    The second layer has no gradient on every third step and the third one never: the
    stack starts with one flat unit and splits it into per-parameter units.
    """
    model, twin = make_model(16), make_model(16)
    frozen, frozen_twin = (torch.nn.Parameter(torch.ones(3, dtype=DTYPE)) for _ in range(2))
    opt = Hyperoptimizer([*model.parameters(), frozen], levels=[level, HyperSGD(lr=0.0)])
    ref = reference([*twin.parameters(), frozen_twin])
    for i, batch in enumerate(make_batches(12)):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            x, y = batch
            hidden = m[1](m[0](x))
            out = hidden[:, :2] if i % 3 == 2 else m[2](hidden)  # skip the last layer
            F.mse_loss(out, y).backward()
            o.step()
    assert max_diff(model.parameters(), twin.parameters()) < 1e-10
    assert torch.equal(frozen, torch.ones(3, dtype=DTYPE))
    assert len(opt._stacks[0].units) == 4  # split into one unit per parameter with gradients


def test_learning_from_a_poor_learning_rate() -> None:
    """Digits-like toy: SGD/SGD from lr 1e-3 ends far below SGD at 1e-3; betas move."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 10, generator=g, dtype=DTYPE)
    y = (x @ torch.randn(10, 1, generator=g, dtype=DTYPE)).squeeze(1)
    w_sgd = torch.zeros(10, dtype=DTYPE, requires_grad=True)
    w_hd = torch.zeros(10, dtype=DTYPE, requires_grad=True)
    w_adam = torch.zeros(10, dtype=DTYPE, requires_grad=True)
    sgd = torch.optim.SGD([w_sgd], lr=1e-3)
    hd = Hyperoptimizer([w_hd], levels=[HyperSGD(lr=1e-3), HyperSGD(lr=1e-3), HyperSGD(1e-6)])
    adam = Hyperoptimizer(
        [w_adam], levels=[HyperAdam(lr=1e-2), HyperSGD(lr=1e-4), HyperSGD(lr=1e-8)]
    )
    for i in range(100):
        idx = torch.arange(20 * (i % 10), 20 * (i % 10) + 20)
        for w, o in ((w_sgd, sgd), (w_hd, hd), (w_adam, adam)):
            o.zero_grad()
            ((x[idx] @ w - y[idx]) ** 2).mean().backward()
            o.step()

    def full(w):
        return float(((x @ w - y) ** 2).mean().detach())

    assert full(w_hd) < 0.1 * full(w_sgd)
    assert hd.param_groups[0]["lr"] > 1e-2
    assert adam.param_groups[0]["betas"] != (0.9, 0.999)
    assert math.isfinite(full(w_adam))


BAD = [
    ("empty", lambda p: Hyperoptimizer(p, levels=[]), r"at least one level"),
    ("not-a-list", lambda p: Hyperoptimizer(p, levels=HyperSGD()), r"expected a list of levels"),
    ("not-a-level", lambda p: Hyperoptimizer(p, levels=[torch.optim.SGD]), r"levels\[0\]"),
    (
        "mapping-without-optimizer",
        lambda p: Hyperoptimizer(p, levels=[{"lr": 0.1}]),
        r"levels\[0\]: a mapping needs 'optimizer'",
    ),
    (
        "mapping-bad-value",
        lambda p: Hyperoptimizer(p, levels=[{"optimizer": "sgd", "lr": -1}]),
        r"levels\[0\]: Invalid lr: -1",
    ),
    ("lr-nan", lambda p: HyperSGD(lr=float("nan")), r"Invalid lr: nan \(must be finite\)"),
    ("lr-inf", lambda p: HyperAdam(lr=float("inf")), r"Invalid lr: inf \(must be finite\)"),
    ("lr-negative", lambda p: HyperSGD(lr=-0.1), r"Invalid lr: -0\.1 \(must be >= 0"),
    ("lr-string", lambda p: HyperSGD(lr="0.1"), r"Invalid lr: expected a number, got str"),
    (
        "learned-momentum-zero",
        lambda p: HyperSGD(momentum=0.0, learn=["lr", "momentum"]),
        r"Invalid momentum \(learned, stored as a logit\): 0\.0 \(must be in \(0, 1\)\)",
    ),
    (
        "learned-beta-one",
        lambda p: HyperAdam(betas=(0.9, 1.0)),
        r"Invalid betas\[1\] \(learned, stored as a logit\): 1\.0",
    ),
    ("beta-out-of-range", lambda p: HyperAdam(betas=(1.5, 0.9), learn=["lr"]), r"betas\[0\]"),
    ("betas-pair", lambda p: HyperAdam(betas=(0.9,)), r"Invalid betas: expected a pair"),
    ("eps", lambda p: HyperAdam(eps=-1e-8), r"Invalid eps"),
    ("weight_decay", lambda p: HyperSGD(weight_decay=float("nan")), r"Invalid weight_decay"),
    ("dampening", lambda p: HyperSGD(dampening=2.0), r"Invalid dampening"),
    ("nesterov", lambda p: HyperSGD(nesterov=True), r"Invalid nesterov"),
    ("learn-unknown", lambda p: HyperSGD(learn=["eps"]), r"HyperSGD cannot learn \['eps'\]"),
    ("learn-string", lambda p: HyperSGD(learn="lr"), r"Invalid learn"),
    (
        "level-learns-nothing",
        lambda p: Hyperoptimizer(p, levels=[HyperSGD(learn=[]), HyperSGD()]),
        r"levels\[0\]: it learns no hyperparameters",
    ),
    (
        "group-lr",
        lambda p: Hyperoptimizer([{"params": p, "lr": float("nan")}], levels=[HyperSGD()]),
        r"Invalid param group 0 lr: nan",
    ),
    (
        "group-hyper-length",
        lambda p: Hyperoptimizer(
            [{"params": p, "hyper": [{}, {}]}], levels=[HyperSGD(), HyperSGD()]
        ),
        r"Invalid param group 0 hyper: expected a list of 1",
    ),
    (
        "group-hyper-value",
        lambda p: Hyperoptimizer(
            [{"params": p, "hyper": [{"lr": -1.0}]}], levels=[HyperSGD(), HyperSGD()]
        ),
        r"Invalid param group 0 hyper\[0\] lr: -1\.0",
    ),
]


@pytest.mark.parametrize("make, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make([torch.zeros(2, requires_grad=True)])


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("lr", float("nan"), r"Invalid param group 0 lr: nan \(must be finite\)"),
        ("betas", (0.9, 1.0), r"Invalid param group 0 betas\[1\] \(learned"),
        ("eps", -1.0, r"Invalid param group 0 eps"),
    ],
    ids=["lr-nan", "beta-one", "eps"],
)
def test_bad_written_values_raise_at_the_next_step(key, value, match) -> None:
    model = make_model(17)
    opt = Hyperoptimizer(model.parameters(), levels=[HyperAdam(lr=0.01), HyperSGD(lr=1e-3)])
    batches = make_batches(2)
    train(model, opt, batches[:1])
    opt.param_groups[0][key] = value
    opt.zero_grad()
    loss_of(model, batches[1]).backward()
    with pytest.raises(ValueError, match=match):
        opt.step()


def test_sparse_gradients_are_rejected() -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = Hyperoptimizer(emb.parameters(), levels=[HyperSGD(lr=0.1), HyperSGD(lr=1e-3)])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="does not support sparse gradients"):
        opt.step()
