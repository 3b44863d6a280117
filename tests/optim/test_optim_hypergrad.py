"""Exact hypergradients through a 5-step unroll of every optimizer, and pure steps.

`torch.autograd.gradcheck` (float64, central differences) compares the Jacobian of the final
parameters with respect to each hyperparameter of each optimizer, in scalar (0-d tensor),
per-layer (dict of 0-d tensors) and per-element (dict of tensors shaped like the params) form.
The inner gradients come from `metagrad.inner_grads(..., create_graph=True)` on a small tanh
network, so the second-order terms of the loss are part of what is checked.
"""

from __future__ import annotations

import pytest
import torch

import metagrad
import metagrad.optim as mo

DTYPE = torch.float64
STEPS = 5
GRADCHECK = dict(eps=1e-6, atol=1e-8, rtol=1e-6)

# (id, optimizer, base hyperparameters, flags). Values are away from range limits so that the
# central differences (step 1e-6) stay valid; eps is checked both small-ish and far from tiny.
CONFIGS = [
    ("sgd", "SGD", dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.05), {}),
    ("sgd-nesterov", "SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.05), dict(nesterov=True)),
    ("adam", "Adam", dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05), {}),
    ("adam-eps0.1", "Adam", dict(lr=0.05, betas=(0.8, 0.95), eps=0.1, weight_decay=0.05), {}),
    (
        "adam-amsgrad",
        "Adam",
        dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.05),
        dict(amsgrad=True),
    ),
    ("adamw", "AdamW", dict(lr=0.05, betas=(0.8, 0.95), eps=1e-3, weight_decay=0.2), {}),
    (
        "adamw-amsgrad-eps0.1",
        "AdamW",
        dict(lr=0.05, betas=(0.8, 0.95), eps=0.1, weight_decay=0.2),
        dict(amsgrad=True),
    ),
    (
        "rmsprop-centered-momentum",
        "RMSprop",
        dict(lr=0.02, alpha=0.9, eps=1e-3, weight_decay=0.05, momentum=0.5),
        dict(centered=True),
    ),
    ("rmsprop-eps0.1", "RMSprop", dict(lr=0.02, alpha=0.9, eps=0.1, weight_decay=0.05), {}),
    (
        "adagrad",
        "Adagrad",
        dict(lr=0.1, lr_decay=0.05, weight_decay=0.05, initial_accumulator_value=0.1, eps=1e-3),
        {},
    ),
    (
        "adagrad-eps0.1",
        "Adagrad",
        dict(lr=0.1, lr_decay=0.05, weight_decay=0.05, initial_accumulator_value=0.1, eps=0.1),
        {},
    ),
]
FORMS = ["scalar", "per_layer", "per_element"]

HYPER_CASES = [
    pytest.param(name, base, flags, hyper, form, id=f"{cid}-{hyper}-{form}")
    for cid, name, base, flags in CONFIGS
    for hyper in base
    for form in FORMS
]


def make_problem() -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    params = {
        "w1": torch.randn(3, 2, generator=g, dtype=DTYPE),
        "b1": torch.randn(3, generator=g, dtype=DTYPE) * 0.1,
        "w2": torch.randn(1, 3, generator=g, dtype=DTYPE),
        "b2": torch.randn(1, generator=g, dtype=DTYPE) * 0.1,
    }
    batches = [
        (torch.randn(8, 2, generator=g, dtype=DTYPE), torch.randn(8, 1, generator=g, dtype=DTYPE))
        for _ in range(STEPS)
    ]
    return params, batches


def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ params["w1"].T + params["b1"])
    out = h @ params["w2"].T + params["b2"]
    return ((out - y) ** 2).mean()


def unroll(opt, params0, batches, create_graph: bool = True) -> torch.Tensor:
    """Final params of a differentiable unroll, flattened into one vector."""
    params = dict(params0)
    state = opt.init(params)
    for x, y in batches:
        grads = metagrad.inner_grads(loss_fn(params, x, y), params, create_graph=create_graph)
        params, state = opt.step(params, grads, state)
    return torch.cat([p.reshape(-1) for p in params.values()])


def leaves(params0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.clone().requires_grad_() for n, p in params0.items()}


def hyper_inputs(value: float, form: str, params: dict[str, torch.Tensor], seed: int):
    """Leaf tensors for one hyperparameter in `form`, and a function rebuilding the value."""
    names = list(params)
    if form == "scalar":
        return [torch.tensor(value, dtype=DTYPE, requires_grad=True)], lambda ts: ts[0]
    g = torch.Generator().manual_seed(seed)
    if form == "per_layer":
        # A different value per layer, in [0.9, 1] times the base value.
        factors = 0.9 + 0.1 * torch.rand(len(names), generator=g, dtype=DTYPE)
        ts = [(value * f).clone().requires_grad_() for f in factors]
    else:
        ts = [
            (value * (0.9 + 0.1 * torch.rand(p.shape, generator=g, dtype=DTYPE))).requires_grad_()
            for p in params.values()
        ]
    return ts, lambda t: dict(zip(names, t, strict=True))


@pytest.mark.parametrize("name, base, flags, hyper, form", HYPER_CASES)
def test_unroll_gradcheck_hyperparameter(name, base, flags, hyper, form) -> None:
    params0, batches = make_problem()
    if hyper == "betas":
        in1, make1 = hyper_inputs(base["betas"][0], form, params0, seed=2)
        in2, make2 = hyper_inputs(base["betas"][1], form, params0, seed=3)
        inputs = in1 + in2
        k = len(in1)

        def build(ts):
            return (make1(ts[:k]), make2(ts[k:]))

    else:
        inputs, build = hyper_inputs(base[hyper], form, params0, seed=4)

    def f(*ts):
        opt = getattr(mo, name)(**{**base, **flags, hyper: build(list(ts))})
        return unroll(opt, leaves(params0), batches)

    assert torch.autograd.gradcheck(f, tuple(inputs), **GRADCHECK)


def test_unroll_gradcheck_betas_as_one_tensor() -> None:
    """Betas given as a single tensor of shape (2,) are differentiable too."""
    params0, batches = make_problem()
    betas = torch.tensor([0.8, 0.95], dtype=DTYPE, requires_grad=True)

    def f(b):
        return unroll(mo.Adam(lr=0.05, betas=b, eps=1e-3), leaves(params0), batches)

    assert torch.autograd.gradcheck(f, (betas,), **GRADCHECK)


@pytest.mark.parametrize("name, base, flags", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_unroll_gradcheck_initial_params(name, base, flags) -> None:
    """The MAML path: final params with respect to the initial params."""
    params0, batches = make_problem()
    opt = getattr(mo, name)(**base, **flags)
    names = list(params0)

    def f(*ps):
        return unroll(opt, dict(zip(names, ps, strict=True)), batches)

    inputs = tuple(p.clone().requires_grad_() for p in params0.values())
    assert torch.autograd.gradcheck(f, inputs, **GRADCHECK)


@pytest.mark.parametrize(
    "name, hyper", [("SGD", "lr"), ("Adam", "eps")], ids=["sgd-lr", "adam-eps"]
)
def test_gradcheck_fails_without_second_order_terms(name, hyper) -> None:
    """The check is sensitive: dropping create_graph (first-order gradients) is detected."""
    params0, batches = make_problem()
    base = {"SGD": dict(lr=0.1, momentum=0.9), "Adam": dict(lr=0.05, eps=0.1)}[name]
    h = torch.tensor(base[hyper], dtype=DTYPE, requires_grad=True)

    def f(t):
        opt = getattr(mo, name)(**{**base, hyper: t})
        return unroll(opt, leaves(params0), batches, create_graph=False)

    assert not torch.autograd.gradcheck(f, (h,), raise_exception=False, **GRADCHECK)


def _all_tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _all_tensors(v)]
    if isinstance(tree, tuple):
        return [t for v in tree for t in _all_tensors(v)]
    return []


@pytest.mark.parametrize("name, base, flags", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
def test_step_leaves_inputs_unchanged(name, base, flags, requires_grad) -> None:
    """`step` is pure: params, grads and state keep their values and version counters."""
    params0, batches = make_problem()
    lr = torch.tensor(base["lr"], dtype=DTYPE, requires_grad=requires_grad)
    opt = getattr(mo, name)(**{**base, **flags, "lr": lr})
    params = {n: p.clone().requires_grad_(requires_grad) for n, p in params0.items()}
    state = opt.init(params)
    for step, (x, y) in enumerate(batches[:3]):
        p_leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        grads = dict(
            zip(
                params,
                torch.autograd.grad(loss_fn(p_leaves, x, y), list(p_leaves.values())),
                strict=True,
            )
        )
        inputs = _all_tensors(params) + _all_tensors(grads) + _all_tensors(state)
        if step > 0:
            assert _all_tensors(state), "the state holds tensors after the first step"
        before = [(t.detach().clone(), t._version) for t in inputs]
        new_params, new_state = opt.step(params, grads, state)
        for t, (value, version) in zip(inputs, before, strict=True):
            assert t._version == version
            assert torch.equal(t.detach(), value)
        assert all(new_params[n] is not params[n] for n in params)
        assert new_state.step == state.step + 1
        params, state = new_params, new_state


@pytest.mark.parametrize("name, base, flags", [c[1:] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def test_float32_params_with_float64_tensor_hyperparameters(name, base, flags) -> None:
    """0-d hyperparameter tensors of another dtype work and keep the params' dtype."""
    params0, batches = make_problem()
    hypers = {
        k: tuple(torch.tensor(b, dtype=DTYPE) for b in v)
        if isinstance(v, tuple)
        else torch.tensor(v, dtype=DTYPE, requires_grad=True)
        for k, v in base.items()
    }
    opt = getattr(mo, name)(**hypers, **flags)
    params = {n: p.float().requires_grad_() for n, p in params0.items()}
    state = opt.init(params)
    for x, y in batches[:2]:
        grads = metagrad.inner_grads(loss_fn(params, x.float(), y.float()), params)
        params, state = opt.step(params, grads, state)
    assert all(p.dtype == torch.float32 for p in params.values())
    (lr_grad,) = torch.autograd.grad(sum(p.sum() for p in params.values()), hypers["lr"])
    assert torch.isfinite(lr_grad) and lr_grad != 0
