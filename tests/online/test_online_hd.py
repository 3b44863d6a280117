"""Online hypergradient optimizers `SGDHD` and `AdamHD` (Baydin et al., 2018)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from metagrad.online import SGDHD, AdamHD

DTYPE = torch.float64


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    batches = [
        (torch.randn(8, 3, generator=g, dtype=DTYPE), torch.randn(8, 2, generator=g, dtype=DTYPE))
        for _ in range(6)
    ]
    return model, batches


def gradients(model, x, y) -> list[torch.Tensor]:
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float((x * y).sum()) for x, y in zip(a, b, strict=True))


# --- the update against hand-computed references ---------------------------------------------


def test_sgdhd_matches_hand_computed_reference() -> None:
    model, batches = make_problem()
    ref = [p.detach().clone() for p in model.parameters()]
    lr, beta = 0.05, 0.02
    opt = SGDHD(model.parameters(), lr=lr, hypergrad_lr=beta)
    ref_model = copy.deepcopy(model)

    u_prev = None
    for step, (x, y) in enumerate(batches):
        # reference: h_t = g_t . u_{t-1} over all params, then one lr for all of them
        with torch.no_grad():
            for p, r in zip(ref_model.parameters(), ref, strict=True):
                p.copy_(r)
        g = gradients(ref_model, x, y)
        if u_prev is not None:
            lr = lr - beta * dot(g, u_prev)
        ref = [r - lr * gi for r, gi in zip(ref, g, strict=True)]
        u_prev = [-gi for gi in g]

        gradients(model, x, y)
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12), f"step {step}"
        for p, r in zip(model.parameters(), ref, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
    assert opt.param_groups[0]["lr"] != 0.05  # the learning rate did move


def test_adamhd_matches_hand_computed_reference() -> None:
    model, batches = make_problem(1)
    ref_model = copy.deepcopy(model)
    ref = [p.detach().clone() for p in model.parameters()]
    lr, beta, (b1, b2), eps = 0.01, 1e-3, (0.9, 0.99), 1e-8
    opt = AdamHD(model.parameters(), lr=lr, hypergrad_lr=beta, betas=(b1, b2), eps=eps)

    m = [torch.zeros_like(r) for r in ref]
    v = [torch.zeros_like(r) for r in ref]
    u_prev = None
    for t, (x, y) in enumerate(batches, start=1):
        with torch.no_grad():
            for p, r in zip(ref_model.parameters(), ref, strict=True):
                p.copy_(r)
        g = gradients(ref_model, x, y)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        u = [
            -(mi / (1 - b1**t)) / (torch.sqrt(vi / (1 - b2**t)) + eps)
            for mi, vi in zip(m, v, strict=True)
        ]
        if u_prev is not None:
            lr = lr - beta * dot(g, u_prev)
        ref = [r + lr * ui for r, ui in zip(ref, u, strict=True)]
        u_prev = u

        gradients(model, x, y)
        opt.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-10), f"step {t}"
        for p, r in zip(model.parameters(), ref, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-10, atol=1e-12)
    assert opt.param_groups[0]["lr"] != 0.01


def test_one_learning_rate_for_all_params_in_a_step() -> None:
    """Every parameter moves by -lr_t * g with the same lr_t, the one in param_groups."""
    model, batches = make_problem(2)
    opt = SGDHD(model.parameters(), lr=0.05, hypergrad_lr=0.05)
    lrs = []
    for x, y in batches:
        before = [p.detach().clone() for p in model.parameters()]
        g = gradients(model, x, y)
        opt.step()
        lr = opt.param_groups[0]["lr"]
        lrs.append(lr)
        for p, b, gi in zip(model.parameters(), before, g, strict=True):
            torch.testing.assert_close(p.detach(), b - lr * gi, rtol=1e-13, atol=1e-13)
    assert len(set(lrs)) == len(lrs)  # it changed every step after the first...
    assert lrs[0] == 0.05  # ...but not on the first, which has no previous update


def test_hypergradient_is_summed_over_params_before_any_update() -> None:
    """Updating the lr inside the per-parameter loop would give a different trajectory."""
    model, batches = make_problem(3)
    opt = SGDHD(model.parameters(), lr=0.05, hypergrad_lr=0.05)
    buggy = copy.deepcopy(model)
    lr, u_prev = 0.05, None
    for x, y in batches[:3]:
        gradients(model, x, y)
        opt.step()
        g = gradients(buggy, x, y)
        with torch.no_grad():
            for i, p in enumerate(buggy.parameters()):
                if u_prev is not None:  # per-tensor update of the lr: the known bug
                    lr = lr - 0.05 * float((g[i] * u_prev[i]).sum())
                p.sub_(lr * g[i])
        u_prev = [-gi for gi in g]
    pairs = zip(model.parameters(), buggy.parameters(), strict=True)
    diff = max(float((a - b).detach().abs().max()) for a, b in pairs)
    assert diff > 1e-6


# --- drop-in behaviour -----------------------------------------------------------------------

SGD_OPTIONS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.9, nesterov=True),
]


@pytest.mark.parametrize(
    "options", SGD_OPTIONS, ids=["plain", "momentum", "dampening-weight_decay", "nesterov"]
)
def test_sgdhd_without_hypergradient_is_torch_sgd(options) -> None:
    model, batches = make_problem(4)
    twin = copy.deepcopy(model)
    opt = SGDHD(model.parameters(), lr=0.05, hypergrad_lr=0.0, **options)
    ref = torch.optim.SGD(twin.parameters(), lr=0.05, foreach=False, **options)
    for x, y in batches:
        gradients(model, x, y)
        opt.step()
        gradients(twin, x, y)
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["plain", "weight_decay"])
def test_adamhd_without_hypergradient_is_torch_adam(weight_decay) -> None:
    model, batches = make_problem(5)
    twin = copy.deepcopy(model)
    opt = AdamHD(model.parameters(), lr=0.01, hypergrad_lr=0.0, weight_decay=weight_decay)
    ref = torch.optim.Adam(twin.parameters(), lr=0.01, weight_decay=weight_decay, foreach=False)
    for x, y in batches:
        gradients(model, x, y)
        opt.step()
        gradients(twin, x, y)
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-14)


def test_closure_returns_the_loss() -> None:
    model, batches = make_problem(6)
    opt = AdamHD(model.parameters(), lr=0.01)
    x, y = batches[0]

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0


@pytest.mark.parametrize("cls", [SGDHD, AdamHD], ids=["sgdhd", "adamhd"])
def test_state_dict_round_trip(cls) -> None:
    model, batches = make_problem(7)
    kwargs = dict(lr=0.02, hypergrad_lr=0.01)
    if cls is SGDHD:
        kwargs["momentum"] = 0.9
    opt = cls(model.parameters(), **kwargs)
    for x, y in batches[:3]:
        gradients(model, x, y)
        opt.step()

    clone = copy.deepcopy(model)
    restored = cls(clone.parameters(), lr=1.0, hypergrad_lr=0.5)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 0.02
    assert restored.param_groups[0]["hypergrad_lr"] == 0.01
    for x, y in batches[3:]:
        gradients(model, x, y)
        opt.step()
        gradients(clone, x, y)
        restored.step()
    assert restored.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)


# --- multiplicative rule ---------------------------------------------------------------------


def quadratic_lrs(multiplicative: bool, hypergrad_lr: float, steps: int = 8) -> list[float]:
    """f(theta) = theta^2 / 2 from theta = 10 with lr 1.5: every step overshoots."""
    theta = torch.tensor([10.0], dtype=DTYPE, requires_grad=True)
    opt = SGDHD([theta], lr=1.5, hypergrad_lr=hypergrad_lr, multiplicative=multiplicative)
    lrs = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * theta**2).sum().backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_multiplicative_learning_rate_stays_positive() -> None:
    additive = quadratic_lrs(multiplicative=False, hypergrad_lr=1.0)
    assert min(additive) < 0  # the additive rule overshoots below zero here
    multiplicative = quadratic_lrs(multiplicative=True, hypergrad_lr=0.9)
    assert all(lr > 0 for lr in multiplicative)
    # the first adaptation: cos(g_2, u_1) = 1 on this problem, so lr * (1 - 0.9)
    assert multiplicative[1] == pytest.approx(1.5 * 0.1, rel=1e-12)
    assert multiplicative[-1] < 1.5


def test_multiplicative_adamhd_positive_on_a_network() -> None:
    model, batches = make_problem(8)
    opt = AdamHD(model.parameters(), lr=0.05, hypergrad_lr=0.99, multiplicative=True)
    for _ in range(5):
        for x, y in batches:
            gradients(model, x, y)
            opt.step()
            assert opt.param_groups[0]["lr"] > 0
            assert all(torch.isfinite(p).all() for p in model.parameters())


# --- validation ------------------------------------------------------------------------------

BAD = [
    ("sgdhd-negative-lr", lambda p: SGDHD(p, lr=-0.1), r"Invalid lr: -0\.1"),
    (
        "sgdhd-negative-hypergrad_lr",
        lambda p: SGDHD(p, hypergrad_lr=-1e-3),
        r"Invalid hypergrad_lr",
    ),
    (
        "sgdhd-multiplicative-hypergrad_lr-one",
        lambda p: SGDHD(p, hypergrad_lr=1.0, multiplicative=True),
        r"Invalid hypergrad_lr \(with multiplicative=True\): 1\.0 \(must be in \[0\.0, 1\.0\)\)",
    ),
    ("sgdhd-negative-momentum", lambda p: SGDHD(p, momentum=-0.5), r"Invalid momentum"),
    ("sgdhd-dampening", lambda p: SGDHD(p, momentum=0.9, dampening=1.5), r"Invalid dampening"),
    ("sgdhd-weight_decay", lambda p: SGDHD(p, weight_decay=-1.0), r"Invalid weight_decay"),
    ("sgdhd-nesterov", lambda p: SGDHD(p, nesterov=True), r"Invalid nesterov"),
    ("sgdhd-lr-string", lambda p: SGDHD(p, lr="0.1"), r"Invalid lr: expected a number, got str"),
    ("adamhd-negative-lr", lambda p: AdamHD(p, lr=-1.0), r"Invalid lr"),
    ("adamhd-beta1", lambda p: AdamHD(p, betas=(1.0, 0.999)), r"Invalid betas\[0\]: 1\.0"),
    ("adamhd-beta2", lambda p: AdamHD(p, betas=(0.9, -0.1)), r"Invalid betas\[1\]: -0\.1"),
    ("adamhd-betas-pair", lambda p: AdamHD(p, betas=(0.9,)), r"Invalid betas: expected a pair"),
    ("adamhd-eps", lambda p: AdamHD(p, eps=-1e-8), r"Invalid eps"),
    (
        "adamhd-multiplicative-hypergrad_lr",
        lambda p: AdamHD(p, hypergrad_lr=2.0, multiplicative=True),
        r"Invalid hypergrad_lr \(with multiplicative=True\)",
    ),
]


@pytest.mark.parametrize("make, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make([torch.zeros(2, requires_grad=True)])


def test_sparse_gradients_are_rejected() -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = SGDHD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="SGDHD does not support sparse gradients"):
        opt.step()


# --- it learns -------------------------------------------------------------------------------


def digits_training_loss(make_optimizer, epochs: int = 3, seed: int = 0) -> tuple[float, float]:
    """Training loss of an MLP 64-128-10 on digits (batch 100) after `epochs` epochs."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = make_optimizer(model.parameters())
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 99, 100):
            idx = perm[i : i + 100]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y)), opt.param_groups[0]["lr"]


def test_sgdhd_learns_faster_than_sgd_from_a_poor_learning_rate() -> None:
    sgd_loss, _ = digits_training_loss(lambda p: torch.optim.SGD(p, lr=0.001))
    hd_loss, hd_lr = digits_training_loss(lambda p: SGDHD(p, lr=0.001, hypergrad_lr=0.1))
    mult_loss, mult_lr = digits_training_loss(
        lambda p: SGDHD(p, lr=0.001, hypergrad_lr=0.5, multiplicative=True)
    )
    assert hd_lr > 0.01 and mult_lr > 0.01  # the learning rate grew from 0.001
    assert hd_loss < 0.5 * sgd_loss
    assert mult_loss < 0.5 * sgd_loss
    assert math.isfinite(hd_loss) and math.isfinite(mult_loss)


def test_adamhd_learns_faster_than_adam_from_a_poor_learning_rate() -> None:
    adam_loss, _ = digits_training_loss(lambda p: torch.optim.Adam(p, lr=1e-4))
    hd_loss, hd_lr = digits_training_loss(lambda p: AdamHD(p, lr=1e-4, hypergrad_lr=1e-5))
    assert hd_lr > 1e-3
    assert hd_loss < 0.5 * adam_loss
