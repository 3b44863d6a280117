"""Each differentiable optimizer follows its torch.optim twin step for step.

Every case runs 50 steps of a small tanh network in float64, once with `torch.optim` on
`nn.Parameter`s and once with `metagrad.optim` on a dict of tensors, each from its own
trajectory's gradients, and compares all parameters after every step to 1e-10 relative.
The hyperparameters are also given in every accepted form (0-d tensors, per-layer dicts with a
different value per layer, per-element tensors); torch.optim then gets one param group per layer.
"""

from __future__ import annotations

import pytest
import torch

import metagrad.optim as mo

STEPS = 50
RTOL = 1e-10
DTYPE = torch.float64

# (id, optimizer name shared by torch.optim and metagrad.optim, keyword arguments)
CASES = [
    ("sgd", "SGD", dict(lr=0.1)),
    ("sgd-momentum", "SGD", dict(lr=0.1, momentum=0.9)),
    ("sgd-momentum-dampening", "SGD", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    ("sgd-nesterov", "SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("sgd-weight_decay", "SGD", dict(lr=0.1, weight_decay=0.05)),
    (
        "sgd-momentum-dampening-weight_decay",
        "SGD",
        dict(lr=0.1, momentum=0.8, dampening=0.1, weight_decay=0.05),
    ),
    (
        "sgd-nesterov-weight_decay",
        "SGD",
        dict(lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.05),
    ),
    ("adam", "Adam", dict(lr=0.01)),
    ("adam-betas-eps", "Adam", dict(lr=0.01, betas=(0.5, 0.9), eps=0.1)),
    ("adam-weight_decay", "Adam", dict(lr=0.01, weight_decay=0.1)),
    ("adam-amsgrad", "Adam", dict(lr=0.01, amsgrad=True)),
    ("adam-amsgrad-weight_decay", "Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    ("adamw", "AdamW", dict(lr=0.01)),
    ("adamw-weight_decay", "AdamW", dict(lr=0.01, weight_decay=0.3, betas=(0.8, 0.95))),
    ("adamw-amsgrad", "AdamW", dict(lr=0.01, weight_decay=0.1, amsgrad=True, eps=1e-3)),
    ("rmsprop", "RMSprop", dict(lr=0.01)),
    ("rmsprop-alpha-eps", "RMSprop", dict(lr=0.01, alpha=0.9, eps=0.1)),
    ("rmsprop-centered", "RMSprop", dict(lr=0.01, centered=True)),
    ("rmsprop-momentum", "RMSprop", dict(lr=0.01, momentum=0.9)),
    ("rmsprop-weight_decay", "RMSprop", dict(lr=0.01, weight_decay=0.1)),
    (
        "rmsprop-centered-momentum-weight_decay",
        "RMSprop",
        dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1),
    ),
    ("adagrad", "Adagrad", dict(lr=0.1)),
    ("adagrad-lr_decay", "Adagrad", dict(lr=0.1, lr_decay=0.05)),
    ("adagrad-initial_accumulator_value", "Adagrad", dict(lr=0.1, initial_accumulator_value=0.5)),
    ("adagrad-weight_decay-eps", "Adagrad", dict(lr=0.1, weight_decay=0.1, eps=0.1)),
]

FORMS = ["float", "tensor", "per_layer", "per_element"]
# Boolean switches, as the optimizers declare them (passed as given, never in tensor forms).
FLAGS = {
    flag
    for name in mo.__all__
    if isinstance(getattr(mo, name), type) and issubclass(getattr(mo, name), mo.Optimizer)
    for flag in getattr(mo, name).flag_names()
}


def make_problem() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(5, 3, generator=g, dtype=DTYPE) * 0.7,
        "b1": torch.randn(5, generator=g, dtype=DTYPE) * 0.1,
        "w2": torch.randn(2, 5, generator=g, dtype=DTYPE) * 0.7,
        "b2": torch.randn(2, generator=g, dtype=DTYPE) * 0.1,
    }
    x = torch.randn(16, 3, generator=g, dtype=DTYPE)
    y = torch.randn(16, 2, generator=g, dtype=DTYPE)
    return params, x, y


def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ params["w1"].T + params["b1"])
    out = h @ params["w2"].T + params["b2"]
    return ((out - y) ** 2).mean()


def layer_factor(i: int) -> float:
    """A different value per layer, decreasing so that ranges such as betas < 1 still hold."""
    return 1.0 - 0.1 * i


def in_form(value, form: str, params: dict[str, torch.Tensor]):
    """`value` in metagrad's hyperparameter `form`, with per-layer values scaled per layer."""
    if isinstance(value, tuple):
        return tuple(in_form(v, form, params) for v in value)
    if form == "float":
        return value
    if form == "tensor":
        return torch.tensor(value, dtype=DTYPE)
    if form == "per_layer":
        return {n: torch.tensor(value * layer_factor(i), dtype=DTYPE) for i, n in enumerate(params)}
    if form == "per_element":
        return {
            n: torch.full_like(p, value * layer_factor(i))
            for i, (n, p) in enumerate(params.items())
        }
    raise AssertionError(form)


def torch_optimizer(name: str, kwargs: dict, form: str, modules: list[torch.nn.Parameter]):
    cls = getattr(torch.optim, name)
    if form not in ("per_layer", "per_element"):
        return cls(modules, foreach=False, **kwargs)
    groups = []
    for i, p in enumerate(modules):
        group = {"params": [p]}
        for k, v in kwargs.items():
            if k in FLAGS:
                continue
            if isinstance(v, tuple):
                group[k] = tuple(x * layer_factor(i) for x in v)
            else:
                group[k] = v * layer_factor(i)
        groups.append(group)
    # kwargs as the defaults (torch.optim checks them at construction); each group overrides.
    opt = cls(groups, foreach=False, **kwargs)
    if name == "Adagrad":
        # torch.optim.Adagrad fills its sums from the constructor's initial_accumulator_value,
        # not from the group's; start each group's sum from the group's value.
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p]["sum"].fill_(group["initial_accumulator_value"])
    return opt


def grads_at(params: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Plain gradients of the loss at `params` (no graph into the earlier steps)."""
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    grads = torch.autograd.grad(loss_fn(leaves, x, y), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-300)) for n in b)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name, kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_follows_torch_optim(name: str, kwargs: dict, form: str) -> None:
    params0, x, y = make_problem()

    # torch.optim twin on nn.Parameters
    ref = {n: torch.nn.Parameter(p.clone()) for n, p in params0.items()}
    ref_opt = torch_optimizer(name, kwargs, form, list(ref.values()))

    # metagrad on a dict of tensors
    mg_kwargs = {k: (v if k in FLAGS else in_form(v, form, params0)) for k, v in kwargs.items()}
    opt = getattr(mo, name)(**mg_kwargs)
    params = {n: p.clone() for n, p in params0.items()}
    state = opt.init(params)

    moved = 0.0
    for step in range(STEPS):
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()

        params, state = opt.step(params, grads_at(params, x, y), state)

        expected = {n: p.detach() for n, p in ref.items()}
        err = max_rel_err(params, expected)
        assert err <= RTOL, f"step {step + 1}: relative error {err:.3e}"
        moved = max(moved, max_rel_err(expected, params0))
    assert state.step == STEPS
    # The trajectory went somewhere: the comparison is not between two unchanged tensors.
    assert moved > 1e-3


def test_trajectory_check_detects_a_wrong_hyperparameter() -> None:
    """The comparison above is sharp: a 1e-6 change of the learning rate is caught."""
    params0, x, y = make_problem()
    ref = {n: torch.nn.Parameter(p.clone()) for n, p in params0.items()}
    ref_opt = torch.optim.Adam(ref.values(), lr=0.01)
    opt = mo.Adam(lr=0.01 * (1 + 1e-6))
    params = {n: p.clone() for n, p in params0.items()}
    state = opt.init(params)
    for _ in range(5):
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()
        params, state = opt.step(params, grads_at(params, x, y), state)
    assert max_rel_err(params, {n: p.detach() for n, p in ref.items()}) > RTOL
